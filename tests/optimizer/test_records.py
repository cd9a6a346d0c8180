"""``plan`` / ``plan_domain`` records of a plan: names per the schema, values from the plan."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from dcenergy import schema
from dcenergy.cli.plan_cmd import publish_plan
from dcenergy.config import load_config
from dcenergy.plan import generate_keypair
from dcenergy.schema import Point
from dcenergy.store.embedded import EmbeddedStore
from optimizer.capping import solve_capping
from optimizer.plan import Plan, make_plan, plan_to_json
from optimizer.problem import Problem, load_problem
from optimizer.records import plan_points

EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "examples" / "problem.json"
NOW = 1_700_000_000_000_000_000


@pytest.fixture(scope="module")
def example() -> tuple[Problem, Plan]:
    problem = load_problem(EXAMPLE)
    plan = make_plan(problem, solve_capping(problem), created_ns=NOW - 10, plan_id="p-1")
    return problem, plan


def _split(points: list[Point]) -> tuple[Point, dict[str, Point]]:
    plans = [p for p in points if p.measurement == schema.PLAN.name]
    domains = {p.tags[schema.TAG_DOMAIN]: p for p in points if p.measurement == "plan_domain"}
    assert len(plans) == 1 and len(points) == 1 + len(domains)
    return plans[0], domains


def _check_schema(p: Point) -> None:
    m = schema.MEASUREMENTS[p.measurement]
    assert set(p.tags) == set(m.tags)
    assert all(isinstance(v, str) and v for v in p.tags.values())
    for name, value in p.fields.items():
        spec = m.spec(name)  # KeyError for an undeclared field
        assert isinstance(value, spec.kind), (name, value)
        assert spec.kind is bool or not isinstance(value, bool), (name, value)


def test_plan_point_carries_the_plan_figures(example: tuple[Problem, Plan]) -> None:
    problem, plan = example
    points = plan_points(plan, NOW, problem=problem)
    for p in points:
        _check_schema(p)
        assert p.time_ns == NOW
    top, _ = _split(points)
    assert top.tags == {"objective": problem.objective.kind}
    f = top.fields
    assert set(f) == set(schema.PLAN.field_names)  # every field present with a problem
    assert f["plan_id"] == "p-1"
    assert f["status"] == plan.solver.status
    assert f["solve_s"] == pytest.approx(plan.solver.time_s)
    assert f["power_before_w"] == pytest.approx(plan.before.fleet_power_w)
    assert f["power_after_w"] == pytest.approx(plan.after.fleet_power_w)
    assert f["savings_w"] == pytest.approx(plan.before.fleet_power_w - plan.after.fleet_power_w)
    assert f["throughput_before"] == pytest.approx(plan.baselines["none"].throughput)
    assert f["throughput_after"] == pytest.approx(plan.baselines["optimized"].throughput)
    defaults = {g.id: g.default_w for g in problem.gpus}
    capped = sum(s.power_limit_w < defaults[s.gpu] - 0.5 for s in plan.setpoints)
    assert capped > 0  # the example's budgets bind: the count is not trivially zero
    assert f["gpus_capped"] == capped


def test_one_domain_point_per_domain_with_budget_and_shadow_price(
    example: tuple[Problem, Plan],
) -> None:
    problem, plan = example
    _, domains = _split(plan_points(plan, NOW, problem=problem))
    assert set(domains) == {d.id for d in problem.domains}
    for d in problem.domains:
        f = domains[d.id].fields
        assert f["plan_id"] == "p-1"
        assert f["budget_w"] == pytest.approx(d.budget_w)
        assert f["before_w"] == pytest.approx(plan.before.domain_power_w[d.id])
        assert f["planned_w"] == pytest.approx(plan.after.domain_power_w[d.id])
        if d.id in plan.shadow_prices:
            assert f["shadow_price_per_kw"] == pytest.approx(plan.shadow_prices[d.id])
        else:
            assert "shadow_price_per_kw" not in f
    assert any("shadow_price_per_kw" in p.fields for p in domains.values())


def test_domain_points_carry_measured_power_and_mark_the_outermost(
    example: tuple[Problem, Plan],
) -> None:
    problem, plan = example
    # every GPU of the example reads 100 W except one, whose domains then have no measured_w
    gpus = [dataclasses.replace(g, current_w=100.0) for g in problem.gpus]
    silent = gpus[-1]
    gpus[-1] = dataclasses.replace(silent, current_w=None)
    measured = dataclasses.replace(problem, gpus=tuple(gpus))
    _, domains = _split(plan_points(plan, NOW, problem=measured))
    for d in problem.domains:
        f = domains[d.id].fields
        members = [g for g in problem.gpus if d.id in g.domains]
        if d.id in silent.domains:
            assert "measured_w" not in f  # a partial sum would read as headroom
        else:
            assert f["measured_w"] == pytest.approx(d.baseline_w + 100.0 * len(members))
        assert f["outermost"] is (len(members) == len(problem.gpus))
    assert sum(p.fields["outermost"] for p in domains.values()) >= 1
    assert any("measured_w" in p.fields for p in domains.values())
    # without the problem neither is known
    _, bare = _split(plan_points(plan, NOW))
    assert not any({"measured_w", "outermost"} & set(p.fields) for p in bare.values())


def test_the_json_dict_gives_the_same_points(example: tuple[Problem, Plan]) -> None:
    problem, plan = example
    assert plan_points(plan_to_json(plan), NOW, problem=problem) == plan_points(
        plan, NOW, problem=problem
    )


def test_without_the_problem_budget_and_capped_count_are_absent_not_zero(
    example: tuple[Problem, Plan],
) -> None:
    _, plan = example
    top, domains = _split(plan_points(plan_to_json(plan), NOW))
    assert "gpus_capped" not in top.fields
    assert top.fields["power_before_w"] == pytest.approx(plan.before.fleet_power_w)
    assert domains and all("budget_w" not in p.fields for p in domains.values())
    assert all("planned_w" in p.fields for p in domains.values())


def test_budgets_and_default_caps_can_be_given_without_the_problem() -> None:
    doc: dict[str, Any] = {
        "plan_id": "x",
        "setpoints": [
            {"gpu": "a", "host": "h", "power_limit_w": 300.0},
            {"gpu": "b", "host": "h", "power_limit_w": 699.8},  # the default, rounded
            {"gpu": "c", "host": "h", "power_limit_w": 500.0},
        ],
        "predictions": {
            "before": {"fleet_power_w": 2000.0, "domain_power_w": {"rack": 2100.0}},
            "after": {"fleet_power_w": 1500.0, "domain_power_w": {"rack": 1600.0}},
        },
    }
    top, domains = _split(
        plan_points(
            doc,
            NOW,
            budgets={"rack": 1600.0, "row": 9000.0},
            default_caps={"a": 700.0, "b": 700.0, "c": 700.0},
        )
    )
    assert top.fields["gpus_capped"] == 2
    assert top.fields["savings_w"] == 500.0
    assert domains["rack"].fields["budget_w"] == 1600.0
    assert domains["row"].fields == {"plan_id": "x", "budget_w": 9000.0}


def test_a_minimal_plan_gives_a_plan_point_and_no_domains() -> None:
    doc = {"plan_id": "cli-1", "created_ns": 1, "expires_ns": 2, "setpoints": []}
    points = plan_points(doc, NOW)
    assert len(points) == 1
    (p,) = points
    _check_schema(p)
    assert p.tags == {"objective": "unknown"}
    assert p.fields == {"plan_id": "cli-1"}


# --- publishing writes the records ---------------------------------------------------------


def test_publish_plan_writes_the_records_next_to_the_parts(
    tmp_path: Path, example: tuple[Problem, Plan], capsys: pytest.CaptureFixture[str]
) -> None:
    problem, plan = example
    generate_keypair(tmp_path / "plan.key", tmp_path / "plan.pub")
    cfg_file = tmp_path / "dcenergy.toml"
    cfg_file.write_text(f'[optimizer]\nsigning_key = "{tmp_path / "plan.key"}"\n')
    cfg = load_config(cfg_file, env={})
    store = EmbeddedStore(tmp_path / "store.sqlite")
    try:
        doc = plan_to_json(plan)
        assert publish_plan(cfg, doc, store=store, dry_run=True, now_ns=NOW) == []
        assert store.count() == 0  # a dry run writes no parts and no records

        signed = publish_plan(cfg, doc, store=store, problem=problem, now_ns=NOW)
        assert store.count(schema.PLAN_PART.name) == len(signed) > 0
        written = store.read(schema.PLAN.name, start_ns=NOW) + store.read(
            schema.PLAN_DOMAIN.name, start_ns=NOW
        )
        assert sorted(written, key=Point.series_key) == sorted(
            plan_points(plan, NOW, problem=problem), key=Point.series_key
        )

        # ``dcenergy apply`` has only the plan: the records come without budgets
        publish_plan(cfg, doc, store=store, now_ns=NOW + 1)
        later = store.read(schema.PLAN_DOMAIN.name, start_ns=NOW + 1)
        assert later and all("budget_w" not in p.fields for p in later)
    finally:
        store.close()
    assert "published plan" in capsys.readouterr().out
