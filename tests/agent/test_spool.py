"""The spool: FIFO, idempotent, bounded with exact drop counts, and durable across SIGKILL."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.spool import Spool, row_size
from dcenergy.lineprotocol import decode, encode, line_time_ns
from dcenergy.schema import Point

REPO = Path(__file__).resolve().parents[2]


def pt(t: int, host: str = "a", v: float = 1.0) -> Point:
    return Point("gpu", {"host": host, "gpu": "0"}, {"power_w": v}, t)


@pytest.fixture
def spool(tmp_path: Path) -> Iterator[Spool]:
    s = Spool(tmp_path / "state" / "spool.sqlite", max_bytes=10_000_000)
    yield s
    s.close()


def test_put_peek_ack_is_fifo(spool: Spool) -> None:
    assert spool.put([pt(t) for t in (30, 10, 20)]) == 3
    rows = spool.peek(2)
    assert [decode(line) for _, line in rows] == [pt(30), pt(10)]  # arrival order, not time
    assert spool.ack([rid for rid, _ in rows]) == 2
    assert [decode(line) for _, line in spool.peek(10)] == [pt(20)]
    assert spool.depth() == 1


def test_re_put_is_idempotent_and_last_write_wins(spool: Spool) -> None:
    spool.put([pt(1), pt(2)])
    size = spool.size_bytes()
    spool.put([pt(1), pt(2)])
    assert spool.depth() == 2 and spool.size_bytes() == size
    spool.put([pt(1, v=123.25)])
    lines = [line for _, line in spool.peek(10)]
    assert [decode(x) for x in lines] == [pt(1, v=123.25), pt(2)]


def test_depth_and_size_track_rows_exactly(spool: Spool) -> None:
    spool.put([pt(t) for t in range(100)])
    rows = spool.peek(1000)
    assert spool.depth() == 100
    assert spool.size_bytes() == sum(row_size(line) for _, line in rows)
    spool.ack([rid for rid, _ in rows[:40]])
    assert spool.depth() == 60
    spool.ack([rid for rid, _ in rows])  # acking twice is harmless
    assert (spool.depth(), spool.size_bytes()) == (0, 0)


def test_ack_of_a_non_contiguous_set(spool: Spool) -> None:
    spool.put([pt(t) for t in range(10)])
    rows = spool.peek(10)
    spool.ack([rows[i][0] for i in (0, 3, 9)])
    assert [line_time_ns(line) for _, line in spool.peek(10)] == [1, 2, 4, 5, 6, 7, 8]


def test_overflow_drops_exactly_the_oldest_and_counts_them(tmp_path: Path) -> None:
    probe = Spool(tmp_path / "probe.sqlite", max_bytes=10**9)
    probe.put([pt(1_000_000)])
    row = probe.size_bytes()  # every point below encodes to the same length
    probe.close()

    keep = 50
    s = Spool(tmp_path / "s.sqlite", max_bytes=keep * row)
    total = 0
    for start in range(1_000_000, 1_000_000 + 500, 37):  # uneven batches
        batch = [pt(t) for t in range(start, min(start + 37, 1_000_500))]
        total += s.put(batch)
        c = s.counters()
        assert c.spool_depth + c.dropped_overflow_total == total  # every point accounted for
        assert c.spool_bytes <= keep * row
    assert total == 500
    c = s.counters()
    assert c.dropped_overflow_total == 450 and c.spool_depth == keep
    remaining = [line_time_ns(line) for _, line in s.peek(1000)]
    assert remaining == list(range(1_000_450, 1_000_500))  # the newest survived
    s.close()
    s = Spool(tmp_path / "s.sqlite", max_bytes=keep * row)  # the counter is persisted
    assert s.counters().dropped_overflow_total == 450
    assert s.counters().points_spooled_total == 500
    s.close()


def test_one_put_bigger_than_the_bound_keeps_its_newest(tmp_path: Path) -> None:
    probe = Spool(tmp_path / "probe.sqlite", max_bytes=10**9)
    probe.put([pt(1_000_000)])
    row = probe.size_bytes()
    probe.close()
    s = Spool(tmp_path / "s.sqlite", max_bytes=10 * row)
    s.put([pt(t) for t in range(1_000_000, 1_000_025)])
    assert s.counters().dropped_overflow_total == 15
    assert [line_time_ns(x) for _, x in s.peek(100)] == list(range(1_000_015, 1_000_025))
    s.close()


def test_invalid_points_are_skipped_and_counted(spool: Spool) -> None:
    bad = Point("gpu", {"host": "a\nb"}, {"power_w": 1.0}, 5)
    assert spool.put([pt(1), bad, Point("gpu", {}, {}, 6), pt(2)]) == 2
    c = spool.counters()
    assert (c.dropped_invalid_total, c.spool_depth, c.points_spooled_total) == (2, 2, 2)


def test_reopen_keeps_rows_and_counters(tmp_path: Path) -> None:
    path = tmp_path / "spool.sqlite"
    s = Spool(path, max_bytes=10**7)
    s.put([pt(t) for t in range(10)])
    s.ack([s.peek(3)[-1][0]])
    s.close()
    s = Spool(path, max_bytes=10**7)
    assert s.depth() == 9
    assert s.counters().points_spooled_total == 10
    s.close()


def test_uses_wal(spool: Spool) -> None:
    db = sqlite3.connect(spool.path)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.close()


# --- crash durability ------------------------------------------------------------------

_CHILD = textwrap.dedent(
    """
    import os, sys
    from agent.spool import Spool, row_size
    from dcenergy.schema import Point
    path, progress = sys.argv[1], sys.argv[2]
    s = Spool(path, max_bytes=10**9)
    fd = os.open(progress, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    t = 0
    while True:
        batch = [Point("gpu", {"host": "h", "gpu": str(i % 8)}, {"power_w": float(t + i)}, t + i)
                 for i in range(64)]
        s.put(batch)              # returns only after COMMIT
        t += 64
        os.write(fd, f"{t}\\n".encode())   # straight to the kernel: survives SIGKILL
    """
)


def test_every_committed_put_survives_sigkill(tmp_path: Path) -> None:
    path = tmp_path / "spool.sqlite"
    progress = tmp_path / "progress"
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(path), str(progress)], cwd=REPO)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if progress.exists() and len(progress.read_bytes().splitlines()) >= 40:
                break
            assert child.poll() is None, "writer died on its own"
            time.sleep(0.01)
        os.kill(child.pid, signal.SIGKILL)  # mid-run: it is inside its loop
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == -signal.SIGKILL
    lines = progress.read_bytes().splitlines()
    committed = int(lines[-1])
    assert committed >= 40 * 64

    s = Spool(path, max_bytes=10**9)
    try:
        times = {line_time_ns(line) for _, line in s.peek(10**7)}
        assert set(range(committed)) <= times  # nothing reported committed is missing
        assert s.depth() == len(times)  # the trigger-kept depth is exact after the crash
        assert len(times) % 64 == 0  # transactions are all-or-nothing
        assert s._db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        first = next(line for _, line in s.peek(1))
        assert first == encode(Point("gpu", {"host": "h", "gpu": "0"}, {"power_w": 0.0}, 0))
    finally:
        s.close()


def test_idempotent_across_reopen_and_series_cleanup(tmp_path: Path) -> None:
    path = tmp_path / "spool.sqlite"
    s = Spool(path, max_bytes=10**7)
    s.put([pt(1, host="a"), pt(1, host="b")])
    s.ack([rid for rid, _ in s.peek(1)])  # host a's series is no longer referenced
    s.close()
    s = Spool(path, max_bytes=10**7)  # cleans up unused series, starts with an empty cache
    s.put([pt(1, host="b"), pt(1, host="a"), pt(2, host="a")])
    assert sorted(decode(x).tags["host"] + str(decode(x).time_ns) for _, x in s.peek(10)) == [
        "a1",
        "a2",
        "b1",
    ]
    assert s.depth() == 3
    s.close()
