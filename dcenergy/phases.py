"""Wall time per phase of one central run (read, fit, solve, publish), logged as one line.

The line is what an operator reads to see where a slow run spends its time,
and what ``bench/fleet_scale.py`` parses (``key=value`` pairs after
``phases:``), so its keys are stable: ``<phase>_s`` per phase, ``total_s``,
and the store's read figures (``queries``, ``rows``, ``bytes``, ``read_s``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

from dcenergy.store.base import ReadStats

log = logging.getLogger("dcenergy.phases")


class Phases:
    """Accumulates seconds per named phase, on the monotonic clock."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._t0 = time.perf_counter()

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t

    def line(self, stats: ReadStats | None = None) -> str:
        parts = [f"{k}_s={v:.3f}" for k, v in self.seconds.items()]
        parts.append(f"total_s={time.perf_counter() - self._t0:.3f}")
        if stats is not None:
            parts.append(stats.describe())
        return "phases: " + " ".join(parts)

    def log(self, stats: ReadStats | None = None) -> None:
        log.info("%s", self.line(stats))
