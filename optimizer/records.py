"""What a published plan leaves in the store for the dashboards: ``plan`` and ``plan_domain``.

Pure: a plan in, points out (``dcenergy.schema.point``, so absent values stay
absent, never zero). One ``plan`` point per plan and one ``plan_domain`` point
per power domain, all stamped ``now_ns`` (the publishing time, like the
``plan_part`` points of the same plan).

``plan`` (tag ``objective``: the objective kind, ``budget``/``energy``/``cost``)

* ``plan_id``, ``status`` (solver status), ``solve_s`` (solver wall time);
* ``power_before_w`` / ``power_after_w``: predicted fleet GPU draw with no
  change and under the plan; ``savings_w`` is their difference;
* ``throughput_before`` / ``throughput_after``: the *weighted normalised*
  throughput, ``sum(weight x GPUs x throughput / uncapped throughput)`` over
  the jobs (without ``x GPUs`` under ``objective.job_value = "per_job"``;
  the plan's ``baselines["none"]`` and ``baselines["optimized"]``).
  Jobs count work in different units (tokens, samples, steps), so a raw sum
  would mean nothing; this is also the unit the LP's shadow prices are in;
* ``gpus_capped``: GPUs whose planned cap is below their default cap; the
  plan does not carry default caps, so this needs the problem (or
  ``default_caps``) and is absent otherwise.

``plan_domain`` (tag ``domain``)

* ``plan_id``; ``before_w`` / ``planned_w``: predicted domain draw (GPUs plus
  the domain's non-GPU baseline) before and under the plan;
* ``shadow_price_per_kw``: weighted normalised throughput one more kW in the
  domain would buy (absent where the solver gave none);
* ``budget_w``: the domain's budget. The plan JSON does not carry budgets,
  so they come from the problem (or ``budgets``); absent otherwise;
* ``measured_w``: the domain's measured draw over the window the problem was
  built from (GPUs' mean draw plus baseline; absent where a GPU in it has no
  reading); ``outermost``: the domain holds every GPU. Both need the problem.

A plan may be a :class:`~optimizer.plan.Plan` or its JSON dict; a minimal
dict (``dcenergy apply`` takes one with only ids, times and setpoints) gives
a ``plan`` point with the fields it has and no domain points.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from dcenergy import schema
from dcenergy.schema import Point
from optimizer.plan import Plan, plan_to_json
from optimizer.problem import Problem, measured_domain_power, outermost_domains

CAPPED_TOLERANCE_W = 0.5  # a cap this close to the default is the default (mW rounding)
UNKNOWN_OBJECTIVE = "unknown"  # tag value when the plan names no objective (tags cannot be "")


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        return None
    return float(v)


def _map(v: Any) -> Mapping[str, Any]:
    return v if isinstance(v, Mapping) else {}


def _objective_tag(doc: Mapping[str, Any]) -> str:
    kind = _map(doc.get("objective")).get("kind")
    return kind if isinstance(kind, str) and kind else UNKNOWN_OBJECTIVE


def _gpus_capped(doc: Mapping[str, Any], default_caps: Mapping[str, float] | None) -> int | None:
    if default_caps is None:
        return None
    setpoints = doc.get("setpoints")
    if not isinstance(setpoints, list):
        return None
    n = 0
    for raw in setpoints:
        sp = _map(raw)
        cap, default = _num(sp.get("power_limit_w")), default_caps.get(str(sp.get("gpu")))
        if cap is not None and default is not None and cap < default - CAPPED_TOLERANCE_W:
            n += 1
    return n


def plan_points(
    plan: Plan | Mapping[str, Any],
    now_ns: int,
    *,
    problem: Problem | None = None,
    budgets: Mapping[str, float] | None = None,
    default_caps: Mapping[str, float] | None = None,
) -> list[Point]:
    """The ``plan`` point and one ``plan_domain`` point per domain of ``plan``.

    ``problem`` supplies domain budgets, default caps, measured power and
    which domains are outermost; ``budgets`` and ``default_caps`` override it
    (or stand in for it). Without either, ``budget_w`` and ``gpus_capped`` are
    absent; without ``problem``, ``measured_w`` and ``outermost``.
    """
    doc: Mapping[str, Any] = plan_to_json(plan) if isinstance(plan, Plan) else plan
    if problem is not None:
        if budgets is None:
            budgets = {d.id: d.budget_w for d in problem.domains}
        if default_caps is None:
            default_caps = {g.id: g.default_w for g in problem.gpus}
    plan_id = doc.get("plan_id")
    plan_id = plan_id if isinstance(plan_id, str) else None
    solver = _map(doc.get("solver"))
    preds = _map(doc.get("predictions"))
    before, after = _map(preds.get("before")), _map(preds.get("after"))
    baselines = _map(doc.get("baselines"))
    p_before, p_after = _num(before.get("fleet_power_w")), _num(after.get("fleet_power_w"))
    status = solver.get("status")
    out = [
        schema.point(
            schema.PLAN,
            {"objective": _objective_tag(doc)},
            {
                "plan_id": plan_id,
                "status": status if isinstance(status, str) else None,
                "solve_s": _num(solver.get("time_s")),
                "power_before_w": p_before,
                "power_after_w": p_after,
                "throughput_before": _num(_map(baselines.get("none")).get("throughput")),
                "throughput_after": _num(_map(baselines.get("optimized")).get("throughput")),
                "savings_w": None if p_before is None or p_after is None else p_before - p_after,
                "gpus_capped": _gpus_capped(doc, default_caps),
            },
            now_ns,
        )
    ]
    measured = measured_domain_power(problem) if problem is not None else {}
    outermost = outermost_domains(problem) if problem is not None else None
    d_before, d_after = _map(before.get("domain_power_w")), _map(after.get("domain_power_w"))
    shadow = _map(doc.get("shadow_prices"))
    domains = sorted({*d_before, *d_after, *shadow, *(budgets or {})})
    for d in domains:
        out.append(
            schema.point(
                schema.PLAN_DOMAIN,
                {schema.TAG_DOMAIN: str(d)},
                {
                    "plan_id": plan_id,
                    "budget_w": _num((budgets or {}).get(d)),
                    "before_w": _num(d_before.get(d)),
                    "planned_w": _num(d_after.get(d)),
                    "measured_w": _num(measured.get(d)),
                    "outermost": None if outermost is None else d in outermost,
                    "shadow_price_per_kw": _num(shadow.get(d)),
                },
                now_ns,
            )
        )
    return out


__all__ = ["plan_points"]
