"""Spool → Shipper → a real influxd that goes away and comes back: nothing lost or doubled."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent.shipper import Shipper
from agent.spool import Spool
from dcenergy.lineprotocol import WriteOutcome
from dcenergy.schema import Point
from dcenergy.store import InfluxStore
from tests.influx_server import InfluxServer

T0 = 1_700_000_000_000_000_000
DB = "outage"


@dataclass
class FakeClock:
    now: float = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.now += s


def sample(cycle: int) -> list[Point]:
    """One agent cycle: 8 GPUs and the host, at the cycle's own timestamp."""
    t = T0 + cycle * 1_000_000_000
    gpus = [
        Point(
            "gpu",
            {"host": "n1", "gpu": str(i)},
            {"power_w": 100.0 + i, "energy_j": float(cycle)},
            t,
        )
        for i in range(8)
    ]
    return [*gpus, Point("host", {"host": "n1"}, {"cpu_pct": 12.5, "mem_used_bytes": cycle}, t)]


def count_points(server: InfluxServer) -> tuple[int, int]:
    def one(q: str) -> int:
        res: Any = server.query(q, db=DB)
        series = res["results"][0].get("series")
        return int(series[0]["values"][0][1]) if series else 0

    return one('SELECT count("power_w") FROM "gpu"'), one('SELECT count("cpu_pct") FROM "host"')


def ship_until_empty(sh: Shipper, clock: FakeClock, tries: int = 10) -> None:
    """Call ship_once as a scheduler would, letting the fake clock run past each backoff."""
    for _ in range(tries):
        rep = sh.ship_once()
        if rep.depth == 0:
            return
        clock.now += rep.backoff_s + 0.001
    pytest.fail(f"spool not drained: {sh.counters}")


@pytest.mark.influxdb
@pytest.mark.slow
def test_database_outage_loses_and_doubles_nothing(
    own_influxd: InfluxServer, tmp_path: Path
) -> None:
    clock = FakeClock()
    spool = Spool(tmp_path / "spool.sqlite", max_bytes=10**8)
    store = InfluxStore(own_influxd.url, DB, create_database=True, timeout_s=2)
    sh = Shipper(spool, store, batch_lines=50, clock=clock, sleep=clock.sleep, rng=lambda: 0.5)
    cycle = 0
    try:
        for _ in range(20):  # up and shipping
            spool.put(sample(cycle))
            cycle += 1
            assert sh.ship_once().outcome is WriteOutcome.OK
        assert spool.depth() == 0

        own_influxd.stop()  # the database goes away mid-run
        for _ in range(30):
            spool.put(sample(cycle))
            cycle += 1
            rep = sh.ship_once()
            assert rep.shipped == 0
            clock.now += 1.0  # a sampling period passes; the backoff may or may not be over
        assert spool.depth() == 30 * 9  # everything sampled during the outage waits
        errors_during_outage = sh.counters.errors_total
        assert errors_during_outage >= 1 and "cannot reach" in sh.counters.last_error

        own_influxd.start()  # it comes back on the same port
        for _ in range(10):
            spool.put(sample(cycle))
            cycle += 1
        ship_until_empty(sh, clock)
    finally:
        store.close()
        spool.close()

    assert count_points(own_influxd) == (cycle * 8, cycle)  # every sample present
    c = sh.counters
    assert c.points_shipped_total == cycle * 9  # each accepted once, none twice
    assert (c.dropped_rejected_total, c.dropped_partial_total) == (0, 0)
    assert c.errors_total >= errors_during_outage
    assert c.ship_latency_s is not None and c.ship_latency_s > 0
