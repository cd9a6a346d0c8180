"""The consolidation section from telemetry (optimizer/live_consolidation.py): a simulated
fleet (real agent code) into the embedded store, read through aggregates only."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from agent.simfleet import JobSpec, SimFleet
from dcenergy.cli import main
from dcenergy.store.base import AggregateQuery, AggRow
from dcenergy.store.embedded import EmbeddedStore
from optimizer.consolidation import parse_consolidation, solve_consolidation
from optimizer.live_consolidation import build_consolidation
from optimizer.policy import ConsolidationPolicy, JobPolicy, NodePolicy
from tests.seed import gpu_point

OBJ = {"price_per_kwh": 0.12, "pue": 1.3, "carbon_g_per_kwh": 400.0}


def _layout(i: int, n: int) -> list[JobSpec | None]:
    """Node 1: two inference jobs; node 2: one light service; node 3: empty."""
    rows: list[list[JobSpec | None]] = [
        [JobSpec("inference", 1), JobSpec("inference", 1), None, None],
        [JobSpec("light", 1), None, None, None],
        [None, None, None, None],
    ]
    return rows[i]


@pytest.fixture(scope="module")
def fleet_store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    root = tmp_path_factory.mktemp("cons")
    db = root / "store.sqlite"
    store = EmbeddedStore(db)
    start = time.time_ns() - int(600e9)
    with SimFleet(3, 4, store=store, state_root=root / "st", layout=_layout, start_ns=start) as f:
        f.run(590)
        f.flush()
        now = f.now_ns
    store.close()
    return db, now


class _AggregatesOnly:
    """The store, with raw reads forbidden: the reader may only ask for aggregates."""

    def __init__(self, store: EmbeddedStore) -> None:
        self.store = store
        self.queries: list[AggregateQuery] = []

    def aggregate(self, q: AggregateQuery) -> list[AggRow]:
        self.queries.append(q)
        return self.store.aggregate(q)

    def read(self, *a: Any, **k: Any) -> Any:
        raise AssertionError("raw rows read")


class _Jobs:
    def __init__(self, decided: Mapping[str, JobPolicy]) -> None:
        self.decided = decided

    def resolve(self, job_ids: Sequence[str]) -> Mapping[str, JobPolicy]:
        return {j: self.decided.get(j, JobPolicy()) for j in job_ids}


def test_section_from_aggregates_frees_the_emptied_nodes(fleet_store: tuple[Path, int]) -> None:
    db, now = fleet_store
    store = EmbeddedStore(db)
    reader = _AggregatesOnly(store)
    snap = build_consolidation(
        reader,  # type: ignore[arg-type]
        now_ns=now,
        window_s=600,
        objective=OBJ,
        policy=ConsolidationPolicy(may_power_down=True, node_base_w=300),
    )
    store.close()
    assert len(reader.queries) == 4
    s = snap.section
    nodes = {n["id"]: n for n in s["nodes"]}
    assert set(nodes) == {"node-1", "node-2", "node-3"}
    assert all(n["gpus"] == 4 and n["mem_per_gpu_gb"] > 40 for n in nodes.values())
    # the empty node is measured as it is: base + its four idle GPUs
    assert 300 < nodes["node-3"]["node_idle_w"] < 300 + 4 * 150
    jobs = {j["id"]: j for j in s["jobs"]}
    assert {j["node"] for j in jobs.values()} == {"node-1", "node-2"}
    assert all(0 < j["util"] <= 1 and j["mem_per_gpu_gb"] > 0 for j in jobs.values())
    assert sorted(jobs[j]["gpu_indices"][0] for j in jobs if jobs[j]["node"] == "node-1") == [0, 1]
    result = solve_consolidation(parse_consolidation(s, "<t>", prefix="consolidation")).to_json()
    assert len(result["nodes_freed"]) == 2 and "node-3" in result["nodes_freed"]
    assert result["savings_w"] > 600


def test_policy_pins_jobs_and_keeps_nodes_on(fleet_store: tuple[Path, int]) -> None:
    db, now = fleet_store
    store = EmbeddedStore(db)
    first = build_consolidation(
        store, now_ns=now, window_s=600, objective=OBJ, policy=ConsolidationPolicy()
    )
    svc = next(j["id"] for j in first.section["jobs"] if j["node"] == "node-2")
    pol = ConsolidationPolicy(
        may_power_down=True, nodes={"node-3": NodePolicy(may_power_down=False, base_w=250)}
    )
    snap = build_consolidation(
        store,
        now_ns=now,
        window_s=600,
        objective=OBJ,
        policy=pol,
        jobs=_Jobs({svc: JobPolicy(exempt=True, migration_cost_wh=100)}),
    )
    store.close()
    assert not any(n["may_power_down"] for n in first.section["nodes"])  # the safe default
    nodes = {n["id"]: n for n in snap.section["nodes"]}
    assert nodes["node-3"]["may_power_down"] is False
    job = next(j for j in snap.section["jobs"] if j["id"] == svc)
    assert job["pinned"] and job["migration_cost_wh"] == 100
    result = solve_consolidation(parse_consolidation(snap.section, "<t>", prefix="c")).to_json()
    assert result["nodes_freed"] == ["node-1"]  # node-2 holds a pinned job, node-3 stays on
    assert all(m["job"] != svc for m in result["moves"])


def test_a_job_on_two_hosts_stays_put_once_per_host(tmp_path: Path) -> None:
    store = EmbeddedStore(tmp_path / "s.sqlite")
    now = time.time_ns()
    pts = [
        gpu_point(host, i, now - (10 - t) * 10**9, job="42" if i == 0 else "", util=90.0,
                  power_w=500.0 if i == 0 else 70.0, mem_used_gb=10)
        for host in ("a", "b")
        for i in range(2)
        for t in range(5)
    ]  # fmt: skip
    store.write(pts)
    snap = build_consolidation(
        store, now_ns=now, window_s=60, objective=OBJ, policy=ConsolidationPolicy()
    )
    store.close()
    assert {j["id"]: j["pinned"] for j in snap.section["jobs"]} == {"42@a": True, "42@b": True}
    assert snap.split_jobs == ["42"]


def test_recommend_with_a_policy_adds_consolidation_to_the_plan(
    fleet_store: tuple[Path, int], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db, _ = fleet_store
    cfg = tmp_path / "dcenergy.toml"
    cfg.write_text(f'[store]\nembedded_path = "{db}"\n[optimizer]\nwindow_s = 900\n')
    pol = tmp_path / "policy.json"
    pol.write_text(json.dumps({"version": 1, "consolidation": {"may_power_down": True}}))
    out_plan = tmp_path / "plan.json"
    saved = tmp_path / "problem.json"
    rc = main(
        ["-c", str(cfg), "recommend", "--budget", "5000", "--policy", str(pol),
         "-o", str(out_plan), "--save-problem", str(saved)]
    )  # fmt: skip
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "Consolidation" in out and "nodes to power down:" in out
    assert "move " in out
    assert "policy (where it came from)" in out  # every job's source: "default" here
    plan = json.loads(out_plan.read_text())
    assert len(plan["consolidation"]["nodes_freed"]) == 2
    assert "consolidation" in json.loads(saved.read_text())  # replayable: optimize reads it
    rc = main(["optimize", str(saved), "--json"])
    assert rc == 0
    assert len(json.loads(capsys.readouterr().out)["consolidation"]["nodes_freed"]) == 2


def test_consolidate_dry_run_without_slurm_says_it_cannot_reach_it(
    fleet_store: tuple[Path, int], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db, _ = fleet_store
    cfg = tmp_path / "dcenergy.toml"
    cfg.write_text(f'[store]\nembedded_path = "{db}"\n[optimizer]\nwindow_s = 900\n')
    pol = tmp_path / "policy.json"
    pol.write_text(
        json.dumps(
            {
                "version": 1,
                "slurm": {"sinfo": str(tmp_path / "no-sinfo"), "scontrol": str(tmp_path / "no")},
                "consolidation": {"may_power_down": True},
            }
        )
    )
    rc = main(["-c", str(cfg), "consolidate", "--policy", str(pol)])
    _, err = capsys.readouterr()
    assert rc == 69
    assert "not found" in err and "\n" in err.strip() and len(err.strip().splitlines()) == 2
    nopol = tmp_path / "p2.json"
    nopol.write_text('{"version": 1}')
    assert main(["-c", str(cfg), "consolidate", "--policy", str(nopol)]) == 78
