"""``dcenergy optimize`` (problem file, no store) and ``dcenergy recommend`` (from a store)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from agent.simfleet import SimFleet
from dcenergy.cli import main
from dcenergy.errors import EX_CONFIG, EX_DATAERR, EX_INFEASIBLE
from dcenergy.store.embedded import EmbeddedStore
from optimizer.plan import load_plan

DOCS = Path(__file__).parents[1] / "docs" / "examples"


def run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    rc = main(args)
    out, err = capsys.readouterr()
    return rc, out, err


def test_optimize_example_prints_report_and_writes_a_valid_plan(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plan_file = tmp_path / "plan.json"
    rc, out, _ = run(["optimize", str(DOCS / "problem.json"), "-o", str(plan_file)], capsys)
    assert rc == 0
    assert "Domains" in out and "Jobs" in out and "Policies compared" in out
    plan = load_plan(plan_file)
    assert len(plan.setpoints) == 16
    assert plan.solver.feasible
    assert plan.after.fleet_power_w <= plan.before.fleet_power_w


def test_optimize_json_is_the_plan(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(["optimize", str(DOCS / "problem.json"), "--json", "--method", "lp"], capsys)
    assert rc == 0
    doc = json.loads(out)
    assert doc["solver"]["method"] == "lp"
    assert {sp["gpu"] for sp in doc["setpoints"]}


def _problem(tmp_path: Path, mutate: Any) -> Path:
    doc = json.loads((DOCS / "problem.json").read_text())
    mutate(doc)
    p = tmp_path / "problem.json"
    p.write_text(json.dumps(doc))
    return p


def test_malformed_problem_exits_65_naming_the_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    p = _problem(tmp_path, lambda d: d["gpus"][2].update(max_w=-1))
    rc, _, err = run(["optimize", str(p)], capsys)
    assert rc == EX_DATAERR
    assert "gpus[2].max_w" in err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) <= 2


def test_missing_problem_file_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, _, err = run(["optimize", str(tmp_path / "nope.json")], capsys)
    assert rc != 0
    assert "nope.json" in err and "Traceback" not in err


def test_consolidation_section_is_solved_and_reported(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    node = {
        "gpus": 8,
        "mem_per_gpu_gb": 80,
        "node_idle_w": 700,
        "gpu_idle_w": 70,
        "gpu_active_w_per_util": 600,
        "may_power_down": True,
    }
    section = {
        "horizon_h": 24,
        "price_per_kwh": 0.1,
        "pue": 1.2,
        "carbon_g_per_kwh": 300,
        "nodes": [{"id": "n1", **node}, {"id": "n2", **node}],
        "jobs": [
            {"id": "a", "gpus": 2, "mem_per_gpu_gb": 40, "util": 0.5, "node": "n1"},
            {"id": "b", "gpus": 2, "mem_per_gpu_gb": 40, "util": 0.5, "node": "n2"},
        ],
    }
    p = _problem(tmp_path, lambda d: d.update(consolidation=section))
    rc, out, _ = run(["optimize", str(p), "-o", str(tmp_path / "plan.json")], capsys)
    assert rc == 0
    assert "Consolidation" in out and "1 nodes" in out
    plan = load_plan(tmp_path / "plan.json")
    assert plan.consolidation is not None
    assert len(plan.consolidation["nodes_freed"]) == 1


def test_bad_consolidation_field_names_its_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    p = _problem(tmp_path, lambda d: d.update(consolidation={"horizon_h": -1}))
    rc, _, err = run(["optimize", str(p)], capsys)
    assert rc == EX_DATAERR
    assert "consolidation." in err


# --- recommend ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def filled_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An embedded store holding 10 minutes of a 2-node simulated fleet, ending now."""
    root = tmp_path_factory.mktemp("fleet")
    db = root / "store.sqlite"
    store = EmbeddedStore(db)
    with SimFleet(
        nodes=2,
        gpus_per_node=4,
        store=store,
        state_root=root / "state",
        start_ns=time.time_ns() - int(600e9),
    ) as fleet:
        fleet.run(590)
    store.close()
    return db


def _config(tmp_path: Path, db: Path) -> Path:
    cfg = tmp_path / "dcenergy.toml"
    cfg.write_text(f'[store]\nembedded_path = "{db}"\n[optimizer]\nwindow_s = 900\n')
    return cfg


def test_recommend_with_one_budget_caps_the_fleet_under_it(
    tmp_path: Path, filled_store: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = _config(tmp_path, filled_store)
    rc, out, _ = run(["-c", str(cfg), "recommend", "--budget", "3800", "--json"], capsys)
    assert rc == 0
    plan = json.loads(out)
    assert len(plan["setpoints"]) == 8
    assert plan["solver"]["feasible"]
    assert plan["predictions"]["after"]["domain_power_w"]["fleet"] <= 3800 + 1e-6


def test_recommend_with_a_topology_prints_every_domain(
    tmp_path: Path, filled_store: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    topo = {
        "version": 1,
        "domains": [
            {"id": "room", "kind": "facility", "budget_w": 3000},
            {"id": "rack-1", "kind": "rack", "parent": "room", "budget_w": 1400},
        ],
        "hosts": {"node-1": {"domains": ["rack-1"]}},
        "default_domains": ["room"],
    }
    tp = tmp_path / "topology.json"
    tp.write_text(json.dumps(topo))
    problem_out = tmp_path / "problem.json"
    args = [
        "-c",
        str(_config(tmp_path, filled_store)),
        "recommend",
        "--topology",
        str(tp),
        "--save-problem",
        str(problem_out),
    ]
    rc, out, err = run(args, capsys)
    # rack-1's 1400 W for 4 GPUs may hold only by slowing a job past its floor: exit 3
    assert rc in (0, EX_INFEASIBLE), err
    assert "room" in out and "rack-1" in out
    doc = json.loads(problem_out.read_text())
    node1 = [g for g in doc["gpus"] if g["host"] == "node-1"]
    assert node1 and all(g["domains"] == ["rack-1", "room"] for g in node1)


def test_recommend_on_an_empty_store_says_what_to_do(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = _config(tmp_path, tmp_path / "empty.sqlite")
    rc, _, err = run(["-c", str(cfg), "recommend", "--budget", "1000"], capsys)
    assert rc != 0
    assert "no GPU telemetry" in err and "hint:" in err


def test_recommend_without_topology_or_budget_is_a_config_error(
    tmp_path: Path, filled_store: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "dcenergy.toml"
    cfg.write_text(
        f'[store]\nembedded_path = "{filled_store}"\n'
        f'[optimizer]\ntopology = "{tmp_path / "none.json"}"\n'
    )
    rc, _, err = run(["-c", str(cfg), "recommend"], capsys)
    assert rc == EX_CONFIG
    assert "--budget" in err


def test_recommend_takes_the_slowdown_confidence_into_the_problem(
    tmp_path: Path, filled_store: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = str(_config(tmp_path, filled_store))
    problem_out = tmp_path / "problem.json"
    args = ["-c", cfg, "recommend", "--budget", "3800", "--save-problem", str(problem_out)]
    rc, _, _ = run([*args, "--confidence", "0.8"], capsys)
    assert rc == 0
    assert json.loads(problem_out.read_text())["objective"]["slowdown_confidence"] == 0.8
    rc, _, err = run([*args, "--confidence", "0.3"], capsys)
    assert rc == EX_CONFIG
    assert "--confidence" in err and "[0.5, 0.999]" in err
