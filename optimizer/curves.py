"""Power→throughput curves: concave, non-decreasing, piecewise linear.

Concavity is what makes power capping a linear program (the epigraph of a
concave piecewise-linear function is a set of linear inequalities, and a
greedy fill of the steepest segments is optimal). Real power-capping curves
are close to concave: the first watts above the minimum buy the most.

A curve maps the **per-GPU cap** (W) to the **job's total throughput**
(its unit per second), assuming every GPU of the job runs at that cap. The
fit is a two-parameter mix of the compute- and memory-bound prior shapes
where that explains the samples as well as their noise allows, else an L1
concave regression solved as a small LP with HiGHS (robust to the odd outlier
sample); with fewer than three distinct caps it falls back to the prior shape
the evidence picks, scaled to what was observed. Every fit carries a slowdown
margin that the capping model takes off the job's allowance, so floors hold
on the true curve (see ``docs/problem-format.md``). Over a whole problem,
jobs of a kind pool their shapes and noise (``fit_curves``): a fleet measures
what a job seen at a few caps cannot. ``fit_job_curve`` and ``_pool`` define
the fits job by job; ``fit_curves`` computes them for all jobs at once, as
array operations over the jobs (see "fitting a whole problem at once").
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import itertools
import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final, NamedTuple

import numpy as np
from scipy import sparse
from scipy.optimize import linprog, nnls
from scipy.stats import f as f_dist
from scipy.stats import norm

from optimizer.problem import DEFAULT_SLOWDOWN_CONFIDENCE, Gpu, Job, Problem, Sample

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
PRIOR_SHAPES: Final[dict[str, tuple[tuple[float, float], ...]]] = {
    "compute": PRIOR_COMPUTE_BOUND,
    "memory": PRIOR_MEMORY_BOUND,
}
MIN_DISTINCT_CAPS: Final = 3
# A sample whose measured power is at least this share of its cap was held by
# the cap; below it, the GPU drew what it wanted and the cap did not matter.
POWER_LIMITED_SHARE: Final = 0.97
# Unheld readings of one job jitter around its draw; one below this share of
# the job's highest reading was a held sample whose reading dipped.
DRAW_SPREAD_SHARE: Final = 0.9
# A job never held by a cap whose unconstrained draw is at most this share of
# its GPUs' default cap is limited by something other than SM clocks (memory
# bandwidth, host, network): it gets the memory-bound prior shape.
MEMORY_BOUND_DRAW_SHARE: Final = 0.7
# The two-shape model (a non-negative mix of the compute- and memory-bound
# shapes, see ``fit_job_curve``) replaces the free concave fit unless an F test
# at this level finds its residuals larger than the noise the samples show by
# themselves; a residual within SHAPE_ABS_TOL of the mean throughput always passes.
SHAPE_TEST_LEVEL: Final = 0.95
SHAPE_ABS_TOL: Final = 0.01
# Slowdown margin: z of the default one-sided 95 % bound (a problem's
# ``objective.slowdown_confidence`` picks another), and the margin of a curve
# that rests on a prior shape alone (the spread of published curves near the top).
SLOWDOWN_Z: Final = float(norm.ppf(DEFAULT_SLOWDOWN_CONFIDENCE))
PRIOR_SLOWDOWN_MARGIN: Final = 0.01
# Fleet pooling (``fit_curves``): a group of jobs needs at least this many
# distinct two-shape fits before their spread says how far its jobs differ.
FLEET_MIN_FITS: Final = 8
# How many degrees of freedom the fleet's noise estimate counts for against a
# job's own when the two are pooled (``_moderated``).
FLEET_NOISE_PRIOR_DOF: Final = 4
# The caps a two-shape margin is taken over (``_share_margin``): this many, from
# this share of the draw up to it; and the relative step of the draw that its
# slowdown's derivative by the draw is taken over.
_MARGIN_FROM: Final = 0.2
_MARGIN_CAPS: Final = 161
_DRAW_STEP: Final = 1e-3


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
        xs, ys = self.x_w, self.y
        slopes = [(ys[i + 1] - ys[i]) / (xs[i + 1] - xs[i]) for i in range(len(xs) - 1)]
        scale = max((abs(s) for s in slopes), default=1.0) or 1.0
        if any(s < -tol * scale for s in slopes):
            return False
        return all(b <= a + tol * scale for a, b in itertools.pairwise(slopes))


@dataclass(frozen=True)
class CurveFit:
    """A fitted curve and how well it explains the samples.

    ``rmse_rel`` is the RMSE over samples divided by their mean throughput
    (``None`` with no samples). ``draw_w`` is the per-GPU power the job draws
    when nothing holds it back; the curve is flat above it. ``shape`` is the
    prior shape the evidence chose (``"compute"`` or ``"memory"``; the fit
    uses it for a ``"prior"`` curve and below the lowest sample).
    ``slowdown_margin`` is how much the curve's predicted slowdown may
    understate the true one (one-sided, about 95 %): the capping model
    tightens the job's slowdown floor by it (see ``docs/problem-format.md``).
    ``memory_share`` is, for a two-shape curve, the memory-bound share of its
    mix and that share's SD (what fleet pooling combines, ``fit_curves``).
    """

    curve: Curve
    method: str  # "exact" | "lp-l1" | "shape" | "prior" | "fleet"
    n_samples: int
    n_distinct_caps: int
    rmse_rel: float | None
    draw_w: float
    shape: str = "compute"
    slowdown_margin: float = 0.0
    memory_share: tuple[float, float] | None = None

    @property
    def uncapped(self) -> float:
        return self.curve.max_y


def _simplify(xs: list[float], ys: list[float]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Drop collinear interior points and enforce the shape against rounding."""
    # monotone, concave clean-up of tiny numerical violations
    ys = list(itertools.accumulate((y if y > 0.0 else 0.0 for y in ys), max))
    out_x, out_y = [xs[0]], [ys[0]]
    for x, y in zip(xs[1:], ys[1:], strict=True):
        if len(out_x) >= 2:
            s_prev = (out_y[-1] - out_y[-2]) / (out_x[-1] - out_x[-2])
            s_new = (y - out_y[-1]) / (x - out_x[-1])
            if abs(s_prev - s_new) <= 1e-9 * max(1.0, abs(s_prev)):
                out_x[-1], out_y[-1] = x, y
                continue
        out_x.append(x)
        out_y.append(y)
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
    r = _shape_fn(shape, draw_w)
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
    r = _shape_fn(shape, draw_w)
    r1 = r(x1)
    grid = sorted({lo, *[x for x in px if lo < x < x1]})
    out_y = []
    for x in grid:
        lin = y1 - s1 * (x1 - x)
        pri = y1 * r(x) / r1 if r1 > 0 else lin
        out_y.append(max(0.0, min(lin, pri)))
    return grid, out_y


def _unheld(job: Job, default_w: float = math.inf) -> list[bool]:
    """Per sample, whether it saw the job's unconstrained draw (no cap held it).

    A reading below ``POWER_LIMITED_SHARE`` of its cap was not held by it, so
    it is the draw, unless another sample drew more than the readings'
    jitter explains (below ``DRAW_SPREAD_SHARE`` of the highest: no cap makes
    a job draw more than it wants): then it was a held sample whose reading
    dipped, and taking it as the draw would end the curve there. A reading at
    the GPUs' default cap (``default_w``) is the draw whatever it reads: that is
    the operating point slowdowns are measured from, and a job held there
    reads the cap itself.
    """
    top = max((s.power_w for s in job.samples if s.power_w is not None), default=0.0)
    return [
        s.power_w is not None
        and (
            s.cap_w is None
            or s.power_w < POWER_LIMITED_SHARE * s.cap_w
            or s.cap_w >= default_w - _EPS
        )
        and (s.cap_w is None or s.power_w >= DRAW_SPREAD_SHARE * top)
        for s in job.samples
    ]


def _aggregate_points(
    job: Job, default_w: float = math.inf
) -> tuple[list[tuple[float, float]], float | None]:
    """Fitting points and the measured unconstrained draw (None if never seen).

    Samples the cap did not hold all observe the same operating point, the
    job's draw; their measured power only jitters. They share one x, the
    median of their power (which is also the draw), so that jitter does not
    pose as distinct caps. Samples held by a cap keep the cap as x.
    """
    unheld = _unheld(job, default_w)
    free_w = [
        s.power_w for s, u in zip(job.samples, unheld, strict=True) if u and s.power_w is not None
    ]
    draw = float(np.median(free_w)) if free_w else None
    out: list[tuple[float, float]] = []
    for s, u in zip(job.samples, unheld, strict=True):
        if u:
            assert draw is not None
            out.append((draw, s.throughput))
        else:
            assert s.cap_w is not None
            out.append((s.cap_w, s.throughput))
    return out, draw


def _shape_fn(shape: Sequence[tuple[float, float]], draw_w: float) -> Callable[[float], float]:
    """The prior shape as a function of the cap (W), x scaled to ``draw_w``, flat above it."""
    px = [p * draw_w for p, _ in shape]
    py = [r for _, r in shape]
    s0 = (py[1] - py[0]) / (px[1] - px[0])

    def r(x: float) -> float:
        if x <= px[0]:
            return max(0.0, py[0] - s0 * (px[0] - x))
        return float(np.interp(x, px, py))

    return r


def _choose_shape(
    pts: Sequence[tuple[float, float]], draw_w: float | None, default_w: float, model: str
) -> str:
    """Which prior shape the evidence supports: ``"compute"`` or ``"memory"``.

    With samples at two or more x, the shape whose least-squares scaling
    leaves the smaller residual. Without, a job whose unconstrained draw stays
    at most ``MEMORY_BOUND_DRAW_SHARE`` of its default cap is memory-bound.
    Otherwise the GPU model's table entry (compute-bound everywhere).
    """
    xs = {round(x, 6) for x, _ in pts}
    if len(xs) >= 2:
        d = draw_w if draw_w is not None else max(x for x, _ in pts)
        sse: dict[str, float] = {}
        for name, shape in PRIOR_SHAPES.items():
            r = _shape_fn(shape, d)
            rx = np.array([r(x) for x, _ in pts])
            y = np.array([y for _, y in pts])
            den = float(rx @ rx)
            k = float(rx @ y) / den if den > 0 else 0.0
            sse[name] = float(np.sum((y - k * rx) ** 2))
        return "memory" if sse["memory"] < sse["compute"] else "compute"
    if draw_w is not None and draw_w <= MEMORY_BOUND_DRAW_SHARE * default_w:
        return "memory"
    return "memory" if prior_for_model(model) is PRIOR_MEMORY_BOUND else "compute"


def _shape_gap(shape: str, draw_w: float, lo: float) -> float:
    """How far above the compute-bound shape ``shape`` reads anywhere on [lo, draw_w].

    A prior curve is the shape the evidence leaned to, but nothing measured
    it below the samples; its slowdown floor is tightened by this gap, so the
    more pessimistic, compute-bound reading keeps the floor too.
    """
    if shape == "compute":
        return 0.0
    fc = _shape_fn(PRIOR_COMPUTE_BOUND, draw_w)
    fs = _shape_fn(PRIOR_SHAPES[shape], draw_w)
    grid = np.linspace(min(lo, draw_w), draw_w, 65)
    return float(max(0.0, *(fs(x) - fc(x) for x in grid)))


def _pure_ss(by_x: dict[float, list[float]]) -> tuple[float, int]:
    """Sum of squares of replicates about their cap's mean, and its degrees of freedom."""
    ss, dof = 0.0, 0
    for v in by_x.values():
        a = np.asarray(v)
        ss += float(np.sum((a - a.mean()) ** 2))
        dof += len(a) - 1
    return ss, dof


def _pure_error(pts: Sequence[tuple[float, float]]) -> tuple[float, int] | None:
    """Noise SD from replicates alone (same x), and its degrees of freedom; None without."""
    by_x: dict[float, list[float]] = {}
    for x, y in pts:
        by_x.setdefault(x, []).append(y)
    ss, dof = _pure_ss(by_x)
    return (math.sqrt(ss / dof), dof) if dof else None


def _noise_sd(pts: Sequence[tuple[float, float]]) -> tuple[float, int] | None:
    """The samples' own noise (SD, absolute), with no model of the curve.

    Replicates at one x give pure error, unbiased whatever the curve; where
    they are too few, the difference estimator of Gasser, Sroka and
    Jennen-Steinmetz (1986) adds one degree of freedom per inner x, comparing
    each point with the line through its neighbours (which a smooth curve
    makes nearly exact; a sharp bend reads as noise). Returns the SD and its
    degrees of freedom; None with none.
    """
    by_x: dict[float, list[float]] = {}
    for x, y in pts:
        by_x.setdefault(x, []).append(y)
    xs = sorted(by_x)
    ss, dof = _pure_ss(by_x)
    if dof >= max(2, len(xs) - 2):
        # pure error alone: the neighbour differences would add as many degrees
        # of freedom or fewer, and a bend of the curve inflates them
        return math.sqrt(ss / dof), dof
    means = [float(np.mean(by_x[x])) for x in xs]
    counts = [len(by_x[x]) for x in xs]
    for i in range(1, len(xs) - 1):
        h = xs[i + 1] - xs[i - 1]
        a, b = (xs[i + 1] - xs[i]) / h, (xs[i] - xs[i - 1]) / h
        e = a * means[i - 1] + b * means[i + 1] - means[i]
        c2 = a * a / counts[i - 1] + b * b / counts[i + 1] + 1.0 / counts[i]
        ss += e * e / c2
        dof += 1
    return (math.sqrt(ss / dof), dof) if dof else None


@dataclass(frozen=True)
class _ShapeFit:
    """The two-shape model's least-squares fit (see ``_shape_model``)."""

    grid: list[float]
    values: list[float]
    sd: float  # residual SD, two degrees of freedom taken off
    dof: int
    coef: tuple[float, float]  # (compute, memory) weights, >= 0
    gram: np.ndarray  # AᵀA of the design: the weights' covariance is sd² × its inverse


def _mix_grid(draw_w: float, lo: float, hi: float) -> list[float]:
    """Breakpoints of a mix of the two shapes on [lo, hi]."""
    knots = {lo, hi, *(p * draw_w for shape in PRIOR_SHAPES.values() for p, _ in shape)}
    return sorted(x for x in knots if lo <= x <= hi)


def _shape_model(
    pts: Sequence[tuple[float, float]], draw_w: float, lo: float, hi: float
) -> _ShapeFit:
    """Least squares over ``a * compute(x) + b * memory(x)``, ``a, b >= 0``.

    Two parameters pool every sample (where a free concave fit lets each
    sample set its own stretch of curve); a non-negative mix of two concave
    non-decreasing shapes is one too. Breakpoints on [lo, hi].
    """
    fc = _shape_fn(PRIOR_COMPUTE_BOUND, draw_w)
    fm = _shape_fn(PRIOR_MEMORY_BOUND, draw_w)
    a_mat = np.array([[fc(x), fm(x)] for x, _ in pts])
    y = np.array([y for _, y in pts])
    coef, _ = nnls(a_mat, y)
    res = y - a_mat @ coef
    dof = max(1, len(pts) - 2)
    sd = math.sqrt(float(res @ res) / dof)
    grid = _mix_grid(draw_w, lo, hi)
    return _ShapeFit(
        grid,
        [float(coef[0] * fc(x) + coef[1] * fm(x)) for x in grid],
        sd,
        dof,
        (float(coef[0]), float(coef[1])),
        a_mat.T @ a_mat,
    )


def _shape_explains(fit: _ShapeFit, noise: tuple[float, int] | None, mean_y: float) -> bool:
    """Whether the two-shape model explains the samples as well as their noise allows.

    An F test at ``SHAPE_TEST_LEVEL``: the model's residual variance against
    the model-free noise estimate, each with its own degrees of freedom. With
    the 4-8 samples a job usually has, both variances are rough, so a fixed
    ratio would throw out a right model far more often than 5 % of the time.
    A residual within ``SHAPE_ABS_TOL`` of the mean always passes.
    """
    if fit.sd <= SHAPE_ABS_TOL * mean_y:
        return True
    if noise is None or noise[0] <= 0.0:
        return False
    return (fit.sd / noise[0]) ** 2 <= _f_critical(fit.dof, noise[1])


@functools.lru_cache(maxsize=4096)
def _f_critical(dof: int, noise_dof: int) -> float:
    """The F test's critical ratio at ``SHAPE_TEST_LEVEL`` (degrees of freedom are
    small integers, and scipy's quantile costs about half a millisecond a call)."""
    return float(f_dist.ppf(SHAPE_TEST_LEVEL, dof, noise_dof))


def _readings(job: Job, default_w: float = math.inf) -> tuple[list[float], list[float]]:
    """The job's power readings the cap did not hold (W), and those it held (as a share of it)."""
    free: list[float] = []
    held: list[float] = []
    for s, unheld in zip(job.samples, _unheld(job, default_w), strict=True):
        if unheld:
            assert s.power_w is not None
            free.append(s.power_w)
        elif s.power_w is not None and s.cap_w is not None:
            held.append(s.power_w / s.cap_w)
    return free, held


def _draw_se(job: Job, fleet_jitter: float = 0.0, default_w: float = math.inf) -> float:
    """Standard error (W) of the unconstrained draw: the spread of the power
    readings the cap did not hold, over their square root; with fewer than two
    of them, the relative jitter of the readings the cap did hold (same
    sensor), else the fleet's (``fleet_jitter``, ``_fleet_jitter``): one reading
    does not show its own noise, and taking none would read it as exact."""
    free, held = _readings(job, default_w)
    if len(free) >= 2:
        return float(np.std(free, ddof=1) / math.sqrt(len(free)))
    if free and len(held) >= 2:
        return float(free[0] * np.std(held, ddof=1))
    if free:
        return free[0] * fleet_jitter
    return 0.0


def _fleet_noise(jobs: Sequence[Job]) -> tuple[float, int] | None:
    """Relative throughput noise pooled over every job's replicates (pure error
    about each x's mean, over that mean), and its degrees of freedom; None
    with fewer than ``FLEET_MIN_FITS``."""
    ss, dof = 0.0, 0
    for job in jobs:
        by_x: dict[float, list[float]] = {}
        for x, y in _aggregate_points(job)[0]:
            by_x.setdefault(x, []).append(y)
        job_ss, job_dof = _pure_ss(
            {x: list(np.divide(v, np.mean(v))) for x, v in by_x.items() if np.mean(v) > 0}
        )
        ss += job_ss
        dof += job_dof
    return (math.sqrt(ss / dof), dof) if dof >= FLEET_MIN_FITS else None


def _moderated(
    noise: tuple[float, int] | None, fleet_noise: tuple[float, int] | None, mean_y: float
) -> tuple[float, int] | None:
    """The job's noise SD moderated toward the fleet's (relative, ``fleet_noise``).

    A job's own estimate rests on a few degrees of freedom and is at times
    far too small by chance; its F test and margin would then be too strict
    and too small. The fleet's
    stands in for ``FLEET_NOISE_PRIOR_DOF`` more degrees of freedom (the
    moderated variance of Smyth, 2004).
    """
    if fleet_noise is None or noise is None:
        return noise
    d0 = FLEET_NOISE_PRIOR_DOF
    var = (d0 * (fleet_noise[0] * mean_y) ** 2 + noise[1] * noise[0] ** 2) / (d0 + noise[1])
    return math.sqrt(var), noise[1] + d0


def _fleet_jitter(jobs: Sequence[Job]) -> float:
    """Relative SD of one power reading, pooled over every job's replicates
    (unheld readings about their mean, held ones' share of the cap about theirs)."""
    ss, dof = 0.0, 0
    for job in jobs:
        free, held = _readings(job)
        for rel in (np.asarray(free) / np.mean(free) if free else np.array([]), np.asarray(held)):
            if len(rel) >= 2:
                ss += float(np.sum((rel - rel.mean()) ** 2))
                dof += len(rel) - 1
    return math.sqrt(ss / dof) if dof else 0.0


def _shape_slowdown(x: np.ndarray, w: float, draw_w: float) -> np.ndarray:
    """Slowdown at caps ``x`` of the mix with memory-bound share ``w``.

    Both shapes are 1 at the draw, so the curve's level cancels out of the
    slowdown and ``1 - ((1 - w) compute(x) + w memory(x))`` is all that is left:
    linear in ``w``, and falling with it (the memory-bound shape is never below
    the compute-bound one).
    """
    px = np.asarray(x, dtype=float) / draw_w
    fc = _relative_shape(PRIOR_COMPUTE_BOUND, px)
    fm = _relative_shape(PRIOR_MEMORY_BOUND, px)
    return np.asarray(1.0 - ((1.0 - w) * fc + w * fm), dtype=float)


def _relative_shape(shape: Sequence[tuple[float, float]], u: np.ndarray) -> np.ndarray:
    """Vectorised ``_shape_fn`` at caps given as shares ``u`` of the draw."""
    pu = np.array([p for p, _ in shape])
    py = np.array([r for _, r in shape])
    s0 = (py[1] - py[0]) / (pu[1] - pu[0])
    below = np.maximum(0.0, py[0] - s0 * (pu[0] - u))
    return np.asarray(np.where(u <= pu[0], below, np.interp(u, pu, py)), dtype=float)


def _memory_share(fit: _ShapeFit, sd: float) -> tuple[float, float] | None:
    """The fit's memory-bound share ``w = b / (a + b)`` and its SD.

    The SD follows by the delta method from the weights' covariance
    (``sd² (AᵀA)⁻¹``); it is infinite where the samples cannot tell the
    shapes apart (no mix is supported by them). None for a job that did no work.
    """
    a, b = fit.coef
    if a + b <= 0.0:
        return None
    w = b / (a + b)
    try:
        cov = sd * sd * np.linalg.inv(fit.gram)
    except np.linalg.LinAlgError:
        return w, math.inf
    grad = np.array([-b, a]) / (a + b) ** 2  # d w / d (a, b)
    return w, math.sqrt(max(0.0, float(grad @ cov @ grad)))


def _share_margin(
    w: float, w_sd: float, draw_w: float, draw_se: float, allowed: float, z: float
) -> float:
    """The slowdown margin of a mix with memory-bound share ``w`` (SD ``w_sd``),
    taken where the job's floor binds.

    What is uncertain in the slowdown is ``w`` and the draw the shapes are
    scaled to. Since the slowdown falls with ``w``, its one-sided bound at
    every cap at once is the slowdown at ``w - z × w_sd`` (not below 0: the
    compute-bound shape is the steepest the model admits). The draw's
    standard error adds in quadrature. The margin is taken at the lowest cap
    from which the bound stays within ``allowed``: the cap the capping
    model's tightened floor then allows, so the floor holds on the true curve
    with the confidence ``z`` stands for, in every objective.
    """
    if allowed <= 0.0:
        return 0.0
    if not math.isfinite(w_sd):
        return allowed
    w_lo = max(0.0, w - z * w_sd)
    x = np.linspace(_MARGIN_FROM * draw_w, draw_w, _MARGIN_CAPS)
    s_hat = _shape_slowdown(x, w, draw_w)
    dev = _shape_slowdown(x, w_lo, draw_w) - s_hat
    if draw_se > 0.0:
        h = _DRAW_STEP * draw_w
        ds = (_shape_slowdown(x, w, draw_w + h) - _shape_slowdown(x, w, draw_w - h)) / (2 * h)
        dev = np.sqrt(dev**2 + (z * ds * draw_se) ** 2)
    upper = s_hat + dev
    # the floor allows every cap above the lowest one it allows: the bound must hold on all
    bad = np.flatnonzero(upper > allowed + _EPS)
    first = int(bad[-1]) + 1 if len(bad) else 0
    if first >= len(x):  # pragma: no cover - at the draw the slowdown and its SD are 0
        return allowed
    return float(min(allowed, max(0.0, allowed - s_hat[first])))


def _shape_margin(
    fit: _ShapeFit, sd: float, draw_w: float, draw_se: float, allowed: float, z: float
) -> tuple[float, tuple[float, float] | None]:
    """A two-shape fit's slowdown margin (``_share_margin``) and its memory-bound share."""
    share = _memory_share(fit, sd)
    if share is None:
        return 0.0, None
    return _share_margin(*share, draw_w, draw_se, allowed, z), share


def _extend_above(
    xs: list[float], ys: list[float], draw_w: float, shape: Sequence[tuple[float, float]]
) -> tuple[list[float], list[float]]:
    """Points on (xs[-1], draw_w] where the job was never seen: the prior shape
    anchored at the highest sample, or the last fitted slope carried on if that
    is lower (the minimum of two concave continuations keeps the curve concave).
    """
    xt, yt = xs[-1], ys[-1]
    s_last = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2]) if len(xs) > 1 else 0.0
    r = _shape_fn(shape, draw_w)
    rt = r(xt)
    grid = sorted({draw_w, *[p * draw_w for p, _ in shape if xt < p * draw_w < draw_w]})
    out = []
    for x in grid:
        lin = yt + max(0.0, s_last) * (x - xt)
        pri = yt * r(x) / rt if rt > 0 else yt
        out.append(max(yt, min(lin, pri)))
    return grid, out


def _free_curve(
    gx: Sequence[float],
    gy: Sequence[float],
    lo: float,
    hi: float,
    free_draw: float | None,
    top_measured: float | None,
    shape: Sequence[tuple[float, float]],
) -> tuple[list[float], list[float], float, Curve]:
    """The free concave fit ``(gx, gy)`` (``concave_l1_fit``'s) as a curve on [lo, hi].

    Continued below and above the samples with the prior ``shape`` and flat
    above the draw. Returns its breakpoints, the draw (the measured one, else
    the highest reading ``top_measured``, else where the fit saturates) and the curve.
    """
    xs, ys = list(gx), list(gy)
    if lo < xs[0]:
        ext_draw = min(max(free_draw or (top_measured if top_measured is not None else hi), lo), hi)
        ex, ey = _extend_below(xs, ys, lo, ext_draw, shape)
        xs, ys = ex + xs, ey + ys
    if free_draw is not None and xs[-1] < min(free_draw, hi):
        ax, ay = _extend_above(xs, ys, min(free_draw, hi), shape)
        xs, ys = xs + ax, ys + ay
    if xs[-1] < hi:
        xs.append(hi)
        ys.append(ys[-1])
    # flat above the unconstrained draw
    fitted = Curve(*_simplify(xs, ys))
    if free_draw is not None:
        draw = free_draw
    else:
        draw = top_measured if top_measured is not None else fitted.saturation_w
    draw = min(max(draw, lo), hi)
    if draw < fitted.saturation_w:
        top = fitted.value(draw)
        keep = [(x, y) for x, y in zip(xs, ys, strict=True) if x < draw]
        tail_x = [draw, hi] if draw < hi else [draw]
        xs = [x for x, _ in keep] + tail_x
        ys = [y for _, y in keep] + [top] * len(tail_x)
    free = Curve(*_simplify(*_dedupe([float(x) for x in xs], [float(y) for y in ys])))
    return xs, ys, draw, free


def _passes_through(curve: Curve, pts: Sequence[tuple[float, float]], mean_y: float) -> bool:
    """Whether ``curve`` meets every sample (to 1e-9 of their mean throughput)."""
    return all(abs(curve.value(x) - y) <= 1e-9 * max(1.0, mean_y) for x, y in pts)


def fit_job_curve(
    job: Job,
    gpus: Sequence[Gpu],
    z: float = SLOWDOWN_Z,
    fleet_noise: tuple[float, int] | None = None,
) -> CurveFit:
    """Fit one job's curve over the cap range of its GPUs; ``gpus`` are the job's GPUs.

    ``z`` sets the one-sided confidence of the slowdown margin (1.645: 95 %).
    ``fleet_noise`` (relative SD, degrees of freedom; ``_fleet_noise``)
    moderates the job's own noise estimate, and stands in for it where a fit
    through every sample has no replicates to show it.

    * Fewer than ``MIN_DISTINCT_CAPS`` distinct x: the prior shape the
      evidence picks (``_choose_shape``), scaled to the samples; with two x
      read repeatedly, the two-shape model instead where its margin is smaller.
    * Otherwise the two-shape model where it explains the samples as well as
      their noise allows (an F test, ``_shape_explains``), else the free concave L1
      fit, continued below the lowest sample with the chosen prior shape.
    """
    lo = min(g.min_w for g in gpus)
    hi = max(g.max_w for g in gpus)
    default_w = max(g.default_w for g in gpus)
    pts, free_draw = _aggregate_points(job, default_w)
    measured = [s.power_w for s in job.samples if s.power_w is not None]
    if free_draw is None and measured:
        # every measured sample was held by its cap: the job wants at least the
        # highest of them, and at most its default cap; read it as the default
        # (the curve keeps rising to there, so no capping looks free on no evidence)
        free_draw = max(default_w, *(x for x, _ in pts))
    distinct = len({round(x, 6) for x, _ in pts})
    shape = _choose_shape(pts, free_draw, default_w, gpus[0].model)
    mean_y = sum(y for _, y in pts) / len(pts) if pts else 0.0
    noise = _moderated(_noise_sd(pts), fleet_noise, mean_y)
    margin = PRIOR_SLOWDOWN_MARGIN
    share: tuple[float, float] | None = None
    if distinct < MIN_DISTINCT_CAPS:
        draw = free_draw if free_draw is not None else (max(measured) if measured else default_w)
        draw = min(max(draw, lo), hi)
        xs, ys = _prior_curve(PRIOR_SHAPES[shape], draw, lo, hi, pts)
        method = "prior"
        margin = PRIOR_SLOWDOWN_MARGIN + _shape_gap(shape, draw, lo)
        if distinct == 2 and mean_y > 0 and noise is not None:
            # two caps, each read more than once (the snapshot's run means): the
            # ratio of their means sets the mix, the replicates its uncertainty.
            # This is how a job the optimizer has capped once starts to learn
            # its own curve instead of staying on the pessimistic prior.
            two = _shape_model(pts, draw, lo, hi)
            if _shape_explains(two, noise, mean_y):
                m, two_share = _shape_margin(
                    two,
                    max(noise[0], two.sd),
                    draw,
                    _draw_se(job, default_w=default_w),
                    job.allowed_slowdown,
                    z,
                )
                if m < margin:
                    xs, ys, method, margin = two.grid, two.values, "shape", m
                    share = two_share
    else:
        gx, gy, method = concave_l1_fit([x for x, _ in pts], [y for _, y in pts])
        xs, ys, draw, free = _free_curve(
            gx, gy, lo, hi, free_draw, max(measured) if measured else None, PRIOR_SHAPES[shape]
        )
        shape_fit = _shape_model(pts, draw, lo, hi)
        sx, sy, shape_sd = shape_fit.grid, shape_fit.values, shape_fit.sd
        # per-x share of the samples: what a free fit's value at one cap rests on
        per_x = len(pts) / distinct
        # a concave curve through every sample leaves nothing to smooth away: keep it,
        # unless the fleet's noise says the samples are noisier than that
        interpolates = _passes_through(free, pts, mean_y)
        borrowed = interpolates and fleet_noise is not None and _pure_error(pts) is None
        if borrowed:
            assert fleet_noise is not None
            noise = (fleet_noise[0] * mean_y, fleet_noise[1])
        sd = noise[0] if noise is not None else shape_sd
        testable = borrowed or not interpolates
        if mean_y > 0 and testable and _shape_explains(shape_fit, noise, mean_y):
            xs, ys, method = sx, sy, "shape"
            margin, share = _shape_margin(
                shape_fit,
                max(sd, shape_sd),
                draw,
                _draw_se(job, default_w=default_w),
                job.allowed_slowdown,
                z,
            )
            if share is not None and not math.isfinite(share[1]):
                # samples where the shapes agree (at or just above the draw) say
                # nothing below it: the prior, as for a job never capped, not an
                # infinite uncertainty that would pin the job at full throughput
                xs, ys = _prior_curve(PRIOR_SHAPES[shape], draw, lo, hi, pts)
                method, share = "prior", None
                margin = PRIOR_SLOWDOWN_MARGIN + _shape_gap(shape, draw, lo)
        elif mean_y > 0:
            # the free fit's own residuals, with the effective degrees of freedom
            # of a shape-restricted fit (one per breakpoint in the sample range;
            # Meyer and Woodroofe, 2000): the neighbour-difference noise estimate
            # would read a sharp bend between coarse caps as noise
            x_lo, x_hi = min(x for x, _ in pts), max(x for x, _ in pts)
            dof = len(pts) - sum(x_lo - 1e-9 <= x <= x_hi + 1e-9 for x in free.x_w)
            ss = sum((free.value(x) - y) ** 2 for x, y in pts)
            # a fit with no residual degrees of freedom left (or through every
            # sample) cannot judge its own noise: the replicates' pure error
            # stands in. Without replicates it is taken at face value: one mean
            # per cap cannot tell noise from a bend (neighbour differences read
            # a knee as noise, and the agent's per-cap means are nearly exact).
            if borrowed:
                free_sd = sd
            elif interpolates or dof <= 0:
                pure = _pure_error(pts)
                free_sd = pure[0] if pure else 0.0
            else:
                free_sd = math.sqrt(ss / dof)
            margin = z * free_sd / mean_y * math.sqrt(2.0 / per_x)
    curve = _concave_curve(xs, ys)
    return CurveFit(
        curve=curve,
        method=method,
        n_samples=len(pts),
        n_distinct_caps=distinct,
        rmse_rel=_rmse_rel(curve, pts),
        draw_w=float(draw),
        shape=shape,
        slowdown_margin=float(margin),
        memory_share=share,
    )


def _concave_curve(xs: Sequence[float], ys: Sequence[float]) -> Curve:
    xs2, ys2 = _dedupe([float(x) for x in xs], [float(y) for y in ys])
    curve = Curve(*_simplify(xs2, ys2))
    if not curve.is_concave(1e-6):
        # only a prior shape's zero clamp can bend it; re-fit the points as an LP
        gx, gy, _ = concave_l1_fit(list(curve.x_w), list(curve.y))
        curve = Curve(*_simplify(gx, gy))
    return curve


def _rmse_rel(curve: Curve, pts: Sequence[tuple[float, float]]) -> float | None:
    """RMSE over the samples relative to their mean throughput; None without."""
    mean_y = sum(y for _, y in pts) / len(pts) if pts else 0.0
    if mean_y <= 0:
        return None
    err = [curve.value(x) - y for x, y in pts]
    return float(math.sqrt(sum(e * e for e in err) / len(err)) / mean_y)


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


@dataclass(frozen=True)
class FleetShare:
    """The memory-bound share across one group of a fleet's jobs.

    A normal random-effects model: each job's share is drawn from
    ``N(mean, spread²)``, and its two-shape fit measures it with its own SD.
    ``spread`` is the between-job SD beyond what the fits' own noise explains,
    so it also carries how far the true curves stray from the two-shape model.
    """

    mean: float
    spread: float
    mean_se: float
    n_fits: int

    @property
    def predictive_sd(self) -> float:
        """SD of a new job's share: the spread and the mean's own error."""
        return math.sqrt(self.spread**2 + self.mean_se**2)

    def posterior(self, w: float, w_sd: float) -> tuple[float, float]:
        """One job's share given its own fit and the fleet's: the precision-weighted mean."""
        prior_var = self.predictive_sd**2
        if not math.isfinite(w_sd):
            return self.mean, self.predictive_sd
        if w_sd <= 0.0:
            return w, 0.0
        var = 1.0 / (1.0 / w_sd**2 + 1.0 / prior_var)
        return var * (w / w_sd**2 + self.mean / prior_var), math.sqrt(var)


def fleet_share(shares: Sequence[tuple[float, float]]) -> FleetShare | None:
    """The random-effects estimate (DerSimonian and Laird, 1986) over ``(w, SD)`` per fit.

    None with fewer than ``FLEET_MIN_FITS`` fits whose SD is finite: too few
    to say how far jobs differ.
    """
    ok = [(w, max(sd, 1e-6)) for w, sd in shares if math.isfinite(sd)]
    if len(ok) < FLEET_MIN_FITS:
        return None
    w = np.array([x for x, _ in ok])
    prec = 1.0 / np.array([sd for _, sd in ok]) ** 2
    fixed = float(prec @ w / prec.sum())
    q = float(prec @ (w - fixed) ** 2)
    denom = float(prec.sum() - (prec @ prec) / prec.sum())
    tau2 = max(0.0, (q - (len(ok) - 1)) / denom) if denom > 0 else 0.0
    prec_re = 1.0 / (1.0 / prec + tau2)
    mean = float(prec_re @ w / prec_re.sum())
    return FleetShare(mean, math.sqrt(tau2), math.sqrt(1.0 / float(prec_re.sum())), len(ok))


def _fleet_group(fit: CurveFit, gpus: Sequence[Gpu]) -> tuple[str, bool]:
    """Jobs that pool their shapes: one GPU model, and alike in how much of
    their power limit they use (the line the evidence rule draws, ``_choose_shape``)."""
    return _fleet_group_of(gpus, fit.draw_w)


def _pooled_fit(
    job: Job, gpus: Sequence[Gpu], fit: CurveFit, w: float, w_sd: float, jitter: float, z: float
) -> CurveFit:
    """``fit`` redone as the mix with memory-bound share ``w`` (SD ``w_sd``),
    scaled to the samples."""
    lo = min(g.min_w for g in gpus)
    hi = max(g.max_w for g in gpus)
    pts, _ = _aggregate_points(job, max(g.default_w for g in gpus))
    fc = _shape_fn(PRIOR_COMPUTE_BOUND, fit.draw_w)
    fm = _shape_fn(PRIOR_MEMORY_BOUND, fit.draw_w)

    def mix(x: float) -> float:
        return (1.0 - w) * fc(x) + w * fm(x)

    den = sum(mix(x) ** 2 for x, _ in pts)
    level = sum(y * mix(x) for x, y in pts) / den if den > 0 else 1.0
    grid = _mix_grid(fit.draw_w, lo, hi)
    curve = _concave_curve(grid, [level * mix(x) for x in grid])
    margin = _share_margin(
        w,
        w_sd,
        fit.draw_w,
        _draw_se(job, jitter, max(g.default_w for g in gpus)),
        job.allowed_slowdown,
        z,
    )
    return dataclasses.replace(
        fit,
        curve=curve,
        method="shape" if fit.method == "shape" else "fleet",
        rmse_rel=_rmse_rel(curve, pts),
        shape="memory" if w >= 0.5 else "compute",
        slowdown_margin=margin,
        memory_share=(w, w_sd),
    )


def _pool(
    problem: Problem, fits: dict[str, CurveFit], distinct: Sequence[CurveFit], z: float
) -> dict[str, CurveFit]:
    """Fleet pooling: every two-shape or prior fit borrows strength from its group.

    Fleets run many jobs of a kind, and a job seen at few caps says little
    about its shape alone. Per group (``_fleet_group``) with at least
    ``FLEET_MIN_FITS`` two-shape fits, a random-effects model of their shares
    (``fleet_share``) replaces a prior job's fixed shape with the group's
    predictive distribution, and a two-shape job's share with its posterior.
    The margin's bound then holds over the group's jobs (empirical Bayes) at
    the objective's confidence. ``distinct`` is one fit per distinct sample
    set, so replicas of one job do not count as many.
    """
    gpus = {job.id: [problem.gpu(g) for g in job.gpus] for job in problem.jobs}
    members: dict[int, tuple[str, bool]] = {}
    for job in problem.jobs:
        members.setdefault(id(fits[job.id]), _fleet_group(fits[job.id], gpus[job.id]))
    by_group: dict[tuple[str, bool], list[tuple[float, float]]] = {}
    for f in distinct:
        if f.method == "shape" and f.memory_share is not None:
            by_group.setdefault(members[id(f)], []).append(f.memory_share)
    shares = {g: fleet_share(v) for g, v in by_group.items()}
    jitter = _fleet_jitter(problem.jobs)
    out = dict(fits)
    for job in problem.jobs:
        f = fits[job.id]
        share = shares.get(members[id(f)])
        if share is None:
            continue
        if f.method == "shape" and f.memory_share is not None:
            w, w_sd = share.posterior(*f.memory_share)
        elif f.method == "prior":
            w, w_sd = share.mean, share.predictive_sd
        else:
            continue
        out[job.id] = _pooled_fit(job, gpus[job.id], f, w, w_sd, jitter, z)
    return out


# --- fitting a whole problem at once ------------------------------------------
#
# ``fit_job_curve`` and ``_pool`` define the fits job by job and stay their
# readable definition: ``_fit_curves_reference`` runs them, and the tests and
# ``bench/optimizer_scale.py`` hold ``fit_curves`` to it. ``fit_curves`` computes
# the same fits for all of a problem's jobs at once: the samples of the jobs
# with the same number of them as one array each (a ``_Bucket``, one row per
# job), and every statistic of the per-job code (the points, the shape the
# evidence picks, the noise, the two-shape model, its F test, the margins, the
# fleet's noise and jitter, fleet pooling, the curves' clean-up) as array
# operations over the rows, whose shapes are tables at the caps as shares of
# the draw. Python loops over the rows only to build the ``Curve`` objects.
# A row whose curve a free concave fit decides (``"exact"`` / ``"lp-l1"``: its
# L1 LP can have many optima, and HiGHS's choice among them is the
# definition), or that the arrays could read differently from the per-job
# code (two caps within rounding of each other, a sample with neither cap nor
# reading, no power reading at all), is fitted by ``fit_job_curve`` itself:
# the arrays take every decision of the per-job code as it does (to rounding:
# the same tests on numbers summed in another order), or leave the job to it.
# A model of the curves other than the two shapes (a new ``_ShapeFits``,
# ``_mix_basis`` and margin table) batches the same way.

# Knot shares of the two shapes together: a mix's breakpoints are these times its draw.
_MIX_SHARES: Final = np.array(sorted({p for s in PRIOR_SHAPES.values() for p, _ in s}))


def _margin_table() -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """At _share_margin's caps as shares of the draw: ``1 - compute`` and
    ``memory - compute``, and how much each changes from the draw a step down to
    a step up (the per-job code's central difference)."""
    u = np.linspace(_MARGIN_FROM, 1.0, _MARGIN_CAPS)

    def at(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        fc = _relative_shape(PRIOR_COMPUTE_BOUND, v)
        return 1.0 - fc, _relative_shape(PRIOR_MEMORY_BOUND, v) - fc

    (lift, gap), (lift_up, gap_up), (lift_dn, gap_dn) = (
        at(u / (1.0 + step)) for step in (0.0, _DRAW_STEP, -_DRAW_STEP)
    )
    return (lift, gap), (lift_up - lift_dn, gap_up - gap_dn)


_MARGIN_TABLE: Final = _margin_table()
# A row whose point sequence is off every concave curve by more than this share
# of its mean throughput (or 1) cannot pass through its samples: far above
# ``_passes_through``'s 1e-9, so that the rounding of the arrays cannot matter.
_OFF_CONCAVE: Final = 1e-6
# Caps closer than this may round to one (``round(x, 6)``) or not; such a row
# is left to the per-job code.
_CLOSE_CAPS: Final = 2e-6
# The two-shape model's columns must differ by more than this (1 - cos²): closer,
# its weights rest on rounding and the per-job model (``_shape_model``,
# ``_memory_share``) computes them.
_COLLINEAR: Final = 1e-6


@dataclass(frozen=True)
class _Bucket:
    """Distinct fits whose jobs have the same number of samples, one row each.

    Samples as ``(rows, samples)`` arrays, NaN where a sample has no cap or
    no reading; the GPUs' cap range per row.
    """

    rows: list[int]  # the fits' positions among the problem's distinct fits
    jobs: list[Job]
    gpus: list[list[Gpu]]
    y: np.ndarray
    cap: np.ndarray
    power: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    default: np.ndarray
    allowed: np.ndarray
    model_memory: np.ndarray  # the GPU model's table entry is the memory-bound shape

    @staticmethod
    def of(rows: list[int], jobs: list[Job], gpus: list[list[Gpu]]) -> _Bucket:
        fields = operator.attrgetter("throughput", "cap_w", "power_w")
        flat = [v for j in jobs for s in j.samples for v in fields(s)]
        v = np.array(flat, dtype=float).reshape(len(jobs), -1, 3)  # None reads as NaN
        return _Bucket(
            rows,
            jobs,
            gpus,
            v[:, :, 0],
            v[:, :, 1],
            v[:, :, 2],
            np.array([min(g.min_w for g in gs) for gs in gpus]),
            np.array([max(g.max_w for g in gs) for gs in gpus]),
            np.array([max(g.default_w for g in gs) for gs in gpus]),
            np.array([j.allowed_slowdown for j in jobs]),
            np.array([prior_for_model(gs[0].model) is PRIOR_MEMORY_BOUND for gs in gpus]),
        )

    def points(self, default: np.ndarray | float) -> _Points:
        """``_aggregate_points`` (and ``_unheld``) for every row."""
        has_p, has_c = ~np.isnan(self.power), ~np.isnan(self.cap)
        top = np.where(has_p, self.power, -np.inf).max(axis=1)
        top = np.where(has_p.any(axis=1), top, 0.0)
        with np.errstate(invalid="ignore"):
            below_cap = self.power < POWER_LIMITED_SHARE * self.cap
            at_default = self.cap >= np.asarray(default)[..., None] - _EPS
            near_top = self.power >= DRAW_SPREAD_SHARE * top[:, None]
        unheld = has_p & (~has_c | below_cap | at_default) & (~has_c | near_top)
        # the median of the unheld readings: np.median's two middle values, or one
        n = unheld.sum(axis=1)
        v = np.sort(np.where(unheld, self.power, np.inf), axis=1)
        ends = np.stack([np.maximum(n - 1, 0) // 2, np.minimum(n // 2, v.shape[1] - 1)], axis=1)
        mid = np.take_along_axis(v, ends, axis=1)
        draw = np.where(n > 0, (mid[:, 0] + mid[:, 1]) / 2, np.nan)
        x = np.where(unheld, draw[:, None], self.cap)
        return _Points(x, unheld, draw)

    def draw_se(self, unheld: np.ndarray, jitter: float) -> np.ndarray:
        """``_draw_se`` for every row, given its unheld samples."""
        has_p, has_c = ~np.isnan(self.power), ~np.isnan(self.cap)
        held = ~unheld & has_p & has_c
        free_sd, n_free, one = _masked_sd(self.power, unheld)
        held_sd, n_held, _ = _masked_sd(self.power / np.where(held, self.cap, 1.0), held)
        with np.errstate(invalid="ignore", divide="ignore"):
            many = free_sd / np.sqrt(n_free)
        single = one * np.where(n_held >= 2, held_sd, jitter)
        return np.where(n_free >= 2, many, np.where(n_free == 1, single, 0.0))

    def jitter_ss(self) -> tuple[np.ndarray, np.ndarray]:
        """Per row, ``_fleet_jitter``'s sum of squares and degrees of freedom."""
        unheld = self.points(math.inf).unheld
        held = ~unheld & ~np.isnan(self.power) & ~np.isnan(self.cap)
        _, n_free, one = _masked_sd(self.power, unheld)
        mean = np.where(n_free > 0, one / np.maximum(n_free, 1), 1.0)  # one: their sum
        rel_sd, _, _ = _masked_sd(self.power / mean[:, None], unheld)
        held_sd, n_held, _ = _masked_sd(self.power / np.where(held, self.cap, 1.0), held)
        ss = np.zeros(len(self.jobs))
        dof = np.zeros(len(self.jobs), dtype=int)
        for sd, n in ((rel_sd, n_free), (held_sd, n_held)):
            ok = n >= 2
            ss += np.where(ok, sd**2 * (n - 1), 0.0)
            dof += np.where(ok, n - 1, 0)
        return ss, dof


def _masked_sd(v: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row, the SD (``ddof=1``) of ``v`` where ``mask``, how many, and their sum."""
    n = mask.sum(axis=1)
    total = np.where(mask, v, 0.0).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = total / n
        ss = (np.where(mask, v - mean[:, None], 0.0) ** 2).sum(axis=1)
        sd = np.sqrt(ss / (n - 1))
    return sd, n, total


@dataclass(frozen=True)
class _Points:
    """A bucket's fitting points (``_aggregate_points``)."""

    x: np.ndarray  # (rows, samples) the sample's effective cap
    unheld: np.ndarray  # (rows, samples) it saw the job's unconstrained draw
    draw: np.ndarray  # (rows,) the measured unconstrained draw, NaN where never seen


@dataclass(frozen=True)
class _Groups:
    """Each row's points grouped by equal x (``by_x`` in the per-job code).

    ``(rows, samples)`` arrays, the groups in order of x, left-aligned: group
    ``k`` of a row is valid while ``k < n`` of the row.
    """

    n: np.ndarray  # (rows,) groups per row: the distinct x
    valid: np.ndarray
    x: np.ndarray
    count: np.ndarray
    mean: np.ndarray
    median: np.ndarray
    ss: np.ndarray  # sum of squares about the group's mean
    spread: np.ndarray  # highest minus lowest y
    rel_ss: np.ndarray  # sum of squares of y over the group's mean, about their mean

    @staticmethod
    def of(x: np.ndarray, y: np.ndarray) -> _Groups:
        rows, m = x.shape
        order = np.lexsort((y, x), axis=-1)
        xs, ys = np.take_along_axis(x, order, 1), np.take_along_axis(y, order, 1)
        new = np.ones((rows, m), dtype=bool)
        new[:, 1:] = xs[:, 1:] != xs[:, :-1]
        gid = np.cumsum(new, axis=1) - 1 + m * np.arange(rows)[:, None]

        def per_group(w: np.ndarray | None = None) -> np.ndarray:
            out = np.bincount(gid.ravel(), None if w is None else w.ravel(), rows * m)
            return out.reshape(rows, m)

        count = per_group().astype(int)
        valid = count > 0
        safe = np.maximum(count, 1)
        mean = per_group(ys) / safe
        flat_mean = mean.ravel()[gid]
        start = np.minimum(np.cumsum(count, axis=1) - count, m - 1)

        def at(k: np.ndarray) -> np.ndarray:
            return np.take_along_axis(ys, np.clip(k, 0, m - 1), 1)

        with np.errstate(invalid="ignore", divide="ignore"):
            rel = ys / flat_mean
        rel_mean = per_group(rel) / safe
        return _Groups(
            n=valid.sum(axis=1),
            valid=valid,
            x=np.take_along_axis(xs, start, 1),
            count=count,
            mean=mean,
            median=(at(start + (count - 1) // 2) + at(start + count // 2)) / 2,
            ss=per_group((ys - flat_mean) ** 2),
            spread=at(start + count - 1) - at(start),
            rel_ss=per_group((rel - rel_mean.ravel()[gid]) ** 2),
        )

    def noise_sd(self) -> tuple[np.ndarray, np.ndarray]:
        """``_noise_sd`` per row: the SD (NaN for None) and its degrees of freedom (0 for None)."""
        pure_ss = np.where(self.valid, self.ss, 0.0).sum(axis=1)
        pure_dof = np.where(self.valid, self.count - 1, 0).sum(axis=1)
        # each inner x against the line through its neighbours (Gasser et al.)
        xp, xm, xn = (self.x[:, k] for k in _thirds(self.x.shape[1]))
        cp, cm, cn = (np.maximum(self.count[:, k], 1) for k in _thirds(self.x.shape[1]))
        mp, mm, mn = (self.mean[:, k] for k in _thirds(self.x.shape[1]))
        inner = self.valid[:, 2:]
        with np.errstate(invalid="ignore", divide="ignore"):
            h = xn - xp
            a, b = (xn - xm) / h, (xm - xp) / h
            e = a * mp + b * mn - mm
            c2 = a * a / cp + b * b / cn + 1.0 / cm
            diff_ss = np.where(inner, e * e / c2, 0.0).sum(axis=1)
        pure_only = pure_dof >= np.maximum(2, self.n - 2)
        ss = np.where(pure_only, pure_ss, pure_ss + diff_ss)
        dof = np.where(pure_only, pure_dof, pure_dof + np.maximum(self.n - 2, 0))
        with np.errstate(invalid="ignore", divide="ignore"):
            sd = np.where(dof > 0, np.sqrt(ss / dof), np.nan)
        return sd, dof

    def medians_concave(self) -> np.ndarray:
        """Per row, whether the per-x medians are ``concave_l1_fit``'s exact optimum."""
        med = np.where(self.valid, self.median, 0.0)
        scale = np.maximum(1e-12, np.abs(med).max(axis=1))[:, None]
        with np.errstate(invalid="ignore", divide="ignore"):
            slope = (self.median[:, 1:] - self.median[:, :-1]) / (self.x[:, 1:] - self.x[:, :-1])
        falls = self.valid[:, 1:] & (slope < -1e-12 * scale)
        bends = self.valid[:, 2:] & ~(slope[:, 1:] <= slope[:, :-1] + 1e-12 * scale)
        low = np.where(self.valid, self.median, np.inf).min(axis=1)
        return np.asarray(~falls.any(axis=1) & ~bends.any(axis=1) & (low >= 0))

    def off_concave(self, tol: np.ndarray) -> np.ndarray:
        """Per row, whether no concave non-decreasing curve >= 0 comes within ``tol``
        of every sample: one x's samples differ, or its medians fall, or dip below
        the chord of their neighbours, or lie below 0, by more than that."""
        t = tol[:, None]
        differ = self.valid & (self.spread > t)
        below = self.valid & (self.median < -t)
        peak = np.fmax.accumulate(np.where(self.valid, self.median, -np.inf), axis=1)
        falls = self.valid[:, 1:] & (peak[:, :-1] - self.median[:, 1:] > t)
        xp, xm, xn = (self.x[:, k] for k in _thirds(self.x.shape[1]))
        mp, mm, mn = (self.median[:, k] for k in _thirds(self.x.shape[1]))
        with np.errstate(invalid="ignore", divide="ignore"):
            chord = ((xn - xm) * mp + (xm - xp) * mn) / (xn - xp)
        dips = self.valid[:, 2:] & (chord - mm > t)
        off = differ.any(axis=1) | below.any(axis=1) | falls.any(axis=1) | dips.any(axis=1)
        return np.asarray(off)


def _thirds(m: int) -> tuple[slice, slice, slice]:
    """Column slices of each group's left neighbour, itself and its right neighbour."""
    return slice(0, max(m - 2, 0)), slice(1, max(m - 1, 1)), slice(2, m)


@dataclass(frozen=True)
class _ShapeFits:
    """``_shape_model`` for every row of a bucket (without the breakpoints)."""

    coef: np.ndarray  # (rows, 2) compute, memory weights >= 0
    sd: np.ndarray
    dof: np.ndarray
    gram: np.ndarray  # (rows, 3): AᵀA's (0, 0), (0, 1), (1, 1)
    well_posed: np.ndarray  # the columns differ by more than _COLLINEAR

    @staticmethod
    def of(x: np.ndarray, y: np.ndarray, draw: np.ndarray) -> _ShapeFits:
        u = x / draw[:, None]
        fc = _relative_shape(PRIOR_COMPUTE_BOUND, u)
        fm = _relative_shape(PRIOR_MEMORY_BOUND, u)
        g00, g01, g11 = (fc * fc).sum(1), (fc * fm).sum(1), (fm * fm).sum(1)
        r0, r1 = (fc * y).sum(1), (fm * y).sum(1)
        det = g00 * g11 - g01 * g01
        well_posed = det > _COLLINEAR * g00 * g11
        # the non-negative least squares of two columns: the unconstrained
        # solution where both weights are >= 0, else the better of one column alone
        with np.errstate(invalid="ignore", divide="ignore"):
            a, b = (g11 * r0 - g01 * r1) / det, (g00 * r1 - g01 * r0) / det
            a1 = np.where(g00 > 0, np.maximum(0.0, r0 / g00), 0.0)
            b2 = np.where(g11 > 0, np.maximum(0.0, r1 / g11), 0.0)
        ss1 = ((y - a1[:, None] * fc) ** 2).sum(1)
        ss2 = ((y - b2[:, None] * fm) ** 2).sum(1)
        inside = well_posed & (a >= 0) & (b >= 0)
        one = ss1 <= ss2
        coef = np.stack(
            [
                np.where(inside, a, np.where(one, a1, 0.0)),
                np.where(inside, b, np.where(one, 0.0, b2)),
            ],
            axis=1,
        )
        res = y - (fc * coef[:, :1] + fm * coef[:, 1:])
        dof = np.full(len(y), max(1, x.shape[1] - 2))
        sd = np.sqrt((res * res).sum(1) / dof)
        return _ShapeFits(coef, sd, dof, np.stack([g00, g01, g11], axis=1), well_posed)

    def memory_share(self, sd: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``_memory_share`` per row: w, its SD, and whether there is one (a + b > 0)."""
        a, b = self.coef[:, 0], self.coef[:, 1]
        g00, g01, g11 = self.gram.T
        with np.errstate(invalid="ignore", divide="ignore"):
            w = b / (a + b)
            det = g00 * g11 - g01 * g01
            da, db = -b / (a + b) ** 2, a / (a + b) ** 2
            var = sd * sd * (da * da * g11 - 2 * da * db * g01 + db * db * g00) / det
        return w, np.sqrt(np.maximum(0.0, var)), a + b > 0.0


def _explains(
    sd: np.ndarray, dof: np.ndarray, noise_sd: np.ndarray, noise_dof: np.ndarray, mean_y: np.ndarray
) -> np.ndarray:
    """``_shape_explains`` per row; ``noise_dof`` 0 where there is no noise estimate."""
    small = sd <= SHAPE_ABS_TOL * mean_y
    test = ~small & (noise_dof > 0) & (noise_sd > 0.0)
    crit = np.full(len(sd), np.nan)
    if test.any():
        pairs = zip(dof[test].tolist(), noise_dof[test].tolist(), strict=True)
        crit[test] = [_f_critical(a, b) for a, b in pairs]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.asarray(small | (test & ((sd / noise_sd) ** 2 <= crit)))


def _share_margins(
    w: np.ndarray,
    w_sd: np.ndarray,
    draw: np.ndarray,
    draw_se: np.ndarray,
    allowed: np.ndarray,
    z: float,
) -> np.ndarray:
    """``_share_margin`` per row. Its caps as shares of the draw are one table
    for every row, and the slowdown there is ``1 - compute - w (memory - compute)``."""
    out = np.empty(len(w))
    for k in range(0, len(w), 2048):  # rows at a time: the (rows, caps) arrays stay in cache
        part = slice(k, k + 2048)
        out[part] = _share_margin_rows(
            w[part], w_sd[part], draw[part], draw_se[part], allowed[part], z
        )
    return out


def _share_margin_rows(
    w: np.ndarray,
    w_sd: np.ndarray,
    draw: np.ndarray,
    draw_se: np.ndarray,
    allowed: np.ndarray,
    z: float,
) -> np.ndarray:
    finite = np.isfinite(w_sd)
    w_lo = np.maximum(0.0, w - z * np.where(finite, w_sd, 0.0))
    lift, gap = _MARGIN_TABLE[0]
    s_hat = lift - w[:, None] * gap
    dev = (w - w_lo)[:, None] * gap
    # the slowdown's derivative by the draw, times the draw's SE and z
    d_lift, d_gap = _MARGIN_TABLE[1]
    with np.errstate(invalid="ignore", divide="ignore"):
        scale = z * draw_se / (2 * _DRAW_STEP * draw)
    ds = (d_lift - w[:, None] * d_gap) * scale[:, None]
    upper = s_hat + np.where((draw_se > 0.0)[:, None], np.sqrt(dev * dev + ds * ds), dev)
    bad = upper > (allowed + _EPS)[:, None]
    n = bad.shape[1]
    first = np.where(bad.any(axis=1), n - np.argmax(bad[:, ::-1], axis=1), 0)
    at = np.take_along_axis(s_hat, np.minimum(first, n - 1)[:, None], 1)[:, 0]
    margin = np.where(first >= n, allowed, np.minimum(allowed, np.maximum(0.0, allowed - at)))
    return np.where(allowed <= 0.0, 0.0, np.where(finite, margin, allowed))


def _shape_gaps(draw: np.ndarray, lo: np.ndarray) -> np.ndarray:
    """``_shape_gap`` of the memory-bound shape per row."""
    x = np.linspace(np.minimum(lo, draw), draw, 65, axis=1)
    u = x / draw[:, None]
    gap = _relative_shape(PRIOR_MEMORY_BOUND, u) - _relative_shape(PRIOR_COMPUTE_BOUND, u)
    return np.asarray(np.maximum(0.0, gap.max(axis=1)))


def _mix_basis(draw: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, ...]:
    """Per row, ``_mix_grid``'s candidate breakpoints (lo, hi and every knot share
    times the draw) and the two shapes there."""
    x = np.column_stack([lo, hi, _MIX_SHARES[None, :] * draw[:, None]])
    u = x / draw[:, None]
    return x, _relative_shape(PRIOR_COMPUTE_BOUND, u), _relative_shape(PRIOR_MEMORY_BOUND, u)


def _mix_curve(x: list[float], v: list[float], lo: float, hi: float) -> Curve:
    """The curve through ``_mix_basis``'s candidates on [lo, hi] (``_mix_grid``)."""
    pts = sorted({a: b for a, b in zip(x, v, strict=True) if lo <= a <= hi}.items())
    return _concave_curve([a for a, _ in pts], [b for _, b in pts])


def _mix_curves(
    x: np.ndarray, v: np.ndarray, lo: np.ndarray, hi: np.ndarray, px: np.ndarray, py: np.ndarray
) -> tuple[list[Curve], list[float | None]]:
    """``_mix_curve`` for every row of candidates ``(x, v)``, and the curve's
    ``_rmse_rel`` at the row's points ``(px, py)``.

    What ``_concave_curve`` does to the candidates on [lo, hi] in order, as
    array operations: clamp them (``_simplify``), drop a point collinear with
    its neighbours (the knot where a mix's linear continuation below its
    lowest share meets the shapes), check the rest is concave. A row where
    it would do more (merge points within 1e-9, or collinear points in a
    row, or re-fit a bend) goes through ``_mix_curve``.
    """
    k = x.shape[1]
    xs = np.where((x >= lo[:, None]) & (x <= hi[:, None]), x, np.inf)
    order = np.argsort(xs, axis=1, kind="stable")
    xs, vs = np.take_along_axis(xs, order, 1), np.take_along_axis(v, order, 1)
    keep = np.isfinite(xs)
    keep[:, :-1] &= ~(xs[:, 1:] == xs[:, :-1])  # equal x: one point (of equal values)
    xs, vs, n = _left(keep, xs, vs)
    valid = np.arange(k)[None, :] < n[:, None]
    ys = np.maximum.accumulate(np.where(valid & (vs > 0.0), vs, 0.0), axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        slope = (ys[:, 1:] - ys[:, :-1]) / (xs[:, 1:] - xs[:, :-1])
        across = (ys[:, 2:] - ys[:, :-2]) / (xs[:, 2:] - xs[:, :-2])
        close = valid[:, 1:] & (xs[:, 1:] - xs[:, :-1] <= 1e-9)
        # point j + 1 collinear with its neighbours; after it is dropped, _simplify
        # tests the next point against the slope across the gap
        drop = valid[:, 2:] & _collinear(slope[:, :-1], slope[:, 1:])
        again = drop[:, :-1] & valid[:, 3:] & _collinear(across[:, :-1], slope[:, 2:])
    other = (n == 0) | close.any(axis=1) | (drop[:, 1:] & drop[:, :-1]).any(axis=1)
    other |= again.any(axis=1)
    keep = valid.copy()
    keep[:, 1:-1] &= ~drop
    xs, ys, n = _left(keep, xs, ys)
    valid = np.arange(k)[None, :] < n[:, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        slope = (ys[:, 1:] - ys[:, :-1]) / (xs[:, 1:] - xs[:, :-1])
        seg = valid[:, 1:]
        scale = np.where(seg, np.abs(slope), 0.0).max(axis=1, initial=0.0)
        scale = np.where(scale > 0.0, scale, 1.0)[:, None]  # Curve.is_concave's
        falls = seg & (slope < -1e-6 * scale)
        rises = valid[:, 2:] & ~(slope[:, 1:] <= slope[:, :-1] + 1e-6 * scale)
    other |= falls.any(axis=1) | rises.any(axis=1)  # not concave: re-fitted
    rmse = _rmse_rows(xs, ys, n, px, py)
    curves: list[Curve] = []
    rmses: list[float | None] = []
    rows = zip(xs.tolist(), ys.tolist(), n.tolist(), rmse.tolist(), strict=True)
    for r, (cx, cy, m, e) in enumerate(rows):
        if other[r]:
            curve = _mix_curve(x[r].tolist(), v[r].tolist(), float(lo[r]), float(hi[r]))
            curves.append(curve)
            pts = list(zip(px[r].tolist(), py[r].tolist(), strict=True))
            rmses.append(_rmse_rel(curve, pts))
        else:
            curves.append(Curve(tuple(cx[:m]), tuple(cy[:m])))
            rmses.append(None if math.isnan(e) else e)
    return curves, rmses


def _collinear(s_prev: np.ndarray, s_new: np.ndarray) -> np.ndarray:
    """``_simplify``'s test that two slopes are one."""
    return np.asarray(np.abs(s_prev - s_new) <= 1e-9 * np.maximum(1.0, np.abs(s_prev)))


def _left(keep: np.ndarray, *arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    """Each row's entries where ``keep``, moved to its front in order; and how many."""
    order = np.argsort(~keep, axis=1, kind="stable")
    return (*(np.take_along_axis(a, order, 1) for a in arrays), keep.sum(axis=1))


def _rmse_rows(
    xs: np.ndarray, ys: np.ndarray, n: np.ndarray, px: np.ndarray, py: np.ndarray
) -> np.ndarray:
    """``_rmse_rel`` per row of the curve through its first ``n`` breakpoints
    ``(xs, ys)``, read as ``Curve.value`` reads it; NaN where it is None."""
    k = xs.shape[1]
    valid = np.arange(k)[None, :] < n[:, None]
    i = (valid[:, None, :] & (xs[:, None, :] <= px[:, :, None])).sum(axis=2) - 1
    i = np.clip(i, 0, np.maximum(n - 2, 0)[:, None])
    j = np.minimum(i + 1, k - 1)
    x0, x1 = np.take_along_axis(xs, i, 1), np.take_along_axis(xs, j, 1)
    y0, y1 = np.take_along_axis(ys, i, 1), np.take_along_axis(ys, j, 1)
    last = np.maximum(n - 1, 0)[:, None]
    x_end, y_end = np.take_along_axis(xs, last, 1), np.take_along_axis(ys, last, 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        between = y0 + (px - x0) / (x1 - x0) * (y1 - y0)
    value = np.where(px <= xs[:, :1], ys[:, :1], np.where(px >= x_end, y_end, between))
    m = py.shape[1]
    mean_y = py.sum(axis=1) / m
    with np.errstate(invalid="ignore", divide="ignore"):
        rmse = np.sqrt(((value - py) ** 2).sum(axis=1) / m) / mean_y
    return np.where(mean_y > 0, rmse, np.nan)


# A fit's method in the arrays: the prior, the two-shape model, left to
# fit_job_curve (in a bucket), or a free concave fit (after it).
_PRIOR, _SHAPE, _REFERENCE, _FREE = 0, 1, 2, 3


@dataclass(frozen=True)
class _BucketFits:
    """A bucket's fits before pooling: ``method`` per row (``_PRIOR``, ``_SHAPE``,
    or ``_REFERENCE``: left to ``fit_job_curve``, whose fit is in ``reference``)."""

    method: np.ndarray
    draw: np.ndarray
    memory: np.ndarray  # the evidence picks the memory-bound prior shape
    margin: np.ndarray
    share: np.ndarray  # (rows, 2) w and its SD; NaN where there is none
    coef: np.ndarray
    distinct: np.ndarray
    points: _Points
    reference: dict[int, CurveFit]


def _fit_bucket(b: _Bucket, z: float, fleet_noise: tuple[float, int] | None) -> _BucketFits:
    """``fit_job_curve`` for every row of ``b`` that ends on a prior or two-shape fit."""
    rows, m = b.y.shape
    y = b.y
    pts = b.points(b.default)
    g = _Groups.of(pts.x, y)
    distinct = g.n
    refer = np.isnan(pts.x).any(axis=1)  # a sample with neither cap nor reading
    with np.errstate(invalid="ignore"):
        refer |= (g.valid[:, 1:] & (g.x[:, 1:] - g.x[:, :-1] < _CLOSE_CAPS)).any(axis=1)
    has_p = ~np.isnan(b.power)
    measured = has_p.any(axis=1)
    top_measured = np.where(has_p, b.power, -np.inf).max(axis=1)
    x_top = np.where(np.isnan(pts.x), -np.inf, pts.x).max(axis=1)
    # every measured sample held by its cap: the default (see fit_job_curve)
    free_draw = np.where(np.isnan(pts.draw) & measured, np.maximum(b.default, x_top), pts.draw)
    seen = ~np.isnan(free_draw)
    mean_y = y.sum(axis=1) / m

    # the prior shape the evidence picks (_choose_shape)
    d = np.where(seen, free_draw, x_top)
    sse = []
    for shape in (PRIOR_COMPUTE_BOUND, PRIOR_MEMORY_BOUND):
        r = _relative_shape(shape, pts.x / d[:, None])
        den = (r * r).sum(1)
        k = np.divide((r * y).sum(1), den, out=np.zeros(rows), where=den > 0)
        sse.append(((y - k[:, None] * r) ** 2).sum(1))
    by_draw = (seen & (free_draw <= MEMORY_BOUND_DRAW_SHARE * b.default)) | b.model_memory
    memory = np.where(distinct >= 2, sse[1] < sse[0], by_draw)

    # the job's own noise, moderated toward the fleet's (_moderated)
    noise_sd, noise_dof = g.noise_sd()
    if fleet_noise is not None:
        d0 = FLEET_NOISE_PRIOR_DOF
        var = (d0 * (fleet_noise[0] * mean_y) ** 2 + noise_dof * noise_sd**2) / (d0 + noise_dof)
        noise_sd = np.where(noise_dof > 0, np.sqrt(var), np.nan)
        noise_dof = np.where(noise_dof > 0, noise_dof + d0, 0)

    prior = distinct < MIN_DISTINCT_CAPS
    refer |= ~prior & ~seen  # the free fit's saturation is the draw
    draw = np.minimum(np.maximum(np.where(seen, free_draw, b.default), b.lo), b.hi)
    two = _ShapeFits.of(pts.x, y, draw)
    two_shape = prior & (distinct == 2) & (mean_y > 0) & (noise_dof > 0)
    # samples that hardly tell the shapes apart (every cap near the draw): the
    # weights and their SD rest on rounding, so the per-job model computes them
    ill: dict[int, _ShapeFit] = {}
    for i in np.flatnonzero(~two.well_posed & (~prior | two_shape) & ~refer).tolist():
        row_pts = list(zip(pts.x[i].tolist(), y[i].tolist(), strict=True))
        ill[i] = fit = _shape_model(row_pts, float(draw[i]), float(b.lo[i]), float(b.hi[i]))
        two.coef[i], two.sd[i] = fit.coef, fit.sd
        two.gram[i] = fit.gram[0, 0], fit.gram[0, 1], fit.gram[1, 1]

    # many caps: does the free concave fit pass through every sample? Where its
    # medians are the exact optimum, the per-job code answers; where they are
    # not, the samples being off every concave curve answers no; else its LP would
    interpolates = np.zeros(rows, dtype=bool)
    exact = g.medians_concave()
    off = g.off_concave(_OFF_CONCAVE * np.maximum(1.0, mean_y))
    refer |= ~prior & ~exact & ~off
    for i in np.flatnonzero(~prior & ~refer & exact & ~off).tolist():
        n = int(g.n[i])
        row_pts = list(zip(pts.x[i].tolist(), y[i].tolist(), strict=True))
        shape = PRIOR_SHAPES["memory" if memory[i] else "compute"]
        top = float(top_measured[i]) if measured[i] else None
        gx, gy = g.x[i, :n].tolist(), g.median[i, :n].tolist()
        lo, hi = float(b.lo[i]), float(b.hi[i])
        _, _, _, free = _free_curve(gx, gy, lo, hi, float(free_draw[i]), top, shape)
        interpolates[i] = _passes_through(free, row_pts, float(mean_y[i]))
    borrowed = interpolates & (fleet_noise is not None) & (g.n == m)  # no replicates
    if fleet_noise is not None:
        use_sd = np.where(borrowed, fleet_noise[0] * mean_y, noise_sd)
        use_dof = np.where(borrowed, fleet_noise[1], noise_dof)
    else:
        use_sd, use_dof = noise_sd, noise_dof
    testable = borrowed | ~interpolates
    many_shape = (
        ~prior & (mean_y > 0) & testable & _explains(two.sd, two.dof, use_sd, use_dof, mean_y)
    )
    refer |= ~prior & ~many_shape  # the free fit is the curve

    # few caps: the prior, or the two-shape model where its margin is smaller
    gap = np.zeros(rows)
    mem_prior = prior & memory
    if mem_prior.any():
        gap[mem_prior] = _shape_gaps(draw[mem_prior], b.lo[mem_prior])
    margin = PRIOR_SLOWDOWN_MARGIN + gap
    two_shape &= _explains(two.sd, two.dof, noise_sd, noise_dof, mean_y)

    sd = np.where(prior, noise_sd, np.where(use_dof > 0, use_sd, two.sd))
    w, w_sd, has_share = two.memory_share(np.maximum(sd, two.sd))
    for i, fit in ill.items():
        one = _memory_share(fit, max(float(sd[i]), fit.sd))
        has_share[i] = one is not None
        if one is not None:
            w[i], w_sd[i] = one
    # a shape fit whose share the samples cannot identify (they lie where the shapes
    # agree, at or above the draw): the per-job code falls back to the prior
    unidentified = many_shape & has_share & ~np.isfinite(w_sd)
    refer |= unidentified
    shape_margin = np.zeros(rows)
    take = (many_shape | two_shape) & ~refer
    if take.any():
        se = b.draw_se(pts.unheld, 0.0)
        ok = take & has_share
        shape_margin[ok] = _share_margins(w[ok], w_sd[ok], draw[ok], se[ok], b.allowed[ok], z)
    take &= many_shape | (shape_margin < margin)
    method = np.where(refer, _REFERENCE, np.where(take, _SHAPE, _PRIOR))
    share = np.where((take & has_share)[:, None], np.stack([w, w_sd], axis=1), np.nan)
    margin = np.where(take, shape_margin, margin)
    return _BucketFits(method, draw, memory, margin, share, two.coef, distinct, pts, {})


class _FitKey(NamedTuple):
    """Jobs with equal keys have equal fits (fleets run many replicas of one job)."""

    samples: tuple[Sample, ...]
    allowed: float  # the slowdown margin is taken where the floor binds
    min_w: float
    max_w: float
    default_w: float
    model: str


def _fit_key(job: Job, gpus: Sequence[Gpu]) -> _FitKey:
    return _FitKey(
        job.samples,
        job.allowed_slowdown,
        min(g.min_w for g in gpus),
        max(g.max_w for g in gpus),
        max(g.default_w for g in gpus),
        gpus[0].model,
    )


def _buckets_noise(buckets: Sequence[_Bucket], mult: Sequence[int]) -> tuple[float, int] | None:
    """``_fleet_noise`` over every job: each bucket row counts for its jobs."""
    ss, dof = 0.0, 0
    for b in buckets:
        g = _Groups.of(b.points(math.inf).x, b.y)
        ok = g.valid & (g.mean > 0)
        k = np.array([mult[r] for r in b.rows])
        ss += float(k @ np.where(ok, g.rel_ss, 0.0).sum(axis=1))
        dof += int(k @ np.where(ok, g.count - 1, 0).sum(axis=1))
    return (math.sqrt(ss / dof), dof) if dof >= FLEET_MIN_FITS else None


def _buckets_jitter(buckets: Sequence[_Bucket], mult: Sequence[int]) -> float:
    """``_fleet_jitter`` over every job: each bucket row counts for its jobs."""
    ss, dof = 0.0, 0
    for b in buckets:
        k = np.array([mult[r] for r in b.rows])
        row_ss, row_dof = b.jitter_ss()
        ss += float(k @ row_ss)
        dof += int(k @ row_dof)
    return math.sqrt(ss / dof) if dof else 0.0


@dataclass(frozen=True)
class _Pooling:
    """What fleet pooling reads of every distinct fit, and what it chooses (``_pool``)."""

    method: np.ndarray  # _PRIOR, _SHAPE or _FREE (a free concave fit: pooling leaves it)
    draw: np.ndarray
    share: np.ndarray  # (fits, 2) the memory-bound share and its SD; NaN where none
    pooled: np.ndarray  # (fits, 2) the share and SD the fit is redone with; NaN where not

    @staticmethod
    def of(
        buckets: Sequence[_Bucket],
        fitted: Sequence[_BucketFits],
        fits: Sequence[CurveFit | None],
        keys: Sequence[_FitKey],
        pool: bool,
    ) -> _Pooling:
        """``fits`` holds the fits of jobs without samples, the buckets the others."""
        n = len(keys)
        method = np.full(n, _FREE)
        draw = np.zeros(n)
        share = np.full((n, 2), np.nan)

        def put(r: int, f: CurveFit) -> None:
            method[r] = {"prior": _PRIOR, "shape": _SHAPE}.get(f.method, _FREE)
            draw[r] = f.draw_w
            if f.memory_share is not None:
                share[r] = f.memory_share

        for r, f in enumerate(fits):
            if f is not None:
                put(r, f)
        for b, bf in zip(buckets, fitted, strict=True):
            method[b.rows], draw[b.rows], share[b.rows] = bf.method, bf.draw, bf.share
            for i, f in bf.reference.items():
                put(b.rows[i], f)
        pooled = np.full((n, 2), np.nan)
        if pool:
            _pool_shares(method, draw, share, keys, pooled)
        return _Pooling(method, draw, share, pooled)


def _pool_shares(
    method: np.ndarray,
    draw: np.ndarray,
    share: np.ndarray,
    keys: Sequence[_FitKey],
    pooled: np.ndarray,
) -> None:
    """``_pool``'s choice into ``pooled``: per group (``_fleet_group``) with enough
    two-shape fits, a two-shape fit's posterior share, a prior's the predictive."""
    models: dict[str, int] = {}
    model = np.array([models.setdefault(k.model, len(models)) for k in keys], dtype=int)
    default = np.array([k.default_w for k in keys])
    group = 2 * model + (draw <= MEMORY_BOUND_DRAW_SHARE * default)
    two_shape = (method == _SHAPE) & ~np.isnan(share[:, 0])
    for g in np.unique(group[two_shape]).tolist():
        members = group == g
        own = np.flatnonzero(members & two_shape)
        fs = fleet_share([(w, sd) for w, sd in share[own].tolist()])
        if fs is None:
            continue
        for r, (w, sd) in zip(own.tolist(), share[own].tolist(), strict=True):
            pooled[r] = fs.posterior(w, sd)
        pooled[members & (method == _PRIOR)] = (fs.mean, fs.predictive_sd)


def _fleet_group_of(gpus: Sequence[Gpu], draw_w: float) -> tuple[str, bool]:
    """``_fleet_group`` of a fit with draw ``draw_w``."""
    default_w = max(g.default_w for g in gpus)
    return gpus[0].model, draw_w <= MEMORY_BOUND_DRAW_SHARE * default_w


def _pooled_curves(
    b: _Bucket,
    bf: _BucketFits,
    sel: np.ndarray,
    w: np.ndarray,
    w_sd: np.ndarray,
    draw: np.ndarray,
    jitter: float,
    z: float,
) -> list[tuple[Curve, float | None, float]]:
    """``_pooled_fit``'s curve, its RMSE and the margin for rows ``sel`` of a bucket,
    with shares ``w``."""
    x, y, lo, hi = bf.points.x[sel], b.y[sel], b.lo[sel], b.hi[sel]
    u = x / draw[:, None]
    fc_x, fm_x = _relative_shape(PRIOR_COMPUTE_BOUND, u), _relative_shape(PRIOR_MEMORY_BOUND, u)
    mix = (1.0 - w)[:, None] * fc_x + w[:, None] * fm_x
    den = (mix * mix).sum(axis=1)
    level = np.divide((y * mix).sum(axis=1), den, out=np.ones(len(sel)), where=den > 0)
    cand, fc, fm = _mix_basis(draw, lo, hi)
    values = level[:, None] * ((1.0 - w)[:, None] * fc + w[:, None] * fm)
    se = b.draw_se(bf.points.unheld, jitter)[sel]
    margins = _share_margins(w, w_sd, draw, se, b.allowed[sel], z).tolist()
    curves, rmse = _mix_curves(cand, values, lo, hi, x, y)
    return list(zip(curves, rmse, margins, strict=True))


def _bucket_fits(
    b: _Bucket,
    bf: _BucketFits,
    fits: list[CurveFit | None],
    pooled_curves: dict[int, tuple[Curve, float | None, float]],
    pooling: _Pooling,
) -> None:
    """Every row's final ``CurveFit`` into ``fits``: pooled, the per-job code's, or the bucket's."""
    m = b.y.shape[1]
    draw = bf.draw.tolist()
    distinct = bf.distinct.tolist()
    lo, hi = b.lo.tolist(), b.hi.tolist()
    todo = [i for i in range(len(b.rows)) if i not in pooled_curves and i not in bf.reference]
    shapes = [i for i in todo if bf.method[i] == _SHAPE]
    mixes: dict[int, tuple[Curve, float | None]] = {}
    if shapes:
        s = np.array(shapes)
        cand, fc, fm = _mix_basis(bf.draw[s], b.lo[s], b.hi[s])
        values = bf.coef[s, :1] * fc + bf.coef[s, 1:] * fm
        fitted = _mix_curves(cand, values, b.lo[s], b.hi[s], bf.points.x[s], b.y[s])
        mixes = dict(zip(shapes, zip(*fitted, strict=True), strict=True))
    for i, r in enumerate(b.rows):
        ref = bf.reference.get(i)
        if ref is not None and i not in pooled_curves:
            fits[r] = ref
            continue
        shape = "memory" if bf.memory[i] else "compute"
        if i in pooled_curves:
            curve, rmse, margin = pooled_curves[i]
            w, w_sd = pooling.pooled[r].tolist()
            fits[r] = CurveFit(
                curve=curve,
                method="shape" if pooling.method[r] == _SHAPE else "fleet",
                n_samples=ref.n_samples if ref is not None else m,
                n_distinct_caps=ref.n_distinct_caps if ref is not None else distinct[i],
                rmse_rel=rmse,
                draw_w=float(pooling.draw[r]),
                shape="memory" if w >= 0.5 else "compute",
                slowdown_margin=margin,
                memory_share=(w, w_sd),
            )
            continue
        share: tuple[float, float] | None = None
        if i in mixes:
            curve, rmse = mixes[i]
            method = "shape"
            w, w_sd = bf.share[i].tolist()
            share = None if math.isnan(w) else (w, w_sd)
        else:
            pts = list(zip(bf.points.x[i].tolist(), b.y[i].tolist(), strict=True))
            xs, ys = _prior_curve(PRIOR_SHAPES[shape], draw[i], lo[i], hi[i], pts)
            curve = _concave_curve(xs, ys)
            rmse = _rmse_rel(curve, pts)
            method = "prior"
        fits[r] = CurveFit(
            curve=curve,
            method=method,
            n_samples=m,
            n_distinct_caps=distinct[i],
            rmse_rel=rmse,
            draw_w=draw[i],
            shape=shape,
            slowdown_margin=float(bf.margin[i]),
            memory_share=share,
        )


def _fit_curves_reference(problem: Problem, pool: bool = True) -> dict[str, CurveFit]:
    """``fit_curves`` job by job: ``fit_job_curve`` per distinct fit, then ``_pool``.

    The readable definition of the fits, kept as the reference the tests and
    ``bench/optimizer_scale.py`` hold the batched ``fit_curves`` to (and time it against).
    """
    z = float(norm.ppf(problem.objective.slowdown_confidence))
    noise = _fleet_noise(problem.jobs) if pool else None
    out: dict[str, CurveFit] = {}
    cache: dict[_FitKey, CurveFit] = {}
    for job in problem.jobs:
        gs = [problem.gpu(g) for g in job.gpus]
        key = _fit_key(job, gs)
        fit = cache.get(key)
        if fit is None:
            fit = fit_job_curve(job, gs, z, noise)
            cache[key] = fit
        out[job.id] = fit
    return _pool(problem, out, list(cache.values()), z) if pool else out


def fit_curves(problem: Problem, pool: bool = True) -> dict[str, CurveFit]:
    """A fitted curve for every job, by job id.

    Jobs with identical samples on the same GPU models and cap ranges share
    one fit (fleets run many replicas of one job). The slowdown margins hold
    with the problem's ``objective.slowdown_confidence``. With ``pool``,
    jobs of a kind pool their shapes across the fleet (``_pool``). The fits
    are ``fit_job_curve``'s and ``_pool``'s, computed for all jobs at once
    (see "fitting a whole problem at once" above).
    """
    z = float(norm.ppf(problem.objective.slowdown_confidence))
    index: dict[_FitKey, int] = {}
    firsts: list[tuple[Job, list[Gpu]]] = []
    mult: list[int] = []
    row_of: list[int] = []
    for job in problem.jobs:
        gs = [problem.gpu(g) for g in job.gpus]
        r = index.setdefault(_fit_key(job, gs), len(firsts))
        if r == len(firsts):
            firsts.append((job, gs))
            mult.append(0)
        mult[r] += 1
        row_of.append(r)
    by_m: dict[int, list[int]] = {}
    for r, (job, _) in enumerate(firsts):
        by_m.setdefault(len(job.samples), []).append(r)
    buckets = [
        _Bucket.of(rs, [firsts[r][0] for r in rs], [firsts[r][1] for r in rs])
        for m, rs in sorted(by_m.items())
        if m > 0
    ]
    noise = _buckets_noise(buckets, mult) if pool else None
    fits: list[CurveFit | None] = [None] * len(firsts)
    for r in by_m.get(0, []):  # no samples: one prior, however many such jobs
        fits[r] = fit_job_curve(*firsts[r], z, noise)
    fitted = [_fit_bucket(b, z, noise) for b in buckets]
    for b, bf in zip(buckets, fitted, strict=True):
        for i in np.flatnonzero(bf.method == _REFERENCE).tolist():
            bf.reference[i] = fit_job_curve(b.jobs[i], b.gpus[i], z, noise)
    pooling = _Pooling.of(buckets, fitted, fits, list(index), pool)
    redone = ~np.isnan(pooling.pooled[:, 0])
    jitter = _buckets_jitter(buckets, mult) if redone.any() else 0.0
    for r in by_m.get(0, []):
        f = fits[r]
        if f is not None and redone[r]:
            w, w_sd = pooling.pooled[r].tolist()
            fits[r] = _pooled_fit(*firsts[r], f, w, w_sd, jitter, z)
    for b, bf in zip(buckets, fitted, strict=True):
        rows = np.array(b.rows)
        sel = np.flatnonzero(redone[rows])
        curves: dict[int, tuple[Curve, float | None, float]] = {}
        if len(sel):
            w, w_sd = pooling.pooled[rows[sel]].T
            pooled_rows = _pooled_curves(b, bf, sel, w, w_sd, pooling.draw[rows[sel]], jitter, z)
            curves = dict(zip(sel.tolist(), pooled_rows, strict=True))
        _bucket_fits(b, bf, fits, curves, pooling)
    out: dict[str, CurveFit] = {}
    for job, r in zip(problem.jobs, row_of, strict=True):
        f = fits[r]
        assert f is not None
        out[job.id] = f
    return out


__all__ = [
    "MIN_DISTINCT_CAPS",
    "PRIORS_BY_MODEL",
    "PRIOR_COMPUTE_BOUND",
    "PRIOR_MEMORY_BOUND",
    "Curve",
    "CurveFit",
    "FleetShare",
    "Segment",
    "concave_l1_fit",
    "fit_curves",
    "fit_job_curve",
    "fleet_share",
    "prior_for_model",
]
