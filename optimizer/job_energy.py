"""A job's GPU energy from the GPUs' energy counters, for its Slurm ``AdminComment``.

Which GPUs: the ``job`` measurement's ``gpu_uuids`` for the job over its time
range (first and last per host, joined: a job that changed GPUs is counted on
every GPU it held). How much: the ``gpu`` measurement's ``energy_j`` — the
driver's total-energy counter, corrected by the agent for driver reloads
(``energy_resets`` counts them) — not power samples: integrating 1 s power
readings misses every spike between them, the counter does not.

Everything is a store aggregate, in time buckets (about ``BUCKETS`` per job,
at least ``MIN_BUCKET_S``): per GPU and bucket the first and last
``energy_j`` and ``energy_resets``. Energy is the sum of each bucket's
``last - first`` plus the step from one bucket's last reading to the next
one's first. The agent's correction holds within one agent process; an agent
restart after a driver reload restarts the counter. That shows as the counter
going *down*, or ``energy_resets`` going down, between two readings:

* between buckets: the step is unknown and counted as 0 (the gap is a few
  seconds of one sampling interval);
* inside a bucket: that bucket's energy is taken from its mean power × its
  length instead, and the result says how many buckets were patched so.

A GPU without an energy counter (``energy_j`` absent) is left out and named.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from dcenergy import schema
from dcenergy.errors import NoTelemetry
from dcenergy.store.base import Agg, AggregateQuery, AggRow, Fn, Store

J_PER_KWH = 3.6e6
BUCKETS = 120
MIN_BUCKET_S = 10.0
COMMENT_KEY = "dcenergy"


@dataclass
class GpuEnergy:
    uuid: str
    host: str
    energy_j: float = 0.0
    buckets: int = 0
    patched: int = 0  # buckets whose counter went backwards: mean power × length instead
    gaps: int = 0  # steps between buckets left out (counter restarted)


@dataclass
class JobEnergy:
    job_id: str
    start_ns: int
    end_ns: int
    gpus: list[GpuEnergy] = field(default_factory=list)
    no_counter: list[str] = field(default_factory=list)  # GPUs with no energy_j reading

    @property
    def energy_j(self) -> float:
        return sum(g.energy_j for g in self.gpus)

    @property
    def kwh(self) -> float:
        return self.energy_j / J_PER_KWH

    def to_json(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "start_ns": self.start_ns,
            "end_ns": self.end_ns,
            "gpu_energy_j": round(self.energy_j, 3),
            "gpu_kwh": round(self.kwh, 6),
            "gpus": [
                {
                    "gpu_uuid": g.uuid,
                    "host": g.host,
                    "energy_j": round(g.energy_j, 3),
                    "patched_buckets": g.patched,
                    "gaps": g.gaps,
                }
                for g in self.gpus
            ],
            "gpus_without_counter": self.no_counter,
        }

    def admin_comment(self, existing: str = "") -> str:
        """``existing`` with its ``dcenergy:`` token replaced by this job's figures."""
        mine = f"{COMMENT_KEY}:gpu_kwh={self.kwh:.4f},gpus={len(self.gpus)}"
        kept = [t for t in existing.split() if not t.startswith(f"{COMMENT_KEY}:")]
        return " ".join([*kept, mine])


def job_gpus(store: Store, job_id: str, start_ns: int, end_ns: int) -> dict[str, set[str]]:
    """Host -> GPU uuids the job reported in ``[start_ns, end_ns)`` (``job`` measurement)."""
    q = AggregateQuery(
        schema.JOB.name,
        (Agg(Fn.FIRST, "gpu_uuids"), Agg(Fn.LAST, "gpu_uuids")),
        start_ns,
        end_ns,
        by=(schema.TAG_HOST,),
        tags={schema.TAG_JOB: job_id},
    )
    out: dict[str, set[str]] = defaultdict(set)
    for r in store.aggregate(q):
        host = r.tags.get(schema.TAG_HOST, "")
        for k in ("first_gpu_uuids", "last_gpu_uuids"):
            out[host].update(u for u in str(r.values.get(k, "")).split(",") if u)
    return {h: u for h, u in out.items() if h and u}


def bucket_width_s(start_ns: int, end_ns: int) -> float:
    return max(MIN_BUCKET_S, (end_ns - start_ns) / 1e9 / BUCKETS)


def _num(v: object) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


def _gpu_energy(
    uuid: str, host: str, rows: list[AggRow], every_s: float, start_ns: int, end_ns: int
) -> GpuEnergy | None:
    g = GpuEnergy(uuid, host)
    prev_last: float | None = None
    prev_resets: float | None = None
    seen = False
    for r in sorted(rows, key=lambda r: r.time_ns or 0):
        v = r.values
        first, last = _num(v.get("first_energy_j")), _num(v.get("last_energy_j"))
        if first is None or last is None:
            continue
        seen = True
        g.buckets += 1
        r_first, r_last = _num(v.get("first_energy_resets")), _num(v.get("last_energy_resets"))
        if prev_last is not None:
            restarted = first < prev_last or (
                prev_resets is not None and r_first is not None and r_first < prev_resets
            )
            if restarted:
                g.gaps += 1
            else:
                g.energy_j += first - prev_last
        inside_restart = last < first or (
            r_first is not None and r_last is not None and r_last < r_first
        )
        if inside_restart:
            g.patched += 1
            b0 = max(start_ns, r.time_ns or start_ns)
            b1 = min(end_ns, (r.time_ns or start_ns) + int(every_s * 1e9))
            g.energy_j += (_num(v.get("mean_power_w")) or 0.0) * max(0, b1 - b0) / 1e9
        else:
            g.energy_j += last - first
        prev_last, prev_resets = last, r_last
    return g if seen else None


def job_energy(store: Store, job_id: str, start_ns: int, end_ns: int) -> JobEnergy:
    """The job's GPU energy over ``[start_ns, end_ns)``; ``NoTelemetry`` when it has no GPUs."""
    if end_ns <= start_ns:
        raise ValueError("the job's end must be after its start")
    hosts = job_gpus(store, job_id, start_ns, end_ns)
    if not hosts:
        raise NoTelemetry(
            f"job {job_id}: no job telemetry (its GPUs) between its start and end",
            hint="is the dcenergy agent running on the job's nodes, and writing to this store?",
        )
    every = bucket_width_s(start_ns, end_ns)
    out = JobEnergy(job_id, start_ns, end_ns)
    for host, uuids in sorted(hosts.items()):
        q = AggregateQuery(
            schema.GPU.name,
            (
                Agg(Fn.FIRST, "energy_j"),
                Agg(Fn.LAST, "energy_j"),
                Agg(Fn.FIRST, "energy_resets"),
                Agg(Fn.LAST, "energy_resets"),
                Agg(Fn.MEAN, "power_w"),
            ),
            start_ns,
            end_ns,
            by=(schema.TAG_GPU_UUID,),
            every_s=every,
            tags={schema.TAG_HOST: host},
        )
        rows: dict[str, list[AggRow]] = defaultdict(list)
        for r in store.aggregate(q):
            rows[r.tags.get(schema.TAG_GPU_UUID, "")].append(r)
        for uuid in sorted(uuids):
            g = _gpu_energy(uuid, host, rows.get(uuid, []), every, start_ns, end_ns)
            if g is None:
                out.no_counter.append(uuid)
            else:
                out.gpus.append(g)
    return out


__all__ = ["GpuEnergy", "JobEnergy", "job_energy", "job_gpus"]
