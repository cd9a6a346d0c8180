"""The agent reporting on itself: its counters as one ``agent`` point per ship cycle.

An agent that silently drops data is worse than one that is down, so every
drop and error counter the parts keep is summed here and shipped with the
telemetry it describes (the ``agent`` measurement, see ``dcenergy.schema``).
The counters are read from the parts that own them; nothing is kept twice.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from dcenergy.schema import AGENT, TAG_HOST, FieldValue, Point, point


class SamplerStats(Protocol):
    @property
    def samples_total(self) -> int: ...
    @property
    def errors_total(self) -> int: ...
    @property
    def last_error(self) -> str: ...
    @property
    def cycle_s(self) -> float | None: ...


class SpoolStats(Protocol):
    """``agent.spool.SpoolCounters``: persisted totals, exact after a crash."""

    @property
    def points_spooled_total(self) -> int: ...
    @property
    def dropped_overflow_total(self) -> int: ...
    @property
    def dropped_invalid_total(self) -> int: ...
    @property
    def spool_depth(self) -> int: ...
    @property
    def spool_bytes(self) -> int: ...
    @property
    def dropped_corrupt_total(self) -> int: ...
    @property
    def dropped_disk_full_total(self) -> int: ...
    @property
    def spool_file_bytes(self) -> int: ...


class ShipperStats(Protocol):
    """``agent.shipper.ShipperCounters``: totals since this process started."""

    @property
    def points_shipped_total(self) -> int: ...
    @property
    def dropped_rejected_total(self) -> int: ...
    @property
    def dropped_partial_total(self) -> int: ...
    @property
    def errors_total(self) -> int: ...
    @property
    def last_error(self) -> str: ...
    @property
    def ship_latency_s(self) -> float | None: ...


class ErrorCounter(Protocol):
    @property
    def errors_total(self) -> int: ...


def agent_point(
    *,
    host: str,
    time_ns: int,
    sampler: SamplerStats,
    spool: SpoolStats,
    shipper: ShipperStats,
    other_errors: Iterable[ErrorCounter] = (),
    daemon_errors_total: int = 0,
    daemon_last_error: str = "",
) -> Point:
    """One ``agent`` point from the parts' counters.

    ``errors_total`` sums every part's errors, and counts the points the spool
    refused as invalid line protocol (a drop the schema has no field of its own for).
    """
    errors = sampler.errors_total + shipper.errors_total + daemon_errors_total
    errors += spool.dropped_invalid_total
    errors += sum(part.errors_total for part in other_errors)
    # The most telling recent error: the daemon's own, then shipping, then sampling.
    last_error = daemon_last_error or shipper.last_error or sampler.last_error
    fields: dict[str, FieldValue | None] = {
        "samples_total": sampler.samples_total,
        "points_spooled_total": spool.points_spooled_total,
        "points_shipped_total": shipper.points_shipped_total,
        "dropped_overflow_total": spool.dropped_overflow_total,
        "dropped_rejected_total": shipper.dropped_rejected_total,
        "dropped_partial_total": shipper.dropped_partial_total,
        "dropped_corrupt_total": spool.dropped_corrupt_total,
        "dropped_disk_full_total": spool.dropped_disk_full_total,
        "errors_total": errors,
        "spool_depth": spool.spool_depth,
        "spool_bytes": spool.spool_bytes,
        "spool_file_bytes": spool.spool_file_bytes,
        "cycle_s": sampler.cycle_s,
        "ship_latency_s": shipper.ship_latency_s,
        "last_error": last_error,
    }
    return point(AGENT, {TAG_HOST: host}, fields, time_ns)
