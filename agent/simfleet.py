"""A simulated fleet: N nodes of real agent parts on one virtual clock, stepped by hand.

Each node is what a real agent runs, minus NVML and the scheduler:
``SimulatedBackend`` GPUs, the ``Sampler`` (with the real ``JobResolver``
reading a fake ``/proc`` and the real ``ThroughputTracker`` reading the node's
job report directory), a ``Spool``, a ``Shipper`` into the shared store, and
(given the optimizer's public key) a ``Reconciler`` that fetches, verifies
and applies its signed plan part. Jobs (``agent.workloads``) are the ground
truth: their speed follows the limits the reconciler sets.

Why a hand-stepped loop and not the daemon: a closed-loop run must be
deterministic and faster than real time, so there is no APScheduler and no
sleeping. One ``step_s`` does, in order: jobs add the work of the interval
at the settings in force, the clock moves, jobs report, every node samples
into its spool; every ``ship_interval_s`` the spools ship; every reconciler
interval the reconcilers act, so their changes hold from the next interval
on. Time starts at ``start_ns`` (virtual ns since the epoch) and is shared by
GPUs, samplers, reports, shipper and reconciler.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Final

from agent.devices.simulated import SimulatedBackend, SimulatedGpu
from agent.jobs import JobResolver
from agent.reconciler import AuditRecord, Reconciler
from agent.sampler import Sampler
from agent.selfstats import ErrorCounter, agent_point
from agent.shipper import Shipper
from agent.spool import Spool
from agent.throughput import ThroughputTracker
from agent.workloads import JobKind, SimJob
from dcenergy.config import ReconcilerConfig
from dcenergy.schema import Point
from dcenergy.store.base import Store

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

log = logging.getLogger(__name__)

DEFAULT_START_NS: Final = 1_700_000_000_000_000_000  # fixed, so runs are reproducible
SPOOL_MAX_BYTES: Final = 256 * 1024 * 1024
PID_BASE: Final = 40_000
_GIB: Final = 1024**3

ProgressFn = Callable[[float, float], None]  # (virtual seconds done, virtual seconds asked)


@dataclass(frozen=True, slots=True)
class JobSpec:
    """A job of the fleet layout: its kind and how many GPUs of one node it holds."""

    kind: JobKind
    gpus: int


def node_layout(node_index: int, gpus: int) -> list[JobSpec | None]:
    """The mix on node ``node_index`` (0-based): jobs in GPU order, ``None`` for an idle GPU.

    Four node types cycle so that any fleet of four or more nodes holds every
    kind: one big synchronous training job; half a node of training with
    single-GPU inference beside it; inference and light services; training
    with light services. Each but the first leaves an idle GPU or more.
    """
    half, quarter = gpus // 2, gpus // 4
    train, infer, light = JobSpec("training", half), JobSpec("inference", 1), JobSpec("light", 1)
    out: list[JobSpec | None] = []
    match node_index % 4:
        case 0:
            out.append(JobSpec("training", gpus))
        case 1:
            out += [train] if half else []
            out += [infer] * max(0, gpus - half - 1)
        case 2:
            out += [infer] * half + [light] * quarter
        case _:
            out += [train] if half else []
            out += [light] * quarter
    used = sum(s.gpus for s in out if s is not None)
    return out + [None] * (gpus - used)


_PREFIX: Final[dict[str, str]] = {"training": "train", "inference": "infer", "light": "svc"}


class _SimHost:
    """Host metrics for a simulated node: plausible, deterministic, derived from GPU load."""

    def __init__(self, gpus: Sequence[SimulatedGpu]) -> None:
        self._gpus = gpus

    def sample(self, now_s: float) -> Mapping[str, float | int | None]:
        busy = sum(1 for g in self._gpus if g.job_id)
        cpu = min(95.0, 4.0 + 9.0 * busy)
        return {
            "cpu_pct": cpu,
            "mem_used_bytes": (64 + 96 * busy) * _GIB,
            "mem_total_bytes": 2048 * _GIB,
            "load1": cpu / 100 * 224,
            "load5": cpu / 100 * 224,
            "load15": cpu / 100 * 224,
        }


@dataclass
class SimNode:
    """One simulated node: its GPUs, its jobs and the agent parts that watch them."""

    host: str
    backend: SimulatedBackend
    spool: Spool
    shipper: Shipper
    sampler: Sampler
    tracker: ThroughputTracker
    resolver: JobResolver
    report_dir: Path
    reconciler: Reconciler | None = None
    jobs: list[SimJob] = field(default_factory=list)

    @property
    def gpus(self) -> list[SimulatedGpu]:
        return self.backend.gpus()


class SimFleet:
    """``nodes`` simulated agents writing to one ``store``, on one virtual clock.

    ``public_key`` enables the reconcilers (the optimizer's Ed25519 key);
    without it the fleet only produces telemetry. ``state_root`` holds each
    node's spool, reconciler state, job report directory and fake ``/proc``;
    ``fresh=True`` empties it first so a rerun starts from the same state.
    """

    def __init__(
        self,
        nodes: int = 4,
        gpus_per_node: int = 8,
        *,
        store: Store,
        state_root: Path,
        public_key: Ed25519PublicKey | None = None,
        reconciler_config: ReconcilerConfig | None = None,
        seed: int = 0,
        step_s: float = 5.0,
        ship_interval_s: float = 30.0,
        start_ns: int = DEFAULT_START_NS,
        model: str = "H100-SXM",
        layout: Callable[[int, int], list[JobSpec | None]] = node_layout,
        fresh: bool = True,
        runtime_root: Path | None = None,
    ) -> None:
        if nodes < 1 or gpus_per_node < 1:
            raise ValueError(
                f"need nodes >= 1 and gpus_per_node >= 1, got {nodes}, {gpus_per_node}"
            )
        if step_s <= 0 or ship_interval_s <= 0:
            raise ValueError("step_s and ship_interval_s must be > 0")
        self.store = store
        self.state_root = Path(state_root)
        self.step_s = step_s
        self.ship_interval_s = ship_interval_s
        self.reconciler_config = reconciler_config or ReconcilerConfig()
        self.start_ns = start_ns
        self._now_ns = start_ns
        self._step_ns = round(step_s * 1e9)
        self._last_ship_ns = start_ns
        self._last_reconcile_ns: int | None = None
        self.audit: list[AuditRecord] = []
        if fresh and self.state_root.exists():
            shutil.rmtree(self.state_root)
        self.state_root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._own_runtime: Path | None = None
        if runtime_root is None:
            runtime_root = self._own_runtime = _runtime_dir(self.state_root)
        self.runtime_root = Path(runtime_root)
        self.nodes: list[SimNode] = []
        counters = {k: 0 for k in _PREFIX}
        try:
            for i in range(nodes):
                node = self._build_node(i, gpus_per_node, seed, model, public_key)
                self.nodes.append(node)
                self._place_jobs(node, layout(i, gpus_per_node), counters)
        except BaseException:
            self.close()
            raise
        for node in self.nodes:
            for job in node.jobs:
                job.start()
                job.report(node.report_dir, self.now_s)  # the baseline the first rate needs

    # --- building ---------------------------------------------------------------------------
    def _clock_s(self) -> float:
        """The GPUs' monotonic clock: virtual seconds since the start."""
        return (self._now_ns - self.start_ns) / 1e9

    def _build_node(
        self, index: int, gpus: int, seed: int, model: str, public_key: Ed25519PublicKey | None
    ) -> SimNode:
        host = f"node-{index + 1}"
        root = self.state_root / host
        report_dir = self.runtime_root / host / "jobs"
        report_dir.mkdir(parents=True, exist_ok=True)
        backend = SimulatedBackend(gpus, models=model, seed=seed, host=host, clock=self._clock_s)
        backend.open()
        spool = Spool(root / "spool.sqlite", SPOOL_MAX_BYTES)
        shipper = Shipper(
            spool,
            self.store,
            clock=self._clock_s,
            wall_clock_ns=lambda: self._now_ns,
            sleep=lambda _s: None,
        )
        tracker = ThroughputTracker(report_dir, max_age_s=max(60.0, 4 * self.step_s))
        resolver = JobResolver(root / "proc")
        sampler = Sampler(
            backend,
            host,
            _SimHost(backend.gpus()),
            resolver,
            tracker,
            clock=lambda: self._now_ns,
        )
        reconciler = None
        if public_key is not None:
            reconciler = Reconciler(
                backend.devices(),
                host,
                self.store,
                public_key,
                self.reconciler_config,
                root,
                clock_ns=lambda: self._now_ns,
                audit_sink=spool.put,  # audit travels with the telemetry, as on a real node
            )
        return SimNode(host, backend, spool, shipper, sampler, tracker, resolver, report_dir,
                       reconciler)  # fmt: skip

    def _place_jobs(
        self, node: SimNode, specs: Sequence[JobSpec | None], counters: dict[str, int]
    ) -> None:
        gpus = node.gpus
        pos = 0
        for spec in specs:
            if spec is None:
                gpus[pos].set_workload(0.0)
                pos += 1
                continue
            counters[spec.kind] += 1
            job_id = f"{_PREFIX[spec.kind]}-{counters[spec.kind]:02d}"
            mine = gpus[pos : pos + spec.gpus]
            pids = [PID_BASE + g.identity.index for g in mine]
            for pid in pids:
                _fake_proc(node.resolver.proc_root, pid, job_id)
            node.jobs.append(SimJob(job_id, spec.kind, mine, pids=pids))
            pos += spec.gpus

    # --- running ----------------------------------------------------------------------------
    @property
    def now_ns(self) -> int:
        return self._now_ns

    @property
    def now_s(self) -> float:
        return self._now_ns / 1e9

    @property
    def hosts(self) -> list[str]:
        return [n.host for n in self.nodes]

    @property
    def jobs(self) -> list[SimJob]:
        return [j for n in self.nodes for j in n.jobs]

    def gpus(self) -> list[tuple[str, SimulatedGpu]]:
        """Every GPU with its host, in fleet order."""
        return [(n.host, g) for n in self.nodes for g in n.gpus]

    def run(self, virtual_s: float, on_progress: ProgressFn | None = None) -> None:
        """Advance the fleet by ``virtual_s`` seconds of virtual time, step by step."""
        steps = max(1, round(virtual_s / self.step_s)) if virtual_s > 0 else 0
        for k in range(steps):
            self.step()
            if on_progress is not None:
                on_progress((k + 1) * self.step_s, virtual_s)

    def step(self) -> None:
        """One sampling interval of every node (see the module docstring for the order)."""
        for job in self.jobs:
            job.run_for(self.step_s)
        self._now_ns += self._step_ns
        for node in self.nodes:
            for job in node.jobs:
                job.report(node.report_dir, self.now_s)
            node.spool.put(node.sampler.sample())
        if self._now_ns - self._last_ship_ns >= round(self.ship_interval_s * 1e9):
            self._last_ship_ns = self._now_ns
            self.ship()
        self._maybe_reconcile()

    def _maybe_reconcile(self) -> None:
        interval_ns = round(self.reconciler_config.interval_s * 1e9)
        last = self._last_reconcile_ns
        if last is not None and self._now_ns - last < interval_ns:
            return
        self._last_reconcile_ns = self._now_ns
        for node in self.nodes:
            if node.reconciler is not None:
                self.audit.extend(node.reconciler.reconcile_once(self._now_ns))

    def ship(self) -> int:
        """Every node puts its self-stats and ships its spool once; returns points left."""
        left = 0
        for node in self.nodes:
            node.spool.put([self._agent_point(node)])
            left += node.shipper.ship_once().depth
        return left

    def flush(self) -> int:
        """Ship until every spool is empty (or the store refuses); returns points left."""
        left = 0
        for node in self.nodes:
            node.spool.put([self._agent_point(node)])
            for _ in range(1000):
                report = node.shipper.ship_once()
                if report.depth == 0 or not (report.shipped or report.dropped_rejected):
                    break
            left += node.spool.depth()
        return left

    def _agent_point(self, node: SimNode) -> Point:
        others: list[ErrorCounter] = [node.tracker, node.resolver]
        return agent_point(
            host=node.host,
            time_ns=self._now_ns,
            sampler=node.sampler,
            spool=node.spool.counters(),
            shipper=node.shipper.counters,
            other_errors=others,
        )

    # --- operator actions (outside the plan) ------------------------------------------------
    def set_power_limits(self, fraction_of_max: float, *, busy_only: bool = True) -> None:
        """Set every (busy) GPU's limit to a share of its maximum, clamped to its range.

        What an operator's capping experiment does by hand: it gives the
        optimizer samples of each job at several caps. Takes effect from the
        next step on.
        """
        for _, gpu in self.gpus():
            if busy_only and not gpu.job_id:
                continue
            lim = gpu.power_limits()
            gpu.set_power_limit_w(min(lim.max_w, max(lim.min_w, fraction_of_max * lim.max_w)))

    def reset_power_limits(self) -> None:
        """Every GPU back to its default limit."""
        for _, gpu in self.gpus():
            gpu.set_power_limit_w(gpu.power_limits().default_w)

    def close(self) -> None:
        """Close every node's parts (the store is the caller's)."""
        for node in self.nodes:
            node.tracker.close()
            node.spool.close()
            node.backend.close()
        self.nodes = []
        if self._own_runtime is not None:
            shutil.rmtree(self._own_runtime, ignore_errors=True)
            self._own_runtime = None

    def __enter__(self) -> SimFleet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _runtime_dir(state_root: Path) -> Path:
    """Where job reports go: tmpfs when there is one, as ``/run/dcenergy/jobs`` is on a node.

    Reports are rewritten every step; on a disk file system each atomic rename
    costs milliseconds, on tmpfs a tenth of one.
    """
    shm = Path("/dev/shm")  # noqa: S108 (mkdtemp below: a private 0700 directory)
    if shm.is_dir() and os.access(shm, os.W_OK):
        return Path(tempfile.mkdtemp(prefix="dcenergy-sim-", dir=shm))
    path = state_root / "run"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _fake_proc(proc_root: Path, pid: int, job_id: str) -> None:
    """A ``/proc/<pid>`` the real ``JobResolver`` attributes to ``job_id`` (via SLURM_JOB_ID)."""
    d = proc_root / str(pid)
    d.mkdir(parents=True, exist_ok=True)
    (d / "cgroup").write_text("0::/system.slice/simjob.scope\n")
    (d / "environ").write_bytes(b"PATH=/usr/bin\0SLURM_JOB_ID=" + job_id.encode() + b"\0")
