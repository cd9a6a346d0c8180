"""The node agent daemon: sample → spool every ``interval_s``, spool → store every ``ship_interval_s``.

Scheduling is APScheduler 3's ``BackgroundScheduler``; the main thread only
waits for a stop request (SIGTERM/SIGINT, ``stop()``, or the end of
``run(duration_s)``).

Why its ``IntervalTrigger`` does not drift: the next run time is computed as
``previous *scheduled* time + interval`` (``IntervalTrigger.get_next_fire_time``
with ``previous_fire_time``; APScheduler 3.11 checked), never from when the
previous run finished, so a slow cycle does not push later ones back. With
``coalesce=True`` and ``max_instances=1`` a cycle that overruns the next
deadline makes the scheduler run once, late, rather than in a burst;
``misfire_grace_time`` bounds how late a run may still start. The schedule is
on the wall clock (APScheduler compares ``datetime.now``): an NTP step moves
it with the clock, which is what telemetry timestamps do too.

Threads: sampling and shipping each have a one-thread executor of their own,
so a store timeout (up to ``store.timeout_s``) never delays a sample; extra
periodic jobs (retention, the plan reconciler: ``add_job``) share a third.
The spool is the only object both touch, and it is safe across threads.

Shutdown: stop the scheduler (a running cycle finishes, nothing new starts),
put a last self-stats point, ship the spool to the store once, bounded by
``flush_timeout_s`` (what does not make it stays in the spool for the next
start), close everything, exit 0.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from agent.devices.base import DeviceBackend
from agent.notify import Notifier
from agent.sampler import Sampler
from agent.selfstats import agent_point
from dcenergy.config import Config
from dcenergy.errors import DcenergyError

log = logging.getLogger(__name__)

SPOOL_FILE = "spool.sqlite"
RETENTION_INTERVAL_S = 3600.0
DEFAULT_FLUSH_TIMEOUT_S = 15.0
JOBS_SUBDIR = "jobs"


@dataclass(frozen=True, slots=True)
class PeriodicJob:
    """An extra job the daemon runs every ``interval_s`` (the plan reconciler registers here)."""

    func: Callable[[], object]
    interval_s: float
    name: str


class AgentDaemon:
    """Owns the agent's parts and their schedule; ``run()`` is the whole life of the process.

    ``backend`` and ``store`` may be given (tests, embedding); otherwise they are
    built from ``config`` when the daemon starts, never in the constructor.
    """

    def __init__(
        self,
        config: Config,
        backend: DeviceBackend | None = None,
        store: Any | None = None,
        *,
        clock: Callable[[], int] = time.time_ns,
        notifier: Notifier | None = None,
        proc_root: Path = Path("/proc"),
        flush_timeout_s: float = DEFAULT_FLUSH_TIMEOUT_S,
        on_spooled: Callable[[int, int], None] | None = None,
    ) -> None:
        self.config = config
        self.host = config.host
        self._backend = backend
        self._own_backend = backend is None
        self._store = store
        self._own_store = store is None
        self._clock = clock
        self.notifier = notifier or Notifier()
        self._proc_root = proc_root
        self.flush_timeout_s = flush_timeout_s
        self._on_spooled = on_spooled  # (time_ns, points committed): tests and demos
        self._stop = threading.Event()
        self._jobs: list[PeriodicJob] = []
        self._scheduler: Any = None
        self._spool: Any = None
        self._shipper: Any = None
        self._tracker: Any = None
        self._host_collector: Any = None
        self._resolver: Any = None
        self.sampler: Sampler | None = None
        self.points_spooled_total = 0
        self.errors_total = 0
        self.last_error = ""
        self._logged: set[str] = set()
        self._started = False

    # --- public API ----------------------------------------------------------------------
    def add_job(self, func: Callable[[], object], interval_s: float, name: str) -> None:
        """Run ``func`` every ``interval_s`` while the daemon runs; its errors are counted.

        May be called before or after ``start()``. This is the hook for periodic
        work that is not sampling or shipping (the plan reconciler).
        """
        job = PeriodicJob(func, interval_s, name)
        self._jobs.append(job)
        if self._scheduler is not None:
            self._schedule_extra(job)

    def run(self, duration_s: float | None = None) -> int:
        """Start, wait for SIGTERM/SIGINT/``stop()`` (or ``duration_s``), shut down; 0 on success."""
        restore = self._install_signal_handlers()
        try:
            self.start()
            self._stop.wait(duration_s)
        finally:
            try:
                self.shutdown()
            finally:
                restore()
        return 0

    def stop(self) -> None:
        """Ask ``run()`` to return (thread- and signal-safe)."""
        self._stop.set()

    @property
    def spool(self) -> Any:
        return self._spool

    @property
    def store(self) -> Any:
        return self._store

    def start(self) -> None:
        """Open the backend, spool and store, schedule the jobs, tell systemd READY=1."""
        if self._started:
            return
        self._started = True
        self._open_parts()
        self.notifier.ready(f"sampling {len(self.backend.devices())} GPUs")
        self._start_scheduler()
        log.info(
            "agent started: host=%s, %d GPUs (%s), interval %.3g s, shipping to %r",
            self.host,
            len(self.backend.devices()),
            self.backend.name,
            self.config.agent.interval_s,
            self._store,
        )

    def shutdown(self) -> None:
        """Stop taking samples, flush the spool once (bounded), close everything."""
        if not self._started:
            return
        self._started = False
        self.notifier.stopping("flushing the spool")
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=True)  # a running cycle completes; nothing new starts
            self._scheduler = None
        if self._spool is not None and self._shipper is not None:
            self._put_self_stats()
            self._flush(self.flush_timeout_s)
        self._close_parts()
        log.info("agent stopped")

    # --- opening and closing -------------------------------------------------------------
    @property
    def backend(self) -> DeviceBackend:
        assert self._backend is not None, "start() first"
        return self._backend

    def _open_parts(self) -> None:
        from agent.host import HostCollector
        from agent.jobs import JobResolver
        from agent.rapl import RaplReader
        from agent.shipper import Shipper
        from agent.spool import Spool
        from agent.throughput import ThroughputTracker

        cfg = self.config
        try:
            if self._backend is None:
                self._backend = open_agent_backend(cfg)
            else:
                self._backend.open()
            state_dir = cfg.state_dir
            state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._spool = Spool(state_dir / SPOOL_FILE, int(cfg.agent.spool_max_mb * 1024 * 1024))
            if self._store is None:
                self._store = open_agent_store(cfg)
            self._shipper = Shipper(self._spool, self._store, batch_lines=cfg.store.batch_lines)
            self._host_collector = HostCollector(rapl=RaplReader())
            self._resolver = JobResolver(self._proc_root)
            self._tracker = ThroughputTracker(
                _jobs_dir(cfg.runtime_dir), max_age_s=cfg.agent.job_report_max_age_s
            )
        except BaseException:
            self._close_parts()
            raise
        self.sampler = Sampler(
            self.backend,
            self.host,
            self._host_collector,
            self._resolver,
            self._tracker,
            clock=self._clock,
        )

    def _close_parts(self) -> None:
        for name in ("_tracker", "_store", "_spool", "_backend"):
            part = getattr(self, name)
            if part is None:
                continue
            if name == "_store" and not self._own_store:
                continue  # the caller's store: the caller closes it
            try:
                part.close()
            except Exception as e:
                self._fail(f"close{name}", e)
            if name != "_backend" or self._own_backend:
                setattr(self, name, None if name != "_store" or self._own_store else part)

    # --- the schedule --------------------------------------------------------------------
    def _start_scheduler(self) -> None:
        from apscheduler.executors.pool import ThreadPoolExecutor
        from apscheduler.schedulers.background import BackgroundScheduler
        from apscheduler.triggers.interval import IntervalTrigger

        a = self.config.agent
        scheduler = BackgroundScheduler(
            executors={
                "sampling": ThreadPoolExecutor(1),
                "shipping": ThreadPoolExecutor(1),
                "default": ThreadPoolExecutor(2),
            },
            timezone="UTC",
        )
        scheduler.add_job(
            self._sample_cycle,
            IntervalTrigger(seconds=a.interval_s, timezone="UTC"),
            id="sample",
            name="sample",
            executor="sampling",
            max_instances=1,
            coalesce=True,
            misfire_grace_time=_grace_s(a.interval_s),
        )
        scheduler.add_job(
            self._ship_cycle,
            IntervalTrigger(seconds=a.ship_interval_s, timezone="UTC"),
            id="ship",
            name="ship",
            executor="shipping",
            max_instances=1,
            coalesce=True,
            misfire_grace_time=_grace_s(a.ship_interval_s),
        )
        self._scheduler = scheduler
        if hasattr(self._store, "prune"):
            self.add_job(self._prune, RETENTION_INTERVAL_S, "retention")
        else:
            for job in self._jobs:
                self._schedule_extra(job)
        scheduler.start()

    def _schedule_extra(self, job: PeriodicJob) -> None:
        from apscheduler.triggers.interval import IntervalTrigger

        def guarded() -> None:
            try:
                job.func()
            except Exception as e:
                self._fail(f"job {job.name}", e)

        self._scheduler.add_job(
            guarded,
            IntervalTrigger(seconds=job.interval_s, timezone="UTC"),
            name=job.name,
            max_instances=1,
            coalesce=True,
            misfire_grace_time=_grace_s(job.interval_s),
        )

    # --- the cycles ----------------------------------------------------------------------
    def _sample_cycle(self) -> None:
        """Sample, commit to the spool, and only then tell the watchdog we are alive."""
        assert self.sampler is not None
        try:
            points = self.sampler.sample()
            committed = self._spool.put(points)
        except Exception as e:
            self._fail("sample", e)
            return
        self.points_spooled_total += committed
        if points:
            log.debug("spooled %d points at %d", committed, points[0].time_ns)
            if self._on_spooled is not None:
                self._on_spooled(points[0].time_ns, committed)
        if self.sampler.healthy:
            self.notifier.watchdog()

    def _ship_cycle(self) -> None:
        """Ship what the spool holds (bounded by the ship interval), then record self-stats."""
        self._flush(self.config.agent.ship_interval_s * 0.8)
        self._put_self_stats()

    def _flush(self, budget_s: float) -> None:
        """Ship batches until the spool is empty, shipping stalls, or ``budget_s`` runs out."""
        deadline = time.monotonic() + budget_s
        while time.monotonic() < deadline:
            try:
                report = self._shipper.ship_once()
            except Exception as e:
                self._fail("ship", e)
                return
            if not _made_progress(report) or self._spool.depth() == 0:
                return

    def _put_self_stats(self) -> None:
        assert self.sampler is not None
        others = [p for p in (self._host_collector, self._resolver, self._tracker) if p]
        try:
            p = agent_point(
                host=self.host,
                time_ns=self._clock(),
                sampler=self.sampler,
                spool=self._spool,
                shipper=self._shipper,
                points_spooled_total=self.points_spooled_total,
                dropped_overflow_total=_spool_dropped(self._spool),
                other_errors=[*others, self.notifier],
                daemon_errors_total=self.errors_total,
                daemon_last_error=self.last_error,
            )
            self._spool.put([p])
        except Exception as e:
            self._fail("selfstats", e)

    def _prune(self) -> None:
        days = self.config.agent.retention_days
        self._store.prune(older_than_ns=self._clock() - int(days * 86400e9))

    # --- helpers -------------------------------------------------------------------------
    def _fail(self, part: str, err: BaseException) -> None:
        self.errors_total += 1
        self.last_error = f"{part}: {err}"
        if part not in self._logged:
            self._logged.add(part)
            log.error("%s failed: %s (logged once; counted in errors_total)", part, err,
                      exc_info=not isinstance(err, DcenergyError | OSError))

    def _install_signal_handlers(self) -> Callable[[], None]:
        """SIGTERM/SIGINT → ``stop()``; only possible (and needed) on the main thread."""
        if threading.current_thread() is not threading.main_thread():
            return lambda: None

        def handler(signum: int, frame: FrameType | None) -> None:
            log.info("received %s, shutting down", signal.Signals(signum).name)
            self.stop()

        old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}

        def restore() -> None:
            for s, h in old.items():
                signal.signal(s, h)

        return restore


def _grace_s(interval_s: float) -> int:
    """APScheduler wants a whole number of seconds; a run later than an interval is moot."""
    return max(1, round(interval_s))


def _made_progress(report: Any) -> bool:
    shipped = getattr(report, "shipped", None)
    if shipped is None:
        shipped = getattr(report, "points_shipped", 0)
    dropped = getattr(report, "dropped", 0) or 0
    return bool(shipped or dropped)


def _spool_dropped(spool: Any) -> int:
    return int(getattr(spool, "dropped_overflow_total", 0))


def _jobs_dir(runtime_dir: Path) -> Path:
    """``<runtime_dir>/jobs``: sticky and world-writable (like /tmp) so any job can report."""
    path = runtime_dir / JOBS_SUBDIR
    try:
        path.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            path.chmod(0o1777)
    except OSError as e:
        log.warning("cannot create the job report directory %s: %s", path, e)
    return path


def open_agent_backend(config: Config) -> DeviceBackend:
    """The configured backend, opened: simulated when ``agent.simulate`` > 0 or asked for."""
    from agent.devices import open_backend

    a = config.agent
    if a.simulate > 0 or a.backend == "simulated":
        return open_backend("simulated", simulate=a.simulate, host=config.host)
    return open_backend("nvml")


def open_agent_store(config: Config) -> Any:
    """The sink: InfluxDB when ``store.influx_url`` is set, else the embedded SQLite store."""
    from dcenergy.store import open_store

    return open_store(config)
