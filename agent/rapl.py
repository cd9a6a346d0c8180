"""CPU package and DRAM power from the Linux powercap (RAPL) energy counters.

The kernel exposes one directory per RAPL zone under ``/sys/class/powercap``
(``intel-rapl:0`` for package 0, ``intel-rapl:0:1`` for a sub-zone of it, and
so on; AMD CPUs appear through the same driver, and any ``<vendor>-rapl:N``
control type is accepted). A zone is classified by the contents of its
``name`` file, not by its directory name: ``package-N`` zones are summed into
CPU power, ``dram`` zones into DRAM power, and everything else (``core``,
``uncore``, ``psys``) is ignored because it is already part of a package or
covers more than the CPU. ``intel-rapl-mmio`` zones are skipped: they are a
second interface to the same package counters and would count it twice.

``energy_uj`` is a cumulative microjoule counter that wraps at
``max_energy_range_uj``; power is the counter delta between two calls over
the time between them. On kernels since 5.10 ``energy_uj`` is readable by
root only, so an unprivileged agent gets ``None`` (absent, not zero): the
first permission denial is counted and logged once, and the reader stops
trying. Other read failures are counted every time and logged once per zone.
Nothing here raises into the daemon.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

from dcenergy.logonce import LogOnce

log = logging.getLogger(__name__)

DEFAULT_POWERCAP_ROOT = Path("/sys/class/powercap")

# <control type>:<package>[:<subzone>]; the mmio interface duplicates the MSR one.
_ZONE_DIR = re.compile(r"^(?P<ctl>[a-z]+(?:-[a-z]+)*-rapl):\d+(?::\d+)?$")
_EXCLUDED_CONTROL_TYPES = frozenset({"intel-rapl-mmio"})

ZoneKind = Literal["package", "dram"]


class RaplPower(NamedTuple):
    """Power over the last interval; ``None`` where unknown (first call, unreadable)."""

    package_w: float | None
    dram_w: float | None


@dataclass(frozen=True, slots=True)
class RaplZone:
    """One counter we sum: its directory, kind and wrap range (None when unreadable)."""

    path: Path
    kind: ZoneKind
    max_energy_range_uj: int | None


class _Reading(NamedTuple):
    time_s: float
    energy_uj: dict[Path, int | None]


class RaplReader:
    """Reads RAPL energy counters under ``root`` and turns their deltas into watts.

    Zones are discovered on the first call to :meth:`power_w` (not in the
    constructor, so building a reader does no IO). Each failure is counted in
    :attr:`errors_total` and logged once per zone and cause.
    """

    def __init__(self, root: Path = DEFAULT_POWERCAP_ROOT) -> None:
        self.root = root
        self.errors_total = 0
        self._zones: list[RaplZone] | None = None
        self._last: _Reading | None = None
        self._logged = LogOnce(log)
        self._denied = False

    # --- discovery ----------------------------------------------------------
    @property
    def zones(self) -> list[RaplZone]:
        """The package and DRAM zones found under the root (discovered once)."""
        if self._zones is None:
            self._zones = self._discover()
        return self._zones

    def _discover(self) -> list[RaplZone]:
        """Find zones; the real sysfs lists them flat, fixtures may nest them: accept both."""
        found: dict[str, Path] = {}
        try:
            top = sorted(self.root.iterdir())
        except FileNotFoundError:
            # No powercap at all (VMs, containers, non-Intel/AMD): not a failure, no counter.
            self._once(
                "none", str(self.root), logging.INFO, "no %s: CPU power not reported", self.root
            )
            return []
        except OSError as e:
            self._fail("discover", str(self.root), e)
            return []
        for entry in top:
            if not _ZONE_DIR.match(entry.name):
                continue
            found.setdefault(entry.name, entry)
            try:
                children = sorted(entry.iterdir())
            except OSError:
                continue  # a zone with unreadable children just has no nested sub-zones
            for child in children:
                if _ZONE_DIR.match(child.name) and child.is_dir():
                    found.setdefault(child.name, child)
        zones: list[RaplZone] = []
        for dirname in sorted(found):
            m = _ZONE_DIR.match(dirname)
            if m is None or m.group("ctl") in _EXCLUDED_CONTROL_TYPES:
                continue
            path = found[dirname]
            kind = self._classify(path)
            if kind is None:
                continue
            zones.append(RaplZone(path, kind, self._read_int(path / "max_energy_range_uj")))
        if not zones:
            self._once("none", str(self.root), logging.INFO, "no RAPL zones under %s", self.root)
        return zones

    def _classify(self, zone: Path) -> ZoneKind | None:
        try:
            name = (zone / "name").read_text().strip()
        except OSError as e:
            self._fail("name", str(zone), e)
            return None
        if name.startswith("package"):
            return "package"
        if name == "dram":
            return "dram"
        return None

    # --- sampling -------------------------------------------------------------
    def power_w(self, now_s: float) -> RaplPower:
        """Package and DRAM power (W) averaged since the previous call.

        The first call only primes the counters and returns ``(None, None)``.
        A kind is ``None`` when it has no zone or when any of its zones could
        not be read at either end of the interval: a partial sum would
        under-report, and absent is better than wrong.
        """
        zones = self.zones
        if self._denied:
            return RaplPower(None, None)
        current = _Reading(now_s, {z.path: self._read_int(z.path / "energy_uj") for z in zones})
        if self._denied:  # set by this very read: a permanent state, not a per-cycle error
            self._last = None
            return RaplPower(None, None)
        previous, self._last = self._last, current
        if previous is None or not zones:
            return RaplPower(None, None)
        dt = now_s - previous.time_s
        if dt <= 0:
            return RaplPower(None, None)
        return RaplPower(
            self._sum_w(zones, "package", previous, current, dt),
            self._sum_w(zones, "dram", previous, current, dt),
        )

    def _sum_w(
        self, zones: list[RaplZone], kind: ZoneKind, prev: _Reading, cur: _Reading, dt: float
    ) -> float | None:
        total_uj = 0
        selected = [z for z in zones if z.kind == kind]
        if not selected:
            return None
        for zone in selected:
            before, after = prev.energy_uj.get(zone.path), cur.energy_uj.get(zone.path)
            if before is None or after is None:
                return None
            delta = after - before
            if delta < 0:  # the counter wrapped (at most once: ~minutes at full power)
                if zone.max_energy_range_uj is None:
                    return None
                delta += zone.max_energy_range_uj
            if delta < 0:
                return None  # still negative: not a wrap we understand (counter reset)
            total_uj += delta
        return total_uj / 1e6 / dt

    # --- io helpers -------------------------------------------------------------
    def _read_int(self, path: Path) -> int | None:
        try:
            return int(path.read_text().strip())
        except (OSError, ValueError) as e:
            self._fail("read", str(path), e)
            return None

    def _fail(self, what: str, where: str, err: Exception) -> None:
        if isinstance(err, PermissionError):
            # Unprivileged agent: not going to change while we run. Count it once and stop
            # reading, so errors_total does not tick every cycle on every such node.
            if self._denied:
                return
            self._denied = True
        self.errors_total += 1
        hint = (
            " (energy_uj is root-only since Linux 5.10)" if isinstance(err, PermissionError) else ""
        )
        self._once(what, where, logging.WARNING, "RAPL %s %s failed: %s%s", what, where, err, hint)

    def _once(self, what: str, where: str, level: int, msg: str, *args: object) -> None:
        self._logged((what, where), level, msg, *args)
