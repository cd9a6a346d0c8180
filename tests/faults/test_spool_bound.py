"""The spool's bound is on disk: database, WAL, -shm, ledger and reserve together.

Before, the WAL was left out: 4.2 MB on disk for a 0.05 MB bound.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.spool import SPOOL_OVERHEAD_BYTES, Spool
from tests.faults.conftest import gpu_points

MB = 1024 * 1024


def _files(path: Path) -> int:
    return sum(
        p.stat().st_size
        for p in path.parent.iterdir()
        if p.name.startswith(path.name) and ".corrupt-" not in p.name
    )


@pytest.mark.parametrize("bound_mb", [0.05, 0.5, 2.0])
def test_files_on_disk_stay_within_the_bound(tmp_path: Path, bound_mb: float) -> None:
    """A long run of NVML-sized points, shipped now and then: never over bound + overhead."""
    bound = int(bound_mb * MB)
    path = tmp_path / "spool.sqlite"
    s = Spool(path, max_bytes=bound)
    worst = acked = 0
    cycles = int(bound / 6000 * 2.5) + 100  # fill it twice and more: the bound drops
    try:
        for cycle in range(cycles):
            s.put(gpu_points(9, cycle * 9, pad=550))  # one cycle: 8 GPUs and a host, ~600 B
            if cycle % 40 == 39 and cycle > cycles // 2:
                acked += s.ack([rid for rid, _ in s.peek(150)])  # shipping, slower than sampling
            worst = max(worst, _files(path))
        c = s.counters()
        assert c.spool_file_bytes == _files(path)  # reported as it is
    finally:
        s.close()
    assert c.dropped_overflow_total > 0  # the bound was reached
    assert c.spool_depth + c.dropped_overflow_total + acked == cycles * 9  # each one counted
    print(
        f"bound {bound_mb} MB: at most {worst / MB:.3f} MB on disk, "
        f"{(worst - bound) / 1024:+.0f} KiB"
    )
    assert worst <= bound + SPOOL_OVERHEAD_BYTES, (worst, bound)


def test_a_lower_bound_shrinks_the_files(tmp_path: Path) -> None:
    path = tmp_path / "spool.sqlite"
    s = Spool(path, max_bytes=8 * MB)
    for batch in range(200):
        s.put(gpu_points(90, batch * 90, pad=550))
    s.close()
    assert _files(path) > 6 * MB
    s = Spool(path, max_bytes=1 * MB)  # the operator lowered agent.spool_max_mb
    try:
        assert s.file_bytes() <= 1 * MB + SPOOL_OVERHEAD_BYTES
        c = s.counters()
        assert c.spool_depth > 0 and c.dropped_overflow_total > 0
    finally:
        s.close()
