"""Fifty minutes of a small fleet's telemetry, every measurement of ``dcenergy.schema``.

Three hosts, twelve GPUs, three jobs, an optimizer publishing a plan every five
minutes and agents applying it. Every state a dashboard shows is present at
least once: busy, idle, capped, throttled (power and thermal) and lost GPUs; a
host without RAPL; spool overflow, rejected and partial drops, errors; every
audit action. Deterministic for a given ``end_ns``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from dcenergy import schema
from dcenergy.schema import Point, point

SAMPLE_S = 20
SAMPLES = 150  # 50 minutes
PLAN_EVERY = 15  # samples: one plan per five minutes
S = 1_000_000_000
GIB = 1 << 30

H100 = "NVIDIA H100 80GB HBM3"
A100 = "NVIDIA A100-SXM4-80GB"
LIMITS = {H100: (200.0, 700.0, 700.0), A100: (100.0, 400.0, 400.0)}  # min, max, default


@dataclass(frozen=True, slots=True)
class Gpu:
    host: str
    index: int
    model: str
    job: str  # "" when idle
    cap_w: float | None = None  # the plan's cap, when below the default
    throttle: int = 0  # NVML clocks-event reasons while busy
    lost_at_end: bool = False

    @property
    def uuid(self) -> str:
        return f"GPU-{self.host[-3:]}{self.index:02d}-0000-4000-8000-{self.index:012d}"

    @property
    def tags(self) -> dict[str, str]:
        return {
            "host": self.host,
            "gpu": str(self.index),
            "gpu_uuid": self.uuid,
            "model": self.model,
        }


FLEET = (
    Gpu("gpu-a01", 0, H100, "train-llm"),
    Gpu("gpu-a01", 1, H100, "train-llm", cap_w=500.0, throttle=0x4),
    Gpu("gpu-a01", 2, H100, ""),
    Gpu("gpu-a01", 3, H100, "infer-chat", throttle=0x20),
    Gpu("gpu-a02", 0, H100, "train-llm"),
    Gpu("gpu-a02", 1, H100, "train-llm"),
    Gpu("gpu-a02", 2, H100, "train-llm", cap_w=550.0, throttle=0x4),
    Gpu("gpu-a02", 3, H100, "train-llm"),
    Gpu("gpu-b01", 0, A100, "infer-vision"),
    Gpu("gpu-b01", 1, A100, "infer-vision"),
    Gpu("gpu-b01", 2, A100, ""),
    Gpu("gpu-b01", 3, A100, "", lost_at_end=True),
)
HOSTS = ("gpu-a01", "gpu-a02", "gpu-b01")
JOB_UNITS = {
    "train-llm": ("tokens", "report", 3200.0),
    "infer-chat": ("tokens", "sm_util_proxy", 900.0),
    "infer-vision": ("samples", "prometheus", 450.0),
}
DOMAINS = {  # budget, share of the fleet's power, shadow price when binding
    "facility": (12_000.0, 1.0, 0.0),
    "row-a": (7_000.0, 0.8, 0.0),
    "rack-a1": (5_200.0, 0.8, 4.2),
    "rack-b1": (2_000.0, 0.2, 0.0),
}


def _wave(i: int, k: int, amp: float) -> float:
    return amp * math.sin(0.37 * i + 1.3 * k)


def _gpu_points(t: int, i: int, state: dict[str, float]) -> list[Point]:
    out = []
    last = i == SAMPLES - 1
    for k, g in enumerate(FLEET):
        if g.lost_at_end and last:
            out.append(point(schema.GPU, g.tags, {"lost": True}, t))
            continue
        lo, hi, default = LIMITS[g.model]
        limit = g.cap_w if g.cap_w is not None else default
        busy = bool(g.job)
        power = min(limit, 0.86 * limit + _wave(i, k, 30.0)) if busy else 68.0 + _wave(i, k, 3.0)
        state[g.uuid + "e"] = state.get(g.uuid + "e", 1.0e8 * (k + 1)) + power * SAMPLE_S
        if g.cap_w is not None:
            state[g.uuid + "pv"] = state.get(g.uuid + "pv", 0.0) + 0.6 * SAMPLE_S
        if g.throttle & 0x20:
            state[g.uuid + "tv"] = state.get(g.uuid + "tv", 0.0) + 0.3 * SAMPLE_S
        hot = 88.0 if g.throttle & 0x20 else 64.0 if busy else 34.0
        fields: dict[str, schema.FieldValue | None] = {
            "power_w": round(power, 2),
            "energy_j": round(state[g.uuid + "e"], 1),
            "energy_resets": 0,
            "power_limit_w": limit,
            "power_limit_default_w": default,
            "power_limit_min_w": lo,
            "power_limit_max_w": hi,
            "power_limit_enforced_w": limit,
            "temp_c": hot + _wave(i, k, 1.5),
            "mem_temp_c": hot + 6.0 + _wave(i, k, 1.0),
            "mem_used_bytes": (62 if busy else 1) * GIB + k * 1024,
            "mem_total_bytes": 80 * GIB,
            "util_gpu_pct": round(92.0 + _wave(i, k, 6.0), 1) if busy else 0.0,
            "util_mem_pct": round(55.0 + _wave(i, k, 10.0), 1) if busy else 0.0,
            "sm_clock_mhz": 1755.0 if busy else 345.0,
            "mem_clock_mhz": 2619.0 if g.model == H100 else 1593.0,
            "throttle_reasons": g.throttle if busy else 0x1,
            "power_violation_s": state.get(g.uuid + "pv", 0.0),
            "thermal_violation_s": state.get(g.uuid + "tv", 0.0),
            "pstate": 0 if busy else 8,
            "mig_mode": 0,
            "pci_bus_id": f"00000000:{0x18 + 0x10 * g.index:02X}:00.0",
            "job_id": g.job,
            "job_count": int(busy),
        }
        if g.model == H100:  # GPM: Hopper only
            fields["sm_active_pct"] = round(78.0 + _wave(i, k, 8.0), 1) if busy else 0.0
            fields["tensor_active_pct"] = round(45.0 + _wave(i, k, 9.0), 1) if busy else 0.0
            fields["dram_active_pct"] = round(52.0 + _wave(i, k, 7.0), 1) if busy else 0.0
        out.append(point(schema.GPU, g.tags, fields, t))
    return out


def _health_points(t: int, i: int) -> list[Point]:
    """Every GPU healthy but gpu-a01/3: an XID 48 at sample 100, its uncorrected ECC error
    and the row remap pending from then on."""
    out = []
    for k, g in enumerate(FLEET):
        if g.lost_at_end and i == SAMPLES - 1:
            continue
        bad = g.host == "gpu-a01" and g.index == 3 and i >= 100
        fields: dict[str, schema.FieldValue | None] = {
            "ecc_corrected_volatile": 2 * k + i // 50,
            "ecc_uncorrected_volatile": int(bad),
            "ecc_corrected_aggregate": 40 + 2 * k + i // 50,
            "ecc_uncorrected_aggregate": int(bad),
            "remap_corrected_rows": k % 2,
            "remap_uncorrected_rows": int(bad),
            "remap_pending": int(bad),
            "remap_failure": 0,
            "xid_events": int(bad and i == 100),
            "xid_critical_events": int(bad and i == 100),
            "xid_last": 48 if bad else None,
            "xid_last_critical": 48 if bad else None,
            "pcie_replay_total": k + i // 75,
            "nvlink_replay_errors_total": k % 3,
            "hw_slowdown": 0,
            "hw_thermal_slowdown": 0,
            "power_brake": 0,
            "unhealthy": int(bad),
            "health_reasons": "1 uncorrected ECC errors; row remap pending" if bad else "",
        }
        out.append(point(schema.GPU_HEALTH, g.tags, fields, t))
    return out


def _job_points(t: int, i: int) -> list[Point]:
    out = []
    for host in HOSTS:
        jobs: dict[str, list[Gpu]] = {}
        for g in FLEET:
            if g.host == host and g.job:
                jobs.setdefault(g.job, []).append(g)
        for job, gpus in sorted(jobs.items()):
            unit, source, rate = JOB_UNITS[job]
            limits = [g.cap_w or LIMITS[g.model][2] for g in gpus]
            power = sum(0.86 * lim for lim in limits)
            fields: dict[str, schema.FieldValue | None] = {
                "throughput": rate * len(gpus) * (1.0 + _wave(i, len(job), 0.05)),
                "throughput_unit": unit,
                "throughput_source": source,
                "sm_util_pct": 92.0 + _wave(i, 1, 4.0),
                "power_w": power,
                "power_limit_w": sum(limits) / len(limits),
                "gpu_count": len(gpus),
                "gpu_uuids": ",".join(g.uuid for g in gpus),
            }
            out.append(point(schema.JOB, {"host": host, "job_id": job}, fields, t))
    return out


def _host_points(t: int, i: int) -> list[Point]:
    out = []
    for k, host in enumerate(HOSTS):
        rapl = host != "gpu-b01"  # its kernel hides RAPL: absent, not zero
        fields: dict[str, schema.FieldValue | None] = {
            "cpu_pct": 35.0 + _wave(i, k, 10.0),
            "mem_used_bytes": (300 + 10 * k) * GIB,
            "mem_total_bytes": 1024 * GIB,
            "load1": 24.0 + _wave(i, k, 4.0),
            "load5": 23.0 + _wave(i, k, 2.0),
            "load15": 22.0 + _wave(i, k, 1.0),
            "cpu_power_w": 310.0 + _wave(i, k, 25.0) if rapl else None,
            "dram_power_w": 48.0 + _wave(i, k, 4.0) if rapl else None,
        }
        out.append(point(schema.HOST, {"host": host}, fields, t))
    return out


def _agent_points(t: int, i: int) -> list[Point]:
    out = []
    for host in HOSTS:
        outage = host == "gpu-a02" and 90 <= i < 120  # the database was away for a while
        depth = min(5_000, (i - 89) * 40) if outage else 0
        overflow = max(0, min(i, 120) - 110) * 7 if host == "gpu-a02" else 0
        rejected = 3 if host == "gpu-b01" and i > 40 else 0
        partial = 2 if host == "gpu-a01" and i > 75 else 0
        corrupt = 4 if host == "gpu-a01" and i > 60 else 0  # a damaged spool salvaged
        disk_full = 6 if host == "gpu-b01" and i > 20 else 0
        errors = i // 30 if host == "gpu-b01" else 0
        spooled = i * 8
        fields: dict[str, schema.FieldValue | None] = {
            "samples_total": i + 1,
            "points_spooled_total": spooled,
            "points_shipped_total": spooled - depth - overflow - rejected - partial - corrupt,
            "dropped_overflow_total": overflow,
            "dropped_rejected_total": rejected,
            "dropped_partial_total": partial,
            "dropped_corrupt_total": corrupt,
            "dropped_disk_full_total": disk_full,
            "errors_total": errors,
            "spool_depth": depth,
            "spool_bytes": 4096 + depth * 180,
            "cycle_s": 0.08 + abs(_wave(i, len(host), 0.03)),
            "ship_latency_s": 2.0 + (i - 89) * SAMPLE_S if outage else 1.5,
            "last_error": "store: 503 Service Unavailable" if errors else "",
        }
        out.append(point(schema.AGENT, {"host": host}, fields, t))
    return out


def _plan_points(t: int, n: int) -> list[Point]:
    plan_id = f"plan-{n:04d}"
    before = sum(0.86 * LIMITS[g.model][2] if g.job else 68.0 for g in FLEET)
    after = sum(0.86 * (g.cap_w or LIMITS[g.model][2]) if g.job else 68.0 for g in FLEET)
    out = [
        point(
            schema.PLAN,
            {"objective": "max_throughput"},
            {
                "plan_id": plan_id,
                "status": "optimal",
                "solve_s": 0.25 + 0.01 * n,
                "power_before_w": before,
                "power_after_w": after,
                "throughput_before": 30_000.0,
                "throughput_after": 29_400.0,
                "savings_w": before - after,
                "gpus_capped": sum(g.cap_w is not None for g in FLEET),
            },
            t,
        )
    ]
    for domain, (budget, share, shadow) in DOMAINS.items():
        out.append(
            point(
                schema.PLAN_DOMAIN,
                {"domain": domain},
                {
                    "plan_id": plan_id,
                    "budget_w": budget,
                    "before_w": before * share + 900.0,
                    "planned_w": after * share + 900.0,
                    "measured_w": 0.97 * before * share + 900.0,
                    "outermost": share == 1.0,
                    "shadow_price_per_kw": shadow,
                },
                t,
            )
        )
    for host in HOSTS:
        part = {"plan_id": plan_id, "host": host, "seq": n, "sig": "ed25519:00"}
        out.append(
            point(
                schema.PLAN_PART,
                {"host": host},
                {
                    "plan_id": plan_id,
                    "seq": n,
                    "payload": json.dumps(part, sort_keys=True, separators=(",", ":")),
                    "expires_ns": t + 15 * 60 * S,
                    "revert": False,
                },
                t,
            )
        )
    if n == 8:  # demand response: the facility's budget lowered for two hours
        out.append(
            point(
                schema.BUDGET_OVERRIDE,
                {"domain": "facility"},
                {
                    "watts": 10_000.0,
                    "expires_ns": t + 2 * 3600 * S,
                    "allow_raise": False,
                    "cleared": False,
                    "payload": "{}",
                },
                t,
            )
        )
    out += _audit_points(t + 2 * S, plan_id, n)
    return out


def _audit_points(t: int, plan_id: str, n: int) -> list[Point]:
    out = []
    for k, g in enumerate(FLEET):
        if not g.job:
            continue
        lo, _, default = LIMITS[g.model]
        requested = g.cap_w or default
        action, reason = "applied", ""
        applied: float | None = requested
        extra: dict[str, schema.FieldValue | None] = {}
        if g.host == "gpu-a01" and g.index == 1 and n == 0:
            action, reason, requested, applied = "clamped", "below power_limit_min_w", 150.0, lo
        elif g.host == "gpu-b01" and n == 2:
            action, reason, applied = "refused", "plan part expired", None
        elif g.host == "gpu-a02" and g.index == 3 and n == 5:
            action, reason, applied = "restored", "plan lease lapsed", default
        elif g.throttle & 0x20 and n % 3 == 1:
            action, reason = "thermal", "temp_c above guard"
            extra["sm_clock_max_mhz"] = 1410.0
        elif g.host == "gpu-a02" and g.index == 0 and n == 7:
            action, reason, applied = "error", "NVML: insufficient permissions", None
        elif g.host == "gpu-a02" and g.index == 1 and n == 3:
            action, reason = "drift", "enforced 650 W, applied 700 W"
        elif g.host == "gpu-b01" and n == 4:
            action, reason, requested = "reverted", "revert", default
        fields: dict[str, schema.FieldValue | None] = {
            "reason": reason,
            "plan_id": plan_id,
            "seq": n,
            "requested_w": requested,
            "applied_w": applied,
            "enforced_w": applied,
            **extra,
        }
        tags = {"host": g.host, "gpu_uuid": g.uuid, "action": action}
        out.append(point(schema.AUDIT, tags, fields, t + k))
    return out


def fleet_points(end_ns: int) -> list[Point]:
    """Every point of the fleet, the last sample at ``end_ns``."""
    start = end_ns - (SAMPLES - 1) * SAMPLE_S * S
    state: dict[str, float] = {}
    out: list[Point] = []
    for i in range(SAMPLES):
        t = start + i * SAMPLE_S * S
        out += _gpu_points(t, i, state)
        out += _health_points(t, i)
        out += _job_points(t, i)
        out += _host_points(t, i)
        out += _agent_points(t, i)
        if i % PLAN_EVERY == 0:
            out += _plan_points(t, i // PLAN_EVERY)
    return out
