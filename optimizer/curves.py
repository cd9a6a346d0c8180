"""Power→throughput curves: concave, non-decreasing, piecewise linear.

Concavity is what makes power capping a linear program (the epigraph of a
concave piecewise-linear function is a set of linear inequalities, and a
greedy fill of the steepest segments is optimal). Real power-capping curves
are close to concave: the first watts above the minimum buy the most.

A curve maps the **per-GPU cap** (W) to the **job's total throughput**
(its unit per second), assuming every GPU of the job runs at that cap. The
fit is an L1 concave regression solved as a small LP with HiGHS (robust to
the odd outlier sample); with fewer than three distinct caps it falls back to
a prior shape scaled to what was observed (see ``docs/problem-format.md``).
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np
from scipy import sparse
from scipy.optimize import linprog

from optimizer.problem import Gpu, Job, Problem

_EPS: Final = 1e-9

# Prior shapes: (cap as a fraction of the job's unconstrained draw, fraction of
# uncapped throughput). Read off published power-capping measurements on
# A100/H100-class GPUs (e.g. Zeus, NSDI'23, and power-capping studies of
# training and inference): compute-bound training keeps ~90 % of its throughput
# at ~70 % of TDP; memory-bound inference is nearly flat down to ~60 %.
PRIOR_COMPUTE_BOUND: Final[tuple[tuple[float, float], ...]] = (
    (0.3, 0.45),
    (0.4, 0.60),
    (0.5, 0.73),
    (0.6, 0.83),
    (0.7, 0.90),
    (0.8, 0.95),
    (0.9, 0.985),
    (1.0, 1.0),
)
PRIOR_MEMORY_BOUND: Final[tuple[tuple[float, float], ...]] = (
    (0.3, 0.60),
    (0.4, 0.75),
    (0.5, 0.88),
    (0.6, 0.96),
    (0.7, 0.99),
    (0.8, 1.0),
    (1.0, 1.0),
)
# Per GPU model family (substring of the model name, case-insensitive). The
# compute-bound shape is the default: it predicts the larger slowdown, so a
# job without data is not throttled on optimism.
PRIORS_BY_MODEL: Final[dict[str, tuple[tuple[float, float], ...]]] = {
    "H200": PRIOR_COMPUTE_BOUND,
    "H100": PRIOR_COMPUTE_BOUND,
    "A100": PRIOR_COMPUTE_BOUND,
    "L40": PRIOR_COMPUTE_BOUND,
    "V100": PRIOR_COMPUTE_BOUND,
}
MIN_DISTINCT_CAPS: Final = 3
# A sample whose measured power is at least this share of its cap was held by
# the cap; below it, the GPU drew what it wanted and the cap did not matter.
POWER_LIMITED_SHARE: Final = 0.97


@dataclass(frozen=True)
class Segment:
    """One linear piece: ``y = y0 + slope * (x - x0)`` on ``[x0, x1]``."""

    x0: float
    x1: float
    y0: float
    slope: float


@dataclass(frozen=True)
class Curve:
    """Breakpoints ``(x_w[i], y[i])``: x increasing, y non-decreasing, slopes non-increasing.

    Outside the breakpoints the curve is flat (clamped), which is what a
    cap above the unconstrained draw does, and the conservative reading below.
    """

    x_w: tuple[float, ...]
    y: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.x_w) != len(self.y) or not self.x_w:
            raise ValueError("a curve needs as many x as y, and at least one point")
        for a, b in zip(self.x_w, self.x_w[1:], strict=False):
            if not b > a:
                raise ValueError("curve breakpoints must be strictly increasing")

    def value(self, x: float) -> float:
        """Throughput at cap ``x`` (W)."""
        xs, ys = self.x_w, self.y
        if x <= xs[0]:
            return ys[0]
        if x >= xs[-1]:
            return ys[-1]
        i = bisect.bisect_right(xs, x) - 1
        t = (x - xs[i]) / (xs[i + 1] - xs[i])
        return ys[i] + t * (ys[i + 1] - ys[i])

    def values(self, x: np.ndarray) -> np.ndarray:
        """Vectorised :meth:`value`."""
        return np.asarray(np.interp(x, np.asarray(self.x_w), np.asarray(self.y)), dtype=float)

    def segments(self) -> list[Segment]:
        """The linear pieces in order; their slopes are non-increasing."""
        return [
            Segment(x0, x1, y0, (y1 - y0) / (x1 - x0))
            for x0, x1, y0, y1 in zip(self.x_w, self.x_w[1:], self.y, self.y[1:], strict=False)
        ]

    def inverse(self, target: float) -> float:
        """The smallest cap that reaches ``target`` (clamped to the curve's x range)."""
        xs, ys = self.x_w, self.y
        if target <= ys[0]:
            return xs[0]
        if target >= ys[-1]:
            # first x where the maximum is reached
            for x, y in zip(xs, ys, strict=True):
                if y >= ys[-1] - _EPS * max(1.0, abs(ys[-1])):
                    return x
            return xs[-1]
        for i in range(len(xs) - 1):
            if ys[i + 1] >= target:
                if ys[i + 1] == ys[i]:
                    return xs[i]
                t = (target - ys[i]) / (ys[i + 1] - ys[i])
                return xs[i] + t * (xs[i + 1] - xs[i])
        return xs[-1]

    @property
    def max_y(self) -> float:
        """Uncapped throughput."""
        return self.y[-1]

    @property
    def saturation_w(self) -> float:
        """The cap above which throughput no longer rises."""
        return self.inverse(self.y[-1])

    def is_concave(self, tol: float = 1e-7) -> bool:
        """Slopes non-negative and non-increasing (within ``tol`` relative)."""
        slopes = [s.slope for s in self.segments()]
        scale = max((abs(s) for s in slopes), default=1.0) or 1.0
        if any(s < -tol * scale for s in slopes):
            return False
        return all(b <= a + tol * scale for a, b in itertools.pairwise(slopes))


@dataclass(frozen=True)
class CurveFit:
    """A fitted curve and how well it explains the samples.

    ``rmse_rel`` is the RMSE over samples divided by their mean throughput
    (``None`` with no samples). ``draw_w`` is the per-GPU power the job draws
    when nothing holds it back; the curve is flat above it.
    """

    curve: Curve
    method: str  # "exact" | "lp-l1" | "prior"
    n_samples: int
    n_distinct_caps: int
    rmse_rel: float | None
    draw_w: float

    @property
    def uncapped(self) -> float:
        return self.curve.max_y


def _simplify(xs: list[float], ys: list[float]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Drop collinear interior points and enforce the shape against rounding."""
    # monotone, concave clean-up of tiny numerical violations
    ys = [max(0.0, y) for y in ys]
    for i in range(1, len(ys)):
        ys[i] = max(ys[i], ys[i - 1])
    out_x, out_y = [xs[0]], [ys[0]]
    for i in range(1, len(xs)):
        if len(out_x) >= 2 and i < len(xs):
            s_prev = (out_y[-1] - out_y[-2]) / (out_x[-1] - out_x[-2])
            s_new = (ys[i] - out_y[-1]) / (xs[i] - out_x[-1])
            if abs(s_prev - s_new) <= 1e-9 * max(1.0, abs(s_prev)):
                out_x[-1], out_y[-1] = xs[i], ys[i]
                continue
        out_x.append(xs[i])
        out_y.append(ys[i])
    return tuple(out_x), tuple(out_y)


def _sample_points(job: Job) -> list[tuple[float, float]]:
    """(effective cap, throughput) per sample: the cap if it held the GPU, else the draw."""
    pts: list[tuple[float, float]] = []
    for s in job.samples:
        if s.cap_w is not None and s.power_w is not None:
            x = s.cap_w if s.power_w >= POWER_LIMITED_SHARE * s.cap_w else s.power_w
        elif s.cap_w is not None:
            x = s.cap_w
        else:
            assert s.power_w is not None
            x = s.power_w
        pts.append((x, s.throughput))
    return pts


def _is_concave_monotone(xs: Sequence[float], ys: Sequence[float]) -> bool:
    scale = max(1e-12, *(abs(y) for y in ys))
    slopes = [(ys[i + 1] - ys[i]) / (xs[i + 1] - xs[i]) for i in range(len(xs) - 1)]
    if any(s < -1e-12 * scale for s in slopes):
        return False
    return all(b <= a + 1e-12 * scale for a, b in itertools.pairwise(slopes))


def concave_l1_fit(
    xs: Sequence[float], ys: Sequence[float], lo: float | None = None
) -> tuple[list[float], list[float], str]:
    """L1 concave non-decreasing regression at the distinct x of the samples.

    Returns the grid (distinct xs, preceded by ``lo`` when it lies below them)
    and the fitted values there, which are >= 0. Solved as an LP: minimise
    sum |f(x_i) - y_i| subject to slopes non-increasing and the last one >= 0.
    """
    grid = sorted(set(xs))
    add_lo = lo is not None and lo < grid[0] - 1e-9
    if add_lo:
        assert lo is not None
        grid = [lo, *grid]
    n = len(grid)
    pos = {x: i for i, x in enumerate(grid)}
    # fast exact path: per-x medians are the L1 optimum if already concave
    by_x: dict[float, list[float]] = {}
    for x, y in zip(xs, ys, strict=True):
        by_x.setdefault(x, []).append(y)
    med_x = sorted(by_x)
    med_y = [float(np.median(by_x[x])) for x in med_x]
    if _is_concave_monotone(med_x, med_y) and min(med_y) >= 0:
        if add_lo:
            assert lo is not None
            s0 = (med_y[1] - med_y[0]) / (med_x[1] - med_x[0]) if len(med_x) > 1 else 0.0
            y_lo = med_y[0] - s0 * (med_x[0] - lo)
            if y_lo >= 0:
                return [lo, *med_x], [y_lo, *med_y], "exact"
        else:
            return med_x, med_y, "exact"
    m = len(xs)
    # variables: f_0..f_{n-1}, e_0..e_{m-1}
    nv = n + m
    c = np.concatenate([np.zeros(n), np.ones(m)])
    if add_lo:
        c[0] = -1e-6  # among equal fits prefer the linear extension (largest f at lo)
    rows: list[dict[int, float]] = []
    rhs: list[float] = []
    for k, (x, y) in enumerate(zip(xs, ys, strict=True)):
        i = pos[x]
        rows.append({i: 1.0, n + k: -1.0})  # f - y <= e
        rhs.append(y)
        rows.append({i: -1.0, n + k: -1.0})  # y - f <= e
        rhs.append(-y)
    for i in range(1, n - 1):
        # (f_{i+1}-f_i)/h2 <= (f_i-f_{i-1})/h1
        h1, h2 = grid[i] - grid[i - 1], grid[i + 1] - grid[i]
        rows.append({i + 1: 1.0 / h2, i: -1.0 / h2 - 1.0 / h1, i - 1: 1.0 / h1})
        rhs.append(0.0)
    if n >= 2:
        rows.append({n - 2: 1.0, n - 1: -1.0})  # last slope >= 0
        rhs.append(0.0)
    r_idx, c_idx, vals = [], [], []
    for ri, row in enumerate(rows):
        for ci, v in row.items():
            r_idx.append(ri)
            c_idx.append(ci)
            vals.append(v)
    a = sparse.csr_matrix((vals, (r_idx, c_idx)), shape=(len(rows), nv))
    bounds = [(0.0, None)] * n + [(0.0, None)] * m
    res = linprog(c, A_ub=a, b_ub=np.asarray(rhs), bounds=bounds, method="highs")
    if res.status != 0:  # pragma: no cover - the LP is always feasible and bounded
        raise RuntimeError(f"concave fit failed: {res.message}")
    f = [float(v) for v in res.x[:n]]
    return grid, f, "lp-l1"


def prior_for_model(model: str) -> tuple[tuple[float, float], ...]:
    """The prior shape used for a GPU model (compute-bound unless a table entry says otherwise)."""
    up = model.upper()
    for key, shape in PRIORS_BY_MODEL.items():
        if key in up:
            return shape
    return PRIOR_COMPUTE_BOUND


def _prior_curve(
    shape: Sequence[tuple[float, float]],
    draw_w: float,
    lo: float,
    hi: float,
    points: Sequence[tuple[float, float]],
) -> tuple[list[float], list[float]]:
    """The prior, x scaled to ``draw_w`` and y scaled (least squares) to the observed points."""
    px = [p * draw_w for p, _ in shape]
    py = [r for _, r in shape]
    s0 = (py[1] - py[0]) / (px[1] - px[0])

    def r(x: float) -> float:
        if x <= px[0]:
            return max(0.0, py[0] - s0 * (px[0] - x))
        return float(np.interp(x, px, py))

    if points:
        num = sum(y * r(x) for x, y in points)
        den = sum(r(x) ** 2 for x, _ in points)
        scale = num / den if den > 0 else 1.0
    else:
        scale = 1.0
    xs = sorted({lo, hi, *[x for x in px if lo < x < hi]})
    return xs, [scale * r(x) for x in xs]


def _extend_below(
    xs: list[float],
    ys: list[float],
    lo: float,
    draw_w: float,
    shape: Sequence[tuple[float, float]],
) -> tuple[list[float], list[float]]:
    """Points on [lo, xs[0]) where no sample was taken.

    The data say nothing there, so take the more pessimistic of two concave
    continuations: the first fitted slope carried on, and the prior shape
    anchored at the lowest sample. The minimum of the two stays concave and
    keeps a fleet that was only ever observed near its top from being capped
    to the floor on a flat extrapolation.
    """
    x1, y1 = xs[0], ys[0]
    s1 = (ys[1] - ys[0]) / (xs[1] - xs[0]) if len(xs) > 1 else 0.0
    px = [p * draw_w for p, _ in shape]
    py = [r for _, r in shape]
    s0 = (py[1] - py[0]) / (px[1] - px[0])

    def r(x: float) -> float:
        if x <= px[0]:
            return max(0.0, py[0] - s0 * (px[0] - x))
        return float(np.interp(x, px, py))

    r1 = r(x1)
    grid = sorted({lo, *[x for x in px if lo < x < x1]})
    out_y = []
    for x in grid:
        lin = y1 - s1 * (x1 - x)
        pri = y1 * r(x) / r1 if r1 > 0 else lin
        out_y.append(max(0.0, min(lin, pri)))
    return grid, out_y


def fit_job_curve(job: Job, gpus: Sequence[Gpu]) -> CurveFit:
    """Fit one job's curve over the cap range of its GPUs; ``gpus`` are the job's GPUs."""
    lo = min(g.min_w for g in gpus)
    hi = max(g.max_w for g in gpus)
    pts = _sample_points(job)
    measured = [s.power_w for s in job.samples if s.power_w is not None]
    distinct = len({round(x, 6) for x, _ in pts})
    if distinct < MIN_DISTINCT_CAPS:
        draw = max(measured) if measured else max(g.default_w for g in gpus)
        draw = min(max(draw, lo), hi)
        xs, ys = _prior_curve(prior_for_model(gpus[0].model), draw, lo, hi, pts)
        method = "prior"
    else:
        gx, gy, method = concave_l1_fit([x for x, _ in pts], [y for _, y in pts])
        xs, ys = list(gx), list(gy)
        if lo < xs[0]:
            ext_draw = min(max(max(measured) if measured else hi, lo), hi)
            ex, ey = _extend_below(xs, ys, lo, ext_draw, prior_for_model(gpus[0].model))
            xs, ys = ex + xs, ey + ys
        if xs[-1] < hi:
            xs.append(hi)
            ys.append(ys[-1])
        # flat above the unconstrained draw
        fitted = Curve(*_simplify(xs, ys))
        draw = max(measured) if measured else fitted.saturation_w
        draw = min(max(draw, lo), hi)
        if draw < fitted.saturation_w:
            top = fitted.value(draw)
            keep = [(x, y) for x, y in zip(xs, ys, strict=True) if x < draw]
            tail_x = [draw, hi] if draw < hi else [draw]
            xs = [x for x, _ in keep] + tail_x
            ys = [y for _, y in keep] + [top] * len(tail_x)
    xs2, ys2 = _dedupe([float(x) for x in xs], [float(y) for y in ys])
    curve = Curve(*_simplify(xs2, ys2))
    if not curve.is_concave(1e-6):
        # only the prior's zero clamp can bend it; re-fit the prior points as an LP
        gx, gy, _ = concave_l1_fit(list(curve.x_w), list(curve.y))
        curve = Curve(*_simplify(gx, gy))
    rmse = None
    if pts:
        err = [curve.value(x) - y for x, y in pts]
        mean_y = sum(y for _, y in pts) / len(pts)
        rmse = float(math.sqrt(sum(e * e for e in err) / len(err)) / mean_y) if mean_y > 0 else None
    return CurveFit(
        curve=curve,
        method=method,
        n_samples=len(pts),
        n_distinct_caps=distinct,
        rmse_rel=rmse,
        draw_w=float(draw),
    )


def _dedupe(xs: list[float], ys: list[float]) -> tuple[list[float], list[float]]:
    ox: list[float] = []
    oy: list[float] = []
    for x, y in sorted(zip(xs, ys, strict=True)):
        if ox and x - ox[-1] <= 1e-9:
            oy[-1] = max(oy[-1], y)
            continue
        ox.append(x)
        oy.append(y)
    return ox, oy


def fit_curves(problem: Problem) -> dict[str, CurveFit]:
    """A fitted curve for every job, by job id.

    Jobs with identical samples on the same GPU models and cap ranges share
    one fit (fleets run many replicas of one job).
    """
    out: dict[str, CurveFit] = {}
    cache: dict[tuple[object, ...], CurveFit] = {}
    for job in problem.jobs:
        gs = [problem.gpu(g) for g in job.gpus]
        key = (
            job.samples,
            min(g.min_w for g in gs),
            max(g.max_w for g in gs),
            max(g.default_w for g in gs),
            gs[0].model,
        )
        fit = cache.get(key)
        if fit is None:
            fit = fit_job_curve(job, gs)
            cache[key] = fit
        out[job.id] = fit
    return out


__all__ = [
    "MIN_DISTINCT_CAPS",
    "PRIORS_BY_MODEL",
    "PRIOR_COMPUTE_BOUND",
    "PRIOR_MEMORY_BOUND",
    "Curve",
    "CurveFit",
    "Segment",
    "concave_l1_fit",
    "fit_curves",
    "fit_job_curve",
    "prior_for_model",
]
