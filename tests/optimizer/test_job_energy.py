"""A job's GPU energy from the energy counters (optimizer/job_energy.py), on both stores."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from dcenergy.errors import NoTelemetry
from dcenergy.store.base import Store
from dcenergy.store.embedded import EmbeddedStore
from optimizer.job_energy import J_PER_KWH, JobEnergy, job_energy
from tests.seed import gpu_point, job_point

T0 = 1_800_000_000 * 10**9
S = 10**9


@pytest.fixture(params=["embedded", "influxdb"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    if request.param == "embedded":
        s: Store = EmbeddedStore(tmp_path / "s.sqlite")
    else:
        from dcenergy.store.influx import InfluxStore

        server = request.getfixturevalue("influxd")
        db = request.getfixturevalue("influx_db")
        s = InfluxStore(server.url, db)
    yield s
    s.close()


def _seed(store: Store, energy: dict[str, list[tuple[int, float, int]]], job: str = "42") -> None:
    """GPU rows (t s, energy_j, resets) per GPU index on host n1; job rows naming them."""
    pts = []
    uuids = [f"GPU-n1-{i}" for i in range(len(energy))]
    for i, rows in enumerate(energy.values()):
        for t, e, resets in rows:
            pts.append(
                gpu_point("n1", i, T0 + t * S, job=job, util=90, power_w=300.0,
                          energy_j=e, energy_resets=resets)
            )  # fmt: skip
    pts += [job_point("n1", job, uuids, T0 + t * S) for t in range(0, 600, 10)]
    # another job's GPU on the same host: not counted
    pts += [gpu_point("n1", 9, T0 + t * S, job="7", energy_j=1e6 + t) for t in range(600)]
    store.write(pts)


def test_energy_is_counter_last_minus_first_over_the_job(store: Store) -> None:
    _seed(store, {"a": [(t, 1000.0 + 300 * t, 0) for t in range(600)],
                  "b": [(t, 5.0 + 100 * t, 2) for t in range(600)]})  # fmt: skip
    r = job_energy(store, "42", T0 + 100 * S, T0 + 400 * S + 1)
    assert [g.uuid for g in r.gpus] == ["GPU-n1-0", "GPU-n1-1"]
    assert r.gpus[0].energy_j == pytest.approx(300 * 300)
    assert r.gpus[1].energy_j == pytest.approx(100 * 300)
    assert r.kwh == pytest.approx(400 * 300 / J_PER_KWH)
    assert all(g.patched == 0 and g.gaps == 0 for g in r.gpus)


def test_driver_reload_seen_by_one_agent_is_already_corrected(store: Store) -> None:
    # the agent's counter keeps going across a reset (resets 0 -> 1): nothing to repair
    rows = [(t, 300.0 * t, 0 if t < 300 else 1) for t in range(600)]
    _seed(store, {"a": rows})
    r = job_energy(store, "42", T0, T0 + 600 * S)
    assert r.gpus[0].energy_j == pytest.approx(300 * 599)


def test_agent_restart_after_a_reload_counts_no_negative_energy(store: Store) -> None:
    # counter drops from 90 kJ to 0 at t=300 (agent restarted after a driver reload)
    rows = [(t, 300.0 * t if t < 300 else 300.0 * (t - 300), 0) for t in range(600)]
    _seed(store, {"a": rows})
    r = job_energy(store, "42", T0, T0 + 600 * S)
    g = r.gpus[0]
    assert g.gaps + g.patched == 1
    # at most one bucket (about 5 s) is estimated from mean power; nothing goes negative
    assert 300 * 598 - 300 * 10 <= g.energy_j <= 300 * 600


def test_gpu_without_counter_is_named_and_left_out(store: Store) -> None:
    _seed(store, {"a": [(t, 300.0 * t, 0) for t in range(600)],
                  "b": [(t, None, None) for t in range(600)]})  # type: ignore[list-item]  # fmt: skip
    r = job_energy(store, "42", T0, T0 + 600 * S)
    assert [g.uuid for g in r.gpus] == ["GPU-n1-0"] and r.no_counter == ["GPU-n1-1"]


def test_job_without_telemetry_is_no_telemetry(store: Store) -> None:
    with pytest.raises(NoTelemetry, match="job 5"):
        job_energy(store, "5", T0, T0 + S)


def test_admin_comment_keeps_other_text_and_replaces_its_own_token() -> None:
    r = JobEnergy("1", 0, 1)
    assert r.admin_comment("") == "dcenergy:gpu_kwh=0.0000,gpus=0"
    assert r.admin_comment("JS1:abc dcenergy:gpu_kwh=9,gpus=1") == (
        "JS1:abc dcenergy:gpu_kwh=0.0000,gpus=0"
    )
