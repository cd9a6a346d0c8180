"""The telemetry schema: the one place that names measurements, tags, fields and units.

Every writer (agent, optimizer) and every reader (recommend, dashboards, tests)
uses these names; a dashboard test checks that each field a panel queries is
declared here, so renaming a field breaks a test rather than a dashboard.

Units are part of field names (``power_w``, ``energy_j``, ``temp_c``).
Tag cardinality stays bounded: ``job_id`` is a tag only on measurements that
are about jobs; on the ``gpu`` measurement the running job is a string field.
A MIG instance's UUID (``mig_uuid``) is a tag only on ``gpu_instance`` (at most
seven per GPU).

Estimates: a field whose name carries ``_est`` before its unit (``power_est_w``,
``energy_est_j``) is an attribution by a stated rule, never a measurement; the
``power_split`` field next to it names the rule used:

* ``sole``: the job has the GPU to itself (the estimate is the measurement);
* ``activity``: MIG instances, by share of activity: instance ``i`` gets
  ``P · a_i·n_i / Σ a_k·n_k`` (``a`` its GPM SM activity, ``n`` its SM count);
* ``process_util``: a GPU time-sliced or shared through MPS, by each job's
  processes' summed SM utilization (``nvmlDeviceGetProcessUtilization``) over
  the summed utilization of every process on the GPU (processes of no job keep
  their part, so the jobs' shares may sum to less than 1);
* ``equal``: where the activity or utilization is unknown (or all zero): an
  equal split among the instances (MIG) or among the jobs (shared GPU).

Energy estimates (``energy_est_j``) add up, every cycle, the share times the
GPU's energy-counter increase since the previous cycle: cumulative since the
agent first saw the job (or instance) on this host.
"""

from __future__ import annotations

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
TAG_MIG_UUID: Final = "mig_uuid"

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
        _f("job_ids", str, "", "every job on this GPU, comma-separated (MIG, MPS, time slicing)"),
        _f("job_count", int, "count", "jobs on this GPU (2 or more: shared)"),
        _f("lost", bool, "bool", "GPU is lost (fell off the bus); other fields absent"),
        # profiling activity (GPM, Hopper and newer): means over the sampling interval
        _f("sm_active_pct", float, "%", "GPM: share of SMs busy"),
        _f("sm_occupancy_pct", float, "%", "GPM: resident warps over the theoretical maximum"),
        _f("tensor_active_pct", float, "%", "GPM: share of time the SMs ran any tensor op"),
        _f("dram_active_pct", float, "%", "GPM: DRAM bandwidth used over its peak"),
        _f("pcie_tx_bytes_per_s", float, "B/s", "GPM: PCIe traffic from the GPU"),
        _f("pcie_rx_bytes_per_s", float, "B/s", "GPM: PCIe traffic to the GPU"),
        _f("nvlink_tx_bytes_per_s", float, "B/s", "GPM: NVLink traffic sent, all links"),
        _f("nvlink_rx_bytes_per_s", float, "B/s", "GPM: NVLink traffic received, all links"),
        # newer power controls, where the GPU has them (Grace Hopper, Blackwell)
        _f("module_power_w", float, "W", "module power (GPU + CPU + memory), module scope"),
        _f("module_power_limit_w", float, "W", "module power limit in force, module scope"),
        _f("power_smoothing_enabled", int, "bool", "power smoothing enabled (1) or not (0)"),
        _f("power_smoothing_profile", int, "id", "active power-smoothing preset profile"),
        _f("power_profiles", str, "", "enforced workload power profiles, comma-separated"),
    ),
    "one row per GPU per sample",
)

GPU_INSTANCE = Measurement(
    "gpu_instance",
    (TAG_HOST, TAG_GPU_INDEX, TAG_GPU_UUID, TAG_GPU_MODEL, TAG_MIG_UUID),
    (
        _f("gpu_instance_id", int, "id", "MIG GPU-instance id"),
        _f("compute_instance_id", int, "id", "MIG compute-instance id"),
        _f("profile", str, "", "MIG profile, e.g. 1g.10gb (1c.3g.40gb for a compute slice)"),
        _f("sm_count", int, "count", "SMs of the instance"),
        _f("mem_used_bytes", int, "bytes", "instance memory used"),
        _f("mem_total_bytes", int, "bytes", "instance memory total"),
        _f("sm_active_pct", float, "%", "GPM per GPU instance: share of its SMs busy"),
        _f("tensor_active_pct", float, "%", "GPM per GPU instance: tensor activity"),
        _f("dram_active_pct", float, "%", "GPM per GPU instance: DRAM bandwidth used"),
        _f("power_share", float, "ratio", "share of the parent GPU's power given to it (0-1)"),
        _f("power_est_w", float, "W", "estimate: parent power x power_share"),
        _f("energy_est_j", float, "J", "estimate: parent energy increase x share, summed"),
        _f("power_split", str, "", "rule of the estimate: activity | equal"),
        _f("job_id", str, "", "job on this instance ('' when idle)"),
        _f("job_count", int, "count", "jobs on this instance"),
    ),
    "one row per MIG instance per sample; the parent GPU is in the tags",
)

GPU_HEALTH = Measurement(
    "gpu_health",
    (TAG_HOST, TAG_GPU_INDEX, TAG_GPU_UUID, TAG_GPU_MODEL),
    (
        _f("ecc_corrected_volatile", int, "count", "corrected ECC errors since driver load"),
        _f("ecc_uncorrected_volatile", int, "count", "uncorrected ECC errors since driver load"),
        _f("ecc_corrected_aggregate", int, "count", "corrected ECC errors, lifetime"),
        _f("ecc_uncorrected_aggregate", int, "count", "uncorrected ECC errors, lifetime"),
        _f("retired_pages_sbe", int, "count", "pages retired for single-bit errors"),
        _f("retired_pages_dbe", int, "count", "pages retired for double-bit errors"),
        _f("retired_pages_pending", int, "bool", "a page retirement waits for a reset (1)"),
        _f("remap_corrected_rows", int, "count", "rows remapped for corrected errors"),
        _f("remap_uncorrected_rows", int, "count", "rows remapped for uncorrected errors"),
        _f("remap_pending", int, "bool", "a row remap waits for a GPU reset (1)"),
        _f("remap_failure", int, "bool", "a row remap failed (1): the GPU needs service"),
        _f("xid_events", int, "count", "XID events since the previous health row"),
        _f("xid_critical_events", int, "count", "of those, not caused by an application"),
        _f("xid_last", int, "code", "the last XID seen since the agent started"),
        _f("xid_last_critical", int, "code", "the last XID not caused by an application"),
        _f("pcie_replay_total", int, "count", "PCIe replays (link retries)"),
        _f("nvlink_crc_flit_errors_total", int, "count", "NVLink flit CRC errors, all links"),
        _f("nvlink_crc_data_errors_total", int, "count", "NVLink data CRC errors, all links"),
        _f("nvlink_replay_errors_total", int, "count", "NVLink replays, all links"),
        _f("nvlink_recovery_errors_total", int, "count", "NVLink recoveries, all links"),
        _f("fan_speed_pct", float, "%", "fan speed (absent on passively cooled GPUs)"),
        _f("hw_slowdown", int, "bool", "HW slowdown clocks-event reason active (1)"),
        _f("hw_thermal_slowdown", int, "bool", "HW thermal slowdown active (1)"),
        _f("power_brake", int, "bool", "HW power brake (external signal) active (1)"),
        _f("unhealthy", int, "bool", "the agent's verdict now (1): see health_reasons"),
        _f("health_reasons", str, "", "why unhealthy, '; '-separated ('' when healthy)"),
    ),
    "one row per GPU every few samples: error counters, XIDs, slowdowns",
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
        _f("mig_uuids", str, "", "comma-separated MIG instance UUIDs of this job on this host"),
        _f("power_est_w", float, "W", "estimate: its share of its GPUs' power (power_split)"),
        _f("energy_est_j", float, "J", "estimate: its share of its GPUs' energy, summed"),
        _f("power_split", str, "", "rule of the estimates: sole | activity | process_util | equal"),
        _f("sharing_jobs", int, "count", "most jobs sharing any one of its GPUs (1: not shared)"),
        _f("gpu_share", float, "GPUs", "summed share of its GPUs (GPU-equivalents)"),
        _f("sm_active_pct", float, "%", "GPM: mean SM activity of its GPUs or MIG instances"),
        _f("tensor_active_pct", float, "%", "GPM: mean tensor activity of its GPUs or instances"),
        _f("dram_active_pct", float, "%", "GPM: mean DRAM bandwidth use of its GPUs or instances"),
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
    "probe",  # the optimizer's short probe cap, inside the job's allowance (learning its curve)
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
    for m in (
        GPU,
        GPU_INSTANCE,
        GPU_HEALTH,
        HOST,
        JOB,
        AGENT,
        PLAN_PART,
        AUDIT,
        PLAN,
        PLAN_DOMAIN,
        BUDGET_OVERRIDE,
    )
}


def point(
    m: Measurement, tags: Mapping[str, str], fields: Mapping[str, FieldValue | None], time_ns: int
) -> Point:
    """Build a point, dropping absent (None) and non-finite fields: absent, not zero."""
    # v - v is 0.0 for a finite float and nan for inf or nan (this runs for every field
    # of every sample: cheaper than isinstance and math.isfinite)
    clean: dict[str, FieldValue] = {
        k: v
        for k, v in fields.items()
        if v is not None and (v.__class__ is not float or v - v == 0.0)
    }
    return Point(m.name, dict(tags), clean, time_ns)
