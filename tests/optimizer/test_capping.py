"""Capping LPs on hand-solvable instances, the fast path against the LP, baselines, DVFS."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from optimizer.baselines import evaluate_baselines
from optimizer.capping import evaluate_caps, fast_path_applicable, sm_clock_for_cap, solve_capping
from optimizer.curves import fit_curves
from optimizer.problem import Gpu, Problem, parse_problem


def gpu(i: int, domains: list[str], **kw: Any) -> dict[str, Any]:
    d = {
        "id": f"g{i}",
        "host": "n",
        "model": "H100",
        "min_w": 100,
        "max_w": 300,
        "default_w": 300,
        "idle_w": 40,
        "domains": domains,
    }
    d.update(kw)
    return d


def linear_job(
    jid: str, gpus: list[str], slope: float, slowdown: float = 0.9, **kw: Any
) -> dict[str, Any]:
    """Throughput = slope * cap on [100, 300]: exactly linear, so optima are by hand."""
    j = {
        "id": jid,
        "gpus": gpus,
        "allowed_slowdown": slowdown,
        "samples": [{"cap_w": c, "throughput": slope * c} for c in (100, 200, 300)],
    }
    j.update(kw)
    return j


def two_gpu_problem(
    kind: str = "budget", budget: float = 450, slow_a: float = 0.9, slow_b: float = 0.9, **obj: Any
) -> Problem:
    # job a: 1 unit/W, uncapped 300; job b: 0.5 unit/W above... (samples 50,100,150), uncapped 150
    return parse_problem(
        {
            "version": 1,
            "domains": [{"id": "rack", "budget_w": budget}],
            "gpus": [gpu(0, ["rack"]), gpu(1, ["rack"])],
            "jobs": [linear_job("a", ["g0"], 1.0, slow_a), linear_job("b", ["g1"], 0.5, slow_b)],
            "objective": {"kind": kind, **obj},
        }
    )


@pytest.mark.parametrize("method", ["lp", "fast", "auto"])
def test_budget_binding_hand_optimum(method: str) -> None:
    # normalised slopes: a 1/300 per W, b 0.5/150 = 1/300 per W -> tie; make b weight 0.5
    p = two_gpu_problem()
    r = solve_capping(p, method)  # type: ignore[arg-type]
    # both normalised slopes 1/300: any split of the 250 W of room is optimal: 2 * (cap sum)/...
    assert r.objective_value == pytest.approx((450) / 300.0)
    assert sum(r.caps_w.values()) == pytest.approx(450)
    assert r.shadow_prices["rack"] == pytest.approx(1000 / 300.0)
    assert r.feasible and not r.evaluation.budget_violations


def weighted_problem(slow_b: float = 0.9) -> Problem:
    return parse_problem(
        {
            "version": 1,
            "domains": [{"id": "rack", "budget_w": 450}],
            "gpus": [gpu(0, ["rack"]), gpu(1, ["rack"])],
            "jobs": [
                linear_job("a", ["g0"], 1.0),
                linear_job("b", ["g1"], 0.5, slow_b, weight=0.5),
            ],
            "objective": {"kind": "budget"},
        }
    )


@pytest.mark.parametrize("method", ["lp", "fast", "auto"])
def test_budget_steepest_job_gets_the_watts(method: str) -> None:
    # a: 1/300 per W; b: 0.5 * 0.5/150 = 1/600 per W. Room 250 W above the minimums:
    # a takes 200 (to 300 W), b the last 50 (to 150 W).
    r = solve_capping(weighted_problem(), method)  # type: ignore[arg-type]
    assert r.caps_w == pytest.approx({"g0": 300, "g1": 150})
    assert r.objective_value == pytest.approx(1.0 + 0.5 * 75 / 150)
    assert r.shadow_prices["rack"] == pytest.approx(1000 / 600.0)


def test_budget_floor_binds_and_auto_falls_back_to_lp() -> None:
    # b may lose 10 %: it needs 135 units -> 270 W; a gets the remaining 80 W above 100.
    r = solve_capping(weighted_problem(slow_b=0.1), "auto")
    assert r.method == "lp" and r.feasible
    assert r.caps_w == pytest.approx({"g0": 180, "g1": 270})
    fast = solve_capping(weighted_problem(slow_b=0.1), "fast")
    assert fast.slowdown_exceeded == ("b",) and not fast.feasible


def test_energy_objective_hand_optimum() -> None:
    # floors: a >= 0.8*300 = 240 -> 240 W; b >= 0.8*150 = 120 -> 240 W
    r = solve_capping(two_gpu_problem("energy", budget=1000, slow_a=0.2, slow_b=0.2))
    assert r.method == "lp" and r.feasible
    assert r.caps_w == pytest.approx({"g0": 240, "g1": 240})
    assert r.objective_value == pytest.approx(480)


def test_energy_floors_that_cannot_hold_are_relaxed_and_named() -> None:
    # budget 300 W total -> room 100 above mins; floors need 140 + 140
    r = solve_capping(two_gpu_problem("energy", budget=300, slow_a=0.2, slow_b=0.2))
    assert not r.feasible and set(r.slowdown_exceeded) <= {"a", "b"} and r.slowdown_exceeded
    assert not r.evaluation.budget_violations
    assert sum(r.caps_w.values()) == pytest.approx(300)
    assert not r.infeasible_domains


def test_cost_objective_hand_optimum() -> None:
    # per W-hour: a earns 1e-4*3600*1 = 0.36, b 0.18; power costs 250/1000 = 0.25
    r = solve_capping(two_gpu_problem("cost", budget=1000, value_per_unit=1e-4, price_per_kwh=250))
    assert r.caps_w == pytest.approx({"g0": 300, "g1": 100})
    expected = 1e-4 * 3600 * (300 + 50) - 250 * (300 + 100) / 1000
    assert r.objective_value == pytest.approx(expected)


def test_synchronous_job_gets_one_cap() -> None:
    p = parse_problem(
        {
            "version": 1,
            "domains": [
                {"id": "rack", "budget_w": 700},
                {"id": "n1", "budget_w": 1000},
                {"id": "n2", "budget_w": 1000},
            ],
            "gpus": [gpu(0, ["rack", "n1"]), gpu(1, ["rack", "n1"]), gpu(2, ["rack", "n2"])],
            "jobs": [
                linear_job("sync", ["g0", "g1"], 2.0, synchronous=True),
                linear_job("solo", ["g2"], 0.5),
            ],
            # per job: by size (the default) both jobs are worth 1/300 per W, a tie
            "objective": {"kind": "budget", "job_value": "per_job"},
        }
    )
    for method in ("lp", "fast"):
        r = solve_capping(p, method)
        caps = r.caps_w
        assert caps["g0"] == pytest.approx(caps["g1"])
        # normalised value per W: sync 1/600 (two GPUs per cap watt), solo 1/300.
        # Room 400 W above the minimums: solo first (200 W -> 300), sync gets the other
        # 200 W, 100 per GPU -> 200 each
        assert caps == pytest.approx({"g0": 200, "g1": 200, "g2": 300})


def test_sync_job_across_domain_sets_is_not_fast() -> None:
    p = parse_problem(
        {
            "version": 1,
            "domains": [{"id": "n1", "budget_w": 1000}, {"id": "n2", "budget_w": 1000}],
            "gpus": [gpu(0, ["n1"]), gpu(1, ["n2"])],
            "jobs": [linear_job("sync", ["g0", "g1"], 2.0, synchronous=True)],
            "objective": {"kind": "budget"},
        }
    )
    assert fast_path_applicable(p) is not None
    assert solve_capping(p).method == "lp"


def test_non_nested_overlapping_domains() -> None:
    # feed-a: g0,g1; feed-b: g1,g2; all jobs 1 unit/W. Optimum: g0 = g2 = 300, g1 = 150.
    p = parse_problem(
        {
            "version": 1,
            "domains": [
                {"id": "feed-a", "budget_w": 450, "kind": "feed"},
                {"id": "feed-b", "budget_w": 450, "kind": "feed"},
            ],
            "gpus": [gpu(0, ["feed-a"]), gpu(1, ["feed-a", "feed-b"]), gpu(2, ["feed-b"])],
            "jobs": [linear_job(f"j{i}", [f"g{i}"], 1.0) for i in range(3)],
            "objective": {"kind": "budget"},
        }
    )
    assert fast_path_applicable(p) is not None
    with pytest.raises(ValueError, match="not laminar"):
        solve_capping(p, "fast")
    r = solve_capping(p)
    assert r.method == "lp"
    assert r.caps_w == pytest.approx({"g0": 300, "g1": 150, "g2": 300})
    assert not r.evaluation.budget_violations


def test_infeasible_budget_names_domain_and_shortfall() -> None:
    p = parse_problem(
        {
            "version": 1,
            "domains": [
                {"id": "facility", "budget_w": 10000},
                {"id": "rack-a", "budget_w": 150, "baseline_w": 20},
                {"id": "rack-b", "budget_w": 350},
            ],
            "gpus": [
                gpu(0, ["facility", "rack-a"]),
                gpu(1, ["facility", "rack-a"]),
                gpu(2, ["facility", "rack-b"]),
                gpu(3, ["facility", "rack-b"]),
            ],
            "jobs": [linear_job("a", ["g0", "g1"], 1.0), linear_job("b", ["g2"], 1.0)],
            "objective": {"kind": "budget"},
        }
    )
    for method in ("lp", "fast"):
        r = solve_capping(p, method)
        assert not r.feasible and r.status.startswith("best-effort")
        assert [(d.id, d.shortfall_w) for d in r.infeasible_domains] == [("rack-a", 70.0)]
        assert r.caps_w["g0"] == 100 and r.caps_w["g1"] == 100
        # rack-b still planned within its budget: idle g3 draws 40, so g2 may take 310 -> 300
        assert r.caps_w["g2"] == pytest.approx(300)
        assert r.caps_w["g3"] == 300  # idle GPU keeps its default


def test_idle_gpu_counts_idle_power() -> None:
    p = parse_problem(
        {
            "version": 1,
            "domains": [{"id": "rack", "budget_w": 300}],
            "gpus": [gpu(0, ["rack"]), gpu(1, ["rack"])],
            "jobs": [linear_job("a", ["g0"], 1.0)],
            "objective": {"kind": "budget"},
        }
    )
    r = solve_capping(p)
    assert r.caps_w["g0"] == pytest.approx(260)  # 300 - 40 idle


def test_baselines_uniform_and_none() -> None:
    p = weighted_problem()
    base = evaluate_baselines(p)
    assert base["none"].budget_violations == ("rack",)
    assert list(base["uniform"].caps_w) == [225, 225]
    opt = solve_capping(p)
    assert opt.evaluation.normalized_throughput >= base["uniform"].normalized_throughput
    ev = evaluate_caps(p, {"g0": 200, "g1": 200})
    assert ev.job_throughput == pytest.approx({"a": 200, "b": 100})


def test_dvfs_clock_rounds_down_to_a_supported_clock() -> None:
    g = Gpu("g", "h", "H100", 200, 700, 700, 70, (), sm_clocks_mhz=(900, 1200, 1500, 1800, 1980))
    assert sm_clock_for_cap(g, 700) == 1980
    # 1980 * 0.5 ** 0.4 = 1500.6 -> 1500
    assert sm_clock_for_cap(g, 350) == 1500
    assert sm_clock_for_cap(g, 10) == 900
    assert sm_clock_for_cap(Gpu("g", "h", "H100", 200, 700, 700, 70, ()), 300) is None


# --- fast path == LP on random laminar instances --------------------------------


@st.composite
def laminar_problems(draw: st.DrawFn) -> Problem:
    n_racks = draw(st.integers(1, 3))
    domains: list[dict[str, Any]] = []
    gpus: list[dict[str, Any]] = []
    jobs: list[dict[str, Any]] = []
    min_total = 0.0
    for r in range(n_racks):
        rack_gpus_min = 0.0
        n_nodes = draw(st.integers(1, 3))
        for n in range(n_nodes):
            node = f"n{r}.{n}"
            k = draw(st.integers(1, 4))
            ids = []
            mn = draw(st.sampled_from([100.0, 150.0]))  # one per node: sync groups stay feasible
            for _ in range(k):
                i = len(gpus)
                gpus.append(
                    {
                        "id": f"g{i}",
                        "host": node,
                        "model": "H100",
                        "min_w": mn,
                        "max_w": 400.0,
                        "default_w": 400.0,
                        "idle_w": 30.0,
                        "domains": ["fac", f"r{r}", node],
                    }
                )
                ids.append(f"g{i}")
                rack_gpus_min += mn
            sync = k > 1 and draw(st.booleans())
            groups = [ids] if sync else [[g] for g in ids]
            for grp in groups:
                slopes = sorted(
                    draw(st.lists(st.floats(0.0, 2.0), min_size=3, max_size=3)), reverse=True
                )
                y0 = draw(st.floats(10.0, 100.0))
                caps = [100.0, 200.0, 300.0, 400.0]
                ys = [y0]
                for s in slopes:
                    ys.append(ys[-1] + s * 100.0)
                jobs.append(
                    {
                        "id": f"j{len(jobs)}",
                        "gpus": grp,
                        "synchronous": sync,
                        "weight": draw(st.sampled_from([0.5, 1.0, 3.0])),
                        "allowed_slowdown": 0.99,
                        # each point twice: exact replicates show the data carry no
                        # noise, so the fits carry no slowdown margin to bind a floor
                        "samples": [
                            {"cap_w": c, "throughput": y}
                            for c, y in zip(caps, ys, strict=True)
                            for _ in range(2)
                        ],
                    }
                )
            node_min = sum(g["min_w"] for g in gpus if g["host"] == node)
            domains.append(
                {"id": node, "budget_w": node_min + draw(st.floats(0.0, 300.0 * k)) + 1.0}
            )
        domains.append(
            {"id": f"r{r}", "budget_w": rack_gpus_min + draw(st.floats(0.0, 600.0)) + 1.0}
        )
        min_total += rack_gpus_min
    domains.append({"id": "fac", "budget_w": min_total + draw(st.floats(0.0, 1500.0)) + 1.0})
    return parse_problem(
        {
            "version": 1,
            "domains": domains,
            "gpus": gpus,
            "jobs": jobs,
            "objective": {"kind": "budget"},
        }
    )


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(laminar_problems())
def test_fast_path_agrees_with_lp(p: Problem) -> None:
    assert fast_path_applicable(p) is None
    fast = solve_capping(p, "fast")
    lp = solve_capping(p, "lp")
    assert not fast.evaluation.budget_violations and not lp.evaluation.budget_violations
    assert fast.objective_value == pytest.approx(lp.objective_value, rel=1e-6, abs=1e-9)


def test_energy_floor_is_tightened_by_the_fit_margin() -> None:
    # a may lose 20 %; a fit that may understate its slowdown by 10 points leaves 10 %:
    # floor 0.9 * 300 = 270 units -> 270 W (b keeps 240 W, its fit is exact)
    p = two_gpu_problem("energy", budget=1000, slow_a=0.2, slow_b=0.2)
    fits = fit_curves(p)
    assert fits["a"].slowdown_margin == 0.0  # exact samples: no margin of their own
    fits["a"] = dataclasses.replace(fits["a"], slowdown_margin=0.1)
    r = solve_capping(p, fits=fits)
    assert r.feasible and r.caps_w == pytest.approx({"g0": 270, "g1": 240})
    # a margin past the allowance leaves the job uncapped (floor = uncapped), never negative
    fits["a"] = dataclasses.replace(fits["a"], slowdown_margin=0.5)
    assert solve_capping(p, fits=fits).caps_w["g0"] == pytest.approx(300)


def _per_node_problem(node_w: float, n: int = 10, kind: str = "budget") -> Problem:
    return parse_problem(
        {
            "version": 1,
            "domains": [{"id": "fac", "budget_w": node_w * n}]
            + [{"id": f"node{i}", "budget_w": node_w} for i in range(n)],
            "gpus": [gpu(i, ["fac", f"node{i}"]) for i in range(n)],
            "jobs": [linear_job(f"j{i}", [f"g{i}"], 1.0) for i in range(n)],
            "objective": {"kind": kind},
        }
    )


@pytest.mark.parametrize("method", ["lp", "fast"])
def test_mw_setpoints_never_break_a_budget(method: str) -> None:
    # every node's budget is 250.0006 W: the solver fills it, and rounding each cap to
    # the nearest mW (250.001) would put every node 0.4 mW and the facility 4 mW over
    from optimizer.plan import make_plan

    p = _per_node_problem(250.0006)
    r = solve_capping(p, method)  # type: ignore[arg-type]
    assert round(250.0006 - 1e-9, 3) > 250.0006  # what round-half did
    plan = make_plan(p, r, created_ns=1)
    caps = {s.gpu: s.power_limit_w for s in plan.setpoints}
    for i in range(10):
        assert caps[f"g{i}"] <= 250.0006
        assert caps[f"g{i}"] == pytest.approx(250.0, abs=1e-3)
        assert caps[f"g{i}"] * 1000 == pytest.approx(round(caps[f"g{i}"] * 1000), abs=1e-6)
    assert sum(caps.values()) <= 2500.006
    assert not r.evaluation.budget_violations
    assert r.caps_w == caps  # the result's caps are the plan's


def test_mw_rounding_fixes_a_domain_the_solver_left_over() -> None:
    # caps already at whole mW but 0.1 mW over each node (0.3 mW over the facility):
    # each node's cap is lowered by 1 mW, once
    import numpy as np

    from optimizer.capping import _build_model, _round_down_mw

    p = _per_node_problem(250.0009, n=3)
    m = _build_model(p, fit_curves(p))
    room = np.maximum(m.room, 0.0)
    caps = _round_down_mw(m, np.full(3, 250.001), room)
    assert caps.tolist() == pytest.approx([250.0, 250.0, 250.0], abs=1e-9)
    assert np.all(caps <= 250.0009)


def _sizes_problem(job_value: str | None) -> Problem:
    # per GPU: 50 at 100 W, 100 at 200 W, 120 at 300 W (slopes 0.5 then 0.2 per W);
    # job "big" on 8 GPUs (8x that), job "small" on 1; 9 x 100 W minimum + 500 W of room
    def job(jid: str, gpus: list[str]) -> dict[str, Any]:
        k = len(gpus)
        pts = ((100, 50.0), (200, 100.0), (300, 120.0))
        return {
            "id": jid,
            "gpus": gpus,
            "allowed_slowdown": 0.9,
            "samples": [{"cap_w": c, "throughput": k * t} for c, t in pts],
        }

    obj: dict[str, Any] = {"kind": "budget"}
    if job_value is not None:
        obj["job_value"] = job_value
    return parse_problem(
        {
            "version": 1,
            "domains": [{"id": "rack", "budget_w": 1400}],
            "gpus": [gpu(i, ["rack"]) for i in range(9)],
            "jobs": [job("big", [f"g{i}" for i in range(8)]), job("small", ["g8"])],
            "objective": obj,
        }
    )


@pytest.mark.parametrize("method", ["lp", "fast"])
def test_job_value_size_maximises_the_fleets_work(method: str) -> None:
    # by GPUs (the default): every GPU's first 100 W earn 0.5/W, the small job's next
    # 100 W only 0.2/W, so the 500 W go to steep pieces: the small GPU stays <= 200 W and
    # the fleet does 9 x 50 + 0.5 x 500 = 700 units/s (120 per GPU uncapped)
    p = _sizes_problem(None)
    assert p.objective.job_value == "size"
    r = solve_capping(p, method)  # type: ignore[arg-type]
    caps = r.caps_w
    assert caps["g8"] <= 200 + 1e-3
    assert sum(caps.values()) == pytest.approx(1400, abs=0.01)
    t = r.evaluation.job_throughput
    assert t["big"] + t["small"] == pytest.approx(700, abs=0.01)
    assert r.objective_value == pytest.approx(700 / 120, abs=1e-4)  # GPU-equivalents


@pytest.mark.parametrize("method", ["lp", "fast"])
def test_job_value_per_job_counts_every_job_alike(method: str) -> None:
    # per job: the small job's watts are worth 8x the big one's per GPU (0.2/120 > 0.5/960),
    # so it runs uncapped (300 W) and the big job's 8 GPUs share the 300 W left:
    # 8 x 50 + 0.5 x 300 + 120 = 670 units/s, less total work than by size
    p = _sizes_problem("per_job")
    r = solve_capping(p, method)  # type: ignore[arg-type]
    caps = r.caps_w
    assert caps["g8"] == pytest.approx(300, abs=1e-3)
    assert sum(caps[f"g{i}"] for i in range(8)) == pytest.approx(1100, abs=0.01)
    t = r.evaluation.job_throughput
    assert t["big"] + t["small"] == pytest.approx(670, abs=0.01)
    assert r.objective_value == pytest.approx(550 / 960 + 1.0, abs=1e-4)  # job-equivalents


def test_job_value_weights_still_multiply() -> None:
    # weight 8 on the small job under size makes it worth the big one per GPU... times 8:
    # its shallow piece (8 x 0.2 = 1.6/W) beats every steep one (0.5/W): it runs at 300 W
    doc_p = _sizes_problem(None)
    small = dataclasses.replace(doc_p.jobs[1], weight=8.0)
    p = dataclasses.replace(doc_p, jobs=(doc_p.jobs[0], small))
    r = solve_capping(p, "lp")
    assert r.caps_w["g8"] == pytest.approx(300, abs=1e-3)


def test_job_value_is_checked_and_round_trips() -> None:
    from optimizer.problem import ProblemError, problem_to_json

    with pytest.raises(ProblemError, match="job_value"):
        _sizes_problem("per_gpu")
    p = _sizes_problem("per_job")
    assert problem_to_json(p)["objective"]["job_value"] == "per_job"
    assert parse_problem(problem_to_json(p)).objective.job_value == "per_job"


def test_readings_just_above_the_draw_do_not_pin_a_job_at_full_throughput() -> None:
    # uncapped at ~600 W, then held by caps of 605 and 612 W (its draw is within 3 % of
    # them): three distinct x, all where the shapes agree. The two-shape share is not
    # identified (infinite SD), which made the margin the whole allowance and pinned the
    # job at its draw; it is read as never capped instead: the prior and its margin
    from optimizer.curves import PRIOR_SLOWDOWN_MARGIN, _fit_curves_reference

    def problem(extra: list[dict[str, float]]) -> Problem:
        uncapped = [(600, 100), (602, 101), (598, 99.5), (601, 100.3)]
        return parse_problem(
            {
                "version": 1,
                "domains": [{"id": "r", "budget_w": 10000}],
                "gpus": [gpu(0, ["r"], min_w=200, max_w=700, default_w=700, idle_w=70)],
                "jobs": [
                    {
                        "id": "j",
                        "gpus": ["g0"],
                        "allowed_slowdown": 0.1,
                        "samples": [
                            {"cap_w": 700, "power_w": p, "throughput": t} for p, t in uncapped
                        ]
                        + extra,
                    }
                ],
                "objective": {"kind": "energy"},
            }
        )

    near = [
        {"cap_w": 605, "power_w": 600, "throughput": 100.2},
        {"cap_w": 612, "power_w": 600, "throughput": 99.9},
    ]
    p, bare = problem(near), problem([])
    for fits in (fit_curves(p), _fit_curves_reference(p)):
        f = fits["j"]
        assert f.n_distinct_caps == 3
        assert f.slowdown_margin == pytest.approx(PRIOR_SLOWDOWN_MARGIN)
        assert f.method == "prior"
    cap = solve_capping(p).caps_w["g0"]
    assert cap < 0.8 * 600  # capped, as the job never capped is
    assert cap == pytest.approx(solve_capping(bare).caps_w["g0"], abs=1.0)


def test_mw_setpoints_keep_a_binding_slowdown_floor() -> None:
    # energy mode puts a job exactly on its floor: 0.8000004 x 300 at 1 unit/W is
    # 240.00012 W, which rounded down (240.000) would leave it a hair past its floor
    p = two_gpu_problem("energy", budget=1000, slow_a=0.1999996, slow_b=0.2)
    r = solve_capping(p)
    assert r.caps_w["g0"] == pytest.approx(240.001, abs=1e-9)
    assert r.evaluation.job_throughput["a"] >= (1 - 0.1999996) * 300
    assert not r.slowdown_exceeded and r.feasible
