"""The held-out bench's fleet generator (bench/fleets.py): true curves, citations, the split."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from bench.fleets import (
    ANCHOR_X,
    CITED_AT_HALF_DRAW,
    FAMILIES,
    GPUS,
    HELD_OUT,
    HELD_OUT_SEED_START,
    SHAPE_NAMES,
    SHAPE_SOURCES,
    SHAPES,
    TUNING,
    TUNING_SEEDS,
    RelativeShape,
    budget_document,
    energy_document,
    generate,
    shape_table,
)
from optimizer.problem import parse_problem

ALL = TUNING + HELD_OUT


def _seed(family: str) -> int:
    return TUNING_SEEDS.start if family in TUNING else HELD_OUT_SEED_START


@pytest.mark.parametrize("family", ALL)
def test_true_curves_are_concave_non_decreasing_and_flat_above_the_draw(family: str) -> None:
    fleet = generate(family, _seed(family))
    for c in fleet.truth.values():
        x = np.linspace(c.lo_w, c.hi_w, 801)
        y = c.values(x)
        d = np.diff(y)
        assert (d >= -1e-12 * c.uncapped).all(), c.job_id
        assert (np.diff(d) <= 1e-9 * c.uncapped).all(), c.job_id  # slopes never rise
        above = x >= c.draw_w
        assert np.allclose(y[above], c.uncapped), c.job_id
        assert c(c.draw_w) == pytest.approx(c.uncapped)
        # the exact table the oracle gets: concave piecewise-linear through the curve
        xs, ys = c.table(10.0)
        assert xs[0] == c.lo_w and xs[-1] == c.hi_w
        slopes = np.diff(ys) / np.diff(xs)
        assert (slopes >= -1e-12).all() and (np.diff(slopes) <= 1e-9).all(), c.job_id
        assert np.allclose(ys, c.values(np.array(xs)))


def test_every_shape_index_gives_a_concave_shape() -> None:
    u = np.linspace(ANCHOR_X[0], 1.2, 2001)
    for h in np.linspace(0.0, len(SHAPE_NAMES) - 1, 61):
        y = RelativeShape(shape_table(float(h))).values(u)
        assert (np.diff(y) >= -1e-12).all()
        assert (np.diff(y, 2) <= 1e-12).all()
        assert y[-1] == pytest.approx(1.0)


@pytest.mark.parametrize("name", SHAPE_NAMES)
def test_anchor_points_reproduce_the_cited_ratios(name: str) -> None:
    shape = RelativeShape(SHAPES[name])
    assert shape(0.5) == pytest.approx(CITED_AT_HALF_DRAW[name], abs=0.005)
    for x, y in zip(ANCHOR_X, SHAPES[name], strict=True):  # the curve goes through its anchors
        assert shape(x) == pytest.approx(y, abs=1e-3)
    assert SHAPE_SOURCES[name]
    assert shape_table(float(SHAPE_NAMES.index(name))) == pytest.approx(SHAPES[name])


def test_published_readings_order_the_shapes() -> None:
    # compute-bound keeps ≈0.66 at half its draw, mixed ≈0.76, memory-bound ≈0.86
    assert CITED_AT_HALF_DRAW["compute"] == 0.66
    assert CITED_AT_HALF_DRAW["mixed"] == 0.76
    assert CITED_AT_HALF_DRAW["memory"] == 0.86
    for a, b in itertools.pairwise(SHAPE_NAMES):  # steeper first, at every anchor
        assert all(ya <= yb for ya, yb in zip(SHAPES[a], SHAPES[b], strict=True))


def test_gpu_limits_stay_inside_the_shapes_range() -> None:
    for key, spec in GPUS.items():
        assert spec.min_w <= spec.default_w <= spec.max_w, key
        assert spec.idle_w < spec.min_w, key
        # a job never draws more than its default cap, so cap / draw >= min_w / default_w
        assert spec.min_w / spec.default_w >= ANCHOR_X[0], key
    assert {s.max_w for s in GPUS.values()} == {700.0, 400.0, 300.0, 1000.0}


def test_tuning_and_held_out_families_and_seeds_do_not_overlap() -> None:
    assert len(TUNING) >= 2 and len(HELD_OUT) >= 4
    assert not set(TUNING) & set(HELD_OUT)
    assert set(ALL) == set(FAMILIES)
    assert list(TUNING_SEEDS) == list(range(10))
    assert max(TUNING_SEEDS) < HELD_OUT_SEED_START == 1000
    for family in TUNING:
        with pytest.raises(ValueError, match="tuning"):
            generate(family, HELD_OUT_SEED_START)
    for family in HELD_OUT:
        with pytest.raises(ValueError, match="held-out"):
            generate(family, 0)
    with pytest.raises(ValueError, match="unknown"):
        generate("no-such-family", 0)


@pytest.mark.parametrize("family", ALL)
def test_a_generated_problem_parses_in_every_mode(family: str) -> None:
    fleet = generate(family, _seed(family))
    fam = FAMILIES[family]
    assert 20 <= fleet.n_jobs <= 60
    for doc in (
        fleet.document,
        energy_document(fleet, 0.05),
        energy_document(fleet, None),
        budget_document(fleet, 0.7),
        budget_document(fleet, 0.5),
    ):
        p = parse_problem(doc, family)
        assert {j.id for j in p.jobs} == set(fleet.truth)
        for j in p.jobs:
            assert fam.samples[0] <= len(j.samples) <= fam.samples[1]
            assert 1 <= len(j.gpus) <= 8
            assert 1.0 <= j.weight <= 2.0
    p = parse_problem(energy_document(fleet, None))
    assert {j.allowed_slowdown for j in p.jobs} <= {0.05, 0.10, 0.20}
    assert generate(family, _seed(family)).document == fleet.document  # deterministic


def test_the_families_stress_what_they_are_named_for() -> None:
    feeds = generate("mixed-models-ab-feeds", HELD_OUT_SEED_START)
    assert len(feeds.models) == 5
    p = parse_problem(feeds.document)
    members = {d.id: {g.id for g in p.gpus if d.id in g.domains} for d in p.domains}
    crossing = [
        (a, b)
        for a, b in itertools.combinations(members, 2)
        if members[a] & members[b] and not (members[a] <= members[b] or members[b] <= members[a])
    ]
    assert crossing  # domains that overlap without nesting: not a tree

    cold = parse_problem(generate("cold-start-3-samples-no-power", HELD_OUT_SEED_START).document)
    assert all(s.power_w is None and len(j.samples) == 3 for j in cold.jobs for s in j.samples)

    mem = generate("memory-above-draw", HELD_OUT_SEED_START)
    held_back = [j for j in mem.document["jobs"] if mem.truth[j["id"]].kind in ("memory", "host")]
    assert held_back
    for j in held_back:
        assert all(s["cap_w"] > mem.truth[j["id"]].draw_w for s in j["samples"])

    steep = generate("steep-compute", HELD_OUT_SEED_START)
    assert sum(c.kind == "steep" for c in steep.truth.values()) > steep.n_jobs / 2
    for c in steep.truth.values():  # steeper than the compute-bound anchor row, or on it
        assert c.shape_index <= 1.25
