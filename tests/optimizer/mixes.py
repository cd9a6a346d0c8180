"""Synthetic jobs whose true curves lie inside the two-shape model, for the fitting tests."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from optimizer.curves import PRIOR_COMPUTE_BOUND, PRIOR_MEMORY_BOUND, Curve
from optimizer.problem import Sample


def mixed_truth(w: float, draw: float) -> Curve:
    """A true curve inside the two-shape model: memory-bound share ``w``, flat above ``draw``."""
    xs = np.linspace(200.0, draw, 40)
    fc, fm = (
        np.interp(xs / draw, [u for u, _ in shape], [r for _, r in shape])
        for shape in (PRIOR_COMPUTE_BOUND, PRIOR_MEMORY_BOUND)
    )
    ys = 100.0 * ((1 - w) * fc + w * fm)
    return Curve((*xs, 700.0), (*ys, ys[-1]))


def noisy_samples(
    truth: Curve,
    draw: float,
    caps: Iterable[float],
    rng: np.random.Generator,
    noise: float,
    power_noise: float = 0.01,
) -> tuple[Sample, ...]:
    """One sample per cap: throughput off ``truth`` by ``noise``, power reading
    (the cap or the draw, whichever is lower) off by ``power_noise``, both relative."""
    return tuple(
        Sample(
            throughput=truth.value(float(c)) * (1 + rng.normal(0, noise)),
            cap_w=float(c),
            power_w=min(float(c), draw) * (1 + rng.normal(0, power_noise)),
        )
        for c in caps
    )
