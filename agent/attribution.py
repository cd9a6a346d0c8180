"""Who gets a shared GPU's power: MIG instances and the jobs that share one GPU.

Pure functions over one cycle's readings; the rules are stated in
``dcenergy.schema`` (the ``_est`` fields and ``power_split``) and repeated here:

* a GPU with one job (or none) is that job's: share 1, rule ``sole``;
* MIG: instance ``i`` gets ``a_i·n_i / Σ a_k·n_k`` of the parent's power (``a``
  its GPM SM activity, ``n`` its SM count, 1 where unknown): rule
  ``activity``; where any instance's activity is unknown, or all are zero, an
  equal split among the instances: rule ``equal``. A job gets the shares of the
  instances its processes run on; jobs sharing one instance split it equally;
* time slicing or MPS (one GPU, several jobs' processes): a job gets its
  processes' summed SM utilization over that of every process on the GPU
  (those of no job keep their part): rule ``process_util``; with no
  utilization sample (or all zero), an equal split among the jobs: ``equal``.

Every share is an estimate of where the power went, never a measurement: the
points carry it in ``_est`` fields with the rule next to it.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

from agent.devices.base import MigInstance

SOLE: Final = "sole"
ACTIVITY: Final = "activity"
PROCESS_UTIL: Final = "process_util"
EQUAL: Final = "equal"
# from exact to least informed: a job on several GPUs reports its least informed rule
RULES: Final = (SOLE, ACTIVITY, PROCESS_UTIL, EQUAL)


@dataclass(frozen=True, slots=True)
class Split:
    """One GPU's power split among its jobs (and, on MIG, its instances)."""

    shares: Mapping[str, float]  # job -> share of the GPU's power (0-1)
    rule: str
    jobs: tuple[str, ...]  # every job on the GPU, the GPU's main job first
    instance_shares: tuple[float, ...] = ()  # per MIG instance, in the readings' order
    instance_jobs: tuple[tuple[str, ...], ...] = ()  # per MIG instance, its jobs
    job_instances: Mapping[str, tuple[int, ...]] = field(default_factory=dict)


@functools.lru_cache(maxsize=4096)
def sole(job: str | None) -> Split:
    """A GPU with at most one job (one shared, read-only object per job: every cycle asks)."""
    if not job:
        return Split({}, SOLE, ())
    return Split({job: 1.0}, SOLE, (job,))


def least_informed(rules: Sequence[str]) -> str:
    """The least exact of ``rules`` (``sole`` for none)."""
    return max(rules, key=RULES.index, default=SOLE)


def instance_shares(instances: Sequence[MigInstance]) -> tuple[list[float], str]:
    """Each MIG instance's share of the parent GPU's power, and the rule used."""
    n = len(instances)
    if n == 0:
        return [], EQUAL
    weights: list[float] = []
    for inst in instances:
        if inst.sm_active_pct is None:
            return [1.0 / n] * n, EQUAL
        weights.append(max(inst.sm_active_pct, 0.0) * (inst.sm_count or 1))
    total = sum(weights)
    if total <= 0.0:
        return [1.0 / n] * n, EQUAL
    return [w / total for w in weights], ACTIVITY


def mig_split(
    instances: Sequence[MigInstance], pid_jobs: Mapping[int, str], main: str | None
) -> Split:
    """A MIG GPU's split: instance shares, then each instance's share to its jobs."""
    shares, rule = instance_shares(instances)
    by_job: dict[str, float] = {}
    inst_jobs: list[tuple[str, ...]] = []
    job_inst: dict[str, list[int]] = {}
    for k, (inst, share) in enumerate(zip(instances, shares, strict=True)):
        jobs = _ordered_jobs(inst.pids, pid_jobs)
        inst_jobs.append(jobs)
        for job in jobs:
            by_job[job] = by_job.get(job, 0.0) + share / len(jobs)
            job_inst.setdefault(job, []).append(k)
    return Split(
        by_job,
        rule,
        _main_first(by_job, main),
        tuple(shares),
        tuple(inst_jobs),
        {j: tuple(v) for j, v in job_inst.items()},
    )


def process_split(
    pids: Sequence[int],
    pid_jobs: Mapping[int, str],
    util_pct: Mapping[int, float],
    main: str | None,
) -> Split:
    """A time-sliced or MPS GPU's split among the jobs of its processes."""
    jobs = _ordered_jobs(pids, pid_jobs)
    if len(jobs) <= 1:
        return sole(jobs[0] if jobs else main)
    total = sum(max(util_pct.get(p, 0.0), 0.0) for p in set(pids))
    if total <= 0.0:
        shares = dict.fromkeys(jobs, 1.0 / len(jobs))
        rule = EQUAL
    else:
        shares = dict.fromkeys(jobs, 0.0)
        for p in set(pids):
            if (job := pid_jobs.get(p)) is not None:
                shares[job] += max(util_pct.get(p, 0.0), 0.0) / total
        rule = PROCESS_UTIL
    return Split(shares, rule, _main_first(shares, main))


def _ordered_jobs(pids: Sequence[int], pid_jobs: Mapping[int, str]) -> tuple[str, ...]:
    """The distinct jobs of ``pids``, most processes first, ties in first-seen order."""
    counts: dict[str, int] = {}
    for p in pids:
        if (job := pid_jobs.get(p)) is not None:
            counts[job] = counts.get(job, 0) + 1
    return tuple(sorted(counts, key=lambda j: -counts[j]))  # sorted is stable


def _main_first(shares: Mapping[str, float], main: str | None) -> tuple[str, ...]:
    rest = sorted(shares, key=lambda j: (-shares[j], j))
    if main is not None and main in shares:
        return (main, *(j for j in rest if j != main))
    return tuple(rest)
