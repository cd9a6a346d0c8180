"""The optimizer service: every ``optimizer.interval_s``, telemetry in, a signed plan out.

One run (:meth:`OptimizerService.run_once`) is the whole central data flow:
read the last ``optimizer.window_s`` of ``gpu``/``job`` telemetry and the
topology file (re-read every run, so an edited topology takes effect at the
next solve) into a problem (``optimizer.snapshot.build_problem``), solve the
capping LP (``optimizer.capping.solve_capping``), make a plan that lives
``optimizer.plan_ttl_s`` (``optimizer.plan.make_plan``), sign and write each
host's part (``dcenergy.publish.publish``), then write the plan's
``plan``/``plan_domain`` records for the dashboards (``optimizer.records``).
The optimizer does not import the CLI; ``dcenergy recommend --apply`` is the
one-shot, by-hand version of the same steps.

Failures keep the last good plan. A run that cannot read the store, finds
no telemetry, meets a bad topology or a solver error publishes nothing: the
failure is counted (``failures_total``, ``last_error``), logged once per
streak of identical failures (not every interval), and the run returns
``None``. There is nothing to republish: the store still holds the last
published parts and each agent keeps applying its part until it expires
(``plan_ttl_s``), then restores its GPUs' defaults, so a dead or blind
optimizer never leaves the fleet throttled for longer than one lease. A
failure to write the dashboard records after a successful publish is counted
too (``records_errors_total``) but the plan stands.

Sequence numbers: agents refuse a part whose ``seq`` is not above the last one
they accepted, so ``seq`` must rise strictly even across restarts and clock
steps. It is ``max(now_ns, last_seq + 1)``, and the ``plan_part`` points are
stamped with it too (agents take the newest part by point time: a part stamped
by a clock that stepped back would hide behind the previous one). The service
keeps ``last_seq`` in ``<state_dir>/optimizer-state.json`` and writes the new
value there (atomically) *before* the parts go out, so a crash between the two
can only skip a number, never reuse one. A missing state file starts from the
clock; an unreadable one is logged and the clock is used too. A copy of the
last plan published is kept as ``<state_dir>/optimizer-last-plan.json`` for
operators to inspect; the service never reads it back.

Scheduling (:meth:`OptimizerService.run`): the first run happens at once, in
the calling thread; then APScheduler 3's ``BackgroundScheduler`` runs it every
``interval_s`` with ``max_instances=1`` and ``coalesce=True`` (a solve that
overruns the next deadline makes one late run, never a burst). The main
thread waits for SIGTERM/SIGINT (the handler only sets a flag), ``stop()``,
or the end of ``duration_s``; shutdown lets a running solve finish, then
returns 0.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from dcenergy.config import Config
from dcenergy.errors import DcenergyError
from dcenergy.files import write_private_atomic
from dcenergy.overrides import read_overrides
from dcenergy.phases import Phases
from dcenergy.plan import SignedPart
from dcenergy.publish import newest_parts, publish
from optimizer.budget_overrides import apply_overrides
from optimizer.capping import FastPathNotApplicable, solve_capping
from optimizer.curves import CurveFit, fit_curves
from optimizer.plan import Plan, make_plan, plan_to_json
from optimizer.policy import Policy, SchedulerPolicy, SlurmSource, load_policy
from optimizer.problem import Problem, parse_problem
from optimizer.records import plan_points
from optimizer.snapshot import build_problem, objective_doc
from optimizer.topology import Topology, load_topology

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from dcenergy.store.base import Store

log = logging.getLogger(__name__)

STATE_FILE = "optimizer-state.json"
LAST_PLAN_FILE = "optimizer-last-plan.json"
STATE_VERSION = 1
SIGNAL_POLL_S = 0.2  # how soon the main thread notices SIGTERM/SIGINT


@dataclass
class ServiceStats:
    """Counters of one service's life (not persisted)."""

    runs_total: int = 0
    published_total: int = 0
    failures_total: int = 0
    consecutive_failures: int = 0
    records_errors_total: int = 0
    last_error: str = ""
    reverted_hosts: int = 0  # hosts the last run did not publish for (a live revert)
    overrides_in_force: int = 0  # budget overrides the last run applied


class OptimizerService:
    """Solves and publishes a plan per run; see the module docstring.

    ``store`` and ``private_key`` belong to the caller (the service never closes
    the store). ``topology_path`` defaults to ``optimizer.topology``;
    ``state_dir`` to the configuration's state directory; ``clock`` gives ns
    since the epoch (plan times and ``seq`` come from it).
    """

    def __init__(
        self,
        config: Config,
        store: Store,
        private_key: Ed25519PrivateKey,
        topology_path: Path | str | None = None,
        clock: Callable[[], int] = time.time_ns,
        *,
        state_dir: Path | None = None,
        method: str = "auto",
        policy_path: Path | str | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.private_key = private_key
        self.topology_path = Path(topology_path or config.optimizer.topology)
        self.clock = clock
        self.state_dir = Path(state_dir) if state_dir is not None else config.state_dir
        self.method = method
        # the scheduler's per-job policy (docs/policy.md): re-read every run, like the topology
        policy = policy_path or config.optimizer.policy
        self.policy_path = Path(policy) if policy else None
        self._policy: Policy | None = None
        self._resolver: SchedulerPolicy | None = None
        self._slurm_source: SlurmSource | None = None
        self.stats = ServiceStats()
        self.last_plan: Plan | None = None
        self.last_exception: BaseException | None = None
        self._logged_error = ""
        self._logged_reverts: frozenset[str] = frozenset()
        self._logged_overrides: tuple[object, ...] = ((), ())
        self._stop = threading.Event()
        self._signalled: int | None = None
        self._state = self._load_state()

    # --- state ------------------------------------------------------------------------------
    @property
    def state_path(self) -> Path:
        return self.state_dir / STATE_FILE

    @property
    def last_seq(self) -> int:
        """The highest ``seq`` this optimizer used, across restarts (0 if none)."""
        seq = self._state.get("last_seq", 0)
        return seq if isinstance(seq, int) and not isinstance(seq, bool) and seq > 0 else 0

    def _load_state(self) -> dict[str, Any]:
        try:
            raw = json.loads(self.state_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            log.error(
                "cannot read the optimizer state %s (%s): seq continues from the clock",
                self.state_path,
                e,
            )
            return {}
        if not isinstance(raw, dict):
            log.error("optimizer state %s is not an object: ignored", self.state_path)
            return {}
        return raw

    def _save_state(self, **changes: Any) -> None:
        state = {**self._state, **changes, "version": STATE_VERSION}
        write_private_atomic(self.state_path, json.dumps(state, sort_keys=True) + "\n")
        self._state = state

    # --- one run ----------------------------------------------------------------------------
    def run_once(self, now_ns: int | None = None, *, raise_errors: bool = False) -> Plan | None:
        """Build, solve, sign, publish and record one plan; ``None`` (counted) on failure.

        Never raises for a failure of the store, the telemetry, the topology or
        the solver: the last published plan stays in force until it expires.
        With ``raise_errors`` (``optimizer run --once``) the failure is counted
        and re-raised instead of logged, for the caller to report.
        """
        now = self.clock() if now_ns is None else now_ns
        self.stats.runs_total += 1
        stage = "start"
        phases = Phases()
        try:
            stage = "topology"
            topology = self._topology()
            stage = "snapshot"
            with phases.phase("read"):
                topology = self._with_overrides(topology, now)
                reverted = self._reverted_hosts(now)
                problem = self._problem(topology, now, pinned=reverted)
            stage = "fit"
            with phases.phase("fit"):
                fits = fit_curves(problem)
            stage = "solve"
            with phases.phase("solve"):
                plan = self._solve(problem, fits, now)
            stage = "publish"
            with phases.phase("publish"):
                signed = self._publish(plan, now, skip_hosts=reverted)
        except Exception as e:
            self._fail(stage, e, now, log_it=not raise_errors)
            if raise_errors:
                raise
            return None
        with phases.phase("record"):
            self._record(plan, problem, now)
            self._keep_last(plan)
        phases.log(self.store.stats)
        if self.stats.consecutive_failures:
            log.info("optimizer recovered after %d failed runs", self.stats.consecutive_failures)
        self.stats.consecutive_failures = 0
        self.stats.published_total += 1
        self.last_exception = None
        self._logged_error = ""
        self.last_plan = plan
        log.info(
            "published plan %s: %d hosts, %d GPUs, seq %d, %s, predicted %.0f W -> %.0f W",
            plan.plan_id,
            len(signed),
            len(plan.setpoints),
            self.last_seq,
            plan.solver.status,
            plan.before.fleet_power_w,
            plan.after.fleet_power_w,
        )
        return plan

    def _topology(self) -> Topology:
        return load_topology(self.topology_path)

    def _problem(
        self, topology: Topology, now_ns: int, *, pinned: frozenset[str] = frozenset()
    ) -> Problem:
        """The problem from telemetry; GPUs of ``pinned`` hosts may not go below their default.

        A reverted host's GPUs run at their saved (pre-agent, normally default) limits
        whatever the plan says: counting them there keeps every domain's budget honest
        for the GPUs the plan does steer.
        """
        o = self.config.optimizer
        doc = build_problem(
            self.store,
            topology,
            now_ns=now_ns,
            window_s=o.window_s,
            objective=objective_doc(o),
            allowed_slowdown=o.allowed_slowdown,
            policy=self._job_policy(),
        )
        for g in doc["gpus"]:
            if g["host"] in pinned:
                g["min_w"] = max(g["min_w"], g["default_w"])
        return parse_problem(doc, "<telemetry>")

    def _with_overrides(self, topology: Topology, now_ns: int) -> Topology:
        """The topology's budgets with the live budget overrides (demand response) applied.

        One aggregate read; an override this optimizer's key did not sign, or for a
        domain the topology lacks, is ignored. Changes are logged once.
        """
        states = read_overrides(self.store, now_ns, self.private_key.public_key())
        out, applied, ignored = apply_overrides(topology, states, now_ns)
        text = "; ".join(
            f"{a.domain} {a.budget_w:g} W"
            + (f" (asked {a.requested_w:g} W, topology {a.topology_w:g} W)" if a.capped else "")
            + f" for {(a.expires_ns - now_ns) / 1e9:.0f} s"
            for a in applied
        )
        key = (tuple((a.domain, a.budget_w, a.expires_ns) for a in applied), tuple(ignored))
        if key != self._logged_overrides:
            self._logged_overrides = key
            if applied:
                log.warning("budget overrides in force: %s", text)
            elif self.stats.overrides_in_force:
                log.info("budget overrides ended: the topology's budgets apply")
            for why in ignored:
                log.warning("budget override ignored: %s", why)
        self.stats.overrides_in_force = len(applied)
        return out

    def _reverted_hosts(self, now_ns: int) -> frozenset[str]:
        """Hosts whose newest part is a live revert (``dcenergy revert``): one aggregate read.

        The service publishes nothing for them until the revert ends, so an
        emergency stop is not undone by the next plan. Changes are logged once.
        """
        hosts = frozenset(
            h
            for h, p in newest_parts(self.store, now_ns).items()
            if p.revert and p.expires_ns > now_ns
        )
        if hosts != self._logged_reverts:
            if hosts:
                log.warning(
                    "not publishing for %d reverted hosts until their revert ends: %s",
                    len(hosts),
                    ", ".join(sorted(hosts)),
                )
            else:
                log.info("no host is reverted any more: publishing for every host")
            self._logged_reverts = hosts
        self.stats.reverted_hosts = len(hosts)
        return hosts

    def _solve(self, problem: Problem, fits: Mapping[str, CurveFit], now_ns: int) -> Plan:
        try:
            result = solve_capping(problem, self.method, fits=fits)  # type: ignore[arg-type]
        except FastPathNotApplicable as e:
            # the fleet changed under a fixed method: the LP solves every problem
            log.warning("method fast does not apply (%s): solved with the LP", e.reason)
            result = solve_capping(problem, "lp", fits=fits)
        if not result.feasible:
            # Still published: best effort is the closest the fleet can get to its budgets.
            log.warning(
                "plan is best effort: %s (domains short: %s; jobs past their slowdown: %s)",
                result.status,
                ", ".join(d.id for d in result.infeasible_domains) or "none",
                ", ".join(result.slowdown_exceeded) or "none",
            )
        o = self.config.optimizer
        probes = None
        if o.probing == "on":
            from optimizer.probing import choose_probes

            probes = choose_probes(
                problem, result, share=o.probe_budget_share, lease_s=o.probe_lease_s, fits=fits
            )
        return make_plan(
            problem,
            result,
            created_ns=now_ns,
            ttl_s=o.plan_ttl_s,
            consolidation=self._consolidation(now_ns),
            probes=probes,
        )

    # --- the scheduler's policy ---------------------------------------------------------------
    def _job_policy(self) -> SchedulerPolicy | None:
        """The policy file joined with Slurm's job facts (their cache outlives one run)."""
        if self.policy_path is None:
            self._policy = None
            return None
        self._policy = load_policy(self.policy_path)
        if self._resolver is None or self._policy.slurm != self._slurm_source:
            from optimizer.slurm import policy_resolver

            self._slurm_source = self._policy.slurm
            self._resolver = policy_resolver(self._policy, self.config.optimizer.allowed_slowdown)
        self._resolver.policy = self._policy
        self._resolver.default_slowdown = self.config.optimizer.allowed_slowdown
        return self._resolver

    def _consolidation(self, now_ns: int) -> dict[str, Any] | None:
        """The consolidation MILP on the same window, when the policy has its section.

        The service only plans it (the plan and its records carry the moves and
        the nodes to free); draining is ``dcenergy consolidate --apply``.
        """
        if self._policy is None or self._policy.consolidation is None:
            return None
        from optimizer.consolidation import parse_consolidation, solve_consolidation
        from optimizer.live_consolidation import build_consolidation

        o = self.config.optimizer
        snap = build_consolidation(
            self.store,
            now_ns=now_ns,
            window_s=o.window_s,
            objective=objective_doc(o),
            policy=self._policy.consolidation,
            jobs=self._resolver,
        )
        cp = parse_consolidation(snap.section, "<telemetry>", prefix="consolidation")
        limit = self._policy.consolidation.time_limit_s
        return solve_consolidation(cp, time_limit_s=limit).to_json()

    def _publish(
        self, plan: Plan, now_ns: int, *, skip_hosts: frozenset[str] = frozenset()
    ) -> list[SignedPart]:
        doc = plan_to_json(plan)
        if skip_hosts:
            doc["setpoints"] = [s for s in doc["setpoints"] if s.get("host") not in skip_hosts]
            if not doc["setpoints"]:
                return []  # every host is reverted: nothing to publish
        seq = max(now_ns, self.last_seq + 1)
        # Write-ahead: the seq is on disk before any agent can see it.
        self._save_state(last_seq=seq)
        # The parts are stamped ``seq`` (= now_ns unless the clock stepped back): agents
        # fetch the newest part by point time, so that must rise with seq as well.
        next_plan_ns = now_ns + int(self.config.optimizer.interval_s * 1e9)
        signed = publish(
            doc,
            self.store,
            self.private_key,
            seq,
            last_seq=seq - 1,
            next_plan_ns=next_plan_ns,
        )
        self._save_state(
            last_seq=seq,
            plan_id=plan.plan_id,
            created_ns=plan.created_ns,
            expires_ns=plan.expires_ns,
        )
        return signed

    def _record(self, plan: Plan, problem: Problem, now_ns: int) -> None:
        try:
            self.store.write(plan_points(plan, now_ns, problem=problem))
        except Exception as e:
            self.stats.records_errors_total += 1
            log.warning("plan %s published, but its records were not written: %s", plan.plan_id, e)

    def _keep_last(self, plan: Plan) -> None:
        try:
            text = json.dumps(plan_to_json(plan), indent=2, allow_nan=False) + "\n"
            write_private_atomic(self.state_dir / LAST_PLAN_FILE, text)
        except (OSError, ValueError) as e:
            log.warning("cannot keep a copy of plan %s: %s", plan.plan_id, e)

    def _fail(self, stage: str, err: Exception, now_ns: int, *, log_it: bool = True) -> None:
        self.stats.failures_total += 1
        self.stats.consecutive_failures += 1
        self.last_exception = err
        hint = getattr(err, "hint", None) if isinstance(err, DcenergyError) else None
        message = f"{stage}: {err}" + (f" (hint: {hint})" if hint else "")
        self.stats.last_error = message
        if not log_it:
            return
        if message == self._logged_error:
            log.debug("optimizer run failed again: %s", message)
            return
        self._logged_error = message
        expires = self._state.get("expires_ns")
        if isinstance(expires, int) and expires > now_ns:
            keep = (
                f"agents keep plan {self._state.get('plan_id')} for "
                f"{(expires - now_ns) / 1e9:.0f} s more"
            )
        else:
            keep = "no plan in force: agents run at their defaults"
        log.error(
            "optimizer run failed (%s); nothing published, %s (logged once; counted)",
            message,
            keep,
            exc_info=err if not isinstance(err, DcenergyError | OSError) else None,
        )

    # --- the schedule -----------------------------------------------------------------------
    def stop(self) -> None:
        """Ask ``run()`` to return (from any thread)."""
        self._stop.set()

    def run(self, duration_s: float | None = None) -> int:
        """Run now, then every ``optimizer.interval_s`` until SIGTERM/SIGINT/``stop()``/duration.

        Returns 0 on a clean stop; failed runs do not end the service.
        """
        from apscheduler.schedulers.background import BackgroundScheduler
        from apscheduler.triggers.interval import IntervalTrigger

        o = self.config.optimizer
        if o.interval_s >= o.plan_ttl_s:
            log.warning(
                "optimizer.interval_s (%g s) is not below optimizer.plan_ttl_s (%g s): agents "
                "will revert to their defaults between two plans",
                o.interval_s,
                o.plan_ttl_s,
            )
        deadline = None if duration_s is None else time.monotonic() + duration_s
        restore = self._install_signal_handlers()
        scheduler: Any = None
        try:
            self._guarded_run()
            if self._should_stop(deadline):
                return 0
            sched_log = logging.getLogger("apscheduler")
            if sched_log.level == logging.NOTSET:
                sched_log.setLevel(logging.WARNING)
            scheduler = BackgroundScheduler(timezone="UTC")
            scheduler.add_job(
                self._guarded_run,
                IntervalTrigger(seconds=o.interval_s, timezone="UTC"),
                name="optimize",
                max_instances=1,
                coalesce=True,
                misfire_grace_time=max(1, round(o.interval_s)),
            )
            scheduler.start()
            log.info(
                "optimizer running: every %g s, plans live %g s, topology %s",
                o.interval_s,
                o.plan_ttl_s,
                self.topology_path,
            )
            self._wait(deadline)
        finally:
            try:
                if scheduler is not None:
                    scheduler.shutdown(wait=True)  # a running solve completes
            finally:
                restore()
        log.info("optimizer stopped")
        return 0

    def _guarded_run(self) -> None:
        try:
            self.run_once()
        except Exception:  # run_once handles its failures; this is a bug, not an outage
            self.stats.failures_total += 1
            log.exception("optimizer run crashed")

    def _should_stop(self, deadline: float | None) -> bool:
        if self._signalled is not None or self._stop.is_set():
            return True
        return deadline is not None and time.monotonic() >= deadline

    def _wait(self, deadline: float | None) -> None:
        """Poll for the signal flag (the handler takes no lock), ``stop()`` or the deadline."""
        while self._signalled is None:
            slice_s = SIGNAL_POLL_S
            if deadline is not None:
                slice_s = min(slice_s, deadline - time.monotonic())
                if slice_s <= 0:
                    return
            if self._stop.wait(slice_s):
                return
        log.info("received %s, shutting down", signal.Signals(self._signalled).name)

    def _install_signal_handlers(self) -> Callable[[], None]:
        if threading.current_thread() is not threading.main_thread():
            return lambda: None

        def handler(signum: int, frame: FrameType | None) -> None:
            self._signalled = signum

        old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}

        def restore() -> None:
            for s, h in old.items():
                signal.signal(s, h)

        return restore


__all__ = ["LAST_PLAN_FILE", "STATE_FILE", "OptimizerService", "ServiceStats"]
