"""The shipper's handling of every answer, through InfluxStore on an injected fake transport.

Each test states what is kept in the spool, what is acked, and what is counted.
The clock, sleep and jitter are injected: nothing here depends on wall time.
"""

from __future__ import annotations

import gzip
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from agent.shipper import Shipper
from agent.spool import Spool
from dcenergy.lineprotocol import WriteOutcome, decode
from dcenergy.schema import Point
from dcenergy.store import EmbeddedStore, InfluxStore

T0 = 1_700_000_000_000_000_000


@dataclass
class FakeClock:
    now: float = 1000.0
    slept: list[float] = field(default_factory=list)

    def __call__(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.slept.append(s)
        self.now += s


@dataclass
class FakeInflux:
    """Answers /write from a script of responses (the last one repeats); records bodies."""

    script: list[Callable[[list[str]], httpx.Response]]
    bodies: list[list[str]] = field(default_factory=list)
    queries: list[str] = field(default_factory=list)
    accepted: list[str] = field(default_factory=list)

    def __call__(self, req: httpx.Request) -> httpx.Response:
        if req.url.path == "/query":
            self.queries.append(req.url.params["q"])
            return httpx.Response(200, json={"results": [{"statement_id": 0}]})
        lines = gzip.decompress(req.content).decode().split("\n")
        self.bodies.append(lines)
        answer = self.script[min(len(self.bodies) - 1, len(self.script) - 1)]
        r = answer(lines)
        if r.status_code == 204:
            self.accepted.extend(lines)
        return r


def ok(lines: list[str]) -> httpx.Response:
    return httpx.Response(204)


def status(code: int, text: str = "", **headers: str) -> Callable[[list[str]], httpx.Response]:
    hdrs = {k.replace("_", "-"): v for k, v in headers.items()}
    return lambda lines: httpx.Response(code, text=text, headers=hdrs)


def raises(exc: Exception) -> Callable[[list[str]], httpx.Response]:
    def f(lines: list[str]) -> httpx.Response:
        raise exc

    return f


def pts(n: int, start: int = 0) -> list[Point]:
    return [
        Point("gpu", {"host": "h", "gpu": str(i % 8)}, {"power_w": float(i)}, T0 + i)
        for i in range(start, start + n)
    ]


@pytest.fixture
def spool(tmp_path: Path) -> Iterator[Spool]:
    s = Spool(tmp_path / "spool.sqlite", max_bytes=10**8)
    yield s
    s.close()


def make(
    spool: Spool, fake: FakeInflux, clock: FakeClock, *, rng: float = 1.0, **kw: object
) -> Shipper:
    create = bool(kw.pop("create_database", False))
    store = InfluxStore(
        "http://influx.test", "tele", transport=httpx.MockTransport(fake), create_database=create
    )
    return Shipper(
        spool,
        store,
        clock=clock,
        sleep=clock.sleep,
        rng=lambda: rng,
        wall_clock_ns=lambda: T0 + 5_000_000_000,
        **kw,  # type: ignore[arg-type]
    )


def test_204_acks_everything_in_batches(spool: Spool) -> None:
    fake, clock = FakeInflux([ok]), FakeClock()
    spool.put(pts(1200))
    sh = make(spool, fake, clock, batch_lines=500)
    rep = sh.ship_once()
    assert [len(b) for b in fake.bodies] == [500, 500, 200]
    assert (rep.shipped, rep.depth, rep.outcome) == (1200, 0, WriteOutcome.OK)
    assert sorted((decode(x) for x in fake.accepted), key=lambda p: p.time_ns) == pts(1200)
    c = sh.counters
    assert (c.points_shipped_total, c.errors_total, c.last_error) == (1200, 0, "")
    assert c.ship_latency_s == pytest.approx(5.0)  # wall clock T0+5 s, oldest point T0


def test_empty_spool_makes_no_request(spool: Spool) -> None:
    fake = FakeInflux([ok])
    rep = make(spool, fake, FakeClock()).ship_once()
    assert (rep.requests, rep.outcome, fake.bodies) == (0, None, [])


def test_413_splits_in_halves_until_it_fits(spool: Spool) -> None:
    def too_big(lines: list[str]) -> httpx.Response:
        return httpx.Response(413 if len(lines) > 100 else 204)

    fake, clock = FakeInflux([too_big]), FakeClock()
    spool.put(pts(400))
    sh = make(spool, fake, clock, batch_lines=400)
    rep = sh.ship_once()
    assert rep.shipped == 400 and spool.depth() == 0
    assert len(fake.accepted) == 400 and len(set(fake.accepted)) == 400  # none sent twice
    assert [len(b) for b in fake.bodies[:3]] == [400, 200, 100]
    spool.put(pts(300, start=1000))
    fake.bodies.clear()
    sh.ship_once()
    assert {len(b) for b in fake.bodies} == {100}  # the next batches start at the size that fit
    assert sh.counters.errors_total == 0


def test_413_on_a_single_point_drops_and_counts_it(spool: Spool) -> None:
    def picky(lines: list[str]) -> httpx.Response:
        return httpx.Response(413 if any("power_w=3.0" in x for x in lines) else 204)

    fake = FakeInflux([picky])
    spool.put(pts(8))
    sh = make(spool, fake, FakeClock(), batch_lines=8)
    rep = sh.ship_once()
    assert (rep.shipped, rep.dropped_rejected, spool.depth()) == (7, 1, 0)
    assert sh.counters.dropped_rejected_total == 1


def test_429_waits_retry_after_without_blocking(spool: Spool) -> None:
    fake, clock = FakeInflux([status(429, Retry_After="30"), ok]), FakeClock()
    spool.put(pts(10))
    sh = make(spool, fake, clock)
    rep = sh.ship_once()
    assert (rep.outcome, rep.backoff_s, spool.depth(), clock.slept) == (
        WriteOutcome.THROTTLED,
        30.0,
        10,
        [],
    )
    clock.now += 29.9
    rep = sh.ship_once()
    assert rep.requests == 0 and rep.backoff_s == pytest.approx(0.1) and len(fake.bodies) == 1
    clock.now += 0.1
    rep = sh.ship_once()
    assert (rep.shipped, spool.depth(), sh.counters.errors_total) == (10, 0, 1)


def test_retry_after_is_capped(spool: Spool) -> None:
    fake, clock = FakeInflux([status(503, Retry_After="86400")]), FakeClock()
    spool.put(pts(3))
    sh = make(spool, fake, clock, retry_after_max_s=60.0)
    assert sh.ship_once().backoff_s == 60.0
    assert sh.not_before == clock.now + 60.0


def test_short_retry_after_is_waited_inline_once(spool: Spool) -> None:
    fake, clock = FakeInflux([status(429, Retry_After="0.5"), ok]), FakeClock()
    spool.put(pts(3))
    rep = make(spool, fake, clock).ship_once()
    assert clock.slept == [0.5] and rep.shipped == 3


def test_5xx_and_transport_errors_back_off_exponentially_and_keep_data(
    spool: Spool, caplog: pytest.LogCaptureFixture
) -> None:
    script = [
        status(500, '{"error":"engine down"}'),
        raises(httpx.ConnectError("refused")),
        raises(httpx.ReadTimeout("slow")),
        status(502, "bad gateway"),
        ok,
    ]
    fake, clock = FakeInflux(script), FakeClock()
    spool.put(pts(20))
    sh = make(spool, fake, clock, rng=1.0, backoff_base_s=2.0, backoff_max_s=10.0)
    delays = []
    with caplog.at_level(logging.WARNING, logger="agent.shipper"):
        for _ in range(4):
            rep = sh.ship_once()
            assert rep.outcome is WriteOutcome.UNAVAILABLE and spool.depth() == 20
            delays.append(rep.backoff_s)
            clock.now += rep.backoff_s
    assert delays == [2.0, 4.0, 8.0, 10.0]  # doubling, capped
    assert len([r for r in caplog.records if r.name == "agent.shipper"]) == 1  # logged once
    assert "bad gateway" in sh.counters.last_error
    rep = sh.ship_once()
    assert (rep.shipped, spool.depth()) == (20, 0)
    assert sh.counters.errors_total == 4 and sh.counters.last_error == ""  # cleared: recovered
    # after a success the backoff starts over
    fake.script.append(status(500))
    spool.put(pts(1, start=99))
    assert sh.ship_once().backoff_s == 2.0


def test_backoff_has_full_jitter(spool: Spool) -> None:
    fake, clock = FakeInflux([status(500)]), FakeClock()
    spool.put(pts(1))
    sh = make(spool, fake, clock, rng=0.25, backoff_base_s=4.0)
    assert sh.ship_once().backoff_s == 1.0  # rng() * base: anywhere in [0, base)


def test_partial_write_counts_dropped_and_acks_the_batch(spool: Spool) -> None:
    msg = '{"error":"partial write: field type conflict: input field \\"power_w\\" dropped=3"}'
    fake = FakeInflux([status(400, msg)])
    spool.put(pts(10))
    sh = make(spool, fake, FakeClock())
    rep = sh.ship_once()
    assert (rep.shipped, rep.dropped_partial, spool.depth(), len(fake.bodies)) == (7, 3, 0, 1)
    c = sh.counters
    assert (c.points_shipped_total, c.dropped_partial_total, c.errors_total) == (7, 3, 1)
    assert "field type conflict" in c.last_error


def test_partial_write_without_a_count_counts_the_batch(spool: Spool) -> None:
    fake = FakeInflux([status(400, '{"error":"partial write: points beyond retention policy"}')])
    spool.put(pts(4))
    sh = make(spool, fake, FakeClock())
    rep = sh.ship_once()
    assert (rep.dropped_partial, spool.depth()) == (4, 0)


def test_other_4xx_drops_the_batch_and_logs_the_message_once(
    spool: Spool, caplog: pytest.LogCaptureFixture
) -> None:
    fake = FakeInflux([status(400, '{"error":"unable to parse: bad timestamp"}')])
    spool.put(pts(30))
    sh = make(spool, fake, FakeClock(), batch_lines=10)
    with caplog.at_level(logging.WARNING, logger="agent.shipper"):
        rep = sh.ship_once()
    assert (rep.dropped_rejected, rep.shipped, spool.depth(), len(fake.bodies)) == (30, 0, 0, 3)
    assert sh.counters.dropped_rejected_total == 30 and sh.counters.errors_total == 3
    logged = [r.getMessage() for r in caplog.records if r.name == "agent.shipper"]
    assert len(logged) == 1 and "bad timestamp" in logged[0]


@pytest.mark.parametrize("code", [401, 403])
def test_auth_failure_keeps_data_backs_off_and_says_so(
    spool: Spool, code: int, caplog: pytest.LogCaptureFixture
) -> None:
    fake, clock = FakeInflux([status(code, '{"error":"authorization failed"}')]), FakeClock()
    spool.put(pts(5))
    sh = make(spool, fake, clock)
    with caplog.at_level(logging.WARNING, logger="agent.shipper"):
        for _ in range(3):
            rep = sh.ship_once()
            clock.now += rep.backoff_s
    assert rep.outcome is WriteOutcome.UNAUTHORIZED and rep.backoff_s > 0
    assert spool.depth() == 5 and sh.counters.dropped_rejected_total == 0
    assert "credentials" in sh.counters.last_error and sh.counters.errors_total == 3
    assert len([r for r in caplog.records if r.name == "agent.shipper"]) == 1


def test_missing_database_keeps_data_with_a_clear_error(spool: Spool) -> None:
    fake, clock = (
        FakeInflux([status(404, '{"error":"database not found: \\"tele\\""}')]),
        FakeClock(),
    )
    spool.put(pts(5))
    sh = make(spool, fake, clock)
    rep = sh.ship_once()
    assert rep.outcome is WriteOutcome.NO_DATABASE and spool.depth() == 5
    assert "'tele'" in sh.counters.last_error and "create_database" in sh.counters.last_error
    assert fake.queries == []


def test_missing_database_is_created_when_configured(spool: Spool) -> None:
    fake = FakeInflux([status(404, '{"error":"database not found: \\"tele\\""}'), ok])
    spool.put(pts(5))
    sh = make(spool, fake, FakeClock(), create_database=True)
    rep = sh.ship_once()
    assert fake.queries == ['CREATE DATABASE "tele"']
    assert (rep.shipped, spool.depth()) == (5, 0)


def test_an_error_after_some_batches_keeps_only_the_rest(spool: Spool) -> None:
    fake = FakeInflux([ok, ok, status(503)])
    spool.put(pts(50))
    sh = make(spool, fake, FakeClock(), batch_lines=10)
    rep = sh.ship_once()
    assert (rep.shipped, spool.depth(), rep.outcome) == (20, 30, WriteOutcome.THROTTLED)
    kept = sorted(decode(x).time_ns - T0 for _, x in spool.peek(100))
    assert kept == list(range(20, 50))


def test_max_batches_bounds_one_call(spool: Spool) -> None:
    fake = FakeInflux([ok])
    spool.put(pts(50))
    rep = make(spool, fake, FakeClock(), batch_lines=10).ship_once(max_batches=2)
    assert (rep.shipped, rep.depth) == (20, 30)


def test_embedded_store_is_a_sink_through_the_same_path(spool: Spool, tmp_path: Path) -> None:
    store = EmbeddedStore(tmp_path / "e.sqlite")
    points = pts(120)
    bad = Point("gpu", {"host": "x"}, {"s": "ok"}, T0)
    spool.put([*points, bad])
    sh = Shipper(spool, store, batch_lines=50, clock=FakeClock())
    rep = sh.ship_once()
    assert (rep.shipped, spool.depth()) == (121, 0)
    got = store.read("gpu", start_ns=T0, tags={"host": "h"})
    assert sorted(got, key=lambda p: p.time_ns) == points
    store.close()
