"""A full state disk: samples dropped by count with their reason, no traceback, shipping drains.

On a real 2 MiB tmpfs (root only; skipped with the reason elsewhere), filled to
the last block by another file.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest

from agent.daemon import AgentDaemon
from agent.spool import Spool
from dcenergy.config import AgentConfig, Config, StoreConfig
from dcenergy.lineprotocol import WriteOutcome, WriteResult
from dcenergy.store.embedded import EmbeddedStore
from tests.faults.conftest import fill_disk, gpu_points

BOUND = 512 * 1024


class _SwitchableStore(EmbeddedStore):
    """The embedded store, unreachable while ``down``."""

    down = False

    def write_lines(self, body: bytes) -> WriteResult:
        if self.down:
            return WriteResult(WriteOutcome.UNAVAILABLE, None, "store down (test)")
        return super().write_lines(body)


def _no_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"


def test_full_disk_drops_by_count_and_shipping_still_drains(
    small_tmpfs: Path, caplog: pytest.LogCaptureFixture
) -> None:
    s = Spool(small_tmpfs / "spool.sqlite", max_bytes=BOUND)
    attempted = 0
    t = 0
    try:
        for _ in range(20):
            assert s.put(gpu_points(9, t)) == 9
            t += 9
            attempted += 9
        filler = fill_disk(small_tmpfs)
        with caplog.at_level(logging.INFO, logger="agent.spool"):
            for _ in range(50):  # sampling goes on: put never raises
                s.put(gpu_points(9, t))
                t += 9
                attempted += 9
            full = s.counters()
            assert full.dropped_disk_full_total > 0
            assert full.points_spooled_total + full.dropped_disk_full_total == attempted

            rows = s.peek(10_000)  # the shipper took them: deleting must work on a full disk
            assert s.ack([rid for rid, _ in rows]) == len(rows) == full.spool_depth
            assert s.depth() == 0

            filler.unlink()  # room again
            assert s.put(gpu_points(9, t)) == 9
            attempted += 9
        c = s.counters()
        assert c.points_spooled_total + c.dropped_disk_full_total == attempted
    finally:
        s.close()
    _no_tracebacks(caplog)
    said = [r.getMessage() for r in caplog.records]
    assert len([m for m in said if "is full (" in m]) == 1  # one warning per episode
    assert any("released" in m and "reserve" in m for m in said)
    assert any(f"{full.dropped_disk_full_total} points were dropped" in m for m in said)
    s = Spool(small_tmpfs / "spool.sqlite", max_bytes=BOUND)  # the count is persisted
    try:
        assert s.counters().dropped_disk_full_total == c.dropped_disk_full_total
    finally:
        s.close()


def test_disk_full_drops_are_counted_even_if_no_commit_ever_persists_them(
    small_tmpfs: Path,
) -> None:
    """Counted in the ledger (rewritten in place, no room needed) until a commit can."""
    s = Spool(small_tmpfs / "spool.sqlite", max_bytes=BOUND)
    for i in range(10):
        s.put(gpu_points(9, i * 9))
    filler = fill_disk(small_tmpfs)
    dropped = 0
    for i in range(10, 60):
        dropped += 9 - s.put(gpu_points(9, i * 9))
    s.close()  # the process ends with the disk still full
    assert dropped > 0
    filler.unlink()
    s = Spool(small_tmpfs / "spool.sqlite", max_bytes=BOUND)
    try:
        assert s.counters().dropped_disk_full_total == dropped
    finally:
        s.close()


def test_a_spool_opens_on_a_full_disk(small_tmpfs: Path) -> None:
    """Opening writes (-shm, WAL): the reserve makes the room, so an agent (re)starts."""
    s = Spool(small_tmpfs / "spool.sqlite", max_bytes=BOUND)
    for i in range(20):
        s.put(gpu_points(9, i * 9))
    s.close()
    fill_disk(small_tmpfs)
    s = Spool(small_tmpfs / "spool.sqlite", max_bytes=BOUND)
    try:
        assert s.depth() == 180
        assert s.ack([rid for rid, _ in s.peek(1000)]) == 180  # and it drains
    finally:
        s.close()


def test_agent_on_a_full_disk_keeps_sampling_and_shipping(
    small_tmpfs: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = Config(
        agent=AgentConfig(
            host="n1",
            state_dir=small_tmpfs / "state",
            runtime_dir=tmp_path / "run",
            simulate=2,
            backend="simulated",
            interval_s=0.05,
            ship_interval_s=0.2,
            spool_max_mb=BOUND / 1024 / 1024,
        ),
        store=StoreConfig(),
    )
    store = _SwitchableStore(tmp_path / "store.sqlite")  # has room; the spool has not
    store.down = True  # so that the spool fills up
    daemon = AgentDaemon(cfg, store=store)

    def wait(pred: object, what: str, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if pred():  # type: ignore[operator]
                return
            time.sleep(0.05)
        pytest.fail(f"timed out waiting for {what}: {daemon.spool.counters()}")

    with caplog.at_level(logging.INFO):
        daemon.start()
        try:
            wait(lambda: daemon.spool.depth() > 50, "points waiting")
            filler = fill_disk(small_tmpfs)
            wait(lambda: daemon.spool.counters().dropped_disk_full_total > 30, "drops")
            samples = daemon.sampler.samples_total if daemon.sampler else 0
            store.down = False  # the store is back, the disk still full
            wait(lambda: daemon.spool.depth() < 20, "the spool to drain on the full disk")
            shipped = daemon.shipper.counters.points_shipped_total
            assert daemon.sampler is not None and daemon.sampler.samples_total > samples
            assert daemon.errors_total == 0, daemon.last_error  # no "sampling failed"
            filler.unlink()
            spooled = daemon.spool.counters().points_spooled_total
            wait(lambda: daemon.spool.counters().points_spooled_total > spooled + 20, "room")
            wait(lambda: daemon.shipper.counters.points_shipped_total > shipped + 20, "more")
        finally:
            daemon.shutdown()
            store.close()
    _no_tracebacks(caplog)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    said = [r.getMessage() for r in caplog.records if r.name == "agent.spool"]
    assert len([m for m in said if "is full (" in m]) == 1
