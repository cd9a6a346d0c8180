"""Per-GPU power caps under power-domain budgets: one constraint set, three objectives.

The model
---------
* A **cap group** is what gets one cap variable: every GPU of a synchronous
  job together (its throughput is set by the slowest GPU, so its GPUs share
  one cap), or a single GPU of any other job. Idle GPUs (in no job) get no
  variable: they draw ``idle_w`` whatever the cap, and keep their default cap.
* An **exempt** job (a scheduler policy: interactive partitions, urgent QOS)
  is fixed load: its groups' caps are pinned at the default cap (``lo = hi``)
  so budgets count it there and the plan leaves it alone; it has no floor.
* A **held** GPU (unhealthy: ``Gpu.held``) pins its group at the default cap
  the same way; a **shared** GPU (``Gpu.shared_by``: MIG instances, MPS, time
  slicing, in no job) keeps its default cap and counts at it, not at
  ``idle_w``: its jobs draw on it, and no one job's curve may set its cap.
* A job's throughput is ``sum over its groups of (n_k / K_j) * f_j(cap_k)``,
  ``f_j`` the job's concave curve (total throughput at a uniform per-GPU cap),
  ``n_k`` GPUs in the group, ``K_j`` in the job.
* Budgets count a busy GPU at its **cap** (a GPU never draws above it, so the
  plan is safe even where the job draws more than we measured) and an idle
  GPU at ``idle_w``: for every domain ``sum(cap) + idle + baseline <= budget``.
* Slowdown floors ``t_j >= (1 - s_j) * uncapped_j``, ``s_j`` the allowed
  slowdown less the fit's ``slowdown_margin`` (never below 0), are
  constraints in every objective while they can all be met together with the
  budgets; when they cannot, budgets win (they are physics), the total
  weighted shortfall is minimised first and the plan names the jobs.

The LP uses the incremental form of the concave curves: ``cap_k = lo_k +
sum_s delta_{k,s}``, ``0 <= delta_{k,s} <= len_s``, throughput gains
``slope_s * delta_{k,s}``. Because slopes decrease, an optimum fills the
steepest pieces first, so this is exact, and it needs no epigraph rows: the
only rows are one per domain (and one per job whose floor binds), which keeps
100k-GPU instances small for HiGHS.

Objectives (``problem.objective.kind``):

* ``budget``: maximise ``sum_j weight_j * K_j * t_j / uncapped_j`` (normalised,
  weighted throughput in "GPU-equivalents": a job's progress counts in
  proportion to its size, so the fleet's total work is maximised), or with
  ``objective.job_value = "per_job"`` ``sum_j weight_j * t_j / uncapped_j``
  ("job-equivalents": every job's progress alike, whatever its size).
* ``energy``: minimise ``sum cap`` (the GPU power bound) subject to the floors.
* ``cost``: maximise ``value_per_unit * 3600 * sum t_j - price * PUE * P / 1000``
  per hour, ``P`` the GPU power bound plus idle and baseline load.

Shadow prices are the HiGHS duals of the domain rows turned into "objective
improvement per extra kW of budget".

A fast exact path handles the budget objective on laminar (nested) domains:
greedy marginal allocation (give the next watt to the steepest remaining
piece whose every enclosing domain has room) is optimal for separable
concave objectives under laminar capacities (a polymatroid). It is computed
as a bottom-up truncation over the domain tree, vectorised with numpy.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from itertools import chain
from operator import attrgetter
from typing import Final, Literal

import numpy as np
from scipy import sparse
from scipy.optimize import linprog

from optimizer.curves import Curve, CurveFit, fit_curves
from optimizer.problem import Gpu, Problem

Method = Literal["auto", "lp", "fast"]


class FastPathNotApplicable(ValueError):
    """``method="fast"`` on a problem the greedy does not solve exactly; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"fast path not applicable: {reason}")
        self.reason = reason


_TOL: Final = 1e-7
DVFS_EXPONENT: Final = 2.5  # P ∝ f^2.5: dynamic power ~ f·V² with V rising with f, plus static


@dataclass(frozen=True)
class DomainShortfall:
    """A domain whose budget cannot hold even its GPUs at their minimum caps."""

    id: str
    shortfall_w: float


@dataclass(frozen=True)
class Evaluation:
    """What a set of caps does, under the same curves and power model for every policy."""

    caps_w: np.ndarray  # per GPU, problem order
    job_throughput: dict[str, float]
    gpu_power_w: np.ndarray  # predicted draw per GPU: min(cap, draw) busy, idle_w idle
    domain_power_w: dict[str, float]  # predicted draw + baseline
    domain_cap_load_w: dict[str, float]  # the budget-side load: caps + idle + baseline
    budget_violations: tuple[str, ...]  # domains where the cap load exceeds the budget
    normalized_throughput: float  # sum weight * t / uncapped (x GPUs with job_value "size")

    @property
    def fleet_power_w(self) -> float:
        return float(self.gpu_power_w.sum())


@dataclass(frozen=True)
class CappingResult:
    """The solution of a capping problem and everything a plan needs from it."""

    objective: str
    method: str  # "lp" or "fast"
    status: str
    time_s: float
    feasible: bool
    infeasible_domains: tuple[DomainShortfall, ...]
    slowdown_exceeded: tuple[str, ...]
    objective_value: float
    shadow_prices: dict[str, float]  # domain -> objective improvement per extra kW
    evaluation: Evaluation
    gpu_ids: tuple[str, ...] = field(repr=False)
    fits: Mapping[str, CurveFit] = field(repr=False)

    @property
    def caps_w(self) -> dict[str, float]:
        """Planned cap per GPU id (idle GPUs keep their default cap)."""
        return dict(zip(self.gpu_ids, (float(c) for c in self.evaluation.caps_w), strict=True))


# --- the model arrays ---------------------------------------------------------


@dataclass
class _Model:
    """Everything the LP, the greedy and the evaluator need, as flat arrays."""

    problem: Problem
    fits: Mapping[str, CurveFit]
    n_gpu: int
    n_dom: int
    gpu_group: np.ndarray  # int, -1 for idle
    idle_w: np.ndarray
    default_w: np.ndarray
    member: sparse.csr_matrix  # domains x gpus, 0/1
    # groups
    grp_job: np.ndarray
    grp_n: np.ndarray
    grp_lo: np.ndarray
    grp_hi: np.ndarray
    grp_base: np.ndarray  # f_j(lo_k)
    grp_target: np.ndarray  # where the headroom fill stops (default cap)
    grp_rep: np.ndarray  # one GPU of the group
    dom_grp: sparse.csr_matrix  # domains x groups, GPU counts
    # jobs
    job_ids: list[str]
    job_k: np.ndarray
    job_unc: np.ndarray
    job_w: np.ndarray  # the problem's weights (floor shortfalls)
    job_val: np.ndarray  # weight x size (job_value "size") or weight: the budget objective
    job_floor: np.ndarray
    job_draw: np.ndarray
    # segments (positive slope only)
    seg_group: np.ndarray
    seg_x0: np.ndarray
    seg_len: np.ndarray
    seg_slope: np.ndarray
    # domains
    budget: np.ndarray
    fixed_w: np.ndarray  # baseline + idle GPUs
    room: np.ndarray  # budget - fixed - sum lo (may be < 0)
    sync_split: bool  # a synchronous job spans different domain sets
    chains: np.ndarray | Literal[False] | None = None  # cache of _laminar_chains

    @property
    def grp_share(self) -> np.ndarray:
        """n_k / K_j: the group's share of its job."""
        return np.asarray(self.grp_n / self.job_k[self.grp_job], dtype=float)

    def group_throughput(self, caps: np.ndarray) -> np.ndarray:
        """f_j(cap_k) per group, from the segment arrays."""
        c = caps[self.seg_group]
        gain = self.seg_slope * np.clip(c - self.seg_x0, 0.0, self.seg_len)
        return self.grp_base + np.bincount(self.seg_group, gain, minlength=len(self.grp_n))

    def gpu_caps(self, grp_caps: np.ndarray) -> np.ndarray:
        """Per-GPU caps: the group's cap, or the default for idle GPUs."""
        out = self.default_w.copy()
        busy = self.gpu_group >= 0
        out[busy] = grp_caps[self.gpu_group[busy]]
        return out


def _shared(gpus: tuple[Gpu, ...]) -> np.ndarray:
    return np.fromiter((bool(g.shared_by) for g in gpus), dtype=bool, count=len(gpus))


def _build_model(problem: Problem, fits: Mapping[str, CurveFit]) -> _Model:
    """Flatten a problem into arrays; Python loops only per job and per GPU, never per nonzero."""
    gpus = problem.gpus
    n_gpu, n_dom = len(gpus), len(problem.domains)
    gidx, didx = problem.gpu_index, problem.domain_index
    # map/attrgetter keep the per-GPU passes in C: 100k GPUs cost milliseconds, not 0.1 s each
    min_w, max_w, default_w, idle_w = (
        np.fromiter(map(attrgetter(a), gpus), dtype=float, count=n_gpu)
        for a in ("min_w", "max_w", "default_w", "idle_w")
    )
    # domain membership (domains x gpus)
    dom_lists = list(map(attrgetter("domains"), gpus))
    counts = np.fromiter(map(len, dom_lists), dtype=np.int64, count=n_gpu)
    cols = np.repeat(np.arange(n_gpu), counts)
    rows = np.fromiter(
        map(didx.__getitem__, chain.from_iterable(dom_lists)),
        dtype=np.int64,
        count=int(counts.sum()),
    )
    member = sparse.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(n_dom, n_gpu))

    # groups: one per synchronous job, one per GPU of any other job
    jobs = problem.jobs
    n_jobs = len(jobs)
    job_ids = [j.id for j in jobs]
    job_k_i = np.fromiter(map(len, map(attrgetter("gpus"), jobs)), dtype=np.int64, count=n_jobs)
    sync = np.fromiter((j.synchronous for j in jobs), dtype=bool, count=n_jobs)
    flat = np.fromiter(
        map(gidx.__getitem__, chain.from_iterable(map(attrgetter("gpus"), jobs))),
        dtype=np.int64,
        count=int(job_k_i.sum()),
    )
    flat_job = np.repeat(np.arange(n_jobs), job_k_i)
    pos = np.arange(len(flat)) - np.repeat(np.cumsum(job_k_i) - job_k_i, job_k_i)
    grp_per_job = np.where(sync, 1, job_k_i)
    grp_start = np.cumsum(grp_per_job) - grp_per_job
    n_groups = int(grp_per_job.sum())
    gpu_group = np.full(n_gpu, -1, dtype=np.int64)
    gpu_group[flat] = grp_start[flat_job] + np.where(sync[flat_job], 0, pos)
    grp_job = np.repeat(np.arange(n_jobs), grp_per_job)
    busy = gpu_group >= 0
    bg = flat
    bgrp = gpu_group[bg]
    grp_n = np.bincount(bgrp, minlength=n_groups).astype(float)
    grp_lo = np.full(n_groups, -np.inf)
    np.maximum.at(grp_lo, bgrp, min_w[bg])
    grp_hi = np.full(n_groups, np.inf)
    np.minimum.at(grp_hi, bgrp, max_w[bg])
    grp_target = np.full(n_groups, np.inf)
    np.minimum.at(grp_target, bgrp, default_w[bg])
    grp_target = np.clip(grp_target, grp_lo, grp_hi)
    # an exempt job (scheduler policy) is fixed load: its caps pinned at the default cap
    exempt = np.fromiter((j.exempt for j in jobs), dtype=bool, count=n_jobs)
    # a held GPU (unhealthy) pins its group; a shared one, in no job, counts at its cap
    held = np.fromiter(map(attrgetter("pinned"), gpus), dtype=bool, count=n_gpu)
    if np.any(exempt) or np.any(held):
        pinned = exempt[grp_job]
        pinned[np.unique(bgrp[held[bg]])] = True
        grp_lo = np.where(pinned, grp_target, grp_lo)
        grp_hi = np.where(pinned, grp_target, grp_hi)
        idle_w = np.where(held & ~busy, np.where(_shared(gpus), default_w, idle_w), idle_w)
    grp_rep = np.zeros(n_groups, dtype=np.int64)
    grp_rep[bgrp] = bg
    incid = sparse.csr_matrix((np.ones(len(bg)), (bg, bgrp)), shape=(n_gpu, n_groups))
    dom_grp = (member @ incid).tocsr()
    sync_split = False
    if np.any(sync):
        in_sync = sync[flat_job]
        h = np.fromiter((hash(frozenset(dom_lists[i])) for i in bg[in_sync]), dtype=np.int64)
        hmin = np.full(n_groups, np.iinfo(np.int64).max)
        hmax = np.full(n_groups, np.iinfo(np.int64).min)
        np.minimum.at(hmin, bgrp[in_sync], h)
        np.maximum.at(hmax, bgrp[in_sync], h)
        sg = np.unique(bgrp[in_sync])
        sync_split = bool(np.any(hmin[sg] != hmax[sg]))

    job_fits = [fits[jid] for jid in job_ids]
    job_k = job_k_i.astype(float)
    job_unc = np.fromiter((f.uncapped for f in job_fits), dtype=float, count=n_jobs)
    job_w = np.fromiter((j.weight for j in jobs), dtype=float, count=n_jobs)
    # what a job's normalised throughput is worth in the budget objective: per GPU
    # (the fleet's total work) or per job; shortfalls of floors stay weighted per job
    job_val = job_w * job_k if problem.objective.job_value == "size" else job_w
    job_s = np.fromiter((j.allowed_slowdown for j in jobs), dtype=float, count=n_jobs)
    # the floor must hold on the true curve, not just the fitted one: take the
    # fit's slowdown margin off what the job may lose (see CurveFit)
    job_margin = np.fromiter((f.slowdown_margin for f in job_fits), dtype=float, count=n_jobs)
    job_s = np.maximum(job_s - job_margin, 0.0)
    job_draw = np.fromiter((f.draw_w for f in job_fits), dtype=float, count=n_jobs)
    job_floor = np.where(exempt, 0.0, (1.0 - job_s) * job_unc)  # exempt: nothing to protect

    # segment tables per distinct (curve, lo, hi), replicated to groups
    curve_ix: dict[int, int] = {}
    curves: list[Curve] = []
    job_curve = np.empty(n_jobs, dtype=np.int64)
    for i, f in enumerate(job_fits):
        c = curve_ix.get(id(f.curve))
        if c is None:
            c = curve_ix[id(f.curve)] = len(curves)
            curves.append(f.curve)
        job_curve[i] = c
    # one integer key per group: (curve, lo, hi) ranked, then made unique
    lo_u, lo_i = np.unique(grp_lo, return_inverse=True)
    hi_u, hi_i = np.unique(grp_hi, return_inverse=True)
    key = (job_curve[grp_job] * len(lo_u) + lo_i.ravel()) * len(hi_u) + hi_i.ravel()
    ukey, grp_cls = np.unique(key, return_inverse=True)
    grp_cls = grp_cls.ravel()
    ukeys = [
        (
            int(k // (len(lo_u) * len(hi_u))),
            float(lo_u[(k // len(hi_u)) % len(lo_u)]),
            float(hi_u[k % len(hi_u)]),
        )
        for k in ukey.tolist()
    ]
    cls_start: list[int] = []
    cls_count: list[int] = []
    cls_base: list[float] = []
    s_x0: list[float] = []
    s_len: list[float] = []
    s_slope: list[float] = []
    for ci, lo, hi in ukeys:
        curve = curves[ci]
        cls_start.append(len(s_x0))
        cls_base.append(curve.value(lo))
        n = 0
        xs, ys = curve.x_w, curve.y
        for a0, a1, y0, y1 in zip(xs, xs[1:], ys, ys[1:], strict=False):
            slope = (y1 - y0) / (a1 - a0)
            a, b = max(a0, lo), min(a1, hi)
            if b - a > 1e-9 and slope > 1e-12:
                s_x0.append(a)
                s_len.append(b - a)
                s_slope.append(slope)
                n += 1
        cls_count.append(n)
    cstart = np.asarray(cls_start, dtype=np.int64)
    ccount = np.asarray(cls_count, dtype=np.int64)
    per_grp = ccount[grp_cls] if n_groups else np.zeros(0, dtype=np.int64)
    seg_group = np.repeat(np.arange(n_groups), per_grp)
    seg_first = np.cumsum(per_grp) - per_grp
    offset = np.arange(len(seg_group)) - np.repeat(seg_first, per_grp)
    src = cstart[grp_cls][seg_group] + offset if len(seg_group) else np.zeros(0, dtype=np.int64)
    sx0, slen, sslope = (np.asarray(v, dtype=float) for v in (s_x0, s_len, s_slope))
    grp_base = np.asarray(cls_base, dtype=float)[grp_cls] if n_groups else np.zeros(0)

    budget = np.fromiter((d.budget_w for d in problem.domains), dtype=float, count=n_dom)
    baseline = np.fromiter((d.baseline_w for d in problem.domains), dtype=float, count=n_dom)
    fixed = baseline + member @ np.where(busy, 0.0, idle_w)
    lo_load = dom_grp @ grp_lo if n_groups else np.zeros(n_dom)
    room = budget - fixed - lo_load
    return _Model(
        problem=problem,
        fits=fits,
        n_gpu=n_gpu,
        n_dom=n_dom,
        gpu_group=gpu_group,
        idle_w=idle_w,
        default_w=default_w,
        member=member,
        grp_job=grp_job,
        grp_n=grp_n,
        grp_lo=grp_lo,
        grp_hi=grp_hi,
        grp_base=grp_base,
        grp_target=grp_target,
        grp_rep=grp_rep,
        dom_grp=dom_grp,
        job_ids=job_ids,
        job_k=job_k,
        job_unc=job_unc,
        job_w=job_w,
        job_val=job_val,
        job_floor=job_floor,
        job_draw=job_draw,
        seg_group=seg_group,
        seg_x0=sx0[src] if len(src) else np.zeros(0),
        seg_len=slen[src] if len(src) else np.zeros(0),
        seg_slope=sslope[src] if len(src) else np.zeros(0),
        budget=budget,
        fixed_w=fixed,
        room=room,
        sync_split=sync_split,
    )


# --- evaluation ---------------------------------------------------------------


def _evaluate_groups(m: _Model, grp_caps: np.ndarray) -> Evaluation:
    caps = m.gpu_caps(grp_caps)
    return _evaluate(m, caps, grp_caps)


def _evaluate(m: _Model, caps: np.ndarray, grp_caps: np.ndarray | None = None) -> Evaluation:
    """Predicted throughput and power for per-GPU caps (idle GPUs' caps are ignored)."""
    busy = m.gpu_group >= 0
    if grp_caps is None:
        # a group's cap is its lowest GPU cap (synchronous: the slowest GPU sets the pace)
        grp_caps = np.full(len(m.grp_n), np.inf)
        np.minimum.at(grp_caps, m.gpu_group[busy], caps[busy])
        grp_caps = np.clip(grp_caps, m.grp_lo, m.grp_hi) if len(grp_caps) else grp_caps
    f = m.group_throughput(grp_caps) if len(m.grp_n) else np.zeros(0)
    t = (
        np.bincount(m.grp_job, f * m.grp_share, minlength=len(m.job_ids))
        if len(m.grp_n)
        else np.zeros(len(m.job_ids))
    )
    gpu_job = np.where(busy, m.grp_job[np.maximum(m.gpu_group, 0)] if len(m.grp_n) else 0, -1)
    draw = np.where(
        busy,
        np.minimum(caps, m.job_draw[np.maximum(gpu_job, 0)] if len(m.job_ids) else caps),
        m.idle_w,
    )
    dom_draw = m.member @ draw
    baseline = m.fixed_w - m.member @ np.where(busy, 0.0, m.idle_w)
    dom_power = dom_draw + baseline
    cap_load = m.member @ np.where(busy, caps, 0.0) + m.fixed_w
    viol = tuple(
        m.problem.domains[i].id for i in np.nonzero(cap_load > m.budget * (1 + 1e-9) + 1e-6)[0]
    )
    unc = np.where(m.job_unc > 0, m.job_unc, 1.0)
    return Evaluation(
        caps_w=caps,
        job_throughput=dict(zip(m.job_ids, (float(x) for x in t), strict=True)),
        gpu_power_w=draw,
        domain_power_w={d.id: float(dom_power[i]) for i, d in enumerate(m.problem.domains)},
        domain_cap_load_w={d.id: float(cap_load[i]) for i, d in enumerate(m.problem.domains)},
        budget_violations=viol,
        normalized_throughput=float(np.sum(m.job_val * np.where(m.job_unc > 0, t / unc, 0.0))),
    )


def evaluate_caps(
    problem: Problem, caps_w: Mapping[str, float], fits: Mapping[str, CurveFit] | None = None
) -> Evaluation:
    """Predict throughput and power for given per-GPU caps (missing GPUs: default cap)."""
    fits = fits if fits is not None else fit_curves(problem)
    m = _build_model(problem, fits)
    caps = np.array([caps_w.get(g.id, g.default_w) for g in problem.gpus], dtype=float)
    return _evaluate(m, caps)


def _objective_value(m: _Model, ev: Evaluation) -> float:
    """The objective in its own units, from an evaluation (cap-bound power model)."""
    o = m.problem.objective
    if o.kind == "budget":
        return ev.normalized_throughput
    busy = m.gpu_group >= 0
    cap_power = float(np.sum(np.where(busy, ev.caps_w, m.idle_w)))
    if o.kind == "energy":
        return float(np.sum(ev.caps_w[busy]))
    total_t = sum(ev.job_throughput.values())
    baseline = float(sum(d.baseline_w for d in m.problem.domains))
    return (
        o.value_per_unit * 3600.0 * total_t
        - o.price_per_kwh * o.pue * (cap_power + baseline) / 1000.0
    )


# --- LP -----------------------------------------------------------------------


def _lp_cost(m: _Model) -> np.ndarray:
    """Per-delta cost coefficients (linprog minimises)."""
    o = m.problem.objective
    k = m.seg_group
    share = m.grp_share[k]
    j = m.grp_job[k]
    if o.kind == "budget":
        unc = np.where(m.job_unc > 0, m.job_unc, np.inf)
        return np.asarray(-(m.job_val[j] / unc[j]) * share * m.seg_slope, dtype=float)
    if o.kind == "energy":
        return np.asarray(m.grp_n[k], dtype=float)
    return np.asarray(
        -(
            o.value_per_unit * 3600.0 * share * m.seg_slope
            - o.price_per_kwh * o.pue / 1000.0 * m.grp_n[k]
        ),
        dtype=float,
    )


def _solve_lp(
    m: _Model, room: np.ndarray, floors: bool
) -> tuple[np.ndarray, dict[str, float], str, tuple[str, ...]]:
    """Solve the LP; returns group caps, shadow prices, status and jobs whose floor was relaxed."""
    n_seg = len(m.seg_group)
    n_grp = len(m.grp_n)
    if n_seg == 0:
        return m.grp_lo.copy(), {d.id: 0.0 for d in m.problem.domains}, "optimal", ()
    cost = _lp_cost(m)
    a_dom = m.dom_grp.tocsc()[:, m.seg_group].tocsr()
    # floor rows for jobs whose floor is above what the minimum caps deliver
    base_t = np.bincount(m.grp_job, m.grp_base * m.grp_share, minlength=len(m.job_ids))
    need = m.job_floor - base_t
    fl_jobs = (
        np.nonzero(need > _TOL * np.maximum(1.0, m.job_unc))[0]
        if floors
        else np.zeros(0, dtype=np.int64)
    )
    row_of_job = np.full(len(m.job_ids), -1, dtype=np.int64)
    row_of_job[fl_jobs] = np.arange(len(fl_jobs))
    sj = m.grp_job[m.seg_group]
    sel = np.nonzero(row_of_job[sj] >= 0)[0]
    a_fl = sparse.csr_matrix(
        (-(m.grp_share[m.seg_group[sel]] * m.seg_slope[sel]), (row_of_job[sj[sel]], sel)),
        shape=(len(fl_jobs), n_seg),
    )
    b_fl = -need[fl_jobs]
    bounds = np.column_stack([np.zeros(n_seg), m.seg_len])
    a_ub = sparse.vstack([a_dom, a_fl], format="csr")
    b_ub = np.concatenate([room, b_fl])
    res = linprog(cost, A_ub=a_ub, b_ub=b_ub, bounds=bounds, method="highs")
    relaxed: tuple[str, ...] = ()
    status = "optimal"
    if res.status == 2 and len(fl_jobs):
        # floors cannot all hold: minimise the weighted normalised shortfall first
        nf = len(fl_jobs)
        unc = np.where(m.job_unc[fl_jobs] > 0, m.job_unc[fl_jobs], 1.0)
        slack = sparse.csr_matrix(
            (-unc, (np.arange(nf) + m.n_dom, np.arange(nf))), shape=(m.n_dom + nf, nf)
        )
        a2 = sparse.hstack([a_ub, slack], format="csr")
        c1 = np.concatenate([np.zeros(n_seg), m.job_w[fl_jobs]])
        b2 = np.column_stack([np.zeros(nf), np.ones(nf)])
        r1 = linprog(c1, A_ub=a2, b_ub=b_ub, bounds=np.vstack([bounds, b2]), method="highs")
        if r1.status != 0:  # pragma: no cover - always feasible with full slack
            raise RuntimeError(f"capping LP (phase 1) failed: {r1.message}")
        sig = r1.x[n_seg:]
        b3 = np.column_stack([np.zeros(nf), np.minimum(1.0, sig + 1e-9)])
        c2 = np.concatenate([cost, np.zeros(nf)])
        res = linprog(c2, A_ub=a2, b_ub=b_ub, bounds=np.vstack([bounds, b3]), method="highs")
        relaxed = tuple(m.job_ids[fl_jobs[i]] for i in np.nonzero(sig > 1e-6)[0])
        status = "optimal (slowdown floors relaxed)"
    if res.status != 0:  # pragma: no cover - feasible by construction
        raise RuntimeError(f"capping LP failed: {res.message}")
    delta = res.x[:n_seg]
    grp_caps = m.grp_lo + np.bincount(m.seg_group, delta, minlength=n_grp)
    grp_caps = np.clip(grp_caps, m.grp_lo, m.grp_hi)
    marg = np.asarray(res.ineqlin.marginals[: m.n_dom], dtype=float)
    shadow = {d.id: float(max(0.0, -marg[i]) * 1000.0) for i, d in enumerate(m.problem.domains)}
    return grp_caps, shadow, status, relaxed


# --- fast path ------------------------------------------------------------------


def _laminar_chains(m: _Model) -> np.ndarray | None:
    """Per-group ancestor table ``anc[k, depth]`` if the domains are laminar, else None."""
    if m.chains is None:
        anc = _compute_chains(m)
        m.chains = anc if anc is not None else False
    return m.chains if m.chains is not False else None


def _compute_chains(m: _Model) -> np.ndarray | None:
    """Sort each GPU's domains by size; laminar iff every domain has one parent."""
    mt = m.member.T.tocsr()  # gpus x domains
    g_of = np.repeat(np.arange(m.n_gpu), np.diff(mt.indptr))
    d_of = mt.indices.astype(np.int64)
    size = np.asarray(m.member.sum(axis=1)).ravel()
    rank = np.empty(m.n_dom, dtype=np.int64)
    rank[np.lexsort((np.arange(m.n_dom), -size))] = np.arange(m.n_dom)
    order = np.argsort(g_of * max(1, m.n_dom) + rank[d_of])
    g_s, d_s = g_of[order], d_of[order]
    same = np.zeros(len(g_s), dtype=bool)
    same[1:] = g_s[1:] == g_s[:-1]
    parent = np.full(len(g_s), -1, dtype=np.int64)
    parent[1:][same[1:]] = d_s[:-1][same[1:]]
    pmin = np.full(m.n_dom, np.iinfo(np.int64).max)
    pmax = np.full(m.n_dom, np.iinfo(np.int64).min)
    np.minimum.at(pmin, d_s, parent)
    np.maximum.at(pmax, d_s, parent)
    used = np.bincount(d_s, minlength=m.n_dom) > 0
    if np.any(pmin[used] != pmax[used]):
        return None
    starts = np.nonzero(~same)[0]
    depth = np.arange(len(g_s)) - np.repeat(starts, np.diff(np.append(starts, len(g_s))))
    max_depth = int(depth.max()) + 1 if len(depth) else 0
    anc_g = np.full((m.n_gpu, max(1, max_depth)), -1, dtype=np.int64)
    anc_g[g_s, depth] = d_s
    return np.asarray(anc_g[m.grp_rep], dtype=np.int64)


def fast_path_applicable(problem: Problem) -> str | None:
    """None if the greedy is exact for this problem, else the reason it is not."""
    if problem.objective.kind != "budget":
        return f"objective {problem.objective.kind!r} (the fast path solves 'budget')"
    fits = fit_curves(problem)
    m = _build_model(problem, fits)
    return _fast_reason(m)


def _fast_reason(m: _Model) -> str | None:
    if m.problem.objective.kind != "budget":
        return f"objective {m.problem.objective.kind!r} (the fast path solves 'budget')"
    if m.sync_split:
        return "a synchronous job spans GPUs with different domain sets"
    if _laminar_chains(m) is None:
        return "domains overlap without nesting (not laminar)"
    return None


def _solve_fast(m: _Model, room: np.ndarray) -> tuple[np.ndarray, dict[str, float]]:
    """Greedy marginal allocation as a bottom-up truncation over the domain tree."""
    anc = _laminar_chains(m)
    assert anc is not None
    n_grp = len(m.grp_n)
    k = m.seg_group
    unc = np.where(m.job_unc > 0, m.job_unc, np.inf)
    j = m.grp_job[k]
    per_watt = (m.job_val[j] / unc[j]) * m.seg_slope / m.job_k[j]
    watts = m.seg_len * m.grp_n[k]
    alloc = watts.copy()
    order = np.argsort(-per_watt, kind="stable")
    room = np.maximum(room, 0.0)
    for level in range(anc.shape[1] - 1, -1, -1):
        dom = anc[k, level] if len(k) else np.zeros(0, dtype=np.int64)
        sel = order[dom[order] >= 0]
        if not len(sel):
            continue
        sel = sel[np.argsort(dom[sel], kind="stable")]
        w = alloc[sel]
        d = dom[sel]
        cs = np.cumsum(w)
        block = np.ones(len(d), dtype=bool)
        block[1:] = d[1:] != d[:-1]
        starts = np.nonzero(block)[0]
        base = np.repeat(cs[starts] - w[starts], np.diff(np.append(starts, len(d))))
        before = cs - w - base
        alloc[sel] = np.clip(room[d] - before, 0.0, w)
    grp_caps = m.grp_lo + np.bincount(k, alloc, minlength=n_grp) / np.where(m.grp_n > 0, m.grp_n, 1)
    grp_caps = np.clip(grp_caps, m.grp_lo, m.grp_hi)
    # shadow prices: right derivative of the optimum in each domain's budget
    used = m.dom_grp @ (grp_caps - m.grp_lo) if n_grp else np.zeros(m.n_dom)
    full = used >= room - 1e-6 * np.maximum(1.0, room)
    shadow = np.zeros(m.n_dom)
    left = watts - alloc > 1e-9
    if np.any(left) and anc.size:
        chain = anc[k[left]]
        fl = np.where(chain >= 0, full[np.maximum(chain, 0)], False)
        one = fl.sum(axis=1) == 1
        which = chain[one, np.argmax(fl[one], axis=1)]
        np.maximum.at(shadow, which, per_watt[left][one])
    return grp_caps, {d.id: float(shadow[i] * 1000.0) for i, d in enumerate(m.problem.domains)}


# --- headroom -------------------------------------------------------------------


def _fill_headroom(
    m: _Model, grp_caps: np.ndarray, room: np.ndarray, rounds: int = 6
) -> np.ndarray:
    """Raise caps toward the default cap with budget left over (budget objective only).

    Among throughput-optimal caps this prefers headroom: a cap above the
    draw costs nothing and protects the job when our curve is pessimistic.
    Proportional sharing per domain keeps every budget; a few rounds hand on
    what a tighter domain left unused.
    """
    caps = grp_caps.copy()
    dg = m.dom_grp.tocsc()
    for _ in range(rounds):
        need = np.maximum(m.grp_target - caps, 0.0)
        if not np.any(need > 1e-9):
            break
        slack = np.maximum(room - m.dom_grp @ (caps - m.grp_lo), 0.0)
        demand = m.dom_grp @ need
        ratio = np.where(
            demand > 1e-12, np.minimum(1.0, slack / np.where(demand > 0, demand, 1.0)), 1.0
        )
        vals = ratio[dg.indices]
        r = np.ones(len(caps))
        nz = np.diff(dg.indptr) > 0
        if len(vals):
            mins = np.minimum.reduceat(vals, dg.indptr[:-1][nz])
            r[nz] = mins
        step = r * need * (1 - 1e-12)
        if not np.any(step > 1e-9):
            break
        caps = caps + step
    return np.asarray(np.clip(caps, m.grp_lo, m.grp_hi), dtype=float)


# --- setpoint resolution -------------------------------------------------------

MW: Final = 1e-3  # setpoints are milliwatts: what NVML takes and what a plan part encodes


def _round_down_mw(m: _Model, grp_caps: np.ndarray, room: np.ndarray) -> np.ndarray:
    """Caps at 1 mW resolution that keep every budget the solver kept.

    Rounding to the nearest mW would put a domain of n GPUs up to n/2 mW over
    its budget (the solver fills budgets exactly), so caps are rounded down
    (never below the group's minimum), except those of jobs at their slowdown
    floor, rounded up (the solver puts them exactly on it: down would break
    it by a hair; in energy mode, where they are, budgets seldom bind). Where
    a domain is still over, within
    the solver's tolerance, its groups above their minimum are lowered by
    whole mW until it fits (a synchronous job keeps one common cap).
    Domains with no room at the minimum caps (infeasible) are left as they are.
    """
    if not len(grp_caps):
        return grp_caps
    # within 1 µW of the next mW is the solver's tolerance, not a choice: snap to it
    down = np.floor(grp_caps * 1000.0 + 1e-3) / 1000.0
    up = np.ceil(grp_caps * 1000.0 - 1e-3) / 1000.0
    t = np.bincount(m.grp_job, m.group_throughput(grp_caps) * m.grp_share, minlength=len(m.job_ids))
    at_floor = t <= m.job_floor + 1e-6 * np.maximum(1.0, m.job_unc)
    caps = np.where(at_floor[m.grp_job] & (m.job_floor > 0)[m.grp_job], up, down)
    caps = np.clip(caps, m.grp_lo, m.grp_hi)
    ok_dom = m.room >= 0.0
    tol = 1e-6 + 1e-9 * m.budget  # what counts as over (as in budget_violations)
    for _ in range(8):
        over = (m.dom_grp @ (caps - m.grp_lo)) - room
        bad = np.nonzero(ok_dom & (over > tol))[0]
        if not len(bad):
            break
        for d in bad:  # rare: where snapping or the solver's tolerance left a domain over
            row = m.dom_grp.getrow(int(d))
            # fresh: fixing another domain may have fixed this one
            left = float((row @ (caps - m.grp_lo))[0]) - room[d]
            if left <= tol[d]:
                continue
            g = row.indices[caps[row.indices] - m.grp_lo[row.indices] >= MW - 1e-9]
            g = g[np.argsort(-caps[g], kind="stable")]  # the largest caps give first
            n = np.asarray(m.dom_grp[int(d), g].toarray()).ravel()
            if not len(g):
                continue
            units = math.ceil(left / MW - 1e-6)  # GPU-mW to take off
            if units <= n.sum():
                take = g[: int(np.searchsorted(np.cumsum(n), units)) + 1]
                caps[take] = caps[take] - MW
            else:
                step = math.ceil(units / n.sum()) * MW
                caps[g] = np.maximum(caps[g] - step, m.grp_lo[g])
    return caps


# --- entry point ----------------------------------------------------------------


def solve_capping(
    problem: Problem,
    method: Method = "auto",
    *,
    fits: Mapping[str, CurveFit] | None = None,
) -> CappingResult:
    """Per-GPU caps for ``problem.objective`` under every domain budget.

    ``method``: ``"lp"`` always solves the LP; ``"fast"`` runs the greedy and
    raises ``FastPathNotApplicable`` (a ``ValueError``) where it is not exact
    (objective other than budget, non-laminar domains, a synchronous job split
    across domain sets); it
    ignores slowdown floors and reports the jobs past them. ``"auto"`` uses
    the greedy where it is exact and its answer keeps every floor, else the LP.
    ``fits`` lets a caller reuse curves it already fitted.
    """
    t0 = time.perf_counter()
    fits = fits if fits is not None else fit_curves(problem)
    m = _build_model(problem, fits)
    short = m.room < -1e-9
    infeasible = tuple(
        DomainShortfall(problem.domains[i].id, float(-m.room[i])) for i in np.nonzero(short)[0]
    )
    room = np.maximum(m.room, 0.0)  # best effort: those domains' GPUs sit at their minimum
    reason = _fast_reason(m)
    if method == "fast" and reason is not None:
        raise FastPathNotApplicable(reason)
    grp_caps: np.ndarray | None = None
    used = "lp"
    status = "optimal"
    relaxed: tuple[str, ...] = ()
    shadow: dict[str, float] = {}
    if method in ("auto", "fast") and reason is None:
        grp_caps, shadow = _solve_fast(m, room)
        t = np.bincount(
            m.grp_job, m.group_throughput(grp_caps) * m.grp_share, minlength=len(m.job_ids)
        )
        under = np.nonzero(t < m.job_floor - 1e-7 * np.maximum(1.0, m.job_unc))[0]
        used = "fast"
        if len(under):
            if method == "fast":
                relaxed = tuple(m.job_ids[i] for i in under)
                status = "optimal (slowdown floors ignored by the fast path)"
            else:
                grp_caps = None
    if grp_caps is None:
        grp_caps, shadow, status, relaxed = _solve_lp(m, room, floors=True)
        used = "lp"
    if problem.objective.kind == "budget" and len(grp_caps):
        grp_caps = _fill_headroom(m, grp_caps, room)
    grp_caps = _round_down_mw(m, grp_caps, room)
    ev = _evaluate_groups(m, grp_caps)
    if infeasible:
        status = "best-effort (budget infeasible)"
    return CappingResult(
        objective=problem.objective.kind,
        method=used,
        status=status,
        time_s=time.perf_counter() - t0,
        feasible=not infeasible and not relaxed,
        infeasible_domains=infeasible,
        slowdown_exceeded=relaxed,
        objective_value=_objective_value(m, ev),
        shadow_prices=shadow,
        evaluation=ev,
        gpu_ids=tuple(map(attrgetter("id"), problem.gpus)),
        fits=fits,
    )


def sm_clock_for_cap(gpu: Gpu, cap_w: float) -> int | None:
    """A max SM clock that keeps the GPU near ``cap_w`` (DVFS instead of a power limit).

    ``f = f_max * (cap / max_w) ** (1 / 2.5)``, rounded down to a supported
    clock (a lower clock draws less, so rounding down keeps the cap), or the
    lowest supported clock. None where the GPU reports no clock table.
    """
    if not gpu.sm_clocks_mhz:
        return None
    table = gpu.sm_clocks_mhz
    f_max = table[-1]
    ratio = min(1.0, max(0.0, cap_w / gpu.max_w))
    f = f_max * ratio ** (1.0 / DVFS_EXPONENT)
    ok = [c for c in table if c <= f + 1e-9]
    return int(ok[-1]) if ok else int(table[0])


def carbon(problem: Problem, power_w: float) -> tuple[float, float]:
    """(g CO2 per hour, kg CO2 per day) for an IT load of ``power_w``, PUE included."""
    o = problem.objective
    g_h = power_w * o.pue / 1000.0 * o.carbon_g_per_kwh
    return g_h, g_h * 24.0 / 1000.0


__all__ = [
    "CappingResult",
    "DomainShortfall",
    "Evaluation",
    "carbon",
    "evaluate_caps",
    "fast_path_applicable",
    "sm_clock_for_cap",
    "solve_capping",
]
