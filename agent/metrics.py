"""Prometheus ``/metrics`` for the agent: the last sample it took, rendered when scraped.

Opened only when ``agent.metrics_listen = "host:port"`` is set, bound to that
address alone, read-only: GET ``/metrics`` answers, any other method gets 405
and any other path 404. A scrape never reaches the GPUs: ``AgentCollector``
renders a ``Snapshot`` of what the sampling thread last produced (its GPU, host
and job points), the agent's counters as they are now, the plan lease the
reconciler holds and the pods of the GPUs (Kubernetes). The collector is
registered in a registry of its own, when the server is built; nothing is
registered at import time and the library's global registry is never used.

Families (labels ``host``, ``gpu`` (index), ``uuid``, ``model`` on GPU series):

* ``dcenergy_gpu_power_watts``, ``dcenergy_gpu_energy_joules_total`` (counter,
  reset-corrected), ``dcenergy_gpu_power_limit_watts{kind=current|default|min|
  max|enforced}``, ``dcenergy_gpu_temperature_celsius{sensor=gpu|memory}``,
  ``dcenergy_gpu_clock_hertz{clock=sm|mem}``,
  ``dcenergy_gpu_utilization_ratio{engine=gpu|memory}`` (0–1),
  ``dcenergy_gpu_memory_used_bytes`` / ``_total_bytes``, ``dcenergy_gpu_pstate``,
  ``dcenergy_gpu_throttle_reason{reason=…}`` (1 while that NVML clocks-event bit
  is set, one series per named bit), ``dcenergy_gpu_violation_seconds_total
  {reason=power|thermal}``, ``dcenergy_gpu_energy_counter_resets_total``,
  ``dcenergy_gpu_lost``;
* ``dcenergy_gpu_job_info{job_id=…}`` 1 for a GPU running a job (plus
  ``namespace``, ``pod``, ``container`` on Kubernetes): the job is a label only
  here, so a new job adds one series, not one per family;
* ``dcenergy_gpu_setpoint_watts`` (and ``…_setpoint_sm_clock_max_hertz`` in DVFS
  mode) for GPUs of the plan in force, ``dcenergy_plan_lease_active``,
  ``dcenergy_plan_lease_expiry_timestamp_seconds``, ``dcenergy_plan_sequence``,
  ``dcenergy_plan_info{plan_id, mode}`` (when the reconciler runs);
* host (``host``): ``dcenergy_host_cpu_utilization_ratio``,
  ``dcenergy_host_memory_used_bytes`` / ``_total_bytes``,
  ``dcenergy_host_load_average{window=1m|5m|15m}``,
  ``dcenergy_host_power_watts{domain=cpu|dram}`` (RAPL);
* jobs (``host``, ``job_id``): ``dcenergy_job_power_watts``,
  ``dcenergy_job_power_limit_watts``, ``dcenergy_job_sm_utilization_ratio``,
  ``dcenergy_job_gpus``, ``dcenergy_job_throughput_per_second{unit, source}``;
* the agent (``host``): ``dcenergy_agent_samples_total``,
  ``…_points_spooled_total``, ``…_points_shipped_total``,
  ``…_points_dropped_total{reason}``, ``…_errors_total``, ``…_spool_points``,
  ``…_spool_bytes``, ``…_spool_file_bytes``, ``…_cycle_seconds``,
  ``…_ship_latency_seconds``, ``…_last_sample_timestamp_seconds``,
  ``…_scrapes_total``, ``dcenergy_agent_info{version}``.

With ``agent.metrics_dcgm_compat`` the same GPU readings are also served under
dcgm-exporter's names, units and labels (see ``DCGM_FAMILIES``), so dashboards
and alerts written for dcgm-exporter work unchanged.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import CollectorRegistry

from agent.devices.base import (
    THROTTLE_APPLICATIONS_CLOCKS,
    THROTTLE_GPU_IDLE,
    THROTTLE_HW_POWER_BRAKE,
    THROTTLE_HW_SLOWDOWN,
    THROTTLE_HW_THERMAL,
    THROTTLE_SW_POWER_CAP,
    THROTTLE_SW_THERMAL,
)
from dcenergy import __version__
from dcenergy.schema import (
    GPU,
    HOST,
    JOB,
    TAG_GPU_INDEX,
    TAG_GPU_MODEL,
    TAG_GPU_UUID,
    TAG_JOB,
    FieldValue,
    Point,
)

if TYPE_CHECKING:
    from wsgiref.types import StartResponse, WSGIEnvironment

    from agent.daemon import AgentDaemon
    from agent.kube import PodRef
    from dcenergy.plan import PlanPart

log = logging.getLogger(__name__)

METRICS_PATH = "/metrics"
REQUEST_TIMEOUT_S = 10.0  # a client that stalls mid-request frees its thread after this
MIB = 1024 * 1024

# NVML clocks-event ("throttle") reason bits by name (agent/devices/base.py, as NVML
# defines them: nvmlClocksEventReason*), one gauge series each.
THROTTLE_REASONS: tuple[tuple[str, int], ...] = (
    ("gpu_idle", THROTTLE_GPU_IDLE),
    ("applications_clocks_setting", THROTTLE_APPLICATIONS_CLOCKS),
    ("sw_power_cap", THROTTLE_SW_POWER_CAP),
    ("hw_slowdown", THROTTLE_HW_SLOWDOWN),
    ("sw_thermal_slowdown", THROTTLE_SW_THERMAL),
    ("hw_thermal_slowdown", THROTTLE_HW_THERMAL),
    ("hw_power_brake_slowdown", THROTTLE_HW_POWER_BRAKE),
)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What one scrape renders; built from what the agent already holds, never from NVML."""

    host: str
    points: Sequence[Point] = ()  # the last sampling cycle: gpu, host and job points
    agent: Point | None = None  # the agent's counters (an ``agent`` point)
    reconciling: bool = False  # a reconciler runs (plan families are served)
    lease: PlanPart | None = None
    pods: Mapping[str, PodRef] = field(default_factory=dict)  # GPU UUID → pod (Kubernetes)


@dataclass(frozen=True, slots=True)
class FieldSeries:
    """One field of a measurement as one labelled series of a family: ``value × scale``."""

    field: str
    labels: tuple[str, ...] = ()
    scale: float = 1.0


@dataclass(frozen=True, slots=True)
class Family:
    """A metric family fed from fields of one measurement's points."""

    name: str  # counters end in ``_total``
    kind: str  # "gauge" | "counter"
    help: str
    series: tuple[FieldSeries, ...]
    label_names: tuple[str, ...] = ()  # the extra labels ``FieldSeries.labels`` fill

    def metric(self, base_labels: Sequence[str]) -> GaugeMetricFamily | CounterMetricFamily:
        labels = [*base_labels, *self.label_names]
        if self.kind == "counter":
            return CounterMetricFamily(self.name, self.help, labels=labels)
        return GaugeMetricFamily(self.name, self.help, labels=labels)


def _one(name: str, kind: str, help: str, field_name: str, scale: float = 1.0) -> Family:
    return Family(name, kind, help, (FieldSeries(field_name, (), scale),))


GPU_FAMILIES: tuple[Family, ...] = (
    _one("dcenergy_gpu_power_watts", "gauge", "Board power draw (W).", "power_w"),
    _one(
        "dcenergy_gpu_energy_joules_total",
        "counter",
        "Energy used since the driver loaded, corrected across counter resets (J).",
        "energy_j",
    ),
    _one(
        "dcenergy_gpu_energy_counter_resets_total",
        "counter",
        "Driver energy-counter resets seen (driver reloads).",
        "energy_resets",
    ),
    Family(
        "dcenergy_gpu_power_limit_watts",
        "gauge",
        "Power limits (W): current (requested), default, min and max settable, enforced.",
        (
            FieldSeries("power_limit_w", ("current",)),
            FieldSeries("power_limit_default_w", ("default",)),
            FieldSeries("power_limit_min_w", ("min",)),
            FieldSeries("power_limit_max_w", ("max",)),
            FieldSeries("power_limit_enforced_w", ("enforced",)),
        ),
        ("kind",),
    ),
    Family(
        "dcenergy_gpu_temperature_celsius",
        "gauge",
        "Temperature (°C) of the GPU die or its memory (HBM).",
        (FieldSeries("temp_c", ("gpu",)), FieldSeries("mem_temp_c", ("memory",))),
        ("sensor",),
    ),
    Family(
        "dcenergy_gpu_clock_hertz",
        "gauge",
        "Current clock (Hz) of the SMs or the memory.",
        (FieldSeries("sm_clock_mhz", ("sm",), 1e6), FieldSeries("mem_clock_mhz", ("mem",), 1e6)),
        ("clock",),
    ),
    Family(
        "dcenergy_gpu_utilization_ratio",
        "gauge",
        "Busy share (0-1) over the driver's sample window: kernels running, memory controller.",
        (
            FieldSeries("util_gpu_pct", ("gpu",), 0.01),
            FieldSeries("util_mem_pct", ("memory",), 0.01),
        ),
        ("engine",),
    ),
    _one(
        "dcenergy_gpu_memory_used_bytes", "gauge", "Device memory used (bytes).", "mem_used_bytes"
    ),
    _one(
        "dcenergy_gpu_memory_total_bytes",
        "gauge",
        "Device memory total (bytes).",
        "mem_total_bytes",
    ),
    _one("dcenergy_gpu_pstate", "gauge", "Performance state (0 fastest, 15 slowest).", "pstate"),
    Family(
        "dcenergy_gpu_violation_seconds_total",
        "counter",
        "Time the clocks were held down by the power limit or by temperature (s).",
        (
            FieldSeries("power_violation_s", ("power",)),
            FieldSeries("thermal_violation_s", ("thermal",)),
        ),
        ("reason",),
    ),
)

HOST_FAMILIES: tuple[Family, ...] = (
    _one(
        "dcenergy_host_cpu_utilization_ratio",
        "gauge",
        "CPU busy share across all cores (0-1).",
        "cpu_pct",
        0.01,
    ),
    _one("dcenergy_host_memory_used_bytes", "gauge", "Host memory used (bytes).", "mem_used_bytes"),
    _one(
        "dcenergy_host_memory_total_bytes", "gauge", "Host memory total (bytes).", "mem_total_bytes"
    ),
    Family(
        "dcenergy_host_load_average",
        "gauge",
        "Load average over 1, 5 and 15 minutes.",
        (
            FieldSeries("load1", ("1m",)),
            FieldSeries("load5", ("5m",)),
            FieldSeries("load15", ("15m",)),
        ),
        ("window",),
    ),
    Family(
        "dcenergy_host_power_watts",
        "gauge",
        "CPU package and DRAM power from RAPL (W); absent where RAPL is unreadable.",
        (FieldSeries("cpu_power_w", ("cpu",)), FieldSeries("dram_power_w", ("dram",))),
        ("domain",),
    ),
)

JOB_FAMILIES: tuple[Family, ...] = (
    _one(
        "dcenergy_job_power_watts", "gauge", "Summed power of the job's GPUs here (W).", "power_w"
    ),
    _one(
        "dcenergy_job_power_limit_watts",
        "gauge",
        "Mean power limit of the job's GPUs here (W).",
        "power_limit_w",
    ),
    _one(
        "dcenergy_job_sm_utilization_ratio",
        "gauge",
        "Mean SM utilization of the job's GPUs (0-1): a proxy, not throughput.",
        "sm_util_pct",
        0.01,
    ),
    _one("dcenergy_job_gpus", "gauge", "GPUs of the job on this host.", "gpu_count"),
)

AGENT_FAMILIES: tuple[Family, ...] = (
    _one("dcenergy_agent_samples_total", "counter", "Sampling cycles completed.", "samples_total"),
    _one(
        "dcenergy_agent_points_spooled_total",
        "counter",
        "Points written to the spool.",
        "points_spooled_total",
    ),
    _one(
        "dcenergy_agent_points_shipped_total",
        "counter",
        "Points the store accepted (since this process started).",
        "points_shipped_total",
    ),
    Family(
        "dcenergy_agent_points_dropped_total",
        "counter",
        "Points dropped: spool full, rejected or partly written by the store, damaged spool, "
        "no room on the state disk.",
        (
            FieldSeries("dropped_overflow_total", ("overflow",)),
            FieldSeries("dropped_rejected_total", ("rejected",)),
            FieldSeries("dropped_partial_total", ("partial",)),
            FieldSeries("dropped_corrupt_total", ("corrupt",)),
            FieldSeries("dropped_disk_full_total", ("disk_full",)),
        ),
        ("reason",),
    ),
    _one("dcenergy_agent_errors_total", "counter", "Errors met by any part.", "errors_total"),
    _one("dcenergy_agent_spool_points", "gauge", "Points waiting in the spool.", "spool_depth"),
    _one(
        "dcenergy_agent_spool_bytes",
        "gauge",
        "Bytes of points waiting in the spool.",
        "spool_bytes",
    ),
    _one(
        "dcenergy_agent_spool_file_bytes",
        "gauge",
        "Spool files on disk (bytes).",
        "spool_file_bytes",
    ),
    _one(
        "dcenergy_agent_cycle_seconds", "gauge", "Duration of the last sampling cycle.", "cycle_s"
    ),
    _one(
        "dcenergy_agent_ship_latency_seconds",
        "gauge",
        "Age of the oldest point of the last shipped batch.",
        "ship_latency_s",
    ),
)

# --- dcgm-exporter compatibility -------------------------------------------------------------
# Names, units and help as dcgm-exporter serves them, checked against NVIDIA/dcgm-exporter
# etc/default-counters.csv (commit d5e5f51, May 2026: "DCGM FIELD, Prometheus metric type, help")
# and its label template in internal/pkg/rendermetrics/render_metrics.go (release
# 4.5.3-4.8.2): gpu, UUID, pci_bus_id, device, modelName, Hostname (renamed to `hostname` on
# dcgm-exporter's main branch after that release; the released name is served here), then
# the Kubernetes attributes pod, namespace, container (internal/pkg/transformation/const.go)
# and hpc_job (hpc.go). DCGM_FI_DEV_POWER_MGMT_LIMIT is not in the default CSV: it is DCGM
# field 160, "Current Power limit for the device", in W (DCGM's dcgm_fields.py and
# dcgmDevicePowerLimits_v1.curPowerLimit, DCGM API reference), which operators add to
# their counters CSV. DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION is declared a counter there but
# named without `_total`; prometheus_client renders a counter only with that suffix, so it
# is a gauge here: the series name is what dashboards match, and rate()/increase() treat it
# the same. device is nvidia<index> (dcgm-exporter uses the device-node minor number,
# which equals the NVML index on nearly every server). FB_FREE is total - used (NVML's
# reserved memory, where the driver reports it, is counted as used).
DCGM_LABELS = ("gpu", "UUID", "pci_bus_id", "device", "modelName", "Hostname")
DCGM_FAMILIES: tuple[Family, ...] = (
    _one("DCGM_FI_DEV_SM_CLOCK", "gauge", "SM clock frequency (in MHz).", "sm_clock_mhz"),
    _one("DCGM_FI_DEV_MEM_CLOCK", "gauge", "Memory clock frequency (in MHz).", "mem_clock_mhz"),
    _one("DCGM_FI_DEV_MEMORY_TEMP", "gauge", "Memory temperature (in C).", "mem_temp_c"),
    _one("DCGM_FI_DEV_GPU_TEMP", "gauge", "GPU temperature (in C).", "temp_c"),
    _one("DCGM_FI_DEV_POWER_USAGE", "gauge", "Power draw (in W).", "power_w"),
    _one(
        "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION",
        "gauge",
        "Total energy consumption since boot (in mJ).",
        "energy_j",
        1000.0,
    ),
    _one("DCGM_FI_DEV_GPU_UTIL", "gauge", "GPU utilization (in %).", "util_gpu_pct"),
    _one("DCGM_FI_DEV_MEM_COPY_UTIL", "gauge", "Memory utilization (in %).", "util_mem_pct"),
    _one(
        "DCGM_FI_DEV_POWER_MGMT_LIMIT", "gauge", "Power management limit (in W).", "power_limit_w"
    ),
)
DCGM_FB_USED = ("DCGM_FI_DEV_FB_USED", "Framebuffer memory used (in MiB).")
DCGM_FB_FREE = ("DCGM_FI_DEV_FB_FREE", "Framebuffer memory free (in MiB).")


def _number(v: FieldValue | None) -> float | None:
    if v is None or isinstance(v, str):
        return None
    return float(v)


def _emit(
    families: Iterable[Family],
    rows: Sequence[tuple[Sequence[str], Mapping[str, FieldValue]]],
    base_labels: Sequence[str],
) -> Iterator[Metric]:
    """Each family with one sample per (row, series) whose field is present."""
    for fam in families:
        metric = fam.metric(base_labels)
        for labels, fields in rows:
            for s in fam.series:
                value = _number(fields.get(s.field))
                if value is not None:
                    metric.add_metric([*labels, *s.labels], value * s.scale)
        if metric.samples:
            yield metric


GPU_BASE = ("host", "gpu", "uuid", "model")


class AgentCollector:
    """A prometheus_client collector over ``source()``: one ``Snapshot`` per scrape."""

    def __init__(self, source: Callable[[], Snapshot], *, dcgm_compat: bool = False) -> None:
        self._source = source
        self.dcgm_compat = dcgm_compat
        self.scrapes_total = 0

    def describe(self) -> list[Metric]:
        """Nothing up front: registering must not take a snapshot."""
        return []

    def collect(self) -> Iterator[Metric]:
        self.scrapes_total += 1
        snap = self._source()
        by_m: dict[str, list[Point]] = {}
        for p in snap.points:
            by_m.setdefault(p.measurement, []).append(p)
        gpus = sorted(by_m.get(GPU.name, []), key=lambda p: int(p.tags[TAG_GPU_INDEX]))
        yield from self._gpu(snap, gpus)
        yield from self._plan(snap, gpus)
        host_rows = [((snap.host,), p.fields) for p in by_m.get(HOST.name, [])]
        yield from _emit(HOST_FAMILIES, host_rows, ("host",))
        yield from self._jobs(snap, by_m.get(JOB.name, []))
        yield from self._agent(snap)
        if self.dcgm_compat:
            yield from self._dcgm(snap, gpus)

    # --- parts -------------------------------------------------------------------------------
    def _gpu(self, snap: Snapshot, gpus: Sequence[Point]) -> Iterator[Metric]:
        live = [p for p in gpus if not p.fields.get("lost")]
        yield from _emit(GPU_FAMILIES, [(_gpu_labels(snap, p), p.fields) for p in live], GPU_BASE)
        throttle = GaugeMetricFamily(
            "dcenergy_gpu_throttle_reason",
            "1 while this NVML clocks-event (throttle) reason is active, else 0.",
            labels=[*GPU_BASE, "reason"],
        )
        for p in live:
            mask = p.fields.get("throttle_reasons")
            if isinstance(mask, int) and not isinstance(mask, bool):
                for name, bit in THROTTLE_REASONS:
                    throttle.add_metric([*_gpu_labels(snap, p), name], 1.0 if mask & bit else 0.0)
        if throttle.samples:
            yield throttle
        lost = GaugeMetricFamily(
            "dcenergy_gpu_lost",
            "1 when the GPU fell off the bus (its other series are absent).",
            labels=list(GPU_BASE),
        )
        for p in gpus:
            lost.add_metric(_gpu_labels(snap, p), 1.0 if p.fields.get("lost") else 0.0)
        yield lost
        yield from self._job_info(snap, live)

    def _job_info(self, snap: Snapshot, gpus: Sequence[Point]) -> Iterator[Metric]:
        info = InfoMetricFamily(
            "dcenergy_gpu_job",
            "The job running on the GPU (Kubernetes: its namespace, pod and container).",
            labels=["host", "gpu", "uuid"],
        )
        for p in gpus:
            job = p.fields.get("job_id")
            if not isinstance(job, str) or not job:
                continue
            value = {"job_id": job}
            if (pod := snap.pods.get(p.tags[TAG_GPU_UUID])) is not None:
                value.update(namespace=pod.namespace, pod=pod.pod, container=pod.container)
            info.add_metric([snap.host, p.tags[TAG_GPU_INDEX], p.tags[TAG_GPU_UUID]], value)
        if info.samples:
            yield info

    def _plan(self, snap: Snapshot, gpus: Sequence[Point]) -> Iterator[Metric]:
        if not snap.reconciling:
            return
        lease = snap.lease
        active = GaugeMetricFamily(
            "dcenergy_plan_lease_active",
            "1 while a signed plan part is in force on this host, else 0.",
            labels=["host"],
        )
        active.add_metric([snap.host], 1.0 if lease is not None else 0.0)
        yield active
        if lease is None:
            return
        watts = GaugeMetricFamily(
            "dcenergy_gpu_setpoint_watts",
            "Power limit the plan in force asks for (W), before the agent's clamps.",
            labels=list(GPU_BASE),
        )
        clocks = GaugeMetricFamily(
            "dcenergy_gpu_setpoint_sm_clock_max_hertz",
            "Highest SM clock the plan in force allows (Hz, DVFS mode).",
            labels=list(GPU_BASE),
        )
        for p in gpus:
            sp = lease.setpoint(p.tags[TAG_GPU_UUID])
            if sp is None:
                continue
            if sp.power_limit_w is not None:
                watts.add_metric(_gpu_labels(snap, p), float(sp.power_limit_w))
            if sp.sm_clock_max_mhz is not None:
                clocks.add_metric(_gpu_labels(snap, p), sp.sm_clock_max_mhz * 1e6)
        yield from (m for m in (watts, clocks) if m.samples)
        for name, help_text, value in (
            (
                "dcenergy_plan_lease_expiry_timestamp_seconds",
                "When the plan part in force expires (Unix time); the GPUs are restored then.",
                lease.expires_ns / 1e9,
            ),
            (
                "dcenergy_plan_created_timestamp_seconds",
                "When the plan part in force was created (Unix time).",
                lease.created_ns / 1e9,
            ),
            ("dcenergy_plan_sequence", "Sequence number of the plan part in force.", lease.seq),
        ):
            g = GaugeMetricFamily(name, help_text, labels=["host"])
            g.add_metric([snap.host], float(value))
            yield g
        info = InfoMetricFamily("dcenergy_plan", "The plan in force.", labels=["host"])
        info.add_metric([snap.host], {"plan_id": lease.plan_id, "mode": lease.mode})
        yield info

    def _jobs(self, snap: Snapshot, jobs: Sequence[Point]) -> Iterator[Metric]:
        rows = [((snap.host, p.tags[TAG_JOB]), p.fields) for p in jobs]
        yield from _emit(JOB_FAMILIES, rows, ("host", "job_id"))
        tput = GaugeMetricFamily(
            "dcenergy_job_throughput_per_second",
            "Work rate from the job's report or Prometheus counter (units of work per s).",
            labels=["host", "job_id", "unit", "source"],
        )
        for p in jobs:
            value = _number(p.fields.get("throughput"))
            if value is not None:
                unit = str(p.fields.get("throughput_unit", ""))
                source = str(p.fields.get("throughput_source", ""))
                tput.add_metric([snap.host, p.tags[TAG_JOB], unit, source], value)
        if tput.samples:
            yield tput

    def _agent(self, snap: Snapshot) -> Iterator[Metric]:
        if snap.agent is not None:
            yield from _emit(AGENT_FAMILIES, [((snap.host,), snap.agent.fields)], ("host",))
        if snap.points:
            last = GaugeMetricFamily(
                "dcenergy_agent_last_sample_timestamp_seconds",
                "When the sample served here was taken (Unix time): its age is the staleness.",
                labels=["host"],
            )
            last.add_metric([snap.host], snap.points[0].time_ns / 1e9)
            yield last
        scrapes = CounterMetricFamily(
            "dcenergy_agent_scrapes_total", "Scrapes of /metrics served.", labels=["host"]
        )
        scrapes.add_metric([snap.host], float(self.scrapes_total))
        yield scrapes
        info = InfoMetricFamily("dcenergy_agent", "The agent's version.", labels=["host"])
        info.add_metric([snap.host], {"version": __version__})
        yield info

    def _dcgm(self, snap: Snapshot, gpus: Sequence[Point]) -> Iterator[Metric]:
        live = [p for p in gpus if not p.fields.get("lost")]
        extra = _dcgm_extra_labels(snap, live)
        names = [*DCGM_LABELS, *extra]
        rows = []
        for p in live:
            ident = (
                p.tags[TAG_GPU_INDEX],
                p.tags[TAG_GPU_UUID],
                str(p.fields.get("pci_bus_id", "")),
                f"nvidia{p.tags[TAG_GPU_INDEX]}",
                p.tags[TAG_GPU_MODEL],
                snap.host,
            )
            rows.append(((*ident, *_dcgm_extra_values(snap, p, extra)), p.fields))
        yield from _emit(DCGM_FAMILIES, rows, names)
        used = GaugeMetricFamily(*DCGM_FB_USED, labels=names)
        free = GaugeMetricFamily(*DCGM_FB_FREE, labels=names)
        for labels, fields in rows:
            used_b, total_b = _number(fields.get("mem_used_bytes")), fields.get("mem_total_bytes")
            if used_b is None:
                continue
            used.add_metric(list(labels), float(int(used_b) // MIB))
            if isinstance(total_b, int):
                free.add_metric(list(labels), float(max(0, total_b - int(used_b)) // MIB))
        yield from (m for m in (used, free) if m.samples)


def _gpu_labels(snap: Snapshot, p: Point) -> list[str]:
    return [snap.host, p.tags[TAG_GPU_INDEX], p.tags[TAG_GPU_UUID], p.tags[TAG_GPU_MODEL]]


def _dcgm_extra_labels(snap: Snapshot, gpus: Sequence[Point]) -> tuple[str, ...]:
    """``hpc_job`` when some GPU runs a job that is not a pod; the pod labels when pods are known.

    A label every series of a family carries, empty where it does not apply
    (Prometheus stores an empty label as no label, as dcgm-exporter leaves it out).
    """
    extra: tuple[str, ...] = ()
    if any(p.fields.get("job_id") and p.tags[TAG_GPU_UUID] not in snap.pods for p in gpus):
        extra += ("hpc_job",)
    if any(p.tags[TAG_GPU_UUID] in snap.pods for p in gpus):
        extra += ("pod", "namespace", "container")
    return extra


def _dcgm_extra_values(snap: Snapshot, p: Point, extra: Sequence[str]) -> list[str]:
    pod = snap.pods.get(p.tags[TAG_GPU_UUID])
    job = p.fields.get("job_id")
    values = {
        "hpc_job": str(job) if job and pod is None else "",
        "pod": pod.pod if pod else "",
        "namespace": pod.namespace if pod else "",
        "container": pod.container if pod else "",
    }
    return [values[k] for k in extra]


# --- the snapshot of a running daemon ---------------------------------------------------------
def daemon_snapshot(daemon: AgentDaemon) -> Snapshot:
    """What the daemon holds now: its last cycle, its counters, the lease, the pods."""
    from agent.kube import KubeJobResolver

    try:
        agent = daemon.self_stats_point()
    except Exception as e:  # the spool closing under a scrape at shutdown: serve the rest
        log.debug("self-stats for /metrics failed: %s", e)
        agent = None
    rec = daemon.reconciler
    resolver = daemon.job_resolver
    return Snapshot(
        host=daemon.host,
        points=daemon.last_points,
        agent=agent,
        reconciling=rec is not None,
        lease=rec.lease if rec is not None else None,
        pods=resolver.pods() if isinstance(resolver, KubeJobResolver) else {},
    )


# --- the HTTP server --------------------------------------------------------------------------
def parse_listen(listen: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` → (host, port); ``ValueError`` when malformed."""
    host, sep, port = listen.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"expected host:port, got {listen!r}")
    return host, int(port)


class _Handler(WSGIRequestHandler):
    timeout = REQUEST_TIMEOUT_S

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a scrape in flight never holds the agent's shutdown

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host name (getfqdn): a DNS wait at start-up
        # for nothing. Bind, then set what WSGIServer needs.
        import socketserver

        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)
        self.setup_environ()


class _Server6(_Server):
    address_family = socket.AF_INET6


def metrics_app(registry: CollectorRegistry) -> Callable[..., Iterable[bytes]]:
    """The WSGI app: GET /metrics only (405 for other methods, 404 for other paths).

    The answer is always Prometheus's text format (0.0.4), whatever ``Accept`` asks:
    every Prometheus accepts it, dcgm-exporter serves it, and prometheus_client
    renders it in two thirds of the CPU its OpenMetrics encoder takes (5.1 ms vs
    7.5 ms for 8 GPUs with the dcgm-compat set, measured). Nothing here needs
    OpenMetrics (no exemplars, no ``_created``). No gzip: the CPU is the agent's.
    """

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD", "")
        if method != "GET":
            start_response("405 Method Not Allowed", [("Allow", "GET"), _TEXT])
            return [f"{method} not allowed: /metrics is read-only (GET)\n".encode()]
        if environ.get("PATH_INFO", "") not in (METRICS_PATH, METRICS_PATH + "/"):
            start_response("404 Not Found", [_TEXT])
            return [b"not found: the agent serves only GET /metrics\n"]
        try:
            body = generate_latest(registry)
        except Exception as e:  # a bug in rendering: answer 500 with what went wrong
            log.exception("rendering /metrics failed")
            start_response("500 Internal Server Error", [_TEXT])
            return [f"rendering /metrics failed: {e}\n".encode()]
        start_response(
            "200 OK", [("Content-Type", CONTENT_TYPE), ("Content-Length", str(len(body)))]
        )
        return [body]

    return app


_TEXT = ("Content-Type", "text/plain; charset=utf-8")
# The classic text format, which every Prometheus parses (prometheus_client >= 0.23 labels
# its output 1.0.0, the UTF-8 names revision; with only legacy names, as here, it is the same).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class MetricsServer:
    """``/metrics`` on one address, served from a thread until ``close()``."""

    def __init__(self, listen: str, collector: AgentCollector) -> None:
        self.listen = listen
        self.collector = collector
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(collector)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Bind and serve; ``OSError`` when the address cannot be bound, ``ValueError`` if bad."""
        host, port = parse_listen(self.listen)
        family, _type, _proto, _name, sockaddr = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM
        )[0]
        cls = _Server6 if family == socket.AF_INET6 else _Server
        server = cls((str(sockaddr[0]), int(sockaddr[1])), _Handler)
        server.set_app(metrics_app(self.registry))
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.5}, name="metrics", daemon=True
        )
        self._thread.start()

    @property
    def address(self) -> tuple[str, int]:
        """The bound (host, port): port 0 in the configuration is the port the kernel chose."""
        if self._server is None:
            raise RuntimeError("the metrics server is not started")
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://{f'[{host}]' if ':' in host else host}:{port}{METRICS_PATH}"

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = self._thread = None


def start_metrics_server(daemon: AgentDaemon) -> MetricsServer:
    """Serve the daemon's ``/metrics`` on ``agent.metrics_listen`` (which must be set)."""
    a = daemon.config.agent
    collector = AgentCollector(lambda: daemon_snapshot(daemon), dcgm_compat=a.metrics_dcgm_compat)
    server = MetricsServer(a.metrics_listen, collector)
    server.start()
    log.info(
        "serving Prometheus metrics on %s%s",
        server.url,
        " (with dcgm-exporter's names)" if a.metrics_dcgm_compat else "",
    )
    return server
