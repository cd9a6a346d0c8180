"""``dcenergy consolidate`` against a real Slurm: the plan from telemetry frees this node
and ``--apply`` drains it (``sinfo -h -o %T``: drained, reason ``dcenergy: …``); a later
plan that needs the node resumes it; each action is an ``audit`` point; a dry run
changes nothing; someone else's drain is left alone."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dcenergy import schema
from dcenergy.cli import main
from dcenergy.store.embedded import EmbeddedStore
from tests.seed import gpu_point
from tests.slurm_cluster import SlurmCluster

pytestmark = pytest.mark.slurm

OTHER = "gpu-b"  # a second node only telemetry knows (single-node cluster)


def _store(path: Path, host: str, *, busy_here: bool) -> Path:
    """4 GPUs on ``host`` (idle, or all held by job 'big') and on OTHER (one job each)."""
    now = time.time_ns()
    pts = []
    for t in range(0, 120, 5):
        ts = now - (120 - t) * 10**9
        for i in range(4):
            pts.append(gpu_point(OTHER, i, ts, job=f"o{i}", util=80.0, power_w=450.0,
                                 mem_used_gb=60))  # fmt: skip
            if busy_here:
                pts.append(gpu_point(host, i, ts, job="big", util=85.0, power_w=500.0,
                                     mem_used_gb=70))  # fmt: skip
            else:
                pts.append(gpu_point(host, i, ts, util=0.0, power_w=65.0))
    store = EmbeddedStore(path)
    store.write(pts)
    store.close()
    return path


def _config(tmp_path: Path, db: Path, name: str) -> Path:
    cfg = tmp_path / f"{name}.toml"
    cfg.write_text(f'[store]\nembedded_path = "{db}"\n[optimizer]\nwindow_s = 300\n')
    return cfg


@pytest.fixture
def node(slurm_env: SlurmCluster) -> Iterator[SlurmCluster]:
    """The cluster's node, idle and not drained before and after the test."""
    c = slurm_env
    c.run("scontrol", "update", f"nodename={c.nodename}", "state=resume", check=False)
    c.wait_node(["idle", "mixed", "allocated"])
    yield c
    c.run("scontrol", "update", f"nodename={c.nodename}", "state=resume", check=False)


def _policy(tmp_path: Path, host: str) -> Path:
    p = tmp_path / "policy.json"
    p.write_text(
        json.dumps(
            {
                "version": 1,
                "slurm": {"timeout_s": 20},
                "consolidation": {
                    "may_power_down": False,
                    "node_base_w": 300,
                    "nodes": {host: {"may_power_down": True}},
                },
            }
        )
    )
    return p


def _audit(db: Path) -> list[tuple[str, str, str]]:
    store = EmbeddedStore(db)
    pts = store.read(schema.AUDIT.name, start_ns=0)
    store.close()
    return [(p.tags["host"], p.tags["action"], str(p.fields.get("reason", ""))) for p in pts]


def test_drain_the_freed_node_then_resume_it_when_a_plan_needs_it(
    node: SlurmCluster, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    host = node.nodename
    pol = _policy(tmp_path, host)
    idle_db = _store(tmp_path / "idle.sqlite", host, busy_here=False)
    cfg = _config(tmp_path, idle_db, "idle")

    # dry run: the plan and what would happen, nothing done
    rc = main(["-c", str(cfg), "consolidate", "--policy", str(pol)])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert f"nodes to power down: {host}" in out
    assert f"would drain {host}" in out and "dry run" in out
    assert node.node_state() == "idle"
    assert _audit(idle_db) == []

    # --apply: drained, audited
    rc = main(["-c", str(cfg), "consolidate", "--policy", str(pol), "--apply", "--json"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    doc = json.loads(out)
    assert doc["applied"] and doc["consolidation"]["nodes_freed"] == [host]
    assert {(a["node"], a["action"], a.get("done")) for a in doc["actions"]} == {
        (host, "drain", True)
    }
    assert node.wait_node(["drained"]) == "drained"
    assert node.node_field("Reason").startswith("dcenergy: consolidation frees this node")
    assert _audit(idle_db) == [(host, "drain", "dcenergy: consolidation frees this node")]

    # again: already drained by dcenergy, nothing to do
    rc = main(["-c", str(cfg), "consolidate", "--policy", str(pol), "--apply"])
    out, _ = capsys.readouterr()
    assert rc == 0 and "already drained by dcenergy" in out
    assert len(_audit(idle_db)) == 1

    # a later plan: the node holds a job nobody else has room for -> resume it
    busy_db = _store(tmp_path / "busy.sqlite", host, busy_here=True)
    cfg2 = _config(tmp_path, busy_db, "busy")
    rc = main(["-c", str(cfg2), "consolidate", "--policy", str(pol), "--apply"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert f"resume {host} (the latest plan needs it)" in out
    assert node.wait_node(["idle"]) == "idle"
    assert [a[:2] for a in _audit(busy_db)] == [(host, "resume")]


def test_someone_elses_drain_is_left_alone(
    node: SlurmCluster, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    host = node.nodename
    node.run("scontrol", "update", f"nodename={host}", "state=drain", "reason=bad DIMM")
    node.wait_node(["drained"])
    busy_db = _store(tmp_path / "busy.sqlite", host, busy_here=True)
    rc = main(
        ["-c", str(_config(tmp_path, busy_db, "b")), "consolidate", "--policy",
         str(_policy(tmp_path, host)), "--apply"]
    )  # fmt: skip
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "no node to drain or resume" in out
    assert node.node_state() == "drained" and node.node_field("Reason").startswith("bad DIMM")
