"""Host metrics (CPU, memory, load, RAPL power) for the ``host`` measurement.

Every key of :data:`dcenergy.schema.HOST` is always present in a sample; a
value is ``None`` where it is unknown (first CPU sample, RAPL unreadable, a
psutil call that failed), so the writer drops it: absent, not zero.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

import psutil

from agent.rapl import RaplReader
from dcenergy.logonce import LogOnce
from dcenergy.schema import HOST

log = logging.getLogger(__name__)

HostSample = dict[str, float | int | None]


class PsutilLike(Protocol):
    """The three psutil functions we use; the real module or a test fake."""

    def cpu_percent(self, interval: float | None = None) -> float: ...
    def virtual_memory(self) -> Any: ...  # anything with .total and .available (bytes)
    def getloadavg(self) -> tuple[float, float, float]: ...


class HostCollector:
    """Samples host metrics through an injectable ``psutil`` module.

    ``cpu_pct`` uses ``psutil.cpu_percent(interval=None)``, which never blocks
    the sampling cycle: it reports the busy share since the previous call. The
    first call has no previous one (psutil returns a meaningless 0.0), so the
    first sample reports ``cpu_pct`` as ``None``.
    """

    def __init__(self, psutil_module: PsutilLike = psutil, rapl: RaplReader | None = None) -> None:
        self._psutil = psutil_module
        self._rapl = rapl
        self._cpu_primed = False
        self._errors_total = 0
        self._once = LogOnce(log)

    @property
    def errors_total(self) -> int:
        """Failed psutil calls plus RAPL failures, for the agent's own ``errors_total``."""
        return self._errors_total + (self._rapl.errors_total if self._rapl else 0)

    def sample(self, now_s: float) -> HostSample:
        """One sample keyed by exactly the HOST field names."""
        out: HostSample = dict.fromkeys(HOST.field_names)
        out["cpu_pct"] = self._cpu_pct()
        try:
            vm = self._psutil.virtual_memory()
            # total - available, not psutil's ``used``: ``used`` is computed differently
            # per platform and leaves out reclaimable memory inconsistently.
            out["mem_total_bytes"] = int(vm.total)
            out["mem_used_bytes"] = int(vm.total - vm.available)
        except OSError as e:
            self._fail("virtual_memory", e)
        try:
            load1, load5, load15 = self._psutil.getloadavg()
            out["load1"], out["load5"], out["load15"] = float(load1), float(load5), float(load15)
        except OSError as e:
            self._fail("getloadavg", e)
        if self._rapl is not None:
            power = self._rapl.power_w(now_s)
            out["cpu_power_w"], out["dram_power_w"] = power.package_w, power.dram_w
        return out

    def _cpu_pct(self) -> float | None:
        try:
            pct = float(self._psutil.cpu_percent(interval=None))
        except OSError as e:
            self._fail("cpu_percent", e)
            return None
        if not self._cpu_primed:
            self._cpu_primed = True
            return None
        return pct

    def _fail(self, call: str, err: OSError) -> None:
        self._errors_total += 1
        self._once(call, logging.WARNING, "psutil.%s failed: %s (logged once)", call, err)
