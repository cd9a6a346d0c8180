"""The optimizer service with a policy file: per-job policy from (a stand-in for) Slurm's
``squeue --json``, cached across runs, and the consolidation section in each plan."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from agent.simfleet import SimFleet
from dcenergy.config import load_config
from dcenergy.plan import generate_keypair, load_private_key
from dcenergy.store.embedded import EmbeddedStore
from optimizer.job_energy import job_gpus
from optimizer.service import OptimizerService

S = 10**9


@pytest.fixture(scope="module")
def seeded(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    root = tmp_path_factory.mktemp("svc")
    db = root / "store.sqlite"
    store = EmbeddedStore(db)
    with SimFleet(2, 4, store=store, state_root=root / "f", start_ns=time.time_ns() - 600 * S) as f:
        f.run(590)
        f.flush()
        end = f.now_ns
    store.close()
    return db, end


def test_service_applies_the_policy_and_plans_consolidation(
    seeded: tuple[Path, int], tmp_path: Path
) -> None:
    db, end = seeded
    calls = tmp_path / "squeue-calls"
    squeue = tmp_path / "squeue"
    jobs = {"jobs": [{"job_id": "train-01", "job_state": "RUNNING", "partition": "interactive"}]}
    squeue.write_text(f"#!/bin/sh\necho x >> {calls}\ncat <<'EOF'\n{json.dumps(jobs)}\nEOF\n")
    squeue.chmod(0o755)
    policy = tmp_path / "policy.json"
    policy.write_text(
        json.dumps(
            {
                "version": 1,
                "rules": [{"match": {"partition": "interactive"}, "exempt": True}],
                "slurm": {"squeue": str(squeue), "cache_ttl_s": 3600},
                "consolidation": {"may_power_down": True},
            }
        )
    )
    topo = tmp_path / "topology.json"
    topo.write_text(
        json.dumps({"version": 1, "domains": [{"id": "room", "budget_w": 2500}],
                    "default_domains": ["room"]})
    )  # fmt: skip
    generate_keypair(tmp_path / "plan.key", tmp_path / "plan.pub")
    cfg = tmp_path / "dcenergy.toml"
    cfg.write_text(
        f'[agent]\nstate_dir = "{tmp_path / "state"}"\n[store]\nembedded_path = "{db}"\n'
        f'[optimizer]\nwindow_s = 900\npolicy = "{policy}"\n'
    )
    store = EmbeddedStore(db)
    try:
        service = OptimizerService(
            load_config(cfg, env={}),
            store,
            load_private_key(tmp_path / "plan.key"),
            topo,
            lambda: end,
        )
        plan = service.run_once(raise_errors=True)
        again = service.run_once(raise_errors=True)
        held = set().union(*job_gpus(store, "train-01", end - 900 * S, end + 1).values())
    finally:
        store.close()
    assert plan is not None and again is not None
    assert plan.consolidation is not None and "nodes_freed" in plan.consolidation
    train = [sp for sp in plan.setpoints if sp.gpu in held]
    assert train and all(sp.power_limit_w == pytest.approx(700.0) for sp in train)  # exempt
    assert min(sp.power_limit_w for sp in plan.setpoints) < 700.0  # the others pay for it
    assert len(calls.read_text().split()) == 1  # one squeue for two runs (the TTL)
