"""The snapshot as it was computed from raw points: the reference the aggregate reader is
checked against (``test_snapshot_aggregates.py``).

It reads every raw row of the window and reduces it in Python, which is what
the product no longer does (it cannot at fleet size); kept here, in the tests,
as the plain definition of what the aggregates must reproduce.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from typing import Any

from dcenergy import schema
from dcenergy.store.base import Store

IDLE_UTIL_PCT = 5.0
CAP_BUCKET_W = 5.0
RUNS_PER_CAP = 3
MIN_RUN = 4


def gpu_summaries(store: Store, start_ns: int, end_ns: int) -> dict[str, dict[str, Any]]:
    by_uuid: dict[str, list[schema.Point]] = defaultdict(list)
    for p in store.read(schema.GPU.name, start_ns=start_ns, end_ns=end_ns):
        if p.fields.get("lost") is not True:
            by_uuid[p.tags.get(schema.TAG_GPU_UUID, "")].append(p)
    out: dict[str, dict[str, Any]] = {}
    for uuid, pts in sorted(by_uuid.items()):
        last = pts[-1].fields
        powers = [float(p.fields["power_w"]) for p in pts if "power_w" in p.fields]
        idle = [
            float(p.fields["power_w"])
            for p in pts
            if "power_w" in p.fields and float(p.fields.get("util_gpu_pct", 100.0)) < IDLE_UTIL_PCT
        ]
        out[uuid] = {
            "host": pts[-1].tags.get(schema.TAG_HOST, ""),
            "min_w": float(last["power_limit_min_w"]),
            "max_w": float(last["power_limit_max_w"]),
            "default_w": float(last["power_limit_default_w"]),
            "current_w": statistics.fmean(powers),
            "idle_w": statistics.median(idle) if idle else None,
        }
    return out


def job_samples(store: Store, start_ns: int, end_ns: int) -> dict[str, list[dict[str, float]]]:
    """Per job: (cap, throughput, power) samples, readings bucketed by cap in runs."""
    per_time: dict[str, dict[int, list[schema.Point]]] = defaultdict(lambda: defaultdict(list))
    gpus: dict[str, set[str]] = defaultdict(set)
    for p in store.read(schema.JOB.name, start_ns=start_ns, end_ns=end_ns):
        job = p.tags.get(schema.TAG_JOB, "")
        gpus[job].update(u for u in str(p.fields.get("gpu_uuids", "")).split(",") if u)
        if "throughput" in p.fields and "power_limit_w" in p.fields:
            per_time[job][p.time_ns].append(p)
    jobs: dict[str, list[dict[str, float]]] = {}
    for job, uuids in gpus.items():
        buckets: dict[float, list[tuple[float, float]]] = defaultdict(list)
        for _, pts in sorted(per_time.get(job, {}).items()):
            cap = statistics.fmean(float(p.fields["power_limit_w"]) for p in pts)
            thr = sum(float(p.fields["throughput"]) for p in pts)
            pw = sum(float(p.fields.get("power_w", 0.0)) for p in pts) / max(len(uuids), 1)
            buckets[round(cap / CAP_BUCKET_W) * CAP_BUCKET_W].append((thr, pw))
        jobs[job] = [
            {
                "cap_w": cap,
                "throughput": statistics.fmean(t for t, _ in run),
                "power_w": max(pw for _, pw in run),
                "readings": len(run),
            }
            for cap, vals in sorted(buckets.items())
            for run in _runs(vals)
        ]
    return jobs


def _runs(vals: list[tuple[float, float]]) -> list[list[tuple[float, float]]]:
    k = max(1, min(RUNS_PER_CAP, len(vals) // MIN_RUN))
    size, extra = divmod(len(vals), k)
    out, i = [], 0
    for r in range(k):
        n = size + (1 if r < extra else 0)
        out.append(vals[i : i + n])
        i += n
    return out
