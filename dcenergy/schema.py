"""The telemetry schema: the one place that names measurements, tags, fields and units.

Every writer (agent, optimizer) and every reader (recommend, dashboards, tests)
uses these names; a dashboard test checks that each field a panel queries is
declared here, so renaming a field breaks a test rather than a dashboard.

Units are part of field names (``power_w``, ``energy_j``, ``temp_c``).
Tag cardinality stays bounded: ``job_id`` is a tag only on measurements that
are about jobs; on the ``gpu`` measurement the running job is a string field.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

FieldValue = float | int | bool | str


@dataclass(frozen=True, slots=True)
class Point:
    """One sample of one series at one client-side timestamp (ns since the epoch)."""

    measurement: str
    tags: Mapping[str, str]
    fields: Mapping[str, FieldValue]
    time_ns: int

    def series_key(self) -> str:
        """Identity of the series: the same key + time overwrites, so retries are idempotent."""
        return self.measurement + "".join(f",{k}={self.tags[k]}" for k in sorted(self.tags))


@dataclass(frozen=True, slots=True)
class FieldSpec:
    name: str
    kind: type  # float, int, bool or str
    unit: str
    help: str


@dataclass(frozen=True, slots=True)
class Measurement:
    name: str
    tags: tuple[str, ...]
    fields: tuple[FieldSpec, ...]
    help: str
    field_names: frozenset[str] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "field_names", frozenset(f.name for f in self.fields))

    def spec(self, name: str) -> FieldSpec:
        for f in self.fields:
            if f.name == name:
                return f
        raise KeyError(f"{self.name} has no field {name!r}")


def _f(name: str, kind: type, unit: str, help: str) -> FieldSpec:
    return FieldSpec(name, kind, unit, help)


# --- tag names ------------------------------------------------------------
TAG_HOST: Final = "host"
TAG_GPU_INDEX: Final = "gpu"
TAG_GPU_UUID: Final = "gpu_uuid"
TAG_GPU_MODEL: Final = "model"
TAG_JOB: Final = "job_id"
TAG_DOMAIN: Final = "domain"
TAG_ACTION: Final = "action"
TAG_REASON: Final = "reason"

# ``audit`` points the optimizer side writes when it acts through the scheduler
# (``dcenergy consolidate --apply``): one per node drained or resumed, host-wide
# (``gpu_uuid`` "all", as the reconciler's host-wide records), ``error`` if Slurm refused.
AUDIT_DRAIN: Final = "drain"
AUDIT_RESUME: Final = "resume"
AUDIT_ERROR: Final = "error"
AUDIT_ALL_GPUS: Final = "all"
SCHEDULER_AUDIT_ACTIONS: Final = (AUDIT_DRAIN, AUDIT_RESUME, AUDIT_ERROR)

GPU = Measurement(
    "gpu",
    (TAG_HOST, TAG_GPU_INDEX, TAG_GPU_UUID, TAG_GPU_MODEL),
    (
        _f("power_w", float, "W", "instantaneous board power (POWER_INSTANT where supported)"),
        _f("energy_j", float, "J", "total-energy counter since driver load, reset-corrected"),
        _f("energy_resets", int, "count", "energy counter resets seen (driver reload)"),
        _f("power_limit_w", float, "W", "current (requested) power limit"),
        _f("power_limit_default_w", float, "W", "default power limit"),
        _f("power_limit_min_w", float, "W", "smallest settable power limit"),
        _f("power_limit_max_w", float, "W", "largest settable power limit"),
        _f("power_limit_enforced_w", float, "W", "limit the driver enforces (all constraints)"),
        _f("temp_c", float, "°C", "GPU core temperature"),
        _f("mem_temp_c", float, "°C", "memory (HBM) temperature"),
        _f("mem_used_bytes", int, "bytes", "device memory used"),
        _f("mem_total_bytes", int, "bytes", "device memory total"),
        _f("util_gpu_pct", float, "%", "SM busy share over the driver's sample window"),
        _f("util_mem_pct", float, "%", "memory-controller busy share"),
        _f("sm_clock_mhz", float, "MHz", "current SM clock"),
        _f("mem_clock_mhz", float, "MHz", "current memory clock"),
        _f("throttle_reasons", int, "bitmask", "NVML clocks-event reasons bitmask"),
        _f("power_violation_s", float, "s", "cumulative time throttled by the power limit"),
        _f("thermal_violation_s", float, "s", "cumulative time throttled by temperature"),
        _f("pstate", int, "P-state", "performance state (0 fastest)"),
        _f("mig_mode", int, "bool", "MIG mode enabled (1) or not (0)"),
        _f("pci_bus_id", str, "", "PCI bus id"),
        _f("job_id", str, "", "job running on this GPU ('' when idle); a field, not a tag"),
        _f("lost", bool, "bool", "GPU is lost (fell off the bus); other fields absent"),
    ),
    "one row per GPU per sample",
)

HOST = Measurement(
    "host",
    (TAG_HOST,),
    (
        _f("cpu_pct", float, "%", "CPU busy share across all cores"),
        _f("mem_used_bytes", int, "bytes", "host memory used"),
        _f("mem_total_bytes", int, "bytes", "host memory total"),
        _f("load1", float, "", "1-minute load average"),
        _f("load5", float, "", "5-minute load average"),
        _f("load15", float, "", "15-minute load average"),
        _f("cpu_power_w", float, "W", "CPU package power from RAPL (absent when unreadable)"),
        _f("dram_power_w", float, "W", "DRAM power from RAPL (absent when unreadable)"),
    ),
    "one row per host per sample",
)

JOB = Measurement(
    "job",
    (TAG_HOST, TAG_JOB),
    (
        _f("throughput", float, "unit/s", "work rate from the job's report or Prometheus counter"),
        _f("throughput_unit", str, "", "what one unit of work is (tokens, samples, steps)"),
        _f("throughput_source", str, "", "report | prometheus | sm_util_proxy"),
        _f("sm_util_pct", float, "%", "mean SM utilization of its GPUs (a proxy, not throughput)"),
        _f("power_w", float, "W", "summed power of its GPUs on this host"),
        _f("power_limit_w", float, "W", "mean power limit of its GPUs on this host"),
        _f("gpu_count", int, "count", "GPUs of this job on this host"),
        _f("gpu_uuids", str, "", "comma-separated GPU UUIDs of this job on this host"),
    ),
    "one row per job per host per sample",
)

AGENT = Measurement(
    "agent",
    (TAG_HOST,),
    (
        _f("samples_total", int, "count", "sampling cycles completed"),
        _f("points_spooled_total", int, "count", "points written to the spool"),
        _f("points_shipped_total", int, "count", "points the store accepted"),
        _f("dropped_overflow_total", int, "count", "points dropped because the spool was full"),
        _f("dropped_rejected_total", int, "count", "points the store rejected (4xx)"),
        _f("dropped_partial_total", int, "count", "points dropped by a 400 partial write"),
        _f(
            "dropped_corrupt_total",
            int,
            "count",
            "committed points a damaged spool could not give back (salvage, damaged WAL)",
        ),
        _f("dropped_disk_full_total", int, "count", "points dropped: no room on the state disk"),
        _f("errors_total", int, "count", "errors met (device, store, collector)"),
        _f("spool_depth", int, "points", "points waiting in the spool"),
        _f("spool_bytes", int, "bytes", "bytes of points waiting (lines + per-row overhead)"),
        _f(
            "spool_file_bytes",
            int,
            "bytes",
            "spool files on disk (database, WAL, -shm, ledger, reserve)",
        ),
        _f("cycle_s", float, "s", "duration of the last sampling cycle"),
        _f("ship_latency_s", float, "s", "age of the oldest point in the last shipped batch"),
        _f("last_error", str, "", "the last error message ('' when none)"),
    ),
    "the agent reporting on itself",
)

PLAN_PART = Measurement(
    "plan_part",
    (TAG_HOST,),
    (
        _f("plan_id", str, "", "id of the plan this part belongs to"),
        _f("seq", int, "", "strictly increasing sequence number"),
        _f("payload", str, "json", "the signed part, canonical JSON with its signature"),
        _f("expires_ns", int, "ns", "expiry time of the part"),
        _f("revert", bool, "bool", "an emergency revert (dcenergy revert): no setpoints"),
    ),
    "each host's signed part of a plan, written by the optimizer",
)

# What the reconciler writes as the ``action`` tag of an ``audit`` point (dashboards and
# alerts import these; tests check agent.reconciler uses exactly these).
AUDIT_ACTIONS: Final = (
    "applied",
    "clamped",
    "refused",
    "restored",
    "reverted",
    "error",
    "thermal",
    "drift",
)

AUDIT = Measurement(
    "audit",
    (TAG_HOST, TAG_GPU_UUID, TAG_ACTION),
    (
        _f("reason", str, "", "why (refusal reason, clamp cause, thermal guard)"),
        _f("plan_id", str, "", "plan the action relates to"),
        _f("seq", int, "", "sequence number of the plan part"),
        _f("requested_w", float, "W", "power limit the plan asked for"),
        _f("applied_w", float, "W", "power limit the agent set"),
        _f("enforced_w", float, "W", "power limit read back from the GPU"),
        _f("sm_clock_max_mhz", float, "MHz", "locked SM clock maximum (DVFS), when used"),
    ),
    "what each agent did with a plan: one of AUDIT_ACTIONS",
)

PLAN = Measurement(
    "plan",
    ("objective",),
    (
        _f("plan_id", str, "", "plan id"),
        _f("status", str, "", "solver status"),
        _f("solve_s", float, "s", "solver wall time"),
        _f("power_before_w", float, "W", "predicted fleet GPU power with no change"),
        _f("power_after_w", float, "W", "predicted fleet GPU power under the plan"),
        _f("throughput_before", float, "unit/s", "predicted weighted throughput before"),
        _f("throughput_after", float, "unit/s", "predicted weighted throughput after"),
        _f("savings_w", float, "W", "predicted power saved"),
        _f("gpus_capped", int, "count", "GPUs given a cap below their default"),
    ),
    "one row per plan the optimizer published",
)

PLAN_DOMAIN = Measurement(
    "plan_domain",
    (TAG_DOMAIN,),
    (
        _f("plan_id", str, "", "plan id"),
        _f("budget_w", float, "W", "domain budget"),
        _f("before_w", float, "W", "predicted domain power before"),
        _f("planned_w", float, "W", "predicted domain power under the plan"),
        _f("measured_w", float, "W", "measured domain power over the solve's window"),
        _f("outermost", bool, "bool", "the domain holds every GPU of the plan"),
        _f("shadow_price_per_kw", float, "unit/s per kW", "throughput one more kW would buy"),
    ),
    "per-domain figures of each plan",
)

BUDGET_OVERRIDE = Measurement(
    "budget_override",
    (TAG_DOMAIN,),
    (
        _f("watts", float, "W", "the domain's budget until expires_ns (0 when cleared)"),
        _f("expires_ns", int, "ns", "when the override ends"),
        _f("allow_raise", bool, "bool", "may exceed the topology's own budget"),
        _f("cleared", bool, "bool", "ends an earlier override (dcenergy budget clear)"),
        _f("payload", str, "json", "the signed override, canonical JSON with its signature"),
    ),
    "signed, expiring budget overrides (demand response: dcenergy budget set)",
)

MEASUREMENTS: Final[dict[str, Measurement]] = {
    m.name: m
    for m in (GPU, HOST, JOB, AGENT, PLAN_PART, AUDIT, PLAN, PLAN_DOMAIN, BUDGET_OVERRIDE)
}


def point(
    m: Measurement, tags: Mapping[str, str], fields: Mapping[str, FieldValue | None], time_ns: int
) -> Point:
    """Build a point, dropping absent (None) and non-finite fields: absent, not zero."""
    clean: dict[str, FieldValue] = {}
    for k, v in fields.items():
        if v is None or (isinstance(v, float) and not math.isfinite(v)):
            continue
        clean[k] = v
    return Point(m.name, dict(tags), clean, time_ns)
