"""One sampling cycle: every GPU, the host and the jobs on its GPUs, as points.

All points of a cycle carry ONE client-side timestamp, taken once at the start:
a dashboard or the optimizer joins GPU, host and job rows of a cycle on equal
time, and a retry of the same cycle overwrites instead of duplicating.

A failure of one part (one GPU, the host collector, job attribution, the rate
tracker) is caught where it happens, counted and logged once per part; the
rest of the cycle goes on. ``sample()`` raises only when the backend cannot
even list its GPUs (it is closed), which is the daemon's business.

A GPU several jobs share (MIG instances, MPS, time slicing) is listed on
every one of its jobs' points, with the job's estimated share of its power and
energy (``agent/attribution.py`` has the rules); one ``gpu_instance`` point per
MIG instance per cycle; one ``gpu_health`` point per GPU every
``health_every`` cycles (XIDs in between are counted at the next one).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from agent import attribution
from agent.attribution import Split
from agent.devices.base import DeviceBackend, GpuDevice, GpuSample, MigInstance
from dcenergy.logonce import LogOnce
from dcenergy.schema import (
    GPU,
    GPU_HEALTH,
    GPU_INSTANCE,
    HOST,
    JOB,
    TAG_GPU_INDEX,
    TAG_GPU_MODEL,
    TAG_GPU_UUID,
    TAG_HOST,
    TAG_JOB,
    TAG_MIG_UUID,
    FieldValue,
    Point,
    point,
)

log = logging.getLogger(__name__)

PROXY_SOURCE = "sm_util_proxy"
DEFAULT_HEALTH_EVERY = 30  # cycles between gpu_health points (30 s at 1 s, as dcgm-exporter)
_ENERGY_KEEP_CYCLES = 3600  # an energy estimate not updated this long is forgotten
_ACTIVITY = ("sm_active_pct", "tensor_active_pct", "dram_active_pct")


class HostSampler(Protocol):
    def sample(self, now_s: float) -> Mapping[str, float | int | None]: ...


class JobAttributor(Protocol):
    def attribute(self, gpu_pids: Mapping[str, list[int]]) -> dict[str, str | None]: ...


class RateLike(Protocol):
    @property
    def value_per_s(self) -> float: ...
    @property
    def unit(self) -> str: ...
    @property
    def source(self) -> str: ...


class RateSource(Protocol):
    def rates(
        self, now_s: float, active_jobs: Iterable[str] | None = None
    ) -> Mapping[str, RateLike]: ...


class _JobRef(Protocol):
    @property
    def job_id(self) -> str: ...


@dataclass(slots=True)
class _GpuReading:
    device: GpuDevice
    sample: GpuSample
    pids: list[int] = field(default_factory=list)
    instances: list[MigInstance] = field(default_factory=list)
    split: Split = field(default_factory=lambda: attribution.sole(None))
    energy_delta_j: float | None = None  # energy since the previous cycle


@dataclass(slots=True)
class _JobGpu:
    """One GPU of a job: the reading and what of it is the job's."""

    reading: _GpuReading
    share: float
    instances: tuple[MigInstance, ...] = ()


class Sampler:
    """Builds the points of one cycle from injected sources; holds the cycle counters.

    ``host_collector``, ``job_resolver`` and ``throughput_tracker`` may be
    ``None`` (``dcenergy agent once`` without job parts, benchmarks).
    """

    def __init__(
        self,
        backend: DeviceBackend,
        host: str,
        host_collector: HostSampler | None,
        job_resolver: JobAttributor | None,
        throughput_tracker: RateSource | None,
        clock: Callable[[], int] = time.time_ns,
        perf_clock: Callable[[], float] = time.perf_counter,
        health_every: int = DEFAULT_HEALTH_EVERY,
    ) -> None:
        self.backend = backend
        self.host = host
        self.host_collector = host_collector
        self.job_resolver = job_resolver
        self.throughput_tracker = throughput_tracker
        self._clock = clock
        self._perf = perf_clock
        self.samples_total = 0
        self.errors_total = 0
        self.last_error = ""
        self.cycle_s: float | None = None
        # Parts that failed in the last cycle; the daemon pings the watchdog only when
        # at least one GPU could be read (or there are none), see ``healthy``.
        self.last_gpu_errors = 0
        self.last_gpu_count = 0
        self.health_every = max(1, health_every)
        self._once = LogOnce(log)
        self._last_energy_j: dict[str, float] = {}  # GPU uuid -> energy at the last cycle
        # ("job", id) or ("mig", uuid) -> [estimated energy, cycle last updated]
        self._energy_est: dict[tuple[str, str], list[float]] = {}

    @property
    def healthy(self) -> bool:
        """The last cycle read at least one GPU, or the host has none."""
        return self.last_gpu_count == 0 or self.last_gpu_errors < self.last_gpu_count

    def sample(self) -> list[Point]:
        """One cycle: GPU points, the HOST point, JOB points, all at one timestamp."""
        started = self._perf()
        time_ns = self._clock()
        now_s = time_ns / 1e9
        devices = self.backend.devices()
        readings = self._read_gpus(devices)
        jobs = self._attribute(readings)
        self._split(readings, jobs)
        self._energy(readings)
        points = [self._gpu_point(r, jobs.get(r.sample.identity.uuid), time_ns) for r in readings]
        for r in readings:
            points.extend(self._instance_points(r, time_ns))
        if (host_point := self._host_point(now_s, time_ns)) is not None:
            points.append(host_point)
        points.extend(self._job_points(readings, now_s, time_ns))
        if self.samples_total % self.health_every == 0:
            points.extend(self._health_points(readings, time_ns))
        self.samples_total += 1
        self.cycle_s = self._perf() - started
        return points

    # --- parts -------------------------------------------------------------------------
    def _read_gpus(self, devices: list[GpuDevice]) -> list[_GpuReading]:
        out: list[_GpuReading] = []
        errors = 0
        for dev in devices:
            try:
                s = dev.sample()
            except Exception as e:  # the backend contract says never; a bug must not stop us
                errors += 1
                self._fail(f"gpu{dev.identity.index}.sample", e)
                continue
            reading = _GpuReading(dev, s)
            if not s.lost and s.identity.mig_mode:
                try:
                    reading.instances = dev.mig_instances()
                except Exception as e:
                    self._fail(f"gpu{dev.identity.index}.mig_instances", e)
                reading.pids = [p for inst in reading.instances for p in inst.pids]
            elif not s.lost and self.job_resolver is not None:
                try:
                    reading.pids = dev.compute_pids()
                except Exception as e:
                    self._fail(f"gpu{dev.identity.index}.compute_pids", e)
            out.append(reading)
        self.last_gpu_count = len(devices)
        self.last_gpu_errors = errors
        return out

    def _attribute(self, readings: list[_GpuReading]) -> dict[str, str | None]:
        if self.job_resolver is None:
            return {}
        pids = {r.sample.identity.uuid: r.pids for r in readings if not r.sample.lost}
        try:
            return self.job_resolver.attribute(pids)
        except Exception as e:
            self._fail("jobs.attribute", e)
            return {}

    def _split(self, readings: list[_GpuReading], jobs: Mapping[str, str | None]) -> None:
        """Each GPU's split among its jobs: its main job alone unless several share it."""
        shared = [r for r in readings if r.instances or len(set(r.pids)) > 1]
        pid_jobs = self._pid_jobs({p for r in shared for p in r.pids}) if shared else {}
        for r in readings:
            main = jobs.get(r.sample.identity.uuid)
            r.split = attribution.sole(main)
            if r.instances:
                r.split = attribution.mig_split(r.instances, pid_jobs, main)
            elif r in shared:
                on_gpu = {pid_jobs[p] for p in r.pids if p in pid_jobs}
                # several jobs, and the resolver's own answer among them (a scheduler's view,
                # such as the kubelet's, may name the GPU's job differently: it wins then)
                if len(on_gpu) > 1 and main in on_gpu:
                    try:
                        util = r.device.process_utilization()
                    except Exception as e:
                        self._fail(f"gpu{r.sample.identity.index}.process_utilization", e)
                        util = {}
                    r.split = attribution.process_split(r.pids, pid_jobs, util, main)

    def _pid_jobs(self, pids: set[int]) -> dict[int, str]:
        """The job of each PID (PIDs of no job left out), through the resolver."""
        resolver = self.job_resolver
        if resolver is None or not pids:
            return {}
        try:
            by_pid: Callable[[int], _JobRef | None] | None = getattr(resolver, "job_for_pid", None)
            if by_pid is not None:
                return {p: ref.job_id for p in sorted(pids) if (ref := by_pid(p)) is not None}
            got = resolver.attribute({str(p): [p] for p in sorted(pids)})
            return {int(k): v for k, v in got.items() if v}
        except Exception as e:
            self._fail("jobs.attribute_pids", e)
            return {}

    def _energy(self, readings: list[_GpuReading]) -> None:
        """Each GPU's energy since the previous cycle, shared out to its jobs and instances."""
        cycle = float(self.samples_total)
        for r in readings:
            uuid, energy = r.sample.identity.uuid, r.sample.energy_j
            if r.sample.lost or energy is None:
                self._last_energy_j.pop(uuid, None)
                continue
            last = self._last_energy_j.get(uuid)
            self._last_energy_j[uuid] = energy
            r.energy_delta_j = max(energy - last, 0.0) if last is not None else 0.0
            delta = r.energy_delta_j
            for j, share in r.split.shares.items():
                self._add_energy(("job", j), share * delta, cycle)
            for inst, share in zip(r.instances, r.split.instance_shares, strict=True):
                self._add_energy(("mig", inst.uuid), share * delta, cycle)
        if self.samples_total % _ENERGY_KEEP_CYCLES == 0:  # forget ended jobs now and then
            stale = [
                k for k, (_, seen) in self._energy_est.items() if cycle - seen > _ENERGY_KEEP_CYCLES
            ]
            for k in stale:
                del self._energy_est[k]

    def _add_energy(self, key: tuple[str, str], joules: float, cycle: float) -> None:
        acc = self._energy_est.get(key)
        if acc is None:
            self._energy_est[key] = [joules, cycle]
        else:
            acc[0] += joules
            acc[1] = cycle

    def _gpu_point(self, r: _GpuReading, job: str | None, time_ns: int) -> Point:
        ident = r.sample.identity
        tags = {
            TAG_HOST: self.host,
            TAG_GPU_INDEX: str(ident.index),
            TAG_GPU_UUID: ident.uuid,
            TAG_GPU_MODEL: ident.name,
        }
        fields: dict[str, FieldValue | None] = r.sample.fields()  # a fresh dict, ours
        # '' when idle (so "which GPUs are idle" is a query); absent when the GPU is lost.
        fields["job_id"] = None if r.sample.lost else (job or "")
        if not r.sample.lost:
            fields["job_count"] = len(r.split.jobs)
            if len(r.split.jobs) > 1:  # shared: every job (one job is job_id already)
                fields["job_ids"] = ",".join(r.split.jobs)
        return point(GPU, tags, fields, time_ns)

    def _instance_points(self, r: _GpuReading, time_ns: int) -> list[Point]:
        ident = r.sample.identity
        out: list[Point] = []
        power = r.sample.power_w
        for k, inst in enumerate(r.instances):
            share = r.split.instance_shares[k]
            jobs = r.split.instance_jobs[k]
            est = self._energy_est.get(("mig", inst.uuid)) if r.energy_delta_j is not None else None
            tags = {
                TAG_HOST: self.host,
                TAG_GPU_INDEX: str(ident.index),
                TAG_GPU_UUID: ident.uuid,
                TAG_GPU_MODEL: ident.name,
                TAG_MIG_UUID: inst.uuid,
            }
            fields: dict[str, FieldValue | None] = {
                "gpu_instance_id": inst.gpu_instance_id,
                "compute_instance_id": inst.compute_instance_id,
                "profile": inst.profile,
                "sm_count": inst.sm_count,
                "mem_used_bytes": inst.mem_used_bytes,
                "mem_total_bytes": inst.mem_total_bytes,
                "sm_active_pct": inst.sm_active_pct,
                "tensor_active_pct": inst.tensor_active_pct,
                "dram_active_pct": inst.dram_active_pct,
                "power_share": share,
                "power_est_w": share * power if power is not None else None,
                "energy_est_j": est[0] if est is not None else None,
                "power_split": r.split.rule,
                "job_id": jobs[0] if jobs else "",
                "job_count": len(jobs),
            }
            out.append(point(GPU_INSTANCE, tags, fields, time_ns))
        return out

    def _health_points(self, readings: list[_GpuReading], time_ns: int) -> list[Point]:
        out: list[Point] = []
        for r in readings:
            if r.sample.lost:
                continue
            ident = r.sample.identity
            try:
                health = r.device.health()
            except Exception as e:  # the backend contract says never
                self._fail(f"gpu{ident.index}.health", e)
                continue
            if health is None:
                continue
            tags = {
                TAG_HOST: self.host,
                TAG_GPU_INDEX: str(ident.index),
                TAG_GPU_UUID: ident.uuid,
                TAG_GPU_MODEL: ident.name,
            }
            out.append(point(GPU_HEALTH, tags, health.fields(), time_ns))
        return out

    def _host_point(self, now_s: float, time_ns: int) -> Point | None:
        if self.host_collector is None:
            return None
        try:
            fields = self.host_collector.sample(now_s)
        except Exception as e:
            self._fail("host.sample", e)
            return None
        return point(HOST, {TAG_HOST: self.host}, fields, time_ns)

    def _job_points(
        self,
        readings: list[_GpuReading],
        now_s: float,
        time_ns: int,
    ) -> list[Point]:
        by_job: dict[str, list[_JobGpu]] = {}
        for r in readings:
            for job in r.split.jobs:
                inst = tuple(r.instances[k] for k in r.split.job_instances.get(job, ()))
                by_job.setdefault(job, []).append(_JobGpu(r, r.split.shares[job], inst))
        if not by_job and self.throughput_tracker is None:
            return []
        rates: Mapping[str, RateLike] = {}
        if self.throughput_tracker is not None:
            try:
                # Called every cycle, jobs or not, so report-based rates keep their baseline.
                rates = self.throughput_tracker.rates(now_s, sorted(by_job))
            except Exception as e:
                self._fail("throughput.rates", e)
        return [
            point(
                JOB,
                {TAG_HOST: self.host, TAG_JOB: job},
                _job_fields(gpus, rates.get(job), self._energy_est.get(("job", job))),
                time_ns,
            )
            for job, gpus in sorted(by_job.items())
        ]

    def _fail(self, part: str, err: BaseException) -> None:
        self.errors_total += 1
        self.last_error = f"{part}: {err}"
        self._once(
            part, logging.WARNING, "%s failed: %s (logged once; counted in errors_total)", part, err
        )


def _job_fields(
    gpus: list[_JobGpu], rate: RateLike | None, energy_est: list[float] | None
) -> dict[str, FieldValue | None]:
    """JOB fields for one job from its GPUs (and its shares of them) and its rate, if any."""
    gpus = sorted(gpus, key=lambda g: g.reading.sample.identity.index)
    samples = [g.reading.sample for g in gpus]
    powers = [s.power_w for s in samples]
    limits = [s.power_limit_w for s in samples if s.power_limit_w is not None]
    utils = [s.util_gpu_pct for s in samples if s.util_gpu_pct is not None]
    fields: dict[str, FieldValue | None] = {
        # A sum over some of its GPUs would understate the job's power: all or absent.
        "power_w": sum(p for p in powers if p is not None) if None not in powers else None,
        "power_limit_w": sum(limits) / len(limits) if limits else None,
        "sm_util_pct": sum(utils) / len(utils) if utils else None,
        "gpu_count": len(samples),
        "gpu_uuids": ",".join(s.identity.uuid for s in samples),
        "power_split": attribution.least_informed([g.reading.split.rule for g in gpus]),
        "sharing_jobs": max(len(g.reading.split.jobs) for g in gpus),
        "gpu_share": sum(g.share for g in gpus),
    }
    if None not in powers:
        fields["power_est_w"] = sum(g.share * (g.reading.sample.power_w or 0.0) for g in gpus)
    if energy_est is not None and all(g.reading.energy_delta_j is not None for g in gpus):
        fields["energy_est_j"] = energy_est[0]
    mig = [i for g in gpus for i in g.instances]
    if mig:
        fields["mig_uuids"] = ",".join(i.uuid for i in mig)
    for name in _ACTIVITY:  # the job's own instances on MIG, else its GPUs'
        values = [getattr(x, name) for x in (mig or samples)]
        if values and None not in values:
            fields[name] = sum(values) / len(values)
    if rate is not None:
        fields["throughput"] = float(rate.value_per_s)
        fields["throughput_unit"] = rate.unit
        fields["throughput_source"] = rate.source
    else:
        fields["throughput_source"] = PROXY_SOURCE
    return fields
