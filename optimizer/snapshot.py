"""Build an optimizer problem from the telemetry store's recent window.

The reader side of the data flow: ``gpu`` and ``job`` points of the last
``window_s`` seconds plus the operator's topology become a problem document
(the same JSON the ``optimize`` command reads), so everything downstream is
the pure solver path and a snapshot can be saved and replayed.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from dcenergy import schema
from dcenergy.config import OptimizerConfig
from dcenergy.errors import DcenergyError
from dcenergy.store.base import Store
from optimizer.topology import Topology

# Idle board power by model family (W), from vendor datasheets and common
# nvidia-smi readings of idle SXM/PCIe parts; used when the window shows no idle sample.
_IDLE_W_BY_MODEL = (("H200", 75.0), ("H100", 70.0), ("A100", 55.0), ("L40", 35.0), ("A10", 20.0))
_IDLE_UTIL_PCT = 5.0
_CAP_BUCKET_W = 5.0
# A cap's readings become up to this many samples (means of consecutive runs of
# at least _MIN_RUN readings), not one mean: the fit then sees their spread as
# pure error, the only noise estimate that a bend of the curve cannot inflate.
_RUNS_PER_CAP = 3
_MIN_RUN = 4


class EmptyWindow(DcenergyError):
    """The store has no GPU telemetry in the requested window."""


@dataclass(frozen=True)
class _GpuSummary:
    uuid: str
    host: str
    model: str
    min_w: float
    max_w: float
    default_w: float
    current_w: float
    idle_w: float
    job_id: str


def _idle_guess(model: str, max_w: float) -> float:
    for family, watts in _IDLE_W_BY_MODEL:
        if family in model:
            return min(watts, max_w)
    return round(0.1 * max_w, 1)


def _summarise_gpus(points: Iterable[schema.Point]) -> list[_GpuSummary]:
    by_uuid: dict[str, list[schema.Point]] = defaultdict(list)
    for p in points:
        if p.fields.get("lost") is True:
            continue
        by_uuid[p.tags.get(schema.TAG_GPU_UUID, "")].append(p)
    out: list[_GpuSummary] = []
    for uuid, pts in sorted(by_uuid.items()):
        if not uuid:
            continue
        last = pts[-1].fields
        needed = ("power_limit_min_w", "power_limit_max_w", "power_limit_default_w")
        if any(not isinstance(last.get(k), int | float) for k in needed):
            continue  # a GPU without readable limits cannot be capped
        max_w = float(last["power_limit_max_w"])
        powers = [float(p.fields["power_w"]) for p in pts if "power_w" in p.fields]
        idle = [
            float(p.fields["power_w"])
            for p in pts
            if "power_w" in p.fields and float(p.fields.get("util_gpu_pct", 100.0)) < _IDLE_UTIL_PCT
        ]
        model = pts[-1].tags.get(schema.TAG_GPU_MODEL, "unknown")
        out.append(
            _GpuSummary(
                uuid=uuid,
                host=pts[-1].tags.get(schema.TAG_HOST, ""),
                model=model,
                min_w=float(last["power_limit_min_w"]),
                max_w=max_w,
                default_w=float(last["power_limit_default_w"]),
                current_w=statistics.fmean(powers) if powers else 0.0,
                idle_w=min(statistics.median(idle), max_w) if idle else _idle_guess(model, max_w),
                job_id=str(last.get("job_id", "")),
            )
        )
    return out


def _job_samples(points: Iterable[schema.Point]) -> dict[str, dict[str, Any]]:
    """Per job: its GPUs, unit, and (cap, throughput, power) samples bucketed by cap.

    A job spread over several hosts reports per host; samples taken at the same
    timestamp are summed (throughput) and averaged (cap) across hosts first.
    """
    per_time: dict[str, dict[int, list[schema.Point]]] = defaultdict(lambda: defaultdict(list))
    gpus: dict[str, set[str]] = defaultdict(set)
    units: dict[str, str] = {}
    for p in points:
        job = p.tags.get(schema.TAG_JOB, "")
        if not job:
            continue
        listed = str(p.fields.get("gpu_uuids", ""))
        gpus[job].update(u for u in listed.split(",") if u)
        if "throughput" in p.fields and "power_limit_w" in p.fields:
            per_time[job][p.time_ns].append(p)
            units[job] = str(p.fields.get("throughput_unit", "units"))
    jobs: dict[str, dict[str, Any]] = {}
    for job, uuids in gpus.items():
        buckets: dict[float, list[tuple[float, float]]] = defaultdict(list)
        for _, pts in sorted(per_time.get(job, {}).items()):
            cap = statistics.fmean(float(p.fields["power_limit_w"]) for p in pts)
            thr = sum(float(p.fields["throughput"]) for p in pts)
            pw = sum(float(p.fields.get("power_w", 0.0)) for p in pts) / max(len(uuids), 1)
            buckets[round(cap / _CAP_BUCKET_W) * _CAP_BUCKET_W].append((thr, pw))
        samples = [
            {
                "cap_w": cap,
                "throughput": statistics.fmean(t for t, _ in run),
                "power_w": max(pw for _, pw in run),
            }
            for cap, vals in sorted(buckets.items())
            for run in _runs(vals)
        ]
        jobs[job] = {
            "gpus": sorted(uuids),
            "unit": units.get(job, "sm_util_proxy"),
            "samples": samples,
        }
    return jobs


def _runs(vals: list[tuple[float, float]]) -> list[list[tuple[float, float]]]:
    """Time-ordered readings at one cap, split into up to ``_RUNS_PER_CAP`` consecutive runs."""
    k = max(1, min(_RUNS_PER_CAP, len(vals) // _MIN_RUN))
    size, extra = divmod(len(vals), k)
    out, i = [], 0
    for r in range(k):
        n = size + (1 if r < extra else 0)
        out.append(vals[i : i + n])
        i += n
    return out


def objective_doc(o: OptimizerConfig, kind: str | None = None) -> dict[str, Any]:
    """The problem's objective block from the ``[optimizer]`` config (``kind`` overrides)."""
    return {
        "kind": kind or o.objective,
        "price_per_kwh": o.price_per_kwh,
        "pue": o.pue,
        "carbon_g_per_kwh": o.carbon_g_per_kwh,
        "slowdown_confidence": o.slowdown_confidence,
    }


def build_problem(
    store: Store,
    topology: Topology,
    *,
    now_ns: int,
    window_s: float,
    objective: Mapping[str, Any],
    allowed_slowdown: float,
) -> dict[str, Any]:
    """The problem document for the fleet as the store saw it in the last ``window_s``."""
    start = now_ns - int(window_s * 1e9)
    gpu_points = store.read(schema.GPU.name, start_ns=start, end_ns=now_ns + 1)
    gpus = _summarise_gpus(gpu_points)
    if not gpus:
        raise EmptyWindow(
            f"no GPU telemetry in the store for the last {window_s:g} s",
            hint="run the agent first (dcenergy agent run --simulate 8) or widen --window",
        )
    known = {g.uuid for g in gpus}
    jobs = _job_samples(store.read(schema.JOB.name, start_ns=start, end_ns=now_ns + 1))
    used_domains: set[str] = set()
    gpu_docs = []
    for g in gpus:
        doms = list(topology.domains_of(g.host))
        used_domains.update(doms)
        gpu_docs.append(
            {
                "id": g.uuid,
                "host": g.host,
                "model": g.model,
                "min_w": g.min_w,
                "max_w": g.max_w,
                "default_w": g.default_w,
                "idle_w": g.idle_w,
                "current_w": round(g.current_w, 2),
                "domains": doms,
            }
        )
    job_docs = []
    for job_id, j in sorted(jobs.items()):
        job_gpus = [u for u in j["gpus"] if u in known]
        if not job_gpus:
            continue
        job_docs.append(
            {
                "id": job_id,
                "gpus": job_gpus,
                "weight": 1.0,
                "allowed_slowdown": allowed_slowdown,
                "synchronous": len(job_gpus) > 1,
                "unit": j["unit"],
                "samples": j["samples"],
            }
        )
    domain_docs = [
        {"id": d.id, "budget_w": d.budget_w, "baseline_w": d.baseline_w, "kind": d.kind}
        for d in topology.domains
        if d.id in used_domains
    ]
    return {
        "version": 1,
        "gpus": gpu_docs,
        "domains": domain_docs,
        "jobs": job_docs,
        "objective": dict(objective),
    }
