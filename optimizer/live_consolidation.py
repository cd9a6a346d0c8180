"""The consolidation section (docs/consolidation.md) built from live telemetry.

What the consolidation model needs and where it comes from:

* nodes, their GPUs, each GPU's memory, which job holds it (the ``gpu``
  measurement's ``job_id`` field), its mean utilization and the most memory
  it used: one aggregate row per GPU over the window;
* **measured idle power**: per GPU the median draw while idle (utilization
  under 5 %) and *not held* by a job (``job_id = ""``), and while idle but
  held (a context open, no work: the model's ``gpu_idle_w`` is the
  difference); a GPU never seen unheld takes its node's, then the fleet's
  median, then the snapshot's guess by model. A node that held no job in the
  whole window is measured as it is (its GPUs' mean draw);
* a node's non-GPU draw (CPUs, DRAM) from RAPL (the ``host`` measurement's
  ``cpu_power_w`` + ``dram_power_w``) where the agent reads it, else the
  policy's ``node_base_w`` (0 without one: fans and disks are then
  unaccounted and the saving is understated);
* active power per unit of utilization from the busy GPUs' draw above idle;
* from the operator's policy file: which nodes may power down, and per job
  ``pinned``, ``shareable``, ``migration_cost_wh`` (an ``exempt`` job is
  pinned too).

Every read is a store aggregate (``AggregateQuery``; InfluxQL on InfluxDB,
SQL on the embedded store): four queries, rows grow with GPUs + hosts, never
with raw points. A job spread over several hosts cannot move as one in the
node-level model: it appears once per host as ``<job>@<host>``, pinned.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from dcenergy import schema
from dcenergy.errors import NoTelemetry
from dcenergy.store.base import Agg, AggregateQuery, AggRow, FieldFilter, Fn, Op, Store
from optimizer.policy import ConsolidationPolicy, JobPolicy, PolicyResolver
from optimizer.snapshot import _idle_guess

IDLE_UTIL_PCT = 5.0
GB = 1e9


@dataclass(frozen=True)
class _Gpu:
    uuid: str
    host: str
    index: int
    model: str
    util: float  # 0..1
    mem_used_gb: float
    mem_total_gb: float
    job: str
    power_w: float | None
    default_w: float | None
    max_w: float | None


@dataclass
class ConsolidationSnapshot:
    """The section (``parse_consolidation`` reads it) and how its figures were obtained."""

    section: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    split_jobs: list[str] = field(default_factory=list)  # jobs on several hosts (pinned)


def _queries(start: int, end: int) -> tuple[AggregateQuery, ...]:
    by = (schema.TAG_HOST, schema.TAG_GPU_INDEX, schema.TAG_GPU_UUID, schema.TAG_GPU_MODEL)
    gpus = AggregateQuery(
        schema.GPU.name,
        (
            Agg(Fn.MEAN, "util_gpu_pct"),
            Agg(Fn.MAX, "mem_used_bytes"),
            Agg(Fn.LAST, "mem_total_bytes"),
            Agg(Fn.LAST, "job_id"),
            Agg(Fn.MEAN, "power_w"),
            Agg(Fn.LAST, "power_limit_default_w"),
            Agg(Fn.LAST, "power_limit_max_w"),
        ),
        start,
        end,
        by=by,
    )
    idle = (FieldFilter("util_gpu_pct", Op.LT, IDLE_UTIL_PCT),)
    unheld = AggregateQuery(
        schema.GPU.name,
        (Agg(Fn.MEDIAN, "power_w"),),
        start,
        end,
        by=(schema.TAG_GPU_UUID,),
        where=(*idle, FieldFilter("job_id", Op.EQ, "")),
    )
    held = AggregateQuery(
        schema.GPU.name,
        (Agg(Fn.MEDIAN, "power_w"),),
        start,
        end,
        by=(schema.TAG_GPU_UUID,),
        where=(*idle, FieldFilter("job_id", Op.NE, "")),
    )
    host = AggregateQuery(
        schema.HOST.name,
        (Agg(Fn.MEAN, "cpu_power_w"), Agg(Fn.MEAN, "dram_power_w")),
        start,
        end,
        by=(schema.TAG_HOST,),
    )
    return gpus, unheld, held, host


def _num(v: object) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


def _gpus(rows: list[AggRow]) -> list[_Gpu]:
    out: dict[str, _Gpu] = {}
    for r in rows:
        uuid, host = r.tags.get(schema.TAG_GPU_UUID, ""), r.tags.get(schema.TAG_HOST, "")
        total = _num(r.values.get("last_mem_total_bytes"))
        if not uuid or not host or uuid in out or total is None or total <= 0:
            continue  # lost all window, or no memory reading: cannot be placed on
        try:
            index = int(r.tags.get(schema.TAG_GPU_INDEX, ""))
        except ValueError:
            index = 1 << 30
        out[uuid] = _Gpu(
            uuid=uuid,
            host=host,
            index=index,
            model=r.tags.get(schema.TAG_GPU_MODEL) or "unknown",
            util=min(1.0, max(0.0, (_num(r.values.get("mean_util_gpu_pct")) or 0.0) / 100)),
            mem_used_gb=max(0.0, (_num(r.values.get("max_mem_used_bytes")) or 0.0) / GB),
            mem_total_gb=total / GB,
            job=str(r.values.get("last_job_id") or ""),
            power_w=_num(r.values.get("mean_power_w")),
            default_w=_num(r.values.get("last_power_limit_default_w")),
            max_w=_num(r.values.get("last_power_limit_max_w")),
        )
    return list(out.values())


def _median(xs: list[float], default: float | None = None) -> float | None:
    return statistics.median(xs) if xs else default


def build_consolidation(
    store: Store,
    *,
    now_ns: int,
    window_s: float,
    objective: Mapping[str, Any],
    policy: ConsolidationPolicy,
    jobs: PolicyResolver | None = None,
) -> ConsolidationSnapshot:
    """The consolidation section for the fleet as the store saw it in the last ``window_s``.

    ``objective`` gives ``price_per_kwh``, ``pue`` and ``carbon_g_per_kwh``
    (the problem's objective block); ``jobs`` the per-job policy (pinned,
    shareable, migration cost, exempt).
    """
    start, end = now_ns - int(window_s * 1e9), now_ns + 1
    q_gpus, q_unheld, q_held, q_host = _queries(start, end)
    gpus = _gpus(store.aggregate(q_gpus))
    if not gpus:
        raise NoTelemetry(
            f"no GPU telemetry in the store for the last {window_s:g} s: nothing to consolidate",
            hint="run the agent first, or widen --window",
        )
    unheld = {
        r.tags.get(schema.TAG_GPU_UUID, ""): v
        for r in store.aggregate(q_unheld)
        if (v := _num(r.values.get("median_power_w"))) is not None
    }
    held = {
        r.tags.get(schema.TAG_GPU_UUID, ""): v
        for r in store.aggregate(q_held)
        if (v := _num(r.values.get("median_power_w"))) is not None
    }
    host_rows = {r.tags.get(schema.TAG_HOST, ""): r.values for r in store.aggregate(q_host)}
    notes: list[str] = []

    by_host: dict[str, list[_Gpu]] = defaultdict(list)
    for g in gpus:
        by_host[g.host].append(g)
    for lst in by_host.values():
        lst.sort(key=lambda g: (g.index, g.uuid))

    # idle draw of each GPU while nobody holds it: own, node's, fleet's (by model), guess
    fleet_unheld: dict[str, list[float]] = defaultdict(list)
    for g in gpus:
        if g.uuid in unheld:
            fleet_unheld[g.model].append(unheld[g.uuid])
    idle_w: dict[str, float] = {}
    guessed = 0
    for lst in by_host.values():
        node_vals = [unheld[g.uuid] for g in lst if g.uuid in unheld]
        for g in lst:
            v = unheld.get(g.uuid)
            if v is None:
                v = _median(node_vals) or _median(fleet_unheld.get(g.model, []))
            if v is None:
                guessed += 1
                v = _idle_guess(g.model, g.max_w or 700.0)
            idle_w[g.uuid] = v
    if guessed:
        notes.append(f"{guessed} GPU(s) never idle and unheld in the fleet: idle draw guessed")
    extra_all = [max(0.0, held[g.uuid] - idle_w[g.uuid]) for g in gpus if g.uuid in held and g.job]
    fleet_extra = _median(extra_all, 0.0) or 0.0

    jobs_on: dict[str, dict[str, list[_Gpu]]] = defaultdict(lambda: defaultdict(list))
    for g in gpus:
        if g.job:
            jobs_on[g.job][g.host].append(g)
    job_ids = sorted(jobs_on)
    decided: Mapping[str, JobPolicy] = jobs.resolve(job_ids) if jobs is not None else {}

    node_docs: list[dict[str, Any]] = []
    fleet_active: list[float] = []
    per_node_active: dict[str, float | None] = {}
    for host, lst in sorted(by_host.items()):
        extra = _median(
            [max(0.0, held[g.uuid] - idle_w[g.uuid]) for g in lst if g.uuid in held and g.job]
        )
        gpu_extra = fleet_extra if extra is None else extra
        slopes = [
            (g.power_w - idle_w[g.uuid] - gpu_extra) / g.util
            for g in lst
            if g.job and g.power_w is not None and g.util * 100 >= IDLE_UTIL_PCT
        ]
        slopes = [max(0.0, s) for s in slopes]
        per_node_active[host] = _median(slopes)
        fleet_active += slopes
    fallback_active = _median(fleet_active)
    no_base: list[str] = []
    for host, lst in sorted(by_host.items()):
        np_ = policy.node(host)
        base = np_.base_w
        source = "policy"
        if base is None:
            rapl = [
                v
                for k in ("mean_cpu_power_w", "mean_dram_power_w")
                if (v := _num(host_rows.get(host, {}).get(k))) is not None
            ]
            if rapl:
                base, source = sum(rapl), "RAPL"
            else:
                base, source = policy.node_base_w or 0.0, "node_base_w"
        empty = not any(g.job for g in lst)
        if empty and all(g.power_w is not None for g in lst):
            gpu_idle_sum = sum(g.power_w or 0.0 for g in lst)  # measured: the node is idle
        else:
            gpu_idle_sum = sum(idle_w[g.uuid] for g in lst)
        extra = _median(
            [max(0.0, held[g.uuid] - idle_w[g.uuid]) for g in lst if g.uuid in held and g.job]
        )
        active = per_node_active[host]
        if active is None:
            active = fallback_active
        if active is None:  # no busy GPU anywhere: a GPU at full work draws about its default
            heads = [(g.default_w or 0.0) - idle_w[g.uuid] for g in lst if g.default_w]
            active = max(0.0, _median(heads, 0.0) or 0.0)
        node_docs.append(
            {
                "id": host,
                "gpus": len(lst),
                "mem_per_gpu_gb": round(min(g.mem_total_gb for g in lst), 3),
                "node_idle_w": round(base + gpu_idle_sum, 2),
                "gpu_idle_w": round(fleet_extra if extra is None else extra, 2),
                "gpu_active_w_per_util": round(active, 2),
                "may_power_down": policy.may_power_down_node(host),
            }
        )
        if source == "node_base_w" and policy.node_base_w is None:
            no_base.append(host)

    if no_base:
        notes.append(
            f"{len(no_base)} node(s) without a RAPL reading and no node_base_w in the policy: "
            f"their non-GPU draw counts as 0 (savings understated): {', '.join(no_base[:5])}"
        )
    mem_of = {d["id"]: float(d["mem_per_gpu_gb"]) for d in node_docs}
    job_docs: list[dict[str, Any]] = []
    split: list[str] = []
    for job in job_ids:
        hosts = jobs_on[job]
        jp = decided.get(job)
        pinned = bool(jp and (jp.pinned or jp.exempt))
        if len(hosts) > 1:
            split.append(job)
        for host, lst in sorted(hosts.items()):
            positions = {g.uuid: i for i, g in enumerate(by_host[host])}
            doc: dict[str, Any] = {
                "id": job if len(hosts) == 1 else f"{job}@{host}",
                "gpus": len(lst),
                "mem_per_gpu_gb": round(min(mem_of[host], max(g.mem_used_gb for g in lst)), 3),
                "util": round(statistics.fmean(g.util for g in lst), 4),
                "node": host,
                "gpu_indices": sorted(positions[g.uuid] for g in lst),
                "shareable": bool(jp and jp.shareable and len(lst) == 1),
                "migration_cost_wh": jp.migration_cost_wh if jp else 0.0,
                "pinned": pinned or len(hosts) > 1,
            }
            job_docs.append(doc)
    if split:
        notes.append(
            f"{len(split)} job(s) span several hosts and stay where they are: "
            + ", ".join(split[:5])
        )
    section = {
        "horizon_h": policy.horizon_h,
        "price_per_kwh": float(objective.get("price_per_kwh", 0.0)),
        "pue": float(objective.get("pue", 1.0)),
        "carbon_g_per_kwh": float(objective.get("carbon_g_per_kwh", 0.0)),
        "nodes": node_docs,
        "jobs": job_docs,
    }
    return ConsolidationSnapshot(section, notes, split)


__all__ = ["IDLE_UTIL_PCT", "ConsolidationSnapshot", "build_consolidation"]
