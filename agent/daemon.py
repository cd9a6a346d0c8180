"""The node agent daemon: sample into the spool, ship the spool to the store, on a schedule.

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

Hooks for the parts that come later (the plan reconciler): ``add_job`` for
periodic work, ``add_start_hook`` (backend open, before READY=1) and
``add_stop_hook`` (after the last cycle, before the final flush).

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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from agent.devices.base import DeviceBackend
from agent.notify import Notifier
from agent.sampler import Sampler
from agent.selfstats import ErrorCounter, agent_point
from dcenergy.config import Config
from dcenergy.errors import DcenergyError
from dcenergy.logonce import LogOnce

if TYPE_CHECKING:
    from agent.host import HostCollector
    from agent.jobs import JobResolver
    from agent.metrics import MetricsServer
    from agent.reconciler import Reconciler
    from agent.shipper import Shipper
    from agent.spool import Spool
    from agent.throughput import ThroughputTracker
    from dcenergy.schema import Point
    from dcenergy.store.base import Store

log = logging.getLogger(__name__)

SPOOL_FILE = "spool.sqlite"
JOBS_SUBDIR = "jobs"
RETENTION_INTERVAL_S = 3600.0
SIGNAL_POLL_S = 0.2  # how soon the main thread notices SIGTERM/SIGINT
DEFAULT_FLUSH_TIMEOUT_S = 15.0  # the unit's TimeoutStopSec= (30 s) leaves room for it


@dataclass(frozen=True, slots=True)
class PeriodicJob:
    """An extra job the daemon runs every ``interval_s`` (the plan reconciler registers here)."""

    func: Callable[[], object]
    interval_s: float
    name: str


class AgentDaemon:
    """Owns the agent's parts and their schedule; ``run()`` is the whole life of the process.

    ``backend`` and ``store`` may be given (tests, embedding: the caller closes
    them); otherwise the daemon builds them from ``config`` when it starts,
    never in the constructor, and closes them when it stops.
    """

    def __init__(
        self,
        config: Config,
        backend: DeviceBackend | None = None,
        store: Store | None = None,
        *,
        clock: Callable[[], int] = time.time_ns,
        notifier: Notifier | None = None,
        proc_root: Path = Path("/proc"),
        flush_timeout_s: float = DEFAULT_FLUSH_TIMEOUT_S,
        on_spooled: Callable[[int, int], None] | None = None,
    ) -> None:
        self.config = config
        self.host = config.host
        self._given_backend = backend
        self._given_store = store
        self._clock = clock
        self.notifier = notifier or Notifier()
        self._proc_root = proc_root
        self.flush_timeout_s = flush_timeout_s
        self._on_spooled = on_spooled  # (time_ns, points committed): tests and demos
        self._stop = threading.Event()
        self._signalled: int | None = None  # set by the signal handler, nothing else
        self._jobs: list[PeriodicJob] = []
        self._start_hooks: list[Callable[[AgentDaemon], object]] = []
        self._stop_hooks: list[Callable[[AgentDaemon], object]] = []
        self._scheduler: Any = None  # apscheduler has no type hints
        self._backend: DeviceBackend | None = None
        self._store: Store | None = None
        self._spool: Spool | None = None
        self._shipper: Shipper | None = None
        self._host_collector: HostCollector | None = None
        self._resolver: JobResolver | None = None
        self._tracker: ThroughputTracker | None = None
        self.sampler: Sampler | None = None
        self.reconciler: Reconciler | None = None
        self.errors_total = 0
        self.last_error = ""
        self._once = LogOnce(log)
        self._started = False
        self._early_audit: list[Point] = []
        self.last_points: tuple[Point, ...] = ()  # the last cycle's points (/metrics renders them)
        self._metrics: MetricsServer | None = None

    # --- public API ----------------------------------------------------------------------
    def add_job(self, func: Callable[[], object], interval_s: float, name: str) -> None:
        """Run ``func`` every ``interval_s`` while the daemon runs; its errors are counted.

        The hook for periodic work besides sampling and shipping (the plan
        reconciler). May be called before or after ``start()``.
        """
        job = PeriodicJob(func, interval_s, name)
        self._jobs.append(job)
        if self._scheduler is not None:
            self._schedule_extra(job)

    def add_start_hook(self, func: Callable[[AgentDaemon], object]) -> None:
        """Call ``func(daemon)`` once the backend, spool and store are open, before READY=1.

        For parts that must act on the GPUs first (the reconciler undoing a crashed
        run's setpoints). An exception is counted and logged; the agent still starts.
        """
        self._start_hooks.append(func)

    def add_stop_hook(self, func: Callable[[AgentDaemon], object]) -> None:
        """Call ``func(daemon)`` at shutdown, after the last cycle and before the final flush.

        The backend is still open and what the hook spools is flushed with the rest
        (the reconciler restoring default limits and auditing it).
        """
        self._stop_hooks.append(func)

    @property
    def store(self) -> Store:
        if self._store is None:
            raise RuntimeError("the agent daemon is not started")
        return self._store

    def run(self, duration_s: float | None = None) -> int:
        """Start, wait for SIGTERM/SIGINT/``stop()`` or ``duration_s``, shut down; 0 when clean."""
        restore = self._install_signal_handlers()
        try:
            self.start()
            self._wait(duration_s)
        finally:
            try:
                self.shutdown()
            finally:
                restore()
        return 0

    def stop(self) -> None:
        """Ask ``run()`` to return (from any thread; signals go through ``_signalled``)."""
        self._stop.set()

    def _wait(self, duration_s: float | None) -> None:
        """Wait for ``stop()``, a signal, or ``duration_s``.

        The signal handler only assigns an int: ``Event.set()`` takes a lock, and a
        handler that interrupted the main thread while it held that lock would
        deadlock. So the main thread looks at the flag every ``SIGNAL_POLL_S``.
        """
        deadline = None if duration_s is None else time.monotonic() + duration_s
        while self._signalled is None:
            slice_s = SIGNAL_POLL_S
            if deadline is not None:
                slice_s = min(slice_s, deadline - time.monotonic())
                if slice_s <= 0:
                    return
            if self._stop.wait(slice_s):
                return
        log.info("received %s, shutting down", signal.Signals(self._signalled).name)

    @property
    def backend(self) -> DeviceBackend:
        if self._backend is None:
            raise RuntimeError("the agent daemon is not started")
        return self._backend

    @property
    def spool(self) -> Spool:
        if self._spool is None:
            raise RuntimeError("the agent daemon is not started")
        return self._spool

    @property
    def shipper(self) -> Shipper:
        if self._shipper is None:
            raise RuntimeError("the agent daemon is not started")
        return self._shipper

    def start(self) -> None:
        """Open backend, spool and store; tell systemd READY=1; start the schedule."""
        if self._started:
            return
        self._started = True
        self._open_parts()  # the reconciler's start-up restore runs in there, before the spool
        wd = self.notifier.watchdog_s
        if wd is not None and self.config.agent.interval_s * 2 > wd:
            log.warning(
                "agent.interval_s (%g s) is over half of WatchdogSec= (%g s): systemd may "
                "restart a healthy agent between two samples",
                self.config.agent.interval_s,
                wd,
            )
        self._call_hooks(self._start_hooks, "start hook")
        n_gpus = len(self.backend.devices())
        self.notifier.ready(f"sampling {n_gpus} GPUs every {self.config.agent.interval_s:g} s")
        self._start_scheduler()
        self._start_metrics()
        log.info(
            "agent started: host %s, %d GPUs (%s), every %g s, shipping to %r",
            self.host,
            n_gpus,
            self.backend.name,
            self.config.agent.interval_s,
            self._store,
        )

    def shutdown(self) -> None:
        """Stop sampling (nothing new is taken), flush the spool once (bounded), close all."""
        if not self._started:
            return
        self._started = False
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=True)  # a running cycle completes; nothing new starts
            self._scheduler = None
        # After the last cycle, so no WATCHDOG=1 can follow STOPPING=1.
        self.notifier.stopping("flushing the spool")
        if self._backend is not None:
            self._call_hooks(self._stop_hooks, "stop hook")
        if self._spool is not None and self._shipper is not None:
            self._put_self_stats()
            depth = self._flush(self.flush_timeout_s)
            if depth:
                log.warning(
                    "stopping with %d points still in the spool (shipped next start)", depth
                )
        self._close_parts()
        log.info("agent stopped")

    # --- the plan reconciler -------------------------------------------------------------
    def _attach_reconciler(self) -> None:
        """Apply this host's signed plan parts, when enabled and a public key is installed.

        A node with no key at the default path is a telemetry-only node (logged once);
        a key path the operator set that does not exist is a configuration error.
        """
        from dcenergy.config import ReconcilerConfig

        rc = self.config.reconciler
        if not rc.enabled:
            return
        if not Path(rc.public_key).exists() and rc.public_key == ReconcilerConfig.public_key:
            log.info(
                "no plan public key at %s: telemetry only, no setpoints applied", rc.public_key
            )
            return
        from agent.reconciler import reconciler_from_config

        rec = reconciler_from_config(
            self.config,
            self.backend.devices(),
            self.store,
            audit_sink=self._audit,  # audit records travel with the telemetry
            clock_ns=self._clock,
        )
        self.reconciler = rec
        # Limits a crashed run left are restored now, before the spool opens: a damaged or
        # unopenable spool must never leave GPUs capped.
        self._call_hooks([lambda _d: rec.on_start(self._clock())], "start-up restore")
        self.add_stop_hook(lambda _d: rec.restore_all("shutdown"))
        self.add_job(rec.tick, rc.interval_s, "reconcile")

    def _audit(self, points: Sequence[Point]) -> int:
        """The reconciler's audit sink: the spool, or a list until the spool is open."""
        if self._spool is None:
            self._early_audit.extend(points)
            return len(points)
        return self._spool.put(points)

    # --- opening and closing -------------------------------------------------------------
    def _open_parts(self) -> None:
        from agent.host import HostCollector
        from agent.kube import job_resolver_from_config
        from agent.rapl import RaplReader
        from agent.shipper import Shipper
        from agent.spool import Spool
        from agent.throughput import ThroughputTracker

        cfg = self.config
        try:
            if self._given_backend is not None:
                self._given_backend.open()  # idempotent
                self._backend = self._given_backend
            else:
                self._backend = open_agent_backend(cfg)
            cfg.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._store = self._given_store or open_agent_store(cfg)
            self._attach_reconciler()  # restores saved limits first: see there
            self._spool = Spool(
                cfg.state_dir / SPOOL_FILE, int(cfg.agent.spool_max_mb * 1024 * 1024)
            )
            if self._early_audit:  # what the start-up restore audited before the spool opened
                self._spool.put(self._early_audit)
                self._early_audit = []
            self._shipper = Shipper(self._spool, self._store, batch_lines=cfg.store.batch_lines)
            self._host_collector = HostCollector(rapl=RaplReader())
            self._resolver = job_resolver_from_config(
                cfg, self._proc_root, [d.identity for d in self._backend.devices()]
            )
            self._tracker = ThroughputTracker(
                jobs_dir(cfg.runtime_dir), max_age_s=cfg.agent.job_report_max_age_s
            )
        except BaseException:
            self._close_parts()
            raise
        self.sampler = Sampler(
            self._backend,
            self.host,
            self._host_collector,
            self._resolver,
            self._tracker,
            clock=self._clock,
        )

    def _close_parts(self) -> None:
        """Close what this daemon opened, each failure counted, none stopping the rest."""
        parts: list[tuple[str, Any]] = [
            ("tracker", self._tracker),
            ("spool", self._spool),
            ("job resolver", self._resolver if hasattr(self._resolver, "close") else None),
        ]
        if self._given_store is None:
            parts.append(("store", self._store))
        if self._given_backend is None:
            parts.append(("backend", self._backend))
        for name, part in parts:
            if part is None:
                continue
            try:
                part.close()
            except Exception as e:
                self._fail(f"closing the {name}", e)
        self._tracker = self._spool = self._store = self._backend = self._shipper = None

    # --- the schedule --------------------------------------------------------------------
    def _start_scheduler(self) -> None:
        from apscheduler.executors.pool import ThreadPoolExecutor
        from apscheduler.schedulers.background import BackgroundScheduler
        from apscheduler.triggers.interval import IntervalTrigger

        from agent.shipper import SKIPPED_SHIP_RUNS
        from dcenergy.store.embedded import EmbeddedStore

        a = self.config.agent
        sched_log = logging.getLogger("apscheduler")
        if sched_log.level == logging.NOTSET:
            # APScheduler logs every run at INFO: once a second is noise, not news.
            sched_log.setLevel(logging.WARNING)
        # A ship run skipped while a hung store holds the previous one is by design (one
        # warning per outage comes from the shipper, not one per ship interval).
        logging.getLogger("apscheduler.scheduler").addFilter(SKIPPED_SHIP_RUNS)
        scheduler = BackgroundScheduler(
            executors={
                "sampling": ThreadPoolExecutor(1),
                "shipping": ThreadPoolExecutor(1),
                "default": ThreadPoolExecutor(2),
            },
            timezone="UTC",
        )
        for func, interval_s, executor in (
            (self._sample_cycle, a.interval_s, "sampling"),
            (self._ship_cycle, a.ship_interval_s, "shipping"),
        ):
            scheduler.add_job(
                func,
                IntervalTrigger(seconds=interval_s, timezone="UTC"),
                name=executor,
                executor=executor,
                max_instances=1,
                coalesce=True,
                misfire_grace_time=_grace_s(interval_s),
            )
        self._scheduler = scheduler
        if isinstance(self._store, EmbeddedStore) and not any(
            j.name == "retention" for j in self._jobs
        ):
            self._jobs.append(PeriodicJob(self._prune, RETENTION_INTERVAL_S, "retention"))
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
        sampler, spool = self.sampler, self._spool
        if sampler is None or spool is None:
            return
        try:
            points = sampler.sample()
            self.last_points = tuple(points)
            committed = spool.put(points)
        except Exception as e:
            self._fail("sampling", e)
            return
        if points:
            log.debug("spooled %d points at %d", committed, points[0].time_ns)
            if self._on_spooled is not None:
                self._on_spooled(points[0].time_ns, committed)
        if sampler.healthy:
            self.notifier.watchdog()

    def _ship_cycle(self) -> None:
        """Ship what the spool holds (for at most one ship interval), then put self-stats."""
        self._flush(self.config.agent.ship_interval_s)
        self._put_self_stats()

    def _flush(self, budget_s: float) -> int:
        """Ship batches until the spool is empty, shipping stalls, or ``budget_s`` is spent.

        Returns the points left. Never waits out a backoff: an unreachable store
        ends the flush at once and the points stay in the spool.
        """
        shipper, spool = self._shipper, self._spool
        if shipper is None or spool is None:
            return 0
        deadline = time.monotonic() + budget_s
        depth = spool.depth()
        while depth and time.monotonic() < deadline:
            try:
                report = shipper.ship_once(max_batches=1)
            except Exception as e:  # the shipper maps store errors to results; this is a bug
                self._fail("shipping", e)
                break
            depth = report.depth
            if not (report.shipped or report.dropped_rejected or report.dropped_partial):
                break  # backing off, or the store refused: try again next cycle
        return depth

    def self_stats_point(self) -> Point | None:
        """The agent's counters now, as an ``agent`` point (``None`` before start)."""
        sampler, spool, shipper = self.sampler, self._spool, self._shipper
        if sampler is None or spool is None or shipper is None:
            return None
        others: list[ErrorCounter] = [self.notifier]
        others += [p for p in (self._host_collector, self._resolver, self._tracker) if p]
        return agent_point(
            host=self.host,
            time_ns=self._clock(),
            sampler=sampler,
            spool=spool.counters(),
            shipper=shipper.counters,
            other_errors=others,
            daemon_errors_total=self.errors_total,
            daemon_last_error=self.last_error,
        )

    @property
    def job_resolver(self) -> JobResolver | None:
        return self._resolver

    def _start_metrics(self) -> None:
        """Serve ``/metrics`` when ``agent.metrics_listen`` is set; a bind failure is counted."""
        if not self.config.agent.metrics_listen:
            return
        from agent.metrics import start_metrics_server

        try:
            self._metrics = start_metrics_server(self)  # logs the address (agent.metrics)
        except (OSError, ValueError) as e:
            self._fail(f"serving /metrics on {self.config.agent.metrics_listen}", e)

    @property
    def metrics_url(self) -> str | None:
        """Where ``/metrics`` is served (the bound port when configured as 0), if it is."""
        return self._metrics.url if self._metrics is not None else None

    def _put_self_stats(self) -> None:
        try:
            p = self.self_stats_point()
            if p is not None and self._spool is not None:
                self._spool.put([p])
        except Exception as e:
            self._fail("self-stats", e)

    def _prune(self) -> None:
        from dcenergy.store.embedded import EmbeddedStore

        if isinstance(self._store, EmbeddedStore):
            keep_ns = int(self.config.agent.retention_days * 86400 * 1e9)
            pruned = self._store.prune(older_than_ns=self._clock() - keep_ns)
            log.debug("retention: pruned %d points", pruned)

    # --- helpers -------------------------------------------------------------------------
    def _call_hooks(self, hooks: list[Callable[[AgentDaemon], object]], what: str) -> None:
        for hook in hooks:
            try:
                hook(self)
            except Exception as e:
                self._fail(f"{what} {getattr(hook, '__name__', hook)!s}", e)

    def _fail(self, part: str, err: BaseException) -> None:
        self.errors_total += 1
        self.last_error = f"{part}: {err}"
        unexpected = not isinstance(err, DcenergyError | OSError)
        self._once(
            part,
            logging.ERROR,
            "%s failed: %s (logged once; counted in errors_total)",
            part,
            err,
            exc_info=err if unexpected else None,
        )

    def _install_signal_handlers(self) -> Callable[[], None]:
        """SIGTERM/SIGINT end ``run()``; handlers can only be set on the main thread."""
        if threading.current_thread() is not threading.main_thread():
            return lambda: None

        def handler(signum: int, frame: FrameType | None) -> None:
            self._signalled = signum  # no lock, no logging: see _wait

        old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}

        def restore() -> None:
            for s, h in old.items():
                signal.signal(s, h)

        return restore


def _grace_s(interval_s: float) -> int:
    """APScheduler takes whole seconds; a run later than one interval is replaced by the next."""
    return max(1, round(interval_s))


def jobs_dir(runtime_dir: Path) -> Path:
    """``<runtime_dir>/jobs``; as root, sticky and world-writable (like /tmp) so any job reports."""
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


def open_agent_store(config: Config) -> Store:
    """The sink: InfluxDB when ``store.influx_url`` is set, else the embedded SQLite store."""
    from dcenergy.store.configured import open_configured_store

    return open_configured_store(config)
