"""Safe probing: inside the allowance on the steepest prior, a bounded share of each domain,
never above the plan, a synchronous job probed as one, marked in the plan and its parts."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from dcenergy.publish import split_plan
from optimizer.capping import solve_capping
from optimizer.curves import PRIOR_SHAPES, PRIOR_SLOWDOWN_MARGIN
from optimizer.plan import make_plan, plan_to_json, validate_plan
from optimizer.probing import choose_probes, pessimistic_cap
from optimizer.problem import Problem, parse_problem
from optimizer.report import render_report


def _steepest(u: float) -> float:
    return min(
        float(np.interp(u, [p for p, _ in s], [r for _, r in s])) for s in PRIOR_SHAPES.values()
    )


def fleet(kind: str = "energy", n_jobs: int = 12, rack_w: float = 9000.0) -> Problem:
    """Two racks of 4-GPU nodes; every job seen only uncapped (on the prior)."""
    gpus: list[dict[str, Any]] = []
    jobs: list[dict[str, Any]] = []
    for j in range(n_jobs):
        rack = f"rack{j % 2}"
        ids = [f"g{j}-{k}" for k in range(2)]
        gpus += [
            {
                "id": g,
                "host": f"n{j}",
                "model": "H100",
                "min_w": 200,
                "max_w": 700,
                "default_w": 700,
                "idle_w": 70,
                "domains": ["fac", rack],
            }
            for g in ids
        ]
        draw = 300.0 + 15 * j  # below 70 % of 700 W: read as memory-bound, a wide margin
        jobs.append(
            {
                "id": f"j{j}",
                "gpus": ids,
                "allowed_slowdown": 0.1,
                "synchronous": j % 3 == 0,
                "samples": [{"cap_w": 700, "power_w": draw, "throughput": 100.0}] * 3,
            }
        )
    return parse_problem(
        {
            "version": 1,
            "domains": [
                {"id": "fac", "budget_w": 2 * rack_w},
                {"id": "rack0", "budget_w": rack_w},
                {"id": "rack1", "budget_w": rack_w},
            ],
            "gpus": gpus,
            "jobs": jobs,
            "objective": {"kind": kind},
        }
    )


@pytest.mark.parametrize("kind", ["energy", "budget"])
@pytest.mark.parametrize("share", [0.1, 0.3, 1.0])
def test_probes_stay_inside_the_allowance_the_plan_and_the_domain_share(
    kind: str, share: float
) -> None:
    p = fleet(kind, rack_w=9000.0 if kind == "energy" else 4300.0)
    r = solve_capping(p)
    assert r.feasible
    pr = choose_probes(p, r, share=share)
    # a job's 2 GPUs draw ~640 W at their caps: more than 10 % of a 4.3 kW rack
    assert bool(pr.job_caps_w) == (kind == "energy" or share > 0.1)
    caps = r.caps_w
    for jid, cap in pr.job_caps_w.items():
        job = next(j for j in p.jobs if j.id == jid)
        fit = r.fits[jid]
        # inside the allowance on the steepest prior shape, with the prior's margin
        assert 1 - _steepest(cap / fit.draw_w) <= job.allowed_slowdown - PRIOR_SLOWDOWN_MARGIN
        assert cap >= max(p.gpu(g).min_w for g in job.gpus)
        # every GPU of the job, one cap, never above the plan
        assert {pr.caps_w[g] for g in job.gpus} == {cap}
        assert all(cap < caps[g] for g in job.gpus)
    for d in p.domains:
        probed = sum(caps[g] for g in pr.caps_w if d.id in p.gpu(g).domains)
        assert probed <= share * d.budget_w + 1e-9
    # the probes keep every budget the plan keeps (they only lower caps)
    from optimizer.capping import evaluate_caps

    assert not evaluate_caps(p, {**caps, **pr.caps_w}, r.fits).budget_violations
    assert (pr.given_up_value > 0) == bool(pr.job_caps_w)
    assert all(v >= 0 for v in pr.given_up.values())


def test_a_small_share_probes_fewer_jobs_and_none_at_zero() -> None:
    p = fleet()
    r = solve_capping(p)
    assert len(choose_probes(p, r, share=0.1).job_caps_w) < len(
        choose_probes(p, r, share=1.0).job_caps_w
    )
    assert choose_probes(p, r, share=0.0).caps_w == {}


def test_certain_and_exempt_jobs_are_not_probed() -> None:
    p = fleet()
    r = solve_capping(p)
    fits = {k: _certain(f) for k, f in r.fits.items()}
    assert choose_probes(p, r, share=1.0, fits=fits).caps_w == {}


def _certain(f: Any) -> Any:
    import dataclasses

    return dataclasses.replace(f, method="shape", slowdown_margin=0.0)


def test_pessimistic_cap_is_the_lowest_cap_within_the_allowance() -> None:
    p = fleet()
    r = solve_capping(p)
    job, fit = p.jobs[1], r.fits["j1"]
    cap = pessimistic_cap(job, fit, 200.0)
    assert cap is not None
    allowed = job.allowed_slowdown - PRIOR_SLOWDOWN_MARGIN
    assert 1 - _steepest(cap / fit.draw_w) <= allowed
    assert 1 - _steepest((cap - 1) / fit.draw_w) > allowed


def test_probes_are_marked_in_the_plan_its_parts_and_the_report() -> None:
    p = fleet()
    r = solve_capping(p)
    pr = choose_probes(p, r, share=0.2, lease_s=90.0)
    plan = make_plan(p, r, created_ns=10**18, probes=pr)
    doc = plan_to_json(plan)
    marked = {s["gpu"]: s for s in doc["setpoints"] if "probe_w" in s}
    assert set(marked) == set(pr.caps_w)
    for s in marked.values():
        assert s["probe_w"] <= s["power_limit_w"]
        assert s["probe_until_ns"] == 10**18 + 90 * 10**9
    assert validate_plan(doc).setpoints == plan.setpoints
    assert doc["probes"]["jobs"].keys() == pr.job_caps_w.keys()
    parts = split_plan(doc, seq_from_ns=10**18)
    probed = {s.gpu_uuid: s.probe_w for part in parts for s in part.setpoints if s.probe_w}
    assert probed == pr.caps_w
    assert "Probes (" in render_report(p, plan)
    # no probes: the plan and its parts are as before
    bare = plan_to_json(make_plan(p, r, created_ns=10**18))
    assert "probes" not in bare and all("probe_w" not in s for s in bare["setpoints"])
