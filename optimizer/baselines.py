"""Simple capping policies the optimizer is compared with, under the same curves.

* ``none``: every GPU at its default cap (what the fleet does today).
* ``uniform``: each domain splits what its budget leaves after baseline and
  idle load equally over its busy GPUs; a GPU takes the tightest share among
  its domains, clipped to its [min_w, max_w].
* ``proportional``: like uniform, but shares are proportional to each GPU's
  unconstrained draw (its job's demand).

A baseline may break a budget (a share clipped up to min_w); the evaluation
lists those domains instead of hiding them.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from optimizer.capping import Evaluation, _build_model, _evaluate, _Model
from optimizer.curves import CurveFit, fit_curves
from optimizer.problem import Problem

BASELINES = ("none", "uniform", "proportional")


def _tightest(m: _Model, per_domain: np.ndarray, fallback: np.ndarray) -> np.ndarray:
    """Per GPU, the smallest of ``per_domain`` over its domains (``fallback`` if none)."""
    mt = m.member.T.tocsr()
    out = fallback.copy()
    nz = np.diff(mt.indptr) > 0
    if mt.nnz:
        out[nz] = np.minimum.reduceat(per_domain[mt.indices], mt.indptr[:-1][nz])
    return out


def baseline_caps(m: _Model, name: str) -> np.ndarray:
    """Per-GPU caps for the named policy."""
    gpus = m.problem.gpus
    default_w = np.array([g.default_w for g in gpus], dtype=float)
    min_w = np.array([g.min_w for g in gpus], dtype=float)
    max_w = np.array([g.max_w for g in gpus], dtype=float)
    if name == "none":
        return default_w
    busy = (m.gpu_group >= 0).astype(float)
    avail = np.maximum(m.budget - m.fixed_w, 0.0)
    if name == "uniform":
        n = m.member @ busy
        share = np.where(n > 0, avail / np.where(n > 0, n, 1.0), np.inf)
        caps = _tightest(m, share, max_w)
    elif name == "proportional":
        gpu_job = np.where(m.gpu_group >= 0, m.grp_job[np.maximum(m.gpu_group, 0)], 0)
        demand = np.where(m.gpu_group >= 0, m.job_draw[gpu_job] if len(m.job_draw) else 0.0, 0.0)
        total = m.member @ demand
        factor = np.where(total > 0, avail / np.where(total > 0, total, 1.0), np.inf)
        tight = _tightest(m, factor, np.full(len(gpus), np.inf))
        bounded = np.isfinite(tight)  # a GPU in no limited domain: no factor, its max
        caps = np.where(bounded, demand * np.where(bounded, tight, 0.0), max_w)
    else:
        raise ValueError(f"unknown baseline {name!r}; one of {BASELINES}")
    caps = np.clip(caps, min_w, max_w)
    return np.where(m.gpu_group >= 0, caps, default_w)


def evaluate_baselines(
    problem: Problem, fits: Mapping[str, CurveFit] | None = None
) -> dict[str, Evaluation]:
    """Every baseline policy evaluated with the problem's fitted curves."""
    fits = fits if fits is not None else fit_curves(problem)
    m = _build_model(problem, fits)
    return {name: _evaluate(m, baseline_caps(m, name)) for name in BASELINES}


__all__ = ["BASELINES", "baseline_caps", "evaluate_baselines"]
