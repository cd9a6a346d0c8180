"""The policy file (optimizer/policy.py): strict reading, matching, precedence, comments;
exempt jobs in the problem format and the capping LP; the snapshot with a resolver."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from agent.simfleet import SimFleet
from dcenergy.errors import InputError
from dcenergy.store.embedded import EmbeddedStore
from optimizer.capping import solve_capping
from optimizer.policy import (
    JobPolicy,
    SchedulerPolicy,
    load_policy,
    parse_comment,
    parse_policy,
)
from optimizer.problem import parse_problem, problem_to_json
from optimizer.report import render_report
from optimizer.snapshot import build_problem
from optimizer.topology import single_domain

POLICY: dict[str, Any] = {
    "version": 1,
    "comment": "free text for people",
    "defaults": {"allowed_slowdown": 0.1},
    "rules": [
        {"name": "interactive", "match": {"partition": "interactive"}, "exempt": True},
        {"match": {"qos": ["high", "urgent"]}, "weight": 4, "allowed_slowdown": 0.02},
        {"match": {"account": "ml-*"}, "allowed_slowdown": 0.2, "migration_cost_wh": 500},
        {"match": {"comment.class": "critical"}, "exempt": True},
        {"match": {"scheduler": "kubernetes", "namespace": "prod"}, "weight": 2},
        {"match": {"label.team": "search"}, "pinned": True},
    ],
    "job_comment": {"key": "dcenergy", "allow": ["weight", "slowdown"], "weight_max": 3},
    "consolidation": {"horizon_h": 12, "nodes": {"gpu-1": {"may_power_down": True}}},
}


def _policy(**changes: Any) -> Any:
    return parse_policy({**POLICY, **changes}, "policy.json")


def test_example_reads_and_matches_partition_qos_account_comment_and_labels() -> None:
    p = _policy()
    assert p.resolve({"partition": "interactive"}, 0.1).exempt
    high = p.resolve({"partition": "gpu", "qos": "urgent"}, 0.1)
    assert (high.weight, high.allowed_slowdown, high.exempt) == (4.0, 0.02, False)
    ml = p.resolve({"account": "ml-vision"}, 0.1)
    assert ml.allowed_slowdown == 0.2 and ml.migration_cost_wh == 500
    assert p.resolve({"comment": "dcenergy:class=critical"}, 0.1).exempt
    k8s = p.resolve({"scheduler": "kubernetes", "namespace": "prod", "label.team": "search"}, 0.1)
    assert k8s.weight == 2 and k8s.pinned
    assert p.consolidation is not None and p.consolidation.may_power_down_node("gpu-1")
    assert not p.consolidation.may_power_down_node("gpu-2")


def test_first_matching_rule_decides_a_field_and_the_comment_overrides_allowed_fields() -> None:
    p = _policy()
    both = p.resolve({"qos": "high", "account": "ml-x"}, 0.1)
    assert both.allowed_slowdown == 0.02  # rules[1] before rules[2]
    assert both.migration_cost_wh == 500  # rules[2] still sets what rules[1] did not
    own = p.resolve({"qos": "high", "comment": "nightly; dcenergy:weight=2,slowdown=0.05"}, 0.1)
    assert (own.weight, own.allowed_slowdown) == (2.0, 0.05)
    assert own.sources == {"weight": "comment", "allowed_slowdown": "comment"}


def test_comment_values_users_cannot_have_are_ignored_and_named() -> None:
    p = _policy()
    jp = p.resolve({"comment": "dcenergy:weight=10,slowdown=abc,exempt=1"}, 0.1)
    assert (jp.weight, jp.allowed_slowdown, jp.exempt) == (1.0, 0.1, False)
    text = jp.describe()
    assert "weight=10 ignored (above job_comment.weight_max 3)" in text
    assert "slowdown=abc ignored (not a number)" in text
    assert "exempt=1 ignored (not in job_comment.allow)" in text


def test_rules_match_comment_keys_without_a_job_comment_section() -> None:
    p = parse_policy({k: v for k, v in POLICY.items() if k != "job_comment"}, "p")
    jp = p.resolve({"comment": "dcenergy:class=critical,weight=2"}, 0.1)
    assert jp.exempt and jp.weight == 1.0  # matched, but the comment itself sets nothing


def test_defaults_and_unknown_jobs() -> None:
    p = _policy()
    jp = p.resolve(None, 0.15)
    assert (jp.weight, jp.allowed_slowdown) == (1.0, 0.1)  # the file's defaults beat config
    assert jp.describe() == "defaults: allowed_slowdown=0.1 (job unknown to the scheduler)"
    bare = parse_policy({"version": 1}, "p").resolve({"partition": "x"}, 0.15)
    assert (bare.allowed_slowdown, bare.describe()) == (0.15, "default")


def test_describe_names_the_rule() -> None:
    jp = _policy().resolve({"partition": "interactive"}, 0.1)
    assert jp.describe() == (
        "defaults: allowed_slowdown=0.1; rules[0] interactive (partition=interactive): exempt=yes"
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("dcenergy:weight=2,slowdown=0.05", {"weight": "2", "slowdown": "0.05"}),
        ("nightly run; dcenergy:exempt", {"exempt": "true"}),
        ("a b dcenergy:class=critical c", {"class": "critical"}),
        ("xdcenergy:weight=2", {}),
        ("", {}),
    ],
)
def test_parse_comment(text: str, expected: dict[str, str]) -> None:
    assert parse_comment(text) == expected


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda d: d.update(version=2), "version"),
        (lambda d: d.update(rule=[]), "rule"),
        (lambda d: d["rules"][0].update(exmept=True), "rules[0].exmept"),
        (lambda d: d["rules"][1]["match"].update(partiton="x"), "rules[1].match.partiton"),
        (lambda d: d["rules"][1].update(match={}), "rules[1].match"),
        (lambda d: d["rules"][1].update(match={"qos": []}), "rules[1].match.qos"),
        (lambda d: d["rules"][1].update(weight=0), "rules[1].weight"),
        (lambda d: d["rules"][1].update(allowed_slowdown=1.0), "rules[1].allowed_slowdown"),
        (lambda d: d["rules"][0].update(exempt="yes"), "rules[0].exempt"),
        (lambda d: d["rules"].append({"match": {"qos": "x"}}), "rules[6]"),
        (lambda d: d["defaults"].update(weight=-1), "defaults.weight"),
        (lambda d: d["job_comment"].update(allow=["exmpt"]), "job_comment.allow"),
        (lambda d: d["job_comment"].update(key="a b"), "job_comment.key"),
        (lambda d: d["consolidation"].update(horizon_h=0), "consolidation.horizon_h"),
        (
            lambda d: d["consolidation"]["nodes"]["gpu-1"].update(may=True),
            "consolidation.nodes.gpu-1.may",
        ),
        (lambda d: d.update(slurm={"cache_ttl": 5}), "slurm.cache_ttl"),
        (lambda d: d["consolidation"].update(drain_reason="power"), "consolidation.drain_reason"),
    ],
)
def test_bad_fields_are_one_error_naming_the_json_path(mutate: Any, field: str) -> None:
    doc = json.loads(json.dumps(POLICY))
    mutate(doc)
    with pytest.raises(InputError) as e:
        parse_policy(doc, "policy.json")
    assert e.value.field == field
    assert e.value.exit_code == 65
    assert "\n" not in e.value.message


def test_file_is_read_strictly(tmp_path: Path) -> None:
    f = tmp_path / "policy.json"
    f.write_text('{"version": 1, "version": 1}')
    with pytest.raises(InputError, match="duplicate key"):
        load_policy(f)
    f.write_text('{"version": 1, "defaults": {"weight": NaN}}')
    with pytest.raises(InputError, match="NaN"):
        load_policy(f)


class _Facts:
    def __init__(self, facts: Mapping[str, Mapping[str, str]], fail: bool = False) -> None:
        self.known = facts
        self.fail = fail
        self.calls = 0

    def facts(self, job_ids: Sequence[str]) -> Mapping[str, Mapping[str, str]]:
        self.calls += 1
        if self.fail:
            raise RuntimeError("slurmctld down")
        return {j: self.known[j] for j in job_ids if j in self.known}


def test_scheduler_down_leaves_defaults_and_says_why() -> None:
    r = SchedulerPolicy(_policy(), _Facts({}, fail=True), default_slowdown=0.1)
    out = r.resolve(["1", "2"])
    assert all(not jp.known for jp in out.values())
    assert "slurmctld down" in r.last_error


# --- exempt in the problem format and the LP ---------------------------------------------


def _problem_doc(exempt: bool) -> dict[str, Any]:
    gpus = [
        {"id": f"g{i}", "host": "h", "model": "H100", "min_w": 200, "max_w": 700,
         "default_w": 700, "idle_w": 70, "domains": ["d"]}
        for i in range(4)
    ]  # fmt: skip
    jobs = [
        {
            "id": f"j{i}",
            "gpus": [f"g{i}"],
            **({"exempt": True, "policy": "rules[0] interactive"} if exempt and i == 0 else {}),
            "samples": [
                {"cap_w": c, "throughput": 100 * (c / 700) ** 0.5} for c in (300, 500, 700)
            ],
        }
        for i in range(4)
    ]
    return {
        "version": 1,
        "gpus": gpus,
        "domains": [{"id": "d", "budget_w": 2000}],
        "jobs": jobs,
        "objective": {"kind": "budget"},
    }


@pytest.mark.parametrize("method", ["lp", "auto"])
def test_exempt_job_is_fixed_load_at_its_default_cap(method: str) -> None:
    p = parse_problem(_problem_doc(exempt=True))
    r = solve_capping(p, method)  # type: ignore[arg-type]
    caps = r.caps_w
    assert caps["g0"] == pytest.approx(700)
    assert sum(caps.values()) <= 2000 + 1e-6  # the others make room for it
    assert "j0" not in r.slowdown_exceeded
    free = solve_capping(parse_problem(_problem_doc(exempt=False)), method)  # type: ignore[arg-type]
    assert free.caps_w["g0"] < 700


def test_exempt_and_policy_round_trip_and_show_in_the_report() -> None:
    p = parse_problem(_problem_doc(exempt=True))
    assert parse_problem(problem_to_json(p)) == p
    assert p.jobs[0].exempt and p.jobs[0].policy == "rules[0] interactive"
    from optimizer.plan import make_plan

    text = render_report(p, make_plan(p, solve_capping(p, "lp")))
    line = next(x for x in text.splitlines() if x.startswith("j0 "))
    assert "exempt" in line and "rules[0] interactive" in line
    with pytest.raises(InputError, match=r"jobs\[0\].exempt"):
        parse_problem(
            {**_problem_doc(True), "jobs": [{**_problem_doc(True)["jobs"][0], "exempt": 1}]}
        )


# --- the snapshot with a resolver ------------------------------------------------------------


class _Resolver:
    def __init__(self, decided: Mapping[str, JobPolicy]) -> None:
        self.decided = decided
        self.asked: list[str] = []

    def resolve(self, job_ids: Sequence[str]) -> Mapping[str, JobPolicy]:
        self.asked = list(job_ids)
        return {j: self.decided.get(j, JobPolicy()) for j in job_ids}


def test_build_problem_takes_weight_slowdown_exempt_and_source_from_the_resolver(
    tmp_path: Path,
) -> None:
    store = EmbeddedStore(tmp_path / "s.sqlite")
    start = time.time_ns() - int(300e9)
    with SimFleet(1, 4, store=store, state_root=tmp_path / "st", start_ns=start) as fleet:
        fleet.run(290)
        fleet.flush()
    plain = build_problem(
        store, single_domain(5000), now_ns=start + int(300e9), window_s=300,
        objective={"kind": "budget"}, allowed_slowdown=0.1,
    )  # fmt: skip
    job = plain["jobs"][0]["id"]
    assert "policy" not in plain["jobs"][0]
    pol = _policy().resolve({"partition": "interactive", "qos": "high"}, 0.1)
    resolver = _Resolver({job: pol})
    doc = build_problem(
        store, single_domain(5000), now_ns=start + int(300e9), window_s=300,
        objective={"kind": "budget"}, allowed_slowdown=0.1, policy=resolver,
    )  # fmt: skip
    store.close()
    assert resolver.asked == [j["id"] for j in plain["jobs"]]
    mine = next(j for j in doc["jobs"] if j["id"] == job)
    assert mine["exempt"] is True and mine["weight"] == 4.0 and mine["allowed_slowdown"] == 0.02
    assert "rules[0] interactive" in mine["policy"]
    others = [j for j in doc["jobs"] if j["id"] != job]
    assert all(j["policy"] == "default" and "exempt" not in j for j in others)
    parse_problem(doc, "<telemetry>")
