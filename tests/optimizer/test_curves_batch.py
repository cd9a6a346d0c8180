"""The batched ``fit_curves`` gives the per-job reference's fits (``_fit_curves_reference``).

Tolerance: methods, shapes, sample and cap counts, the number of curve
breakpoints and whether a fit has a memory-bound share are identical; every
number (breakpoint x, draw, margin, RMSE, share and its SD) agrees within
``REL`` = 1e-6 relative plus ``ABS`` = 1e-9 absolute (for numbers near 0), and
breakpoint y within ``REL`` of the curve's top. The two paths sum and divide
in another order, so they agree to rounding, about 1e-11 on these fleets.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import numpy as np
import pytest

import optimizer.curves as curves
from bench.optimizer_quality import fleet as quality_fleet
from optimizer.curves import CurveFit, _fit_curves_reference, fit_curves
from optimizer.problem import Gpu, Job, Objective, Problem, Sample
from tests.optimizer.mixes import mixed_truth, noisy_samples

REL = 1e-6
ABS = 1e-9


def _close(a: float | None, b: float | None) -> bool:
    if a is None or b is None:
        return a is b
    if math.isinf(a) or math.isinf(b):
        return a == b
    return abs(a - b) <= REL * max(abs(a), abs(b)) + ABS


def assert_same_fits(fast: Mapping[str, CurveFit], ref: Mapping[str, CurveFit]) -> None:
    assert fast.keys() == ref.keys()
    for jid, r in ref.items():
        f = fast[jid]
        kind = (f.method, f.shape, f.n_samples, f.n_distinct_caps, len(f.curve.x_w))
        assert kind == (r.method, r.shape, r.n_samples, r.n_distinct_caps, len(r.curve.x_w)), jid
        top = max(abs(y) for y in r.curve.y)
        assert all(_close(a, b) for a, b in zip(f.curve.x_w, r.curve.x_w, strict=True)), jid
        assert all(
            abs(a - b) <= REL * top + ABS for a, b in zip(f.curve.y, r.curve.y, strict=True)
        ), jid
        for name in ("draw_w", "slowdown_margin", "rmse_rel"):
            assert _close(getattr(f, name), getattr(r, name)), (jid, name)
        assert (f.memory_share is None) == (r.memory_share is None), jid
        if f.memory_share is not None and r.memory_share is not None:
            assert all(_close(a, b) for a, b in zip(f.memory_share, r.memory_share, strict=True)), (
                jid
            )


def _both_ways(p: Problem) -> None:
    for pool in (True, False):
        assert_same_fits(fit_curves(p, pool), _fit_curves_reference(p, pool))


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize(
    ("kind", "slowdown", "budget"), [("energy", 0.05, 10.0), ("budget", 0.99, 0.7)]
)
def test_the_quality_benchs_fleet_fits_as_job_by_job(
    seed: int, kind: str, slowdown: float, budget: float
) -> None:
    for host_share in (0.2, 0.0):
        p, _ = quality_fleet(40, seed, kind, slowdown, budget, host_share)
        _both_ways(p)


def _gpu(i: int, model: str = "NVIDIA H100", lo: float = 200.0, hi: float = 700.0) -> Gpu:
    return Gpu(f"g{i}", f"h{i // 8}", model, lo, hi, hi, 70.0, ())


def _mixed_fleet(seed: int, n: int = 96) -> Problem:
    """Jobs inside the two-shape model (``tests/optimizer/mixes.py``), read every
    way the fit tells apart: at 3-6 random caps, at four caps with no replicate,
    at two caps three times each (far apart, or both at the top, where the
    shapes hardly differ), once uncapped, held at caps above their draw,
    without power readings, with readings only, at two caps within rounding of
    each other, and not at all; on three GPU models, some on two GPUs of
    different ranges, and some replicas of others."""
    rng = np.random.default_rng(seed)
    gpus: list[Gpu] = []
    jobs: list[Job] = []
    models = ("NVIDIA H100", "NVIDIA A100-SXM4-80GB", "Some Accelerator")
    for i in range(n):
        w, draw = float(rng.uniform(0, 1)), float(rng.uniform(300, 690))
        truth = mixed_truth(w, draw)
        case = i % 12
        caps: tuple[float, ...]
        if case == 0:
            caps = tuple(rng.choice(np.arange(250.0, 701.0, 50.0), int(rng.integers(3, 7)), False))
        elif case == 1:
            caps = (300.0, 400.0, 500.0, 600.0)
        elif case == 2:
            caps = (700.0,) * 3 + (round(0.6 * draw),) * 3
        elif case == 3:
            caps = (700.0,)
        elif case == 4:
            caps = (700.0, round(1.03 * draw), round(0.8 * draw), round(0.6 * draw))
        elif case == 10:
            caps = (700.0,) * 3 + (round(0.99 * draw),) * 3
        elif case == 11:
            caps = (700.0,) * 3 + (min(699.0, round(1.02 * draw)),) * 3
        else:
            caps = (350.0, 450.0, 550.0, 700.0)
        samples = noisy_samples(truth, draw, caps, rng, float(rng.choice([0.005, 0.03])))
        if case == 5:
            samples = tuple(Sample(s.throughput, cap_w=s.cap_w) for s in samples)
        elif case == 6:
            samples = tuple(Sample(s.throughput, power_w=s.power_w) for s in samples)
        elif case == 7:
            samples = (*samples, Sample(samples[0].throughput, 450.0000004, 450.0))
        elif case == 8:
            samples = ()
        model = models[i % 3]
        members: tuple[Gpu, ...]
        if case == 9:
            members = (_gpu(len(gpus), model), _gpu(len(gpus) + 1, model, 150.0, 650.0))
        else:
            members = (_gpu(len(gpus), model),)
        gpus += members
        job = Job(f"j{i}", tuple(g.id for g in members), samples, allowed_slowdown=0.05)
        jobs.append(job)
        if i % 4 == 0:  # a replica on its own GPU: shares the fit
            gpus.append(_gpu(len(gpus), model))
            jobs.append(dataclasses.replace(job, id=f"r{i}", gpus=(gpus[-1].id,)))
    return Problem(tuple(gpus), (), tuple(jobs), Objective("energy"))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mixed_jobs_read_every_way_fit_as_job_by_job(seed: int) -> None:
    _both_ways(_mixed_fleet(seed))


@pytest.mark.parametrize("confidence", [0.8, 0.99])
def test_other_confidences_fit_as_job_by_job(confidence: float) -> None:
    p = _mixed_fleet(3)
    p = dataclasses.replace(
        p, objective=dataclasses.replace(p.objective, slowdown_confidence=confidence)
    )
    _both_ways(p)


def test_mix_curves_clean_up_as_the_per_job_code_does() -> None:
    """Every way a mix's breakpoints meet the cap range: knots below, at and
    above its ends, pure shapes (collinear knots in a row), zero and negative
    levels, one point."""
    rng = np.random.default_rng(5)
    rows = 400
    draw = rng.choice([250.0, 400.0, 600.0, 666.0, 700.0, 900.0], rows)
    lo = rng.choice([150.0, 200.0, 0.3 * 666.0], rows)
    hi = np.where(rng.random(rows) < 0.1, lo, rng.choice([650.0, 700.0, 1000.0], rows))
    draw = np.minimum(np.maximum(draw, lo), hi)
    w = rng.choice([0.0, 1.0, 0.3, 0.97], rows)
    level = rng.choice([0.0, -5.0, 80.0, 120.0], rows, p=[0.05, 0.05, 0.45, 0.45])
    x, fc, fm = curves._mix_basis(draw, lo, hi)
    v = level[:, None] * ((1 - w)[:, None] * fc + w[:, None] * fm)
    px = rng.uniform(100.0, 1100.0, (rows, 5))
    py = rng.uniform(-10.0, 150.0, (rows, 5))
    got, rmse = curves._mix_curves(x, v, lo, hi, px, py)
    for r in range(rows):
        want = curves._mix_curve(x[r].tolist(), v[r].tolist(), float(lo[r]), float(hi[r]))
        assert got[r].x_w == want.x_w and got[r].y == pytest.approx(want.y, rel=REL, abs=ABS)
        pts = list(zip(px[r].tolist(), py[r].tolist(), strict=True))
        assert _close(rmse[r], curves._rmse_rel(want, pts)), r


def test_the_batch_leaves_few_jobs_to_the_per_job_code(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only a free concave fit, or samples that hardly tell the shapes apart,
    send a job to ``fit_job_curve``: the arrays fit the rest."""
    calls = []
    per_job = curves.fit_job_curve

    def counted(*args: object, **kwargs: object) -> CurveFit:
        calls.append(1)
        return per_job(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(curves, "fit_job_curve", counted)
    p, _ = quality_fleet(100, 1, "energy", 0.05, 10.0)
    fits = fit_curves(p)
    free = sum(f.method in ("exact", "lp-l1") for f in fits.values())
    assert free <= len(calls) <= free + 0.05 * len(p.jobs)
