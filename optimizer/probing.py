"""Safe probing: short caps inside a job's allowance, so its curve is learned from its own readings.

A job whose curve is still uncertain (fitted on a prior: ``method`` ``prior``
or ``fleet``, or a slowdown margin above ``UNCERTAIN_SHARE`` of its
allowance) has no readings below its draw, or too few to tell its shape. The
plan then keeps its floor with a wide margin, which is what the job costs in
saving. A **probe** sets all of the job's GPUs together (a synchronous job is
probed as one; any other job's curve is its throughput at a uniform cap) to
a lower cap for a short lease (``optimizer.probe_lease_s``), after which the
agents go back to the plan's setpoint. The readings under the probe become
the job's samples at that cap in the next snapshot, so its next fit comes
from its own readings.

Safety:

* **Inside the allowance on the most pessimistic prior.** The probe cap is
  the lowest cap at which the steepest of the prior shapes
  (``optimizer.curves.PRIOR_SHAPES``, pointwise, scaled to the job's draw)
  still keeps the job within ``allowed_slowdown`` less the prior's own
  margin: a first plan on priors alone keeps its promise too.
* **Never above the plan.** A probe only lowers a cap (a probe cap at least
  ``MIN_STEP_W`` below every planned cap of the job, else no probe), so every
  budget the plan keeps, the probe keeps.
* **A bounded share of every domain.** The GPUs probed at one time draw (at
  their planned caps) at most ``probe_budget_share`` of each domain's budget
  they are in: what the probes put at risk is bounded per domain.
* **Audited.** The plan part marks the setpoint (``probe_w`` until
  ``probe_until_ns``); the agent applies it and audits ``probe``.

Exempt jobs are never probed. What probing costs is predicted on the fitted
curves (``Probes.given_up``: throughput given up while the probe lasts) and
shown in the report.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np

from optimizer.capping import CappingResult, evaluate_caps
from optimizer.curves import PRIOR_SHAPES, PRIOR_SLOWDOWN_MARGIN, CurveFit
from optimizer.problem import Job, Problem

UNCERTAIN_SHARE: Final = 0.25  # a margin above this share of the allowance: still uncertain
UNCERTAIN_METHODS: Final = frozenset({"prior", "fleet"})
MIN_STEP_W: Final = 10.0  # a probe this far below the plan at least (the snapshot buckets 5 W)
DEFAULT_SHARE: Final = 0.1
DEFAULT_LEASE_S: Final = 120.0


@dataclass(frozen=True)
class Probes:
    """The probes of one plan: per GPU the probe cap, per job what it is predicted to cost."""

    caps_w: dict[str, float]  # GPU -> probe cap (W)
    job_caps_w: dict[str, float]  # job -> probe cap (W)
    lease_s: float
    given_up: dict[str, float] = field(default_factory=dict)  # job -> units/s while probing
    given_up_value: float = 0.0  # the same in the objective's normalised units
    planned_value: float = 0.0  # the plan's normalised throughput, for scale

    def summary(self) -> dict[str, Any]:
        """The plan's ``probes`` object."""
        return {
            "lease_s": self.lease_s,
            "jobs": {
                j: {"cap_w": c, "throughput_given_up": self.given_up.get(j, 0.0)}
                for j, c in sorted(self.job_caps_w.items())
            },
            "gpus": len(self.caps_w),
            "given_up_normalized": self.given_up_value,
            "planned_normalized": self.planned_value,
        }


def uncertain(job: Job, fit: CurveFit) -> bool:
    """Whether a job's curve is still uncertain enough to be worth a probe."""
    return fit.method in UNCERTAIN_METHODS or fit.slowdown_margin > UNCERTAIN_SHARE * (
        job.allowed_slowdown
    )


def _pessimistic(u: np.ndarray) -> np.ndarray:
    """The steepest prior shape, pointwise over every shape, at caps ``u`` x the draw.

    Below the shapes' lowest anchor nothing is assumed (0): no probe goes there.
    """
    out = np.full(len(u), np.inf)
    for shape in PRIOR_SHAPES.values():
        px = np.array([p for p, _ in shape])
        py = np.array([r for _, r in shape])
        v = np.where(u < px[0], 0.0, np.interp(u, px, py, right=1.0))
        out = np.minimum(out, v)
    return out


def pessimistic_cap(job: Job, fit: CurveFit, lo_w: float) -> float | None:
    """The lowest cap (whole W, >= ``lo_w``) within the allowance on the steepest prior."""
    allowed = job.allowed_slowdown - PRIOR_SLOWDOWN_MARGIN
    draw = fit.draw_w
    if allowed <= 0 or draw <= lo_w:
        return None
    caps = np.arange(np.ceil(lo_w), np.floor(draw) + 1.0)
    ok = caps[1.0 - _pessimistic(caps / draw) <= allowed + 1e-12]
    return float(ok[0]) if len(ok) else None


def choose_probes(
    problem: Problem,
    result: CappingResult,
    *,
    share: float = DEFAULT_SHARE,
    lease_s: float = DEFAULT_LEASE_S,
    fits: Mapping[str, CurveFit] | None = None,
) -> Probes:
    """The probes for a plan made from ``result`` (see the module docstring)."""
    fits = fits if fits is not None else result.fits
    caps = result.caps_w
    dom_budget = {d.id: d.budget_w for d in problem.domains}
    used = dict.fromkeys(dom_budget, 0.0)
    cands: list[tuple[int, float, str, float]] = []
    for job in problem.jobs:
        fit = fits.get(job.id)
        if fit is None or job.exempt or not uncertain(job, fit):
            continue
        gpus = [problem.gpu(g) for g in job.gpus]
        cap = pessimistic_cap(job, fit, max(g.min_w for g in gpus))
        if cap is None or cap > min(caps[g] for g in job.gpus) - MIN_STEP_W:
            continue
        cands.append(
            (0 if fit.method in UNCERTAIN_METHODS else 1, -fit.slowdown_margin, job.id, cap)
        )
    cands.sort()
    job_caps: dict[str, float] = {}
    gpu_caps: dict[str, float] = {}
    jobs = {j.id: j for j in problem.jobs}
    for _, _, jid, cap in cands:
        load: dict[str, float] = {}
        for g in jobs[jid].gpus:
            for d in problem.gpu(g).domains:
                load[d] = load.get(d, 0.0) + caps[g]
        if all(used[d] + w <= share * dom_budget[d] + 1e-9 for d, w in load.items()):
            for d, w in load.items():
                used[d] += w
            job_caps[jid] = cap
            gpu_caps.update(dict.fromkeys(jobs[jid].gpus, cap))
    if not gpu_caps:
        return Probes({}, {}, lease_s)
    probed = evaluate_caps(problem, {**caps, **gpu_caps}, fits)
    planned = result.evaluation
    given_up = {j: max(0.0, planned.job_throughput[j] - probed.job_throughput[j]) for j in job_caps}
    return Probes(
        gpu_caps,
        job_caps,
        lease_s,
        given_up,
        max(0.0, planned.normalized_throughput - probed.normalized_throughput),
        planned.normalized_throughput,
    )


__all__ = ["Probes", "choose_probes", "pessimistic_cap", "uncertain"]
