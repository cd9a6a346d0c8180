"""gpu_health points: every ``health_every`` cycles, XIDs in between counted at the next."""

from __future__ import annotations

import itertools

from agent.devices.simulated import SimulatedBackend
from agent.sampler import Sampler
from dcenergy.schema import GPU_HEALTH


def test_health_points_every_n_cycles_and_xids_between_are_not_lost() -> None:
    t = itertools.count(1000.0, 1.0)
    backend = SimulatedBackend(2, seed=1, clock=lambda: next(t))
    backend.open()
    ns = itertools.count(1_700_000_000_000_000_000, 1_000_000_000)
    sampler = Sampler(backend, "n1", None, None, None, clock=lambda: next(ns), health_every=5)
    health = []
    for cycle in range(11):
        if cycle == 2:
            backend.gpus()[1].inject_xid(79)
        if cycle == 3:
            backend.gpus()[0].mark_lost()
        health.append([p for p in sampler.sample() if p.measurement == GPU_HEALTH.name])
    assert [len(h) for h in health] == [2, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1]  # GPU 0 lost at 3
    first, later = health[0], health[5]
    assert [p.fields["unhealthy"] for p in first] == [0, 0]
    (p,) = later
    assert p.tags["gpu"] == "1" and p.tags["gpu_uuid"] == backend.gpus()[1].identity.uuid
    assert (p.fields["xid_events"], p.fields["unhealthy"]) == (1, 1)
    assert p.fields["health_reasons"] == "XID 79"
    assert health[10][0].fields["xid_events"] == 0
