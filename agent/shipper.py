"""The shipper: moves points from the spool into the store, losing none to an outage.

One code path for both stores: the sink is anything with
``write_lines(body) -> WriteResult`` (``InfluxStore`` posts the body to
``/write``; ``EmbeddedStore`` parses it into SQLite). The shipper acts on the
result alone:

=============  ==========================================================
OK             ack (delete) the batch
PARTIAL        count the dropped points, ack the batch (never send twice)
TOO_LARGE      split the batch in halves and retry each; remember the size
THROTTLED      keep; no attempt before Retry-After (capped) or a backoff
UNAVAILABLE    keep; exponential backoff with full jitter
UNAUTHORIZED   keep; back off; log (once) so the operator fixes the token
NO_DATABASE    keep; back off; log the store's message (names the fix)
REJECTED       drop the batch, count it, log the server's message once
=============  ==========================================================

``ship_once`` never sleeps for long: a backoff is a "not before" time on the
injected monotonic clock, and the call returns at once until it has passed.
Each kind of error is logged once until shipping succeeds again, and the last
error is cleared when it does (``last_error`` describes the present).

A backoff (up to ``backoff_max_s``, 5 minutes) must not keep the spool waiting
once the store is back: while backing off from an unreachable store (or a
refused token, or a missing database) the shipper *probes* every
``probe_interval_s`` (jittered) by writing the oldest point alone. A probe the
store accepts ends the backoff and the rest ships in the same call; a failed
probe does not lengthen the backoff. A store that asked for time (429/503 with
Retry-After) is not probed.

A hung store (it accepts connections and never answers) holds one request for
up to ``store.timeout_s``; the daemon's ship job is non-overlapping
(``max_instances=1``) so the runs that fall due meanwhile are skipped, which
``SkippedShipRuns`` keeps out of the log: the outage is one warning.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from dcenergy.lineprotocol import LineSink, WriteOutcome, WriteResult, line_time_ns

log = logging.getLogger(__name__)


class SpoolLike(Protocol):
    def peek(self, n: int) -> list[tuple[int, str]]: ...
    def ack(self, rowids: list[int]) -> int: ...
    def depth(self) -> int: ...


@dataclass
class ShipperCounters:
    """Totals since start, named as the ``agent`` measurement's fields."""

    points_shipped_total: int = 0
    dropped_rejected_total: int = 0
    dropped_partial_total: int = 0
    errors_total: int = 0
    last_error: str = ""
    ship_latency_s: float | None = None  # age of the oldest point in the last shipped batch


@dataclass
class ShipReport:
    """What one ``ship_once`` did."""

    shipped: int = 0
    dropped_rejected: int = 0
    dropped_partial: int = 0
    requests: int = 0
    outcome: WriteOutcome | None = None  # the last request's outcome; None if none was made
    backoff_s: float = 0.0  # time until the next attempt is allowed (0: go ahead)
    depth: int = 0  # points still in the spool
    errors: list[str] = field(default_factory=list)


_KEEP_AND_BACK_OFF = (
    WriteOutcome.THROTTLED,
    WriteOutcome.UNAVAILABLE,
    WriteOutcome.UNAUTHORIZED,
    WriteOutcome.NO_DATABASE,
)
_PROBED = (WriteOutcome.UNAVAILABLE, WriteOutcome.UNAUTHORIZED, WriteOutcome.NO_DATABASE)
SHIP_JOB_NAME = "shipping"  # the daemon's ship job, as SkippedShipRuns knows it


class SkippedShipRuns(logging.Filter):
    """Keeps APScheduler's "maximum number of running instances reached" for the ship job out.

    Install on the ``apscheduler.scheduler`` logger. The ship job never overlaps
    itself by design (``max_instances=1``, ``coalesce=True``): while a hung store
    holds a request, the runs that fall due are skipped, which is the intent and
    not news (once every ship interval it was 9 warnings in 12 s); the shipper has
    logged the outage once. Other jobs' skips (a hung sampler) still show.
    """

    def __init__(self, job_name: str = SHIP_JOB_NAME) -> None:
        super().__init__()
        self.job_name = job_name
        self.skipped = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if "maximum number of running instances" not in str(record.msg):
            return True
        args = record.args if isinstance(record.args, tuple) else ()
        if args and getattr(args[0], "name", None) == self.job_name:
            self.skipped += 1
            return False
        return True


SKIPPED_SHIP_RUNS = SkippedShipRuns()


class Shipper:
    """Spool → sink, in batches, with backoff; call ``ship_once`` on a schedule."""

    def __init__(
        self,
        spool: SpoolLike,
        sink: LineSink,
        *,
        batch_lines: int = 5000,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        rng: Callable[[], float] = random.random,
        wall_clock_ns: Callable[[], int] = time.time_ns,
        backoff_base_s: float = 1.0,
        backoff_max_s: float = 300.0,
        retry_after_max_s: float = 300.0,
        inline_wait_max_s: float = 1.0,
        probe_interval_s: float = 2.0,
    ) -> None:
        if batch_lines < 1:
            raise ValueError("batch_lines must be at least 1")
        self.spool = spool
        self.sink = sink
        self.batch_lines = batch_lines
        self._clock = clock
        self._sleep = sleep
        self._rng = rng
        self._wall_clock_ns = wall_clock_ns
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.retry_after_max_s = retry_after_max_s
        self.inline_wait_max_s = inline_wait_max_s
        self.probe_interval_s = probe_interval_s
        self.counters = ShipperCounters()
        self._failures = 0  # consecutive failed attempts: the backoff exponent
        self._not_before = float("-inf")
        self._batch_cap = batch_lines  # lowered after a 413 so the next batches fit
        self._logged: set[WriteOutcome] = set()
        self._probe: bool = False  # backing off from an outage a one-point write can end
        self._next_probe = float("inf")
        self._outage_since: float | None = None  # first failure of the current outage

    @property
    def not_before(self) -> float:
        """Monotonic time before which ``ship_once`` makes no request."""
        return self._not_before

    def ship_once(self, max_batches: int | None = None) -> ShipReport:
        """Ship batches until the spool is empty, an error says back off, or ``max_batches``."""
        report = ShipReport()
        now = self._clock()
        batches = 0
        if now < self._not_before:
            if not (self._probe and now >= self._next_probe and self._probe_ends_outage(report)):
                report.backoff_s = max(0.0, self._not_before - self._clock())
                report.depth = self.spool.depth()
                return report
            batches = 1  # the probe was accepted: the store is back, ship the rest now
        waited_inline = False
        while max_batches is None or batches < max_batches:
            rows = self.spool.peek(self._batch_cap)
            if not rows:
                break
            batches += 1
            stop = self._send(rows, report)
            if stop is None:
                continue
            delay = stop
            throttled = report.outcome is WriteOutcome.THROTTLED
            if throttled and delay <= self.inline_wait_max_s and not waited_inline:
                waited_inline = True  # a short Retry-After: wait it out once, here
                self._sleep(delay)
                continue
            self._not_before = self._clock() + delay
            self._probe = report.outcome in _PROBED
            self._next_probe = self._clock() + self._probe_delay()
            report.backoff_s = delay
            break
        report.depth = self.spool.depth()
        return report

    def _probe_delay(self) -> float:
        return self.probe_interval_s * (0.5 + 0.5 * self._rng())

    def _probe_ends_outage(self, report: ShipReport) -> bool:
        """Write the oldest point alone; True when the store took it (the backoff is over)."""
        rows = self.spool.peek(1)
        if not rows:
            return False
        failures = self._failures
        stop = self._send(rows, report)
        if stop is None:
            self._not_before = float("-inf")
            self._probe = False
            return True
        self._failures = failures  # a failed probe does not lengthen the backoff
        if report.outcome is WriteOutcome.THROTTLED:  # the store asks for time: give it
            self._not_before = self._clock() + stop
            self._probe = False
        self._next_probe = self._clock() + self._probe_delay()
        return False

    def _send(self, rows: list[tuple[int, str]], report: ShipReport) -> float | None:
        """Send one batch (splitting on 413); None to go on, else seconds to back off."""
        body = "\n".join(line for _, line in rows).encode()
        result = self.sink.write_lines(body)
        report.requests += 1
        report.outcome = result.outcome
        o = result.outcome
        ids = [rid for rid, _ in rows]
        if o is WriteOutcome.OK:
            self._shipped(rows, len(rows), report)
            return None
        if o is WriteOutcome.TOO_LARGE:
            if len(rows) == 1:  # one point the server will never take
                self._error(result, report, f"a single point is too large: {result.message}")
                self._drop_rejected(ids, report)
                return None
            mid = len(rows) // 2
            self._batch_cap = max(1, min(self._batch_cap, mid))
            for half in (rows[:mid], rows[mid:]):
                stop = self._send(half, report)
                if stop is not None:
                    return stop
            return None
        if o is WriteOutcome.PARTIAL:
            dropped = len(rows) if result.dropped is None else min(result.dropped, len(rows))
            self._error(
                result, report, f"partial write, {dropped} points dropped: {result.message}"
            )
            self.counters.dropped_partial_total += dropped
            report.dropped_partial += dropped
            self._shipped(rows, len(rows) - dropped, report)
            return None
        if o is WriteOutcome.REJECTED:
            self._error(result, report, f"batch of {len(rows)} points rejected: {result.message}")
            self._drop_rejected(ids, report)
            return None
        assert o in _KEEP_AND_BACK_OFF
        self._error(result, report, result.message or o.value)
        if self._outage_since is None:
            self._outage_since = self._clock()
        return self._backoff(result)

    def _shipped(self, rows: list[tuple[int, str]], accepted: int, report: ShipReport) -> None:
        self.spool.ack([rid for rid, _ in rows])
        self.counters.points_shipped_total += accepted
        report.shipped += accepted
        oldest = min(line_time_ns(line) for _, line in rows)
        self.counters.ship_latency_s = max(0.0, (self._wall_clock_ns() - oldest) / 1e9)
        if self._outage_since is not None:
            log.info(
                "shipping resumed after %d failed attempts (%.1f s)",
                self._failures,
                self._clock() - self._outage_since,
            )
            self._outage_since = None
            self.counters.last_error = ""  # the outage is over: no stale error
        self._failures = 0
        self._probe = False
        self._logged -= set(_KEEP_AND_BACK_OFF)  # a new outage is logged again

    def _drop_rejected(self, ids: list[int], report: ShipReport) -> None:
        self.spool.ack(ids)
        self.counters.dropped_rejected_total += len(ids)
        report.dropped_rejected += len(ids)

    def _error(self, result: WriteResult, report: ShipReport, message: str) -> None:
        self.counters.errors_total += 1
        self.counters.last_error = message
        report.errors.append(message)
        if result.outcome not in self._logged:
            self._logged.add(result.outcome)
            log.warning("shipper: %s", message)

    def _backoff(self, result: WriteResult) -> float:
        """Seconds to wait: the server's Retry-After (capped), else full-jitter exponential."""
        self._failures += 1
        if result.outcome is WriteOutcome.THROTTLED and result.retry_after_s is not None:
            return min(result.retry_after_s, self.retry_after_max_s)
        ceiling = min(self.backoff_max_s, self.backoff_base_s * 2.0 ** min(self._failures - 1, 30))
        return self._rng() * ceiling
