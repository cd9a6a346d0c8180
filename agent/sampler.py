"""One sampling cycle: every GPU, the host and the jobs on its GPUs, as points.

All points of a cycle carry ONE client-side timestamp, taken once at the start:
a dashboard or the optimizer joins GPU, host and job rows of a cycle on equal
time, and a retry of the same cycle overwrites instead of duplicating.

A failure of one part (one GPU, the host collector, job attribution, the rate
tracker) is caught where it happens, counted and logged once per part; the
rest of the cycle goes on. ``sample()`` raises only when the backend cannot
even list its GPUs (it is closed), which is the daemon's business.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from agent.devices.base import DeviceBackend, GpuDevice, GpuSample
from dcenergy.logonce import LogOnce
from dcenergy.schema import (
    GPU,
    HOST,
    JOB,
    TAG_GPU_INDEX,
    TAG_GPU_MODEL,
    TAG_GPU_UUID,
    TAG_HOST,
    TAG_JOB,
    FieldValue,
    Point,
    point,
)

log = logging.getLogger(__name__)

PROXY_SOURCE = "sm_util_proxy"


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


@dataclass(slots=True)
class _GpuReading:
    device: GpuDevice
    sample: GpuSample
    pids: list[int] = field(default_factory=list)


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
        self._once = LogOnce(log)

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
        points = [self._gpu_point(r, jobs.get(r.sample.identity.uuid), time_ns) for r in readings]
        if (host_point := self._host_point(now_s, time_ns)) is not None:
            points.append(host_point)
        points.extend(self._job_points(readings, jobs, now_s, time_ns))
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
            if not s.lost and self.job_resolver is not None:
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

    def _gpu_point(self, r: _GpuReading, job: str | None, time_ns: int) -> Point:
        ident = r.sample.identity
        tags = {
            TAG_HOST: self.host,
            TAG_GPU_INDEX: str(ident.index),
            TAG_GPU_UUID: ident.uuid,
            TAG_GPU_MODEL: ident.name,
        }
        fields: dict[str, FieldValue | None] = dict(r.sample.fields())
        # '' when idle (so "which GPUs are idle" is a query); absent when the GPU is lost.
        fields["job_id"] = None if r.sample.lost else (job or "")
        return point(GPU, tags, fields, time_ns)

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
        jobs: Mapping[str, str | None],
        now_s: float,
        time_ns: int,
    ) -> list[Point]:
        by_job: dict[str, list[GpuSample]] = {}
        for r in readings:
            if job := jobs.get(r.sample.identity.uuid):
                by_job.setdefault(job, []).append(r.sample)
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
                _job_fields(samples, rates.get(job)),
                time_ns,
            )
            for job, samples in sorted(by_job.items())
        ]

    def _fail(self, part: str, err: BaseException) -> None:
        self.errors_total += 1
        self.last_error = f"{part}: {err}"
        self._once(
            part, logging.WARNING, "%s failed: %s (logged once; counted in errors_total)", part, err
        )


def _job_fields(samples: list[GpuSample], rate: RateLike | None) -> dict[str, FieldValue | None]:
    """JOB fields for one job from its GPUs' samples and its rate (if any source has one)."""
    samples = sorted(samples, key=lambda s: s.identity.index)
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
    }
    if rate is not None:
        fields["throughput"] = float(rate.value_per_s)
        fields["throughput_unit"] = rate.unit
        fields["throughput_source"] = rate.source
    else:
        fields["throughput_source"] = PROXY_SOURCE
    return fields
