"""Build an optimizer problem from the telemetry store's recent window.

The reader side of the data flow: the store's aggregates of the last
``window_s`` seconds of ``gpu`` and ``job`` telemetry plus the operator's
topology become a problem document (the same JSON the ``optimize`` command
reads), so everything downstream is the pure solver path and a snapshot can be
saved and replayed.

The store computes every aggregate (five queries; InfluxQL on InfluxDB, SQL on
the embedded store): per GPU one summary row, its idle median and its health
over the window, per job and host time-bucketed means with their reading
counts. What is read grows with GPUs + jobs × buckets, never with raw rows or
the sampling rate.

Two kinds of GPU keep their default cap (the problem's ``held`` and
``shared_by``, see docs/problem-format.md):

* unhealthy in the window (``gpu_health``): uncorrected ECC errors since driver
  load, a page retirement or row remap pending, a failed row remap, or an XID
  that no application explains (``_health_holds``);
* shared by several jobs now (its last ``job_count`` is 2 or more: MIG
  instances, MPS, time slicing): listed in none of its jobs, which keep their
  other GPUs (a job left with none is left out), and named in ``shared_by``.

A GPU two jobs listed one after the other in the window belongs to the job it
runs now (its last ``job_id``). A job's mean GPM activity (``dram_active``,
``sm_active``, ``tensor_active`` as shares) goes into its ``activity``.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from dcenergy import schema
from dcenergy.config import OptimizerConfig
from dcenergy.errors import NoTelemetry
from dcenergy.store.base import Agg, AggregateQuery, AggRow, FieldFilter, Fn, Op, Store
from optimizer.policy import PolicyResolver
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
# Job evidence is read as time-bucketed means: about this many buckets a window.
_BUCKETS_PER_WINDOW = 40
_MIN_BUCKET_S = 10.0
# GPM activity a job's problem entry carries (job fields ``<name>_pct``), as shares 0-1
_ACTIVITY = ("dram_active", "sm_active", "tensor_active")


class EmptyWindow(NoTelemetry):
    """The store has no GPU telemetry in the requested window (exit 4)."""


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
    shared_by: tuple[str, ...] = ()  # its jobs now, when several share it


def _idle_guess(model: str, max_w: float) -> float:
    for family, watts in _IDLE_W_BY_MODEL:
        if family in model:
            return min(watts, max_w)
    return round(0.1 * max_w, 1)


def _gpu_queries(start_ns: int, end_ns: int) -> tuple[AggregateQuery, AggregateQuery]:
    """Per GPU over the window: one summary row, and its median power while idle."""
    by = (schema.TAG_GPU_UUID, schema.TAG_HOST, schema.TAG_GPU_MODEL)
    summary = AggregateQuery(
        schema.GPU.name,
        (
            Agg(Fn.MEAN, "power_w"),
            Agg(Fn.LAST, "power_limit_min_w"),
            Agg(Fn.LAST, "power_limit_max_w"),
            Agg(Fn.LAST, "power_limit_default_w"),
            Agg(Fn.LAST, "job_id"),
            Agg(Fn.LAST, "job_count"),
            Agg(Fn.LAST, "job_ids"),
        ),
        start_ns,
        end_ns,
        by=by,
    )
    idle = AggregateQuery(
        schema.GPU.name,
        (Agg(Fn.MEDIAN, "power_w"),),
        start_ns,
        end_ns,
        by=(schema.TAG_GPU_UUID,),
        where=(FieldFilter("util_gpu_pct", Op.LT, _IDLE_UTIL_PCT),),
    )
    return summary, idle


def _summarise_gpus(summary: Iterable[AggRow], idle: Iterable[AggRow]) -> list[_GpuSummary]:
    idle_w = {
        r.tags[schema.TAG_GPU_UUID]: float(r.values["median_power_w"])
        for r in idle
        if isinstance(r.values.get("median_power_w"), int | float)
    }
    out: dict[str, _GpuSummary] = {}
    for r in summary:
        uuid = r.tags.get(schema.TAG_GPU_UUID, "")
        v = r.values
        limits = [v.get(f"last_{k}") for k in ("power_limit_min_w", "power_limit_max_w")]
        default = v.get("last_power_limit_default_w")
        if not uuid or uuid in out:
            continue
        if not all(isinstance(x, int | float) for x in (*limits, default)):
            continue  # a GPU without readable limits cannot be capped (also: lost all window)
        model = r.tags.get(schema.TAG_GPU_MODEL) or "unknown"
        max_w = float(v["last_power_limit_max_w"])
        mean_w = v.get("mean_power_w")
        count = v.get("last_job_count")
        listed = str(v.get("last_job_ids") or "")
        shared = isinstance(count, int) and count > 1 and "," in listed
        out[uuid] = _GpuSummary(
            uuid=uuid,
            host=r.tags.get(schema.TAG_HOST, ""),
            model=model,
            min_w=float(v["last_power_limit_min_w"]),
            max_w=max_w,
            default_w=float(v["last_power_limit_default_w"]),
            current_w=float(mean_w) if isinstance(mean_w, int | float) else 0.0,
            idle_w=min(idle_w[uuid], max_w) if uuid in idle_w else _idle_guess(model, max_w),
            job_id=str(v.get("last_job_id", "")),
            shared_by=tuple(sorted({j for j in listed.split(",") if j})) if shared else (),
        )
    return [out[u] for u in sorted(out)]


def _health_query(start_ns: int, end_ns: int) -> AggregateQuery:
    """Per GPU over the window: what says it should not be trusted with a cap change."""
    return AggregateQuery(
        schema.GPU_HEALTH.name,
        (
            Agg(Fn.MAX, "ecc_uncorrected_volatile"),
            Agg(Fn.LAST, "retired_pages_pending"),
            Agg(Fn.LAST, "remap_pending"),
            Agg(Fn.MAX, "remap_failure"),
            Agg(Fn.SUM, "xid_critical_events"),
            Agg(Fn.LAST, "xid_last_critical"),
        ),
        start_ns,
        end_ns,
        by=(schema.TAG_GPU_UUID,),
    )


def _health_holds(rows: Iterable[AggRow]) -> dict[str, list[str]]:
    """GPU uuid -> why it keeps its default cap (GPUs with no reason left out)."""

    def num(v: Mapping[str, Any], key: str) -> int:
        x = v.get(key)
        return int(x) if isinstance(x, int | float) else 0

    out: dict[str, list[str]] = {}
    for r in rows:
        uuid, v = r.tags.get(schema.TAG_GPU_UUID, ""), r.values
        reasons = []
        if n := num(v, "max_ecc_uncorrected_volatile"):
            reasons.append(f"{n} uncorrected ECC errors")
        if num(v, "last_retired_pages_pending"):
            reasons.append("page retirement pending")
        if num(v, "last_remap_pending"):
            reasons.append("row remap pending")
        if num(v, "max_remap_failure"):
            reasons.append("row remap failed")
        if n := num(v, "sum_xid_critical_events"):
            last = v.get("last_xid_last_critical")
            reasons.append(f"{n} XID events in the window (last XID {last})")
        if uuid and reasons:
            out[uuid] = reasons
    return out


def bucket_s(window_s: float) -> float:
    """Time-bucket width for job evidence: about ``_BUCKETS_PER_WINDOW`` buckets, ≥ 10 s.

    Buckets are what crosses the wire (jobs × buckets rows, whatever the
    sampling rate); each must still hold enough readings for a run mean.
    """
    return max(_MIN_BUCKET_S, window_s / _BUCKETS_PER_WINDOW)


def _job_queries(
    start_ns: int, end_ns: int, every_s: float
) -> tuple[AggregateQuery, AggregateQuery]:
    """Per job and host: time-bucketed evidence, and the GPUs and unit it reported."""
    by = (schema.TAG_JOB, schema.TAG_HOST)
    evidence = AggregateQuery(
        schema.JOB.name,
        (
            Agg(Fn.MEAN, "throughput"),
            Agg(Fn.COUNT, "throughput"),
            Agg(Fn.MEAN, "power_limit_w"),
            Agg(Fn.MIN, "power_limit_w"),
            Agg(Fn.MAX, "power_limit_w"),
            Agg(Fn.MAX, "power_w"),
        ),
        start_ns,
        end_ns,
        by=by,
        every_s=every_s,
        where=(FieldFilter("throughput", Op.GE, 0.0),),
    )
    identity = AggregateQuery(
        schema.JOB.name,
        (
            Agg(Fn.LAST, "gpu_uuids"),
            Agg(Fn.LAST, "throughput_unit"),
            *(Agg(Fn.MEAN, f"{name}_pct") for name in _ACTIVITY),
        ),
        start_ns,
        end_ns,
        by=by,
    )
    return evidence, identity


@dataclass(frozen=True, slots=True)
class _Bucket:
    """One job's evidence in one time bucket, summed over the hosts it runs on."""

    cap_w: float
    throughput: float  # mean rate of the whole job (host rates summed)
    power_w: float  # highest per-GPU reading (host maxima summed over the job's GPUs)
    readings: int


def _job_samples(
    evidence: Iterable[AggRow], identity: Iterable[AggRow]
) -> dict[str, dict[str, Any]]:
    """Per job: its GPUs, unit, and (cap, throughput, power) samples per distinct cap.

    A bucket whose cap moved by more than ``_CAP_BUCKET_W`` (the reconciler
    ramping) mixes two caps' readings and is left out, as is a bucket missing
    one of the job's hosts (its summed rate would read low).
    """
    gpus: dict[str, set[str]] = defaultdict(set)
    units: dict[str, str] = {}
    activity: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in identity:
        job = r.tags.get(schema.TAG_JOB, "")
        if not job:
            continue
        listed = str(r.values.get("last_gpu_uuids", ""))
        gpus[job].update(u for u in listed.split(",") if u)
        unit = r.values.get("last_throughput_unit")
        if isinstance(unit, str) and unit:
            units[job] = unit
        for name in _ACTIVITY:  # a mean per host; the job's is their mean
            pct = r.values.get(f"mean_{name}_pct")
            if isinstance(pct, int | float):
                activity[job][name].append(float(pct))
    per_bucket: dict[str, dict[int, list[Mapping[str, Any]]]] = defaultdict(
        lambda: defaultdict(list)
    )
    hosts: dict[str, set[str]] = defaultdict(set)
    for r in evidence:
        job = r.tags.get(schema.TAG_JOB, "")
        if not job or r.time_ns is None or "mean_throughput" not in r.values:
            continue
        if "mean_power_limit_w" not in r.values:
            continue
        hosts[job].add(r.tags.get(schema.TAG_HOST, ""))
        per_bucket[job][r.time_ns].append(r.values)
    jobs: dict[str, dict[str, Any]] = {}
    for job, uuids in gpus.items():
        n_hosts = len(hosts.get(job, ()))
        by_cap: dict[float, list[_Bucket]] = defaultdict(list)
        for _, vals in sorted(per_bucket.get(job, {}).items()):
            if len(vals) < n_hosts:
                continue
            if any(
                float(v["max_power_limit_w"]) - float(v["min_power_limit_w"]) > _CAP_BUCKET_W
                for v in vals
            ):
                continue
            cap = statistics.fmean(float(v["mean_power_limit_w"]) for v in vals)
            b = _Bucket(
                cap_w=cap,
                throughput=sum(float(v["mean_throughput"]) for v in vals),
                power_w=sum(float(v.get("max_power_w", 0.0)) for v in vals) / max(len(uuids), 1),
                readings=min(int(v["count_throughput"]) for v in vals),
            )
            by_cap[round(cap / _CAP_BUCKET_W) * _CAP_BUCKET_W].append(b)
        samples = [
            {
                "cap_w": cap,
                "throughput": sum(b.throughput * b.readings for b in run)
                / sum(b.readings for b in run),
                "power_w": max(b.power_w for b in run),
            }
            for cap, buckets in sorted(by_cap.items())
            for run in _runs(buckets)
        ]
        jobs[job] = {
            "gpus": sorted(uuids),
            "unit": units.get(job, "sm_util_proxy"),
            "samples": samples,
        }
        if act := activity.get(job):
            jobs[job]["activity"] = {
                name: round(min(1.0, max(0.0, statistics.fmean(v) / 100.0)), 4)
                for name, v in act.items()
            }
    return jobs


def _runs(buckets: list[_Bucket]) -> list[list[_Bucket]]:
    """Time-ordered buckets at one cap, split into up to ``_RUNS_PER_CAP`` consecutive runs.

    Runs hold about equal numbers of readings, each at least ``_MIN_RUN``
    (where the cap has that many), so their spread is the readings' noise.
    """
    total = sum(b.readings for b in buckets)
    k = max(1, min(_RUNS_PER_CAP, total // _MIN_RUN, len(buckets)))
    out: list[list[_Bucket]] = [[] for _ in range(k)]
    done = 0
    for b in buckets:
        # the run this bucket's middle reading falls in, by cumulative readings
        r = min(k - 1, int((done + b.readings / 2) * k / total)) if total else 0
        out[r].append(b)
        done += b.readings
    return [run for run in out if run]


def _owners(gpus: Sequence[_GpuSummary], jobs: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
    """GPU uuid -> the one job that owns it; shared GPUs, and unclear ones, have none.

    A GPU listed by one job is that job's; listed by several one after another
    (the window saw a job end and the next start), the job it runs now.
    """
    claims: dict[str, list[str]] = defaultdict(list)
    for job_id, j in jobs.items():
        for u in j["gpus"]:
            claims[u].append(job_id)
    current = {g.uuid: g.job_id for g in gpus}
    shared = {g.uuid for g in gpus if g.shared_by}
    out: dict[str, str] = {}
    for u, js in claims.items():
        if u in shared:
            continue
        if len(js) == 1:
            out[u] = js[0]
        elif current.get(u) in js:
            out[u] = current[u]
    return out


def objective_doc(o: OptimizerConfig, kind: str | None = None) -> dict[str, Any]:
    """The problem's objective block from the ``[optimizer]`` config (``kind`` overrides)."""
    return {
        "kind": kind or o.objective,
        "price_per_kwh": o.price_per_kwh,
        "pue": o.pue,
        "carbon_g_per_kwh": o.carbon_g_per_kwh,
        "slowdown_confidence": o.slowdown_confidence,
        "job_value": o.job_value,
    }


def build_problem(
    store: Store,
    topology: Topology,
    *,
    now_ns: int,
    window_s: float,
    objective: Mapping[str, Any],
    allowed_slowdown: float,
    policy: PolicyResolver | None = None,
) -> dict[str, Any]:
    """The problem document for the fleet as the store saw it in the last ``window_s``.

    Every job gets weight 1 and ``allowed_slowdown``, unless ``policy`` (the
    scheduler's facts through the policy file, ``optimizer/policy.py``) says
    otherwise: then its weight, allowed slowdown, ``exempt`` and where they
    came from (``policy``, shown in reports) are the resolver's.
    """
    start, end = now_ns - int(window_s * 1e9), now_ns + 1
    summary_q, idle_q = _gpu_queries(start, end)
    gpus = _summarise_gpus(store.aggregate(summary_q), store.aggregate(idle_q))
    if not gpus:
        raise EmptyWindow(
            f"no GPU telemetry in the store for the last {window_s:g} s",
            hint="run the agent first (dcenergy agent run --simulate 8) or widen --window",
        )
    known = {g.uuid for g in gpus}
    holds = _health_holds(store.aggregate(_health_query(start, end)))
    evidence_q, identity_q = _job_queries(start, end, bucket_s(window_s))
    jobs = _job_samples(store.aggregate(evidence_q), store.aggregate(identity_q))
    owner = _owners(gpus, jobs)
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
                **({"held": holds[g.uuid]} if g.uuid in holds else {}),
                **({"shared_by": list(g.shared_by)} if g.shared_by else {}),
            }
        )
    job_docs = []
    for job_id, j in sorted(jobs.items()):
        job_gpus = [u for u in j["gpus"] if u in known and owner.get(u) == job_id]
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
                **({"activity": j["activity"]} if "activity" in j else {}),
            }
        )
    if policy is not None:
        decided = policy.resolve([d["id"] for d in job_docs])
        for d in job_docs:
            jp = decided[d["id"]]
            d["weight"], d["allowed_slowdown"] = jp.weight, jp.allowed_slowdown
            if jp.exempt:
                d["exempt"] = True
            d["policy"] = jp.describe()
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
