"""The simulated fleet: deterministic, every node/GPU/job in the store, plans applied."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.simfleet import DEFAULT_START_NS, SimFleet, node_layout
from dcenergy import schema
from dcenergy.publish import publish
from dcenergy.store.embedded import EmbeddedStore

S = 1_000_000_000
KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))


@pytest.fixture
def store(tmp_path: Path) -> Iterator[EmbeddedStore]:
    s = EmbeddedStore(tmp_path / "store.sqlite")
    yield s
    s.close()


def run_fleet(root: Path, seed: int = 0, seconds: float = 60.0) -> EmbeddedStore:
    store = EmbeddedStore(root / "store.sqlite")
    with SimFleet(4, 4, store=store, state_root=root / "agents", seed=seed) as fleet:
        fleet.run(seconds)
        assert fleet.flush() == 0
    return store


def telemetry(store: EmbeddedStore, measurement: str) -> list[tuple[object, ...]]:
    return [
        (p.time_ns, sorted(p.tags.items()), sorted(p.fields.items()))
        for p in store.read(measurement, start_ns=0)
    ]


def test_runs_are_deterministic(tmp_path: Path) -> None:
    a = run_fleet(tmp_path / "a")
    b = run_fleet(tmp_path / "b")
    c = run_fleet(tmp_path / "c", seed=1)
    try:
        for m in ("gpu", "job", "host"):
            assert telemetry(a, m) == telemetry(b, m), m
            assert telemetry(a, m)
        assert telemetry(a, "gpu") != telemetry(c, "gpu")  # the seed matters
    finally:
        for s in (a, b, c):
            s.close()


def test_every_node_gpu_and_job_lands_in_the_store(tmp_path: Path, store: EmbeddedStore) -> None:
    with SimFleet(4, 8, store=store, state_root=tmp_path / "agents", step_s=5.0) as fleet:
        fleet.run(60.0)
        fleet.flush()
        gpu_ids = {g.identity.uuid for _, g in fleet.gpus()}
        jobs = {j.job_id: j for j in fleet.jobs}
        end = fleet.now_ns
        hosts = fleet.hosts
    assert hosts == ["node-1", "node-2", "node-3", "node-4"]
    gpu_points = store.read("gpu", start_ns=0)
    assert {p.tags["gpu_uuid"] for p in gpu_points} == gpu_ids
    assert {p.tags["host"] for p in gpu_points} == {"node-1", "node-2", "node-3", "node-4"}
    assert len(gpu_points) == 32 * 12  # one point per GPU per 5 s step
    assert {p.time_ns for p in gpu_points} == {DEFAULT_START_NS + k * 5 * S for k in range(1, 13)}
    idle = [p for p in gpu_points if p.fields["job_id"] == ""]
    assert idle and all(p.fields["util_gpu_pct"] == 0.0 for p in idle)

    last = {p.tags["job_id"]: p for p in store.read("job", start_ns=end)}
    assert set(last) == set(jobs)
    for job_id, p in last.items():
        job = jobs[job_id]
        assert p.fields["throughput_source"] == "report"  # the real report → tracker path
        assert p.fields["throughput_unit"] == job.unit
        assert p.fields["throughput"] == pytest.approx(job.last_rate)
        assert p.fields["gpu_count"] == len(job.gpus)
    assert {p.tags["host"] for p in store.read("host", start_ns=0)} == set(hosts)
    assert {p.tags["host"] for p in store.read("agent", start_ns=0)} == set(hosts)


def test_layout_mixes_every_kind_and_fills_each_node() -> None:
    kinds = set()
    for i in range(4):
        specs = node_layout(i, 8)
        assert sum(1 if s is None else s.gpus for s in specs) == 8
        kinds |= {None if s is None else s.kind for s in specs}
    assert kinds == {"training", "inference", "light", None}
    assert any(s is not None and s.gpus > 1 for s in node_layout(0, 8))  # a synchronous job
    for gpus in (1, 2, 3):
        for i in range(4):
            assert sum(1 if s is None else s.gpus for s in node_layout(i, gpus)) == gpus


def test_reconcilers_apply_a_signed_plan_and_audit_it(tmp_path: Path, store: EmbeddedStore) -> None:
    with SimFleet(
        2, 2, store=store, state_root=tmp_path / "agents", public_key=KEY.public_key()
    ) as fleet:
        fleet.run(20.0)
        (host, gpu), *_ = fleet.gpus()
        plan = {
            "plan_id": "p1",
            "created_ns": fleet.now_ns,
            "expires_ns": fleet.now_ns + 600 * S,
            "setpoints": [{"gpu": gpu.identity.uuid, "host": host, "power_limit_w": 450.0}],
        }
        publish(plan, store, KEY, fleet.now_ns)
        fleet.run(60.0)
        fleet.flush()
        assert gpu.power_limit_w() == 450.0
        for _, other in fleet.gpus()[1:]:
            assert other.power_limit_w() == other.power_limits().default_w
    audit = store.read(schema.AUDIT.name, start_ns=0)
    actions = [p.tags["action"] for p in audit if p.tags["gpu_uuid"] == gpu.identity.uuid]
    assert actions[-1] == "applied"
    assert "clamped" in actions  # 700 → 450 W is more than one max_step_w
    assert not [p for p in audit if p.tags["action"] == "refused"]
    last = store.read("gpu", start_ns=fleet.now_ns, tags={"gpu_uuid": gpu.identity.uuid})
    assert last[-1].fields["power_limit_enforced_w"] == 450.0


def test_a_plan_signed_by_another_key_is_refused(tmp_path: Path, store: EmbeddedStore) -> None:
    other = Ed25519PrivateKey.from_private_bytes(bytes(range(1, 33)))
    with SimFleet(
        1, 1, store=store, state_root=tmp_path / "agents", public_key=KEY.public_key()
    ) as fleet:
        (host, gpu), *_ = fleet.gpus()
        plan = {
            "plan_id": "evil",
            "created_ns": fleet.now_ns,
            "expires_ns": fleet.now_ns + 600 * S,
            "setpoints": [{"gpu": gpu.identity.uuid, "host": host, "power_limit_w": 200.0}],
        }
        publish(plan, store, other, fleet.now_ns)
        fleet.run(30.0)
        assert gpu.power_limit_w() == gpu.power_limits().default_w
    assert any(r.action == "refused" for r in fleet.audit)


def test_without_a_public_key_the_fleet_only_samples(tmp_path: Path, store: EmbeddedStore) -> None:
    with SimFleet(1, 2, store=store, state_root=tmp_path / "agents") as fleet:
        assert all(n.reconciler is None for n in fleet.nodes)
        fleet.run(10.0)
        assert fleet.audit == []


def test_bad_sizes_are_refused(tmp_path: Path, store: EmbeddedStore) -> None:
    with pytest.raises(ValueError, match="nodes"):
        SimFleet(0, 8, store=store, state_root=tmp_path / "agents")
    with pytest.raises(ValueError, match="step_s"):
        SimFleet(1, 8, store=store, state_root=tmp_path / "agents", step_s=0)
