"""Fleet families for evaluating the optimizer on fleets it was not tuned on.

Each family generates, for a seed, (a) a problem document in the project's JSON
problem format (``docs/problem-format.md``; what ``optimizer.problem.parse_problem``
reads) and (b) the TRUE power→throughput curve of every job, as a function of
the per-GPU cap in W, for scoring a plan. The optimizer sees only (a): a few
noisy samples per job. Nothing here imports the optimizer, so the truth cannot
borrow the model under test.

**The split.** ``TUNING`` families with ``TUNING_SEEDS`` (0-9) may be looked at
while tuning the model: run them, read their figures, pick constants on them.
``HELD_OUT`` families with seeds from ``HELD_OUT_SEED_START`` (1000) on must
not be: run them only to measure a change that is already decided
(``bench/heldout_quality.py``), never to choose a constant, a threshold, a
shape or a prior, and never inspect their problems or curves to debug a fit.
A change tuned while watching a held-out figure turns that figure into a tuning
figure and it no longer says how the model does on fleets it has not seen.
``generate`` refuses a seed from the other side of the split.

**True shapes** come from published power-limit sweeps, not from the
optimizer's priors (``optimizer/curves.py``). Relative throughput at a cap, as
a share of the job's unconstrained draw (cap / draw), at these anchors:

=========  =====  =====  =====  =====  =====  =====  =====  =====  =====
shape       0.2    0.3    0.4    0.5    0.6    0.7    0.8    0.9    1.0
=========  =====  =====  =====  =====  =====  =====  =====  =====  =====
steep      0.000  0.166  0.332  0.498  0.664  0.830  0.907  0.960  1.000
compute    0.19   0.36   0.52   0.66   0.77   0.855  0.92   0.97   1.00
mixed      0.35   0.50   0.64   0.76   0.855  0.92   0.963  0.99   1.00
memory     0.46   0.62   0.76   0.86   0.93   0.97   0.99   1.00   1.00
=========  =====  =====  =====  =====  =====  =====  =====  =====  =====

Sources (``SHAPE_SOURCES`` holds them per shape):

* compute, 0.66 at half the draw: power-limit sweeps of DNN training in Zeus
  (You, Chung, Chowdhury, "Zeus: Understanding and Optimizing GPU Energy
  Consumption of DNN Training", NSDI '23, https://ml.energy/zeus/research_overview/zeus/)
  and the training-under-power-cap characterisation of Patel et al.,
  "Characterizing Power Management Opportunities for LLMs in the Cloud"
  (ASPLOS '24; preprint "POLCA", arXiv 2308.12908). The stored copies we could
  read hold only these papers' abstracts, so 0.66 is a rounded reading of their
  figures, not a number quoted from their text. Checked against a measured
  sweep with numbers: compute-bound LLM prefill on an RTX 3090 (350 W limit)
  keeps 0.943 at 300 W (0.857 of the limit), 0.853 at 250 W (0.714) and 0.60 at
  200 W (0.571) (https://llmgarage.ai/power-limit-tokens-per-second-benchmark);
  the table gives 0.953, 0.866, 0.71: the sweep is steeper still below 0.6,
  which is what ``steep`` carries.
* steep, 0.50 at half the draw: the upper concave hull of that prefill sweep,
  relative to its 350 W limit ((0.286, 0.14), (0.714, 0.853), (0.857, 0.943),
  (1.0, 1.0); its 150 W point, 0.26 at 0.43, lies below the hull: the sweep is
  not concave near the card's minimum limit).
* memory, 0.86 at half the draw: LLM decode in the same sweep keeps 0.993 at
  300 W, 0.974 at 250 W, 0.941 at 200 W and 0.862 at 150 W of the 350 W limit;
  decode draws less than its limit (Ma, Afzal, Eitzinger, Wellein, "The Illusion
  of Power Capping in LLM Decode", arXiv 2605.11999: 137-300 W on a 700 W H200),
  so relative to its draw the same points lie further right and the curve is
  steeper than read against the limit.
* mixed, 0.76 at half the draw: between the two (jobs whose kernels alternate
  between compute- and memory-bound phases), as the brief's reading of the same
  sweeps puts it; no single measurement.

Between the anchors the curve is a monotone cubic Hermite like PCHIP, with
its node slopes limited so that every piece is concave (PCHIP itself bends the
wrong way between these anchors, and its concave hull then misses them by up to
0.8 points); it goes through every anchor. Above the draw it is flat (a cap
above what the job draws costs nothing). Per job the shape index moves a few
points between neighbouring rows (a convex mix of two concave curves is
concave).

**GPU limits** (``GPUS``): min/max/default power limit and idle draw per model,
with their sources in comments.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Final

import numpy as np

# --- GPU models -----------------------------------------------------------------


@dataclass(frozen=True)
class GpuSpec:
    """Settable power-limit range, default limit and idle draw of one GPU model."""

    name: str
    min_w: float
    max_w: float
    default_w: float
    idle_w: float


GPUS: Final[dict[str, GpuSpec]] = {
    # H100 SXM5: 700 W TDP; settable 200-700 W, default 700 W: DGX H100 user guide,
    # "Managing Power Capping" (Redfish PowerLimitWatts AllowableMin 200, AllowableMax 700,
    # DefaultSetPoint 700, an idle Reading of 64.4 W), and nvidia-smi -q on an H100
    # (Min 200.00 W, Max 700.00 W, Default 700.00 W, 78.8 W drawn idle;
    # github.com/stackhpc/ansible-slurm-appliance/pull/975). Idle: 70 W.
    "H100": GpuSpec("NVIDIA H100 80GB HBM3", 200.0, 700.0, 700.0, 70.0),
    # H200 SXM: 700 W TDP, same board limits as the H100 (the DGX H100/H200 guide covers
    # both; arXiv 2604.11391 sweeps H100 and H200 caps from 200 W to 700 W). Idle 75 W
    # (this project's snapshot default for H200, optimizer/snapshot.py).
    "H200": GpuSpec("NVIDIA H200", 200.0, 700.0, 700.0, 75.0),
    # B200: 1000 W TDP; settable 200-1000 W: DGX B200 user guide, "Managing Power Capping"
    # (AllowableMin 200, AllowableMax 1000). Default = TDP. Idle 140 W is our estimate:
    # Shafique et al. (H100 vs B200 DDP training) report an elevated B200 baseline draw
    # but we found no figure.
    "B200": GpuSpec("NVIDIA B200", 200.0, 1000.0, 1000.0, 140.0),
    # A100 SXM4 80GB: 400 W TDP (NVIDIA A100 datasheet), settable 100-400 W, idle 55 W:
    # the figures this project's simulated A100 uses (agent/devices/simulated.py).
    "A100": GpuSpec("NVIDIA A100-SXM4-80GB", 100.0, 400.0, 400.0, 55.0),
    # V100 SXM2: 300 W TDP (NVIDIA V100 datasheet); settable 150-300 W as nvidia-smi
    # reports it (not verified from a stored page here). Idle 40 W (estimate).
    "V100": GpuSpec("Tesla V100-SXM2-32GB", 150.0, 300.0, 300.0, 40.0),
}
MODEL_KEY: Final[dict[str, str]] = {s.name: k for k, s in GPUS.items()}
GPUS_PER_NODE: Final = 8

# --- true shapes --------------------------------------------------------------------

ANCHOR_X: Final[tuple[float, ...]] = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
# ordered from the steepest to the flattest: the shape index h in [0, 3] interpolates
# between neighbouring rows
SHAPE_NAMES: Final[tuple[str, ...]] = ("steep", "compute", "mixed", "memory")
SHAPES: Final[dict[str, tuple[float, ...]]] = {
    "steep": (0.0, 0.166, 0.332, 0.498, 0.664, 0.830, 0.907, 0.960, 1.0),
    "compute": (0.19, 0.36, 0.52, 0.66, 0.77, 0.855, 0.92, 0.97, 1.0),
    "mixed": (0.35, 0.50, 0.64, 0.76, 0.855, 0.92, 0.963, 0.99, 1.0),
    "memory": (0.46, 0.62, 0.76, 0.86, 0.93, 0.97, 0.99, 1.0, 1.0),
}
# the cited figure each row reproduces: (cap / draw, share of uncapped throughput)
CITED_AT_HALF_DRAW: Final[dict[str, float]] = {
    "steep": 0.50,
    "compute": 0.66,
    "mixed": 0.76,
    "memory": 0.86,
}
SHAPE_SOURCES: Final[dict[str, str]] = {
    "steep": "upper concave hull of an RTX 3090 LLM-prefill power-limit sweep "
    "(llmgarage.ai/power-limit-tokens-per-second-benchmark): 0.853 at 0.714, 0.943 at 0.857",
    "compute": "Zeus (NSDI '23) training power-limit sweeps; Patel et al. (ASPLOS '24, "
    "POLCA arXiv 2308.12908) training under power caps; RTX 3090 prefill sweep as a check",
    "mixed": "between the compute and memory readings of the same sweeps",
    "memory": "RTX 3090 LLM-decode sweep (0.862 at 150/350 W, 0.941 at 200/350 W); "
    "decode draws below its limit (Ma et al., arXiv 2605.11999: 137-300 W of 700 W on H200)",
}


def shape_table(h: float) -> tuple[float, ...]:
    """Anchor values at ``ANCHOR_X`` for shape index ``h`` (0 steep … 3 memory)."""
    h = min(max(h, 0.0), len(SHAPE_NAMES) - 1.0)
    k = min(int(h), len(SHAPE_NAMES) - 2)
    t = h - k
    lo, hi = SHAPES[SHAPE_NAMES[k]], SHAPES[SHAPE_NAMES[k + 1]]
    return tuple((1 - t) * a + t * b for a, b in zip(lo, hi, strict=True))


def concave_hermite_slopes(
    xs: Sequence[float], ys: Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    """Start and end slope of each piece of a concave cubic Hermite through concave points.

    Like PCHIP (Fritsch-Carlson), a piecewise cubic through every point whose
    node slopes are limited, here so that every piece is concave rather than
    merely monotone: with secant ``d`` a piece starting at slope ``d + a`` and
    ending at ``d - b`` is concave iff ``b / 2 <= a <= 2 b``. Each node's drop of
    secant slope is split half to either side (smooth there) and trimmed where a
    piece needs it; after a straight run (no drop) the curve keeps a kink, since
    no smooth concave curve goes through collinear points and then bends. Above
    the last point the curve is flat.
    """
    x, y = np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)
    d = np.diff(y) / np.diff(x)
    if (np.diff(d) > 1e-12).any() or (d < -1e-12).any():
        raise ValueError("points are not concave and non-decreasing")
    drop = np.append(d[:-1] - d[1:], d[-1])  # at each node after the first; flat above the last
    a = np.append(drop[0] / 2, drop[:-1] / 2)  # extra start slope of each piece
    b = drop / 2  # missing end slope of each piece
    a = np.minimum(a, 2 * b)
    b = np.minimum(b, 2 * a)
    return d + a, d - b


@dataclass(frozen=True)
class RelativeShape:
    """Share of uncapped throughput as a function of cap / draw: concave, non-decreasing.

    A concave cubic Hermite through the anchors (``concave_hermite_slopes``),
    flat above 1.0 (the draw).
    """

    anchors: tuple[float, ...]  # values at ANCHOR_X, the last one 1.0

    @cached_property
    def _slopes(self) -> tuple[np.ndarray, np.ndarray]:
        return concave_hermite_slopes(ANCHOR_X, self.anchors)

    def __call__(self, u: float) -> float:
        return float(self.values(np.array([u]))[0])

    def values(self, u: np.ndarray) -> np.ndarray:
        x, y = np.array(ANCHOR_X), np.array(self.anchors)
        m0, m1 = self._slopes
        v = np.minimum(np.asarray(u, dtype=float), x[-1])
        k = np.clip(np.searchsorted(x, v, side="right") - 1, 0, len(x) - 2)
        h = x[k + 1] - x[k]
        t = (v - x[k]) / h
        h00, h10 = 2 * t**3 - 3 * t**2 + 1, t**3 - 2 * t**2 + t
        h01, h11 = -2 * t**3 + 3 * t**2, t**3 - t**2
        out = h00 * y[k] + h10 * h * m0[k] + h01 * y[k + 1] + h11 * h * m1[k]
        below = v < x[0]  # never reached by the families (every min_w >= 0.2 x draw)
        out[below] = y[0] - m0[0] * (x[0] - v[below])
        return np.asarray(np.maximum(out, 0.0), dtype=float)


@dataclass(frozen=True)
class TrueCurve:
    """A job's true total throughput as a function of the per-GPU cap (W).

    ``uncapped`` at and above ``draw_w``; below it ``uncapped × shape(cap / draw)``.
    ``lo_w``..``hi_w`` is the cap range of the job's GPUs.
    """

    job_id: str
    kind: str
    draw_w: float
    uncapped: float
    shape_index: float
    lo_w: float
    hi_w: float
    shape: RelativeShape = field(repr=False)

    def __call__(self, cap_w: float) -> float:
        return float(self.values(np.array([cap_w]))[0])

    def values(self, caps_w: np.ndarray) -> np.ndarray:
        return self.uncapped * self.shape.values(np.asarray(caps_w, dtype=float) / self.draw_w)

    def slowdown(self, cap_w: float) -> float:
        """True slowdown at ``cap_w`` against the uncapped throughput."""
        return 1.0 - self(cap_w) / self.uncapped

    def table(self, step_w: float = 10.0) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Exact points of the curve on ``[lo_w, hi_w]`` every ``step_w`` and at the draw.

        Linear interpolation between them is concave and non-decreasing, since
        the points lie on a concave, non-decreasing curve; flat stretches above
        the draw collapse to their ends.
        """
        xs = np.arange(self.lo_w, self.hi_w + step_w / 2, step_w)
        xs = np.unique(np.clip(np.append(xs, [self.hi_w, self.draw_w]), self.lo_w, self.hi_w))
        xs = xs[(xs <= max(self.draw_w, self.lo_w)) | (xs == xs[-1])]
        ys = self.values(xs)
        return tuple(float(x) for x in xs), tuple(float(y) for y in ys)


# --- families ------------------------------------------------------------------------

# job kinds: shape index (centre, half-width of the per-job jitter) and draw as a share
# of the GPU's default limit
KINDS: Final[dict[str, tuple[tuple[float, float], tuple[float, float]]]] = {
    "steep": ((0.6, 0.35), (0.90, 1.00)),  # compute-bound, steeper than "compute"
    "compute": ((1.0, 0.25), (0.88, 1.00)),  # GEMM / LLM training near TDP
    "mixed": ((2.0, 0.25), (0.65, 0.85)),
    # LLM decode, memory-bandwidth-bound kernels
    "memory": ((2.8, 0.2), (0.35, 0.60)),
    # held back by data loading, the host or the network: draws well below the cap
    "host": ((2.0, 0.25), (0.15, 0.35)),
}


@dataclass(frozen=True)
class Family:
    """How one family of fleets is drawn."""

    name: str
    stresses: str
    models: tuple[tuple[str, float], ...]  # (GPUS key, weight)
    jobs: tuple[int, int]  # range of the number of jobs
    kinds: tuple[tuple[str, float], ...]  # (KINDS key, weight)
    samples: tuple[int, int]  # samples per job, inclusive range
    # how sample caps are picked: "spread" (down to lowest_cap x default), "high"
    # (0.65-1.0 x default), or "above-draw" for memory- and host-bound jobs
    sampling: str = "spread"
    lowest_cap: float = 0.5
    power_share: float = 1.0  # share of jobs whose samples carry a power reading
    feeds: bool = False  # A/B feeds across racks (domains that are not a tree)
    nodes_per_rack: int = 4
    noise: float = 0.03  # relative throughput noise of a sample
    allowances: tuple[float, ...] = (0.05, 0.10, 0.20)


FAMILIES: Final[dict[str, Family]] = {
    f.name: f
    for f in (
        # --- tuning -------------------------------------------------------------------
        Family(
            "tune-hopper-tree",
            "H100/H200 only, a facility/rack/node tree, 4-6 samples with power readings "
            "down to 40 % of the limit: the well-observed case",
            models=(("H100", 0.6), ("H200", 0.4)),
            jobs=(30, 50),
            kinds=(("compute", 0.4), ("mixed", 0.2), ("memory", 0.2), ("host", 0.2)),
            samples=(4, 6),
            lowest_cap=0.4,
            power_share=0.9,
        ),
        Family(
            "tune-ampere-volta-racks",
            "A100/V100 (V100's 150 W floor is half its limit), racks binding as well as "
            "the facility, 3-5 samples, half the jobs without power readings",
            models=(("A100", 0.6), ("V100", 0.4)),
            jobs=(20, 40),
            kinds=(("compute", 0.5), ("mixed", 0.25), ("memory", 0.15), ("host", 0.1)),
            samples=(3, 5),
            lowest_cap=0.5,
            power_share=0.5,
        ),
        # --- held out -----------------------------------------------------------------
        Family(
            "mixed-models-ab-feeds",
            "all five GPU models in one fleet; every rack on two A/B feeds whose racks "
            "overlap without nesting (domains not a tree), feeds binding; 3 samples, half "
            "the jobs without power readings",
            models=(("H100", 1.0), ("H200", 1.0), ("B200", 1.0), ("A100", 1.0), ("V100", 1.0)),
            jobs=(40, 60),
            kinds=(("compute", 0.35), ("mixed", 0.25), ("memory", 0.2), ("host", 0.2)),
            samples=(3, 3),
            power_share=0.5,
            feeds=True,
            nodes_per_rack=2,
        ),
        Family(
            "cold-start-3-samples-no-power",
            "3 noisy samples per job (the uncapped one and two caps) and no power reading "
            "at all: the draw must be inferred from where throughput stops rising",
            models=(("H100", 0.4), ("H200", 0.3), ("A100", 0.3)),
            jobs=(30, 50),
            kinds=(("compute", 0.4), ("mixed", 0.2), ("memory", 0.2), ("host", 0.2)),
            samples=(3, 3),
            lowest_cap=0.55,
            power_share=0.0,
        ),
        Family(
            "steep-compute",
            "compute-bound jobs steeper than any prior below 60 % of their draw, on GPUs "
            "with low minimum limits (A100 25 %, B200 20 %), sampled only at 65-100 % of "
            "the limit: the steep part is never observed",
            models=(("A100", 0.4), ("B200", 0.4), ("H100", 0.2)),
            jobs=(20, 40),
            kinds=(("steep", 0.7), ("compute", 0.3)),
            samples=(3, 3),
            sampling="high",
        ),
        Family(
            "memory-above-draw",
            "memory- and host-bound jobs (draw 15-60 % of the limit) sampled only at caps "
            "above their draw, so no sample shows their slope; compute jobs sampled as usual",
            models=(("H200", 0.4), ("H100", 0.3), ("B200", 0.3)),
            jobs=(30, 50),
            kinds=(("memory", 0.5), ("host", 0.2), ("compute", 0.3)),
            samples=(3, 3),
            sampling="above-draw",
        ),
    )
}
TUNING: Final[tuple[str, ...]] = ("tune-hopper-tree", "tune-ampere-volta-racks")
HELD_OUT: Final[tuple[str, ...]] = (
    "mixed-models-ab-feeds",
    "cold-start-3-samples-no-power",
    "steep-compute",
    "memory-above-draw",
)
TUNING_SEEDS: Final[range] = range(10)
HELD_OUT_SEED_START: Final = 1000


@dataclass(frozen=True)
class DomainLoad:
    """What a domain's budget rests on (W)."""

    baseline: float  # non-GPU load
    draw: float  # its GPUs uncapped: busy at their job's true draw, idle at idle_w
    least: float  # the least cap load: busy GPUs at min_w, idle at idle_w
    top: float  # the most: every GPU at max_w


@dataclass(frozen=True)
class Fleet:
    """One generated fleet: the problem document, the truth and what budgets rest on."""

    family: str
    seed: int
    document: dict[str, Any]  # energy objective, the family's allowances, no budget binding
    truth: dict[str, TrueCurve]  # by job id
    domain_load: dict[str, DomainLoad]
    budget_spread: dict[str, float]  # per domain: its budget share relative to the level

    @property
    def n_jobs(self) -> int:
        return len(self.truth)

    @property
    def models(self) -> tuple[str, ...]:
        return tuple(sorted({g["model"] for g in self.document["gpus"]}))


def check_seed(family: str, seed: int) -> None:
    """Refuse a seed from the other side of the tuning / held-out split."""
    if family in TUNING:
        if seed not in TUNING_SEEDS:
            raise ValueError(f"tuning family {family!r} takes seeds 0-9, not {seed}")
    elif family in HELD_OUT:
        if seed < HELD_OUT_SEED_START:
            raise ValueError(
                f"held-out family {family!r} takes seeds >= {HELD_OUT_SEED_START}, not {seed}"
            )
    else:
        raise ValueError(f"unknown family {family!r}; one of {sorted(FAMILIES)}")


def _pick(rng: np.random.Generator, options: Sequence[tuple[str, float]]) -> str:
    w = np.array([p for _, p in options], dtype=float)
    return options[int(rng.choice(len(options), p=w / w.sum()))][0]


def _sample_caps(
    fam: Family, kind: str, spec: GpuSpec, draw: float, n: int, rng: np.random.Generator
) -> list[float]:
    """The caps a job was observed at: its default (uncapped) one and ``n - 1`` others."""
    step = 25.0 if spec.max_w > 400 else 10.0
    if fam.sampling == "above-draw" and kind in ("memory", "host"):
        lo = min(spec.default_w - step, math.ceil(draw * 1.08 / step) * step)
    elif fam.sampling in ("high", "above-draw"):
        lo = 0.65 * spec.default_w
    else:
        lo = fam.lowest_cap * spec.default_w
    lo = max(lo, spec.min_w)
    grid = np.arange(math.ceil(lo / step) * step, spec.default_w, step)
    if len(grid) == 0:
        grid = np.array([spec.default_w])
    others = rng.choice(grid, size=n - 1, replace=len(grid) < n - 1)
    return [spec.default_w, *(float(c) for c in others)]


def generate(family: str, seed: int, n_jobs: int | None = None) -> Fleet:
    """Draw one fleet of ``family`` (``n_jobs`` overrides the family's range)."""
    check_seed(family, seed)
    fam = FAMILIES[family]
    rng = np.random.default_rng([seed, sum(map(ord, family))])
    target = n_jobs if n_jobs is not None else int(rng.integers(fam.jobs[0], fam.jobs[1] + 1))
    gpus: list[dict[str, Any]] = []
    jobs: list[dict[str, Any]] = []
    truth: dict[str, TrueCurve] = {}
    node_of: dict[str, int] = {}
    draw_of: dict[str, float] = {}  # per busy GPU id
    n = 0
    while len(jobs) < target:
        model = _pick(rng, fam.models)
        spec = GPUS[model]
        ids = [f"GPU-{n:03d}-{i}" for i in range(GPUS_PER_NODE)]
        for gid in ids:
            node_of[gid] = n
            gpus.append(
                {
                    "id": gid,
                    "host": f"node{n:03d}",
                    "model": spec.name,
                    "min_w": spec.min_w,
                    "max_w": spec.max_w,
                    "default_w": spec.default_w,
                    "idle_w": spec.idle_w,
                    "domains": [],  # filled in below
                }
            )
        i = 0
        while i < GPUS_PER_NODE and len(jobs) < target:
            size = int(min(GPUS_PER_NODE - i, rng.choice([1, 2, 4, 8], p=[0.35, 0.3, 0.2, 0.15])))
            members = ids[i : i + size]
            i += size
            if rng.random() < 0.08:  # these GPUs stay idle
                continue
            kind = _pick(rng, fam.kinds)
            (h0, dh), (d_lo, d_hi) = KINDS[kind]
            h = float(np.clip(h0 + rng.uniform(-dh, dh), 0.0, 3.0))
            draw = float(rng.uniform(d_lo, d_hi)) * spec.default_w
            jid = f"job{len(jobs):03d}"
            curve = TrueCurve(
                job_id=jid,
                kind=kind,
                draw_w=draw,
                uncapped=float(rng.uniform(50.0, 150.0)) * size,
                shape_index=h,
                lo_w=spec.min_w,
                hi_w=spec.max_w,
                shape=RelativeShape(shape_table(h)),
            )
            truth[jid] = curve
            for gid in members:
                draw_of[gid] = min(draw, spec.default_w)
            with_power = rng.random() < fam.power_share
            n_samples = int(rng.integers(fam.samples[0], fam.samples[1] + 1))
            samples: list[dict[str, float]] = []
            for cap in _sample_caps(fam, kind, spec, draw, n_samples, rng):
                s: dict[str, float] = {
                    "cap_w": cap,
                    "throughput": round(max(0.0, curve(cap) * rng.normal(1.0, fam.noise)), 4),
                }
                if with_power:
                    s["power_w"] = round(min(cap, draw) * rng.normal(1.0, 0.01), 2)
                samples.append(s)
            jobs.append(
                {
                    "id": jid,
                    "gpus": members,
                    "weight": round(float(rng.uniform(1.0, 2.0)), 2),
                    "allowed_slowdown": float(rng.choice(fam.allowances)),
                    # data-parallel training is synchronous; inference replicas are not
                    "synchronous": size > 1
                    and (kind in ("compute", "steep") or rng.random() < 0.5),
                    "samples": samples,
                }
            )
        n += 1
    n_nodes = n
    n_racks = -(-n_nodes // fam.nodes_per_rack)
    # domains: facility ⊇ rack ⊇ node, plus (feeds) two feeds per rack that pair racks
    # (2k, 2k+1) on A and (2k+1, 2k+2) on B: they overlap without nesting
    n_feeds = max(1, -(-n_racks // 2))
    rack_of_node = [k // fam.nodes_per_rack for k in range(n_nodes)]
    member_domains: dict[str, list[str]] = {}
    for g in gpus:
        node = node_of[g["id"]]
        rack = rack_of_node[node]
        doms = ["facility", f"rack{rack:02d}", f"node{node:03d}"]
        if fam.feeds:
            doms += [f"feed-a{rack // 2:02d}", f"feed-b{((rack + 1) // 2) % n_feeds:02d}"]
        g["domains"] = doms
        member_domains[g["id"]] = doms
    node_baseline = {"H100": 1800.0, "H200": 1800.0, "B200": 2400.0, "A100": 1200.0, "V100": 900.0}
    baseline: dict[str, float] = {}
    for k in range(n_nodes):
        b = node_baseline[
            MODEL_KEY[gpus[k * GPUS_PER_NODE]["model"]]
        ]  # CPUs, fans, NICs of one node
        rack = rack_of_node[k]
        for d, share in (("facility", 1.0), (f"rack{rack:02d}", 1.0)):
            baseline[d] = baseline.get(d, 0.0) + b * share
        if fam.feeds:  # a rack's non-GPU load splits over its two feeds
            for d in (f"feed-a{rack // 2:02d}", f"feed-b{((rack + 1) // 2) % n_feeds:02d}"):
                baseline[d] = baseline.get(d, 0.0) + b / 2
    load: dict[str, list[float]] = {}
    for g in gpus:
        busy = g["id"] in draw_of
        draw = draw_of.get(g["id"], g["idle_w"])
        least = g["min_w"] if busy else g["idle_w"]
        for d in member_domains[g["id"]]:
            acc = load.setdefault(d, [0.0, 0.0, 0.0, 0.0])
            acc[1] += draw
            acc[2] += least
            acc[3] += g["max_w"]
    for d, acc in load.items():
        acc[0] = baseline.get(d, 0.0)
    spread: dict[str, float] = {}
    for d in sorted(load):
        if d == "facility":
            spread[d] = 1.0
        elif d.startswith("rack"):
            spread[d] = float(rng.uniform(1.0, 1.2))  # some racks bind beside the facility
        elif d.startswith("feed"):
            spread[d] = float(rng.uniform(0.9, 1.05))  # feeds bind first
        else:
            spread[d] = math.inf  # nodes never bind
    domain_load = {d: DomainLoad(*a) for d, a in load.items()}
    doc: dict[str, Any] = {
        "version": 1,
        "comment": f"bench/fleets.py family {family!r} seed {seed}",
        "gpus": gpus,
        "domains": [],
        "jobs": jobs,
        "objective": {"kind": "energy"},
    }
    fleet = Fleet(family, seed, doc, truth, domain_load, spread)
    doc["domains"] = _domains(fleet, None)
    return fleet


def _kind(domain_id: str) -> str:
    for prefix in ("facility", "rack", "node", "feed"):
        if domain_id.startswith(prefix):
            return prefix
    return "other"


def _domains(fleet: Fleet, level: float | None) -> list[dict[str, Any]]:
    """Domain entries with budgets at ``level`` x uncapped draw (None: never binding)."""
    out: list[dict[str, Any]] = []
    for d, ld in sorted(fleet.domain_load.items()):
        s = fleet.budget_spread[d]
        if level is None or math.isinf(s):
            budget = ld.baseline + ld.top + 1000.0  # above any cap load
        else:
            # never below what the GPUs at their minimum already count (a feasible budget)
            budget = ld.baseline + max(level * s * ld.draw, 1.02 * ld.least)
        out.append(
            {"id": d, "budget_w": round(budget, 1), "baseline_w": ld.baseline, "kind": _kind(d)}
        )
    return out


def budget_document(
    fleet: Fleet, level: float, allowed_slowdown: float | None = 0.99
) -> dict[str, Any]:
    """The fleet in budget mode, budgets at ``level`` x each domain's uncapped GPU draw.

    ``allowed_slowdown`` replaces every job's allowance (0.99: no floor, the
    plan is scored on throughput alone); ``None`` keeps the family's.
    """
    return _with(fleet, {"kind": "budget"}, _domains(fleet, level), allowed_slowdown)


def energy_document(fleet: Fleet, allowed_slowdown: float | None) -> dict[str, Any]:
    """The fleet in energy mode, no budget binding; ``None`` keeps each job's allowance."""
    return _with(fleet, {"kind": "energy"}, _domains(fleet, None), allowed_slowdown)


def _with(
    fleet: Fleet,
    objective: dict[str, Any],
    domains: list[dict[str, Any]],
    allowed_slowdown: float | None,
) -> dict[str, Any]:
    jobs = fleet.document["jobs"]
    if allowed_slowdown is not None:
        jobs = [{**j, "allowed_slowdown": allowed_slowdown} for j in jobs]
    return {**fleet.document, "domains": domains, "jobs": jobs, "objective": objective}


def budget_clamped(fleet: Fleet, level: float) -> list[str]:
    """Domains whose budget at ``level`` was raised to keep it feasible."""
    return [
        d
        for d, ld in fleet.domain_load.items()
        if not math.isinf(fleet.budget_spread[d])
        and level * fleet.budget_spread[d] * ld.draw < 1.02 * ld.least
    ]


def describe(fleet: Fleet) -> str:
    """One line: jobs, GPUs, models, job kinds and domain kinds."""
    kinds: dict[str, int] = {}
    for c in fleet.truth.values():
        kinds[c.kind] = kinds.get(c.kind, 0) + 1
    doms: dict[str, int] = {}
    for d in fleet.domain_load:
        doms[_kind(d)] = doms.get(_kind(d), 0) + 1
    return (
        f"{fleet.n_jobs} jobs on {len(fleet.document['gpus'])} GPUs "
        f"({'/'.join(MODEL_KEY[m] for m in fleet.models)}); "
        + ", ".join(f"{v} {k}" for k, v in sorted(kinds.items()))
        + "; domains "
        + ", ".join(f"{v} {k}" for k, v in sorted(doms.items()))
    )
