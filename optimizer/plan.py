"""The optimizer's output: a versioned JSON plan of per-GPU setpoints.

A plan is what agents apply, so it is self-contained and short-lived: an id,
creation and expiry times (an expired plan is reverted to defaults by the
agents), the setpoints, the predictions it was made on, and a ``signature``
slot. Signing happens elsewhere (Ed25519 over :func:`canonical_bytes`, which
covers everything but the signature); this module only keeps the format
ready for it. ``consolidation`` is produced by the consolidation MILP and is
carried as an opaque JSON object here.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Final

from dcenergy.errors import PlanError
from optimizer.baselines import evaluate_baselines
from optimizer.capping import CappingResult, Evaluation, carbon, sm_clock_for_cap
from optimizer.problem import Problem, objective_to_json

PLAN_VERSION: Final = 1
DEFAULT_TTL_S: Final = 15 * 60.0


@dataclass(frozen=True)
class Setpoint:
    """What one GPU should be set to."""

    gpu: str
    host: str
    power_limit_w: float
    sm_clock_max_mhz: int | None = None
    # a short probe below the plan's limit (optimizer/probing.py): agents apply it
    # until probe_until_ns and audit it as 'probe', then the plan's limit
    probe_w: float | None = None
    probe_until_ns: int | None = None


@dataclass(frozen=True)
class InfeasibleDomain:
    id: str
    shortfall_w: float


@dataclass(frozen=True)
class SolverInfo:
    method: str
    status: str
    time_s: float
    feasible: bool
    infeasible_domains: tuple[InfeasibleDomain, ...] = ()
    slowdown_exceeded: tuple[str, ...] = ()
    objective_value: float | None = None


@dataclass(frozen=True)
class Prediction:
    """Predicted state of the fleet under a set of caps."""

    fleet_power_w: float  # GPU draw, summed over the fleet
    domain_power_w: Mapping[str, float]  # GPU draw + baseline per domain
    job_throughput: Mapping[str, float]  # unit per second
    job_energy_j_per_unit: Mapping[str, float | None]  # GPU energy per unit of work


@dataclass(frozen=True)
class BaselineSummary:
    throughput: float  # sum of weight * normalised throughput
    power_w: float  # fleet GPU draw
    budget_violations: tuple[str, ...] = ()


@dataclass(frozen=True)
class Plan:
    """One plan. Build it with :func:`make_plan`; load it with :func:`validate_plan`."""

    plan_id: str
    created_ns: int
    expires_ns: int
    objective: Mapping[str, Any]
    solver: SolverInfo
    setpoints: tuple[Setpoint, ...]
    before: Prediction
    after: Prediction
    shadow_prices: Mapping[str, float]
    baselines: Mapping[str, BaselineSummary]
    consolidation: Mapping[str, Any] | None = None
    signature: Mapping[str, Any] | None = None
    version: int = PLAN_VERSION
    # what the plan probes and what that is predicted to cost (optimizer/probing.py)
    probes: Mapping[str, Any] | None = None

    def expired(self, now_ns: int) -> bool:
        return now_ns >= self.expires_ns

    def setpoints_for_host(self, host: str) -> tuple[Setpoint, ...]:
        return tuple(s for s in self.setpoints if s.host == host)


# --- building -----------------------------------------------------------------


def _prediction(problem: Problem, ev: Evaluation) -> Prediction:
    energy: dict[str, float | None] = {}
    index = problem.gpu_index
    for job in problem.jobs:
        t = ev.job_throughput[job.id]
        p = sum(float(ev.gpu_power_w[index[g]]) for g in job.gpus)
        energy[job.id] = p / t if t > 0 else None
    return Prediction(
        fleet_power_w=ev.fleet_power_w,
        domain_power_w=dict(ev.domain_power_w),
        job_throughput=dict(ev.job_throughput),
        job_energy_j_per_unit=energy,
    )


def make_plan(
    problem: Problem,
    result: CappingResult,
    *,
    consolidation: Mapping[str, Any] | None = None,
    created_ns: int | None = None,
    ttl_s: float = DEFAULT_TTL_S,
    plan_id: str | None = None,
    probes: Any = None,
) -> Plan:
    """Turn a capping result into a plan; ``created_ns`` defaults to now.

    ``probes`` (an ``optimizer.probing.Probes``) adds probe setpoints and their summary.
    """
    created = time.time_ns() if created_ns is None else created_ns
    base = evaluate_baselines(problem, result.fits)
    caps = result.evaluation.caps_w
    setpoints = tuple(
        Setpoint(
            gpu=g.id,
            host=g.host,
            power_limit_w=round(float(caps[i]), 3),
            sm_clock_max_mhz=sm_clock_for_cap(g, float(caps[i])),
        )
        for i, g in enumerate(problem.gpus)
    )
    if probes is not None and probes.caps_w:
        until = created + min(int(probes.lease_s * 1e9), int(ttl_s * 1e9))
        setpoints = tuple(
            replace(s, probe_w=probes.caps_w[s.gpu], probe_until_ns=until)
            if s.gpu in probes.caps_w
            else s
            for s in setpoints
        )
    return Plan(
        plan_id=plan_id or uuid.uuid4().hex,
        created_ns=created,
        expires_ns=created + int(ttl_s * 1e9),
        objective=objective_to_json(problem.objective),
        solver=SolverInfo(
            method=result.method,
            status=result.status,
            time_s=result.time_s,
            feasible=result.feasible,
            infeasible_domains=tuple(
                InfeasibleDomain(d.id, d.shortfall_w) for d in result.infeasible_domains
            ),
            slowdown_exceeded=result.slowdown_exceeded,
            objective_value=result.objective_value,
        ),
        setpoints=setpoints,
        before=_prediction(problem, base["none"]),
        after=_prediction(problem, result.evaluation),
        shadow_prices=dict(result.shadow_prices),
        baselines={
            **{
                name: BaselineSummary(
                    ev.normalized_throughput, ev.fleet_power_w, ev.budget_violations
                )
                for name, ev in base.items()
            },
            "optimized": BaselineSummary(
                result.evaluation.normalized_throughput,
                result.evaluation.fleet_power_w,
                result.evaluation.budget_violations,
            ),
        },
        consolidation=dict(consolidation) if consolidation is not None else None,
        probes=probes.summary() if probes is not None and probes.caps_w else None,
    )


def carbon_summary(problem: Problem, plan: Plan) -> dict[str, float]:
    """Carbon before/after (g/h and kg/day) of the GPU draw, PUE included."""
    gb, kb = carbon(problem, plan.before.fleet_power_w)
    ga, ka = carbon(problem, plan.after.fleet_power_w)
    return {"before_g_h": gb, "before_kg_day": kb, "after_g_h": ga, "after_kg_day": ka}


# --- JSON -----------------------------------------------------------------------


def _pred_json(p: Prediction) -> dict[str, Any]:
    return {
        "fleet_power_w": p.fleet_power_w,
        "domain_power_w": dict(p.domain_power_w),
        "job_throughput": dict(p.job_throughput),
        "job_energy_j_per_unit": dict(p.job_energy_j_per_unit),
    }


def plan_to_json(plan: Plan) -> dict[str, Any]:
    """The JSON form; :func:`validate_plan` reads it back to an equal plan."""
    s = plan.solver
    return {
        "version": plan.version,
        "plan_id": plan.plan_id,
        "created_ns": plan.created_ns,
        "expires_ns": plan.expires_ns,
        "objective": dict(plan.objective),
        "solver": {
            "method": s.method,
            "status": s.status,
            "time_s": s.time_s,
            "feasible": s.feasible,
            "infeasible_domains": [
                {"id": d.id, "shortfall_w": d.shortfall_w} for d in s.infeasible_domains
            ],
            "slowdown_exceeded": list(s.slowdown_exceeded),
            "objective_value": s.objective_value,
        },
        "setpoints": [
            {
                "gpu": sp.gpu,
                "host": sp.host,
                "power_limit_w": sp.power_limit_w,
                "sm_clock_max_mhz": sp.sm_clock_max_mhz,
                **(
                    {}
                    if sp.probe_w is None
                    else {"probe_w": sp.probe_w, "probe_until_ns": sp.probe_until_ns}
                ),
            }
            for sp in plan.setpoints
        ],
        "consolidation": dict(plan.consolidation) if plan.consolidation is not None else None,
        "predictions": {"before": _pred_json(plan.before), "after": _pred_json(plan.after)},
        "shadow_prices": dict(plan.shadow_prices),
        "baselines": {
            k: {
                "throughput": b.throughput,
                "power_w": b.power_w,
                "budget_violations": list(b.budget_violations),
            }
            for k, b in plan.baselines.items()
        },
        "signature": dict(plan.signature) if plan.signature is not None else None,
        **({} if plan.probes is None else {"probes": dict(plan.probes)}),
    }


def canonical_bytes(plan: Plan | Mapping[str, Any]) -> bytes:
    """The bytes a signature covers: the JSON form without ``signature``, sorted, compact."""
    obj = dict(plan_to_json(plan) if isinstance(plan, Plan) else plan)
    obj.pop("signature", None)
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode()


class _V:
    """Field checks that raise PlanError naming the JSON path."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, path: str, problem: str) -> PlanError:
        return PlanError(f"{self.source}: field '{path}': {problem}")

    def obj(self, v: object, path: str) -> Mapping[str, Any]:
        if not isinstance(v, Mapping):
            raise self.fail(path, "expected an object")
        return v

    def get(self, o: Mapping[str, Any], key: str, path: str) -> Any:
        if key not in o:
            raise self.fail(f"{path}.{key}" if path else key, "missing required field")
        return o[key]

    def num(self, o: Mapping[str, Any], key: str, path: str, *, nullable: bool = False) -> float:
        v = self.get(o, key, path)
        p = f"{path}.{key}" if path else key
        if v is None and nullable:
            return math.nan
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(float(v)):
            raise self.fail(p, "expected a finite number")
        return float(v)

    def int_(self, o: Mapping[str, Any], key: str, path: str) -> int:
        v = self.get(o, key, path)
        if isinstance(v, bool) or not isinstance(v, int):
            raise self.fail(f"{path}.{key}" if path else key, "expected an integer")
        return v

    def str_(self, o: Mapping[str, Any], key: str, path: str) -> str:
        v = self.get(o, key, path)
        if not isinstance(v, str) or not v:
            raise self.fail(f"{path}.{key}" if path else key, "expected a non-empty string")
        return v

    def num_map(self, v: object, path: str, *, nullable: bool = False) -> dict[str, Any]:
        o = self.obj(v, path)
        out: dict[str, Any] = {}
        for k, x in o.items():
            if x is None and nullable:
                out[k] = None
                continue
            if isinstance(x, bool) or not isinstance(x, int | float) or not math.isfinite(float(x)):
                raise self.fail(f"{path}.{k}", "expected a finite number")
            out[k] = float(x)
        return out


def _pred_from(v: _V, raw: object, path: str) -> Prediction:
    o = v.obj(raw, path)
    return Prediction(
        fleet_power_w=v.num(o, "fleet_power_w", path),
        domain_power_w=v.num_map(v.get(o, "domain_power_w", path), f"{path}.domain_power_w"),
        job_throughput=v.num_map(v.get(o, "job_throughput", path), f"{path}.job_throughput"),
        job_energy_j_per_unit=v.num_map(
            v.get(o, "job_energy_j_per_unit", path), f"{path}.job_energy_j_per_unit", nullable=True
        ),
    )


def validate_plan(obj: object, source: str = "<dict>") -> Plan:
    """Check a decoded plan document and build a :class:`Plan` (PlanError names the field).

    This checks the format only; signature and expiry are the loader's policy.
    """
    v = _V(source)
    top = v.obj(obj, "")
    version = v.get(top, "version", "")
    if isinstance(version, bool) or version != PLAN_VERSION:
        raise v.fail("version", f"unsupported plan version {version!r}; expected {PLAN_VERSION}")
    created = v.int_(top, "created_ns", "")
    expires = v.int_(top, "expires_ns", "")
    if expires <= created:
        raise v.fail("expires_ns", "must be after created_ns")
    so = v.obj(v.get(top, "solver", ""), "solver")
    inf: list[InfeasibleDomain] = []
    for i, d in enumerate(so.get("infeasible_domains", [])):
        p = f"solver.infeasible_domains[{i}]"
        do = v.obj(d, p)
        inf.append(InfeasibleDomain(v.str_(do, "id", p), v.num(do, "shortfall_w", p)))
    ov = so.get("objective_value")
    feasible = v.get(so, "feasible", "solver")
    if not isinstance(feasible, bool):
        raise v.fail("solver.feasible", "expected true or false")
    solver = SolverInfo(
        method=v.str_(so, "method", "solver"),
        status=v.str_(so, "status", "solver"),
        time_s=v.num(so, "time_s", "solver"),
        feasible=feasible,
        infeasible_domains=tuple(inf),
        slowdown_exceeded=tuple(str(x) for x in so.get("slowdown_exceeded", [])),
        objective_value=None if ov is None else v.num(so, "objective_value", "solver"),
    )
    raw_sp = v.get(top, "setpoints", "")
    if not isinstance(raw_sp, list):
        raise v.fail("setpoints", "expected an array")
    sps: list[Setpoint] = []
    seen: set[str] = set()
    for i, raw in enumerate(raw_sp):
        p = f"setpoints[{i}]"
        o = v.obj(raw, p)
        gpu = v.str_(o, "gpu", p)
        if gpu in seen:
            raise v.fail(f"{p}.gpu", f"duplicate setpoint for GPU {gpu!r}")
        seen.add(gpu)
        limit = v.num(o, "power_limit_w", p)
        if limit <= 0:
            raise v.fail(f"{p}.power_limit_w", "must be > 0")
        clk = o.get("sm_clock_max_mhz")
        if clk is not None and (isinstance(clk, bool) or not isinstance(clk, int) or clk <= 0):
            raise v.fail(f"{p}.sm_clock_max_mhz", "expected a positive integer or null")
        probe_w = probe_until = None
        if o.get("probe_w") is not None:
            probe_w = v.num(o, "probe_w", p)
            probe_until = v.int_(o, "probe_until_ns", p)
            if not 0 < probe_w <= limit:
                raise v.fail(f"{p}.probe_w", "must be in (0, power_limit_w]")
        sps.append(Setpoint(gpu, v.str_(o, "host", p), limit, clk, probe_w, probe_until))
    preds = v.obj(v.get(top, "predictions", ""), "predictions")
    cons = top.get("consolidation")
    if cons is not None:
        cons = v.obj(cons, "consolidation")
    sig = top.get("signature")
    if sig is not None:
        sig = v.obj(sig, "signature")
    bl: dict[str, BaselineSummary] = {}
    for k, raw in v.obj(top.get("baselines", {}), "baselines").items():
        p = f"baselines.{k}"
        o = v.obj(raw, p)
        bl[k] = BaselineSummary(
            v.num(o, "throughput", p),
            v.num(o, "power_w", p),
            tuple(str(x) for x in o.get("budget_violations", [])),
        )
    return Plan(
        plan_id=v.str_(top, "plan_id", ""),
        created_ns=created,
        expires_ns=expires,
        objective=dict(v.obj(v.get(top, "objective", ""), "objective")),
        solver=solver,
        setpoints=tuple(sps),
        before=_pred_from(v, v.get(preds, "before", "predictions"), "predictions.before"),
        after=_pred_from(v, v.get(preds, "after", "predictions"), "predictions.after"),
        shadow_prices=v.num_map(top.get("shadow_prices", {}), "shadow_prices"),
        baselines=bl,
        consolidation=dict(cons) if cons is not None else None,
        signature=dict(sig) if sig is not None else None,
        probes=dict(v.obj(top["probes"], "probes")) if top.get("probes") is not None else None,
    )


def dump_plan(plan: Plan, path: str | Path) -> None:
    """Write the plan as indented JSON."""
    Path(path).write_text(
        json.dumps(plan_to_json(plan), indent=2, allow_nan=False) + "\n", encoding="utf-8"
    )


def load_plan(path: str | Path) -> Plan:
    """Read and validate a plan file (format only; no signature or expiry check)."""
    p = Path(path)
    try:
        obj = json.loads(p.read_text(encoding="utf-8"))
    except OSError as e:
        raise PlanError(f"{p}: cannot read: {e.strerror or e}") from e
    except json.JSONDecodeError as e:
        raise PlanError(f"{p}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from e
    return validate_plan(obj, source=str(p))


__all__ = [
    "DEFAULT_TTL_S",
    "PLAN_VERSION",
    "BaselineSummary",
    "InfeasibleDomain",
    "Plan",
    "Prediction",
    "Setpoint",
    "SolverInfo",
    "canonical_bytes",
    "carbon_summary",
    "dump_plan",
    "load_plan",
    "make_plan",
    "plan_to_json",
    "validate_plan",
]
