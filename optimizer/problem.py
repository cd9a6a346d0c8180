"""The optimizer's input: a versioned JSON problem and its frozen dataclasses.

A problem is everything the optimizer needs and nothing it has to look up:
GPUs with their limits and the power domains they draw from, domains with
budgets, jobs with observed (cap or power, throughput) samples, and the
objective. ``dcenergy`` can solve a problem file with no store at all.

Validation is strict and names the offending field by its JSON path
(``gpus[3].max_w``) so a person can fix the file; every failure raises
:class:`~dcenergy.errors.ProblemError`. The format is documented in
``docs/problem-format.md``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Final

from dcenergy.errors import ProblemError
from dcenergy.inputs import read_json

PROBLEM_VERSION: Final = 1
DEFAULT_SLOWDOWN_CONFIDENCE: Final = 0.95
DOMAIN_KINDS: Final = frozenset({"facility", "row", "rack", "node", "feed", "cooling", "other"})
OBJECTIVE_KINDS: Final = frozenset({"budget", "energy", "cost"})


@dataclass(frozen=True)
class Gpu:
    """One GPU: settable power-limit range, idle draw and the domains it draws from."""

    id: str
    host: str
    model: str
    min_w: float
    max_w: float
    default_w: float
    idle_w: float
    domains: tuple[str, ...]
    current_w: float | None = None  # measured draw now (W), for "now" figures
    sm_clocks_mhz: tuple[int, ...] | None = None  # supported SM clocks, ascending
    # held: why it keeps its default cap (unhealthy: ECC, row remap, XID); never capped
    held: tuple[str, ...] = ()
    # shared_by: the jobs whose work shares it (MIG instances, MPS, time slicing): busy,
    # no one job's curve sets its cap, so it keeps its default cap and counts there
    shared_by: tuple[str, ...] = ()

    @property
    def pinned(self) -> bool:
        """Whether the solver must leave it at its default cap (held or shared)."""
        return bool(self.held or self.shared_by)


@dataclass(frozen=True)
class Activity:
    """A job's profiling activity (GPM) over the window, shares 0-1; None: not measured.

    Evidence about its curve's shape before any cap sample exists: a job whose
    DRAM is busy and whose SMs are not is memory-bound.
    """

    dram_active: float | None = None
    sm_active: float | None = None
    tensor_active: float | None = None


@dataclass(frozen=True)
class Domain:
    """A power domain (facility, row, rack, node, feed, cooling zone) with a budget."""

    id: str
    budget_w: float
    baseline_w: float = 0.0  # non-GPU load inside the domain
    kind: str | None = None


@dataclass(frozen=True)
class Sample:
    """One observation: the per-GPU cap and/or measured per-GPU power, and job throughput."""

    throughput: float  # the job's total, in the job's unit per second
    cap_w: float | None = None
    power_w: float | None = None


@dataclass(frozen=True)
class Job:
    """A job on a set of GPUs and how its throughput responded to power."""

    id: str
    gpus: tuple[str, ...]
    samples: tuple[Sample, ...] = ()
    weight: float = 1.0
    allowed_slowdown: float = 0.1
    synchronous: bool = False
    unit: str = "units"
    # exempt: fixed load at its GPUs' default cap, never capped nor slowed (scheduler policy)
    exempt: bool = False
    policy: str | None = None  # where weight/slowdown/exempt came from (shown in reports)
    activity: Activity | None = None  # GPM activity over the window (curve-shape evidence)


@dataclass(frozen=True)
class Objective:
    """What to optimise and the prices that turn watts into money and carbon."""

    kind: str
    price_per_kwh: float = 0.0
    pue: float = 1.0
    carbon_g_per_kwh: float = 0.0
    value_per_unit: float = 0.0
    horizon_h: float | None = None
    # how sure a job's slowdown floor must be to hold on its true curve (see curves.py)
    slowdown_confidence: float = DEFAULT_SLOWDOWN_CONFIDENCE
    # what a job's progress is worth in the budget objective: "size" (in proportion to its
    # GPUs, so the fleet's total work is maximised) or "per_job" (every job alike)
    job_value: str = "size"


@dataclass(frozen=True)
class Problem:
    """A validated problem; build it with :func:`parse_problem` or :func:`load_problem`."""

    gpus: tuple[Gpu, ...]
    domains: tuple[Domain, ...]
    jobs: tuple[Job, ...]
    objective: Objective
    version: int = PROBLEM_VERSION

    @cached_property
    def gpu_index(self) -> dict[str, int]:
        """Position of every GPU id in ``gpus``."""
        return {g.id: i for i, g in enumerate(self.gpus)}

    @cached_property
    def domain_index(self) -> dict[str, int]:
        """Position of every domain id in ``domains``."""
        return {d.id: i for i, d in enumerate(self.domains)}

    @cached_property
    def job_of_gpu(self) -> dict[str, str]:
        """The job each busy GPU belongs to (idle GPUs are absent)."""
        return {g: j.id for j in self.jobs for g in j.gpus}

    def gpu(self, gpu_id: str) -> Gpu:
        return self.gpus[self.gpu_index[gpu_id]]

    def domain(self, domain_id: str) -> Domain:
        return self.domains[self.domain_index[domain_id]]


# --- reading ----------------------------------------------------------------


class _Reader:
    """Typed field access that raises ProblemError naming the JSON path."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, field: str, problem: str) -> ProblemError:
        return ProblemError(self.source, field, problem)

    def obj(self, value: object, path: str, allowed: frozenset[str]) -> Mapping[str, Any]:
        if not isinstance(value, Mapping):
            raise self.fail(path, f"expected an object, got {_tname(value)}")
        for key in value:
            if key not in allowed:
                raise self.fail(_join(path, str(key)), "unknown field (typo?)")
        return value

    def array(self, value: object, path: str) -> list[Any]:
        if not isinstance(value, list):
            raise self.fail(path, f"expected an array, got {_tname(value)}")
        return value

    def require(self, o: Mapping[str, Any], key: str, path: str) -> Any:
        if key not in o:
            raise self.fail(_join(path, key), "missing required field")
        return o[key]

    def string(self, o: Mapping[str, Any], key: str, path: str, default: str | None = None) -> str:
        if key not in o and default is not None:
            return default
        v = self.require(o, key, path)
        if not isinstance(v, str) or not v:
            raise self.fail(_join(path, key), f"expected a non-empty string, got {_tname(v)}")
        return v

    def number(
        self,
        o: Mapping[str, Any],
        key: str,
        path: str,
        *,
        default: float | None = None,
        minimum: float | None = 0.0,
        positive: bool = False,
    ) -> float:
        if key not in o and default is not None:
            return default
        v = self.require(o, key, path)
        return self.number_value(v, _join(path, key), minimum=minimum, positive=positive)

    def number_value(
        self, v: object, path: str, *, minimum: float | None = 0.0, positive: bool = False
    ) -> float:
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise self.fail(path, f"expected a number, got {_tname(v)}")
        x = float(v)
        if not math.isfinite(x):
            raise self.fail(path, f"must be a finite number, got {v!r}")
        if positive and x <= 0:
            raise self.fail(path, f"must be > 0, got {v!r}")
        if minimum is not None and x < minimum:
            raise self.fail(path, f"must be >= {minimum:g}, got {v!r}")
        return x

    def opt_number(self, o: Mapping[str, Any], key: str, path: str) -> float | None:
        if o.get(key) is None:
            return None
        return self.number(o, key, path)

    def boolean(self, o: Mapping[str, Any], key: str, path: str, default: bool) -> bool:
        if key not in o:
            return default
        v = o[key]
        if not isinstance(v, bool):
            raise self.fail(_join(path, key), f"expected true or false, got {_tname(v)}")
        return v

    def id_list(self, o: Mapping[str, Any], key: str, path: str) -> tuple[str, ...]:
        items = self.array(self.require(o, key, path), _join(path, key))
        out: list[str] = []
        for i, v in enumerate(items):
            if not isinstance(v, str) or not v:
                raise self.fail(
                    f"{_join(path, key)}[{i}]", f"expected an id string, got {_tname(v)}"
                )
            out.append(v)
        return tuple(out)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _tname(v: object) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, int | float):
        return "number"
    if isinstance(v, str):
        return "string"
    if isinstance(v, list):
        return "array"
    if isinstance(v, Mapping):
        return "object"
    return type(v).__name__


# "consolidation" is the consolidation MILP's own section (optimizer/consolidation.py);
# this parser leaves it to that module.
_TOP_KEYS = frozenset(
    {"version", "gpus", "domains", "jobs", "objective", "comment", "consolidation"}
)
_GPU_KEYS = frozenset(
    {
        "id",
        "host",
        "model",
        "min_w",
        "max_w",
        "default_w",
        "idle_w",
        "domains",
        "current_w",
        "sm_clocks_mhz",
        "held",
        "shared_by",
    }
)
_DOMAIN_KEYS = frozenset({"id", "budget_w", "baseline_w", "kind"})
_JOB_KEYS = frozenset(
    {
        "id",
        "gpus",
        "weight",
        "allowed_slowdown",
        "synchronous",
        "unit",
        "samples",
        "exempt",
        "policy",
        "activity",
    }
)
_ACTIVITY_KEYS = frozenset({"dram_active", "sm_active", "tensor_active"})
_SAMPLE_KEYS = frozenset({"cap_w", "power_w", "throughput"})
_OBJECTIVE_KEYS = frozenset(
    {
        "kind",
        "price_per_kwh",
        "pue",
        "carbon_g_per_kwh",
        "value_per_unit",
        "horizon_h",
        "slowdown_confidence",
        "job_value",
    }
)
JOB_VALUES: Final = ("size", "per_job")
SLOWDOWN_CONFIDENCE_RANGE: Final = (0.5, 0.999)


def parse_problem(obj: object, source: str = "<dict>") -> Problem:
    """Validate a decoded JSON document and build a :class:`Problem`.

    ``source`` names the file in error messages.
    """
    r = _Reader(source)
    top = r.obj(obj, "", _TOP_KEYS)
    version = r.require(top, "version", "")
    if isinstance(version, bool) or version != PROBLEM_VERSION:
        raise r.fail(
            "version", f"unsupported version {version!r}; this dcenergy reads {PROBLEM_VERSION}"
        )

    domains = _parse_domains(r, top)
    domain_ids = {d.id for d in domains}
    gpus = _parse_gpus(r, top, domain_ids)
    jobs = _parse_jobs(r, top, {g.id: g for g in gpus})
    objective = _parse_objective(r, r.require(top, "objective", ""))
    return Problem(gpus=gpus, domains=domains, jobs=jobs, objective=objective)


def _parse_domains(r: _Reader, top: Mapping[str, Any]) -> tuple[Domain, ...]:
    out: list[Domain] = []
    seen: set[str] = set()
    for i, raw in enumerate(r.array(r.require(top, "domains", ""), "domains")):
        p = f"domains[{i}]"
        o = r.obj(raw, p, _DOMAIN_KEYS)
        did = r.string(o, "id", p)
        if did in seen:
            raise r.fail(f"{p}.id", f"duplicate domain id {did!r}")
        seen.add(did)
        budget = r.number(o, "budget_w", p, positive=True)
        baseline = r.number(o, "baseline_w", p, default=0.0)
        kind: str | None = None
        if o.get("kind") is not None:
            kind = r.string(o, "kind", p)
            if kind not in DOMAIN_KINDS:
                raise r.fail(f"{p}.kind", f"unknown kind {kind!r}; one of {sorted(DOMAIN_KINDS)}")
        out.append(Domain(id=did, budget_w=budget, baseline_w=baseline, kind=kind))
    return tuple(out)


def _parse_gpus(r: _Reader, top: Mapping[str, Any], domain_ids: set[str]) -> tuple[Gpu, ...]:
    out: list[Gpu] = []
    seen: set[str] = set()
    raw_list = r.array(r.require(top, "gpus", ""), "gpus")
    if not raw_list:
        raise r.fail("gpus", "a problem needs at least one GPU")
    for i, raw in enumerate(raw_list):
        p = f"gpus[{i}]"
        o = r.obj(raw, p, _GPU_KEYS)
        gid = r.string(o, "id", p)
        if gid in seen:
            raise r.fail(f"{p}.id", f"duplicate GPU id {gid!r}")
        seen.add(gid)
        host = r.string(o, "host", p)
        model = r.string(o, "model", p)
        min_w = r.number(o, "min_w", p, positive=True)
        max_w = r.number(o, "max_w", p, positive=True)
        if min_w > max_w:
            raise r.fail(f"{p}.min_w", f"min_w {min_w:g} is above max_w {max_w:g}")
        default_w = r.number(o, "default_w", p, positive=True)
        if not min_w <= default_w <= max_w:
            raise r.fail(
                f"{p}.default_w",
                f"{default_w:g} is outside [min_w, max_w] = [{min_w:g}, {max_w:g}]",
            )
        idle_w = r.number(o, "idle_w", p)
        if idle_w > max_w:
            raise r.fail(f"{p}.idle_w", f"idle draw {idle_w:g} is above max_w {max_w:g}")
        doms = r.id_list(o, "domains", p)
        for k, d in enumerate(doms):
            if d not in domain_ids:
                raise r.fail(f"{p}.domains[{k}]", f"unknown domain {d!r}")
        if len(set(doms)) != len(doms):
            raise r.fail(f"{p}.domains", "a domain is listed twice")
        current = r.opt_number(o, "current_w", p)
        clocks: tuple[int, ...] | None = None
        if o.get("sm_clocks_mhz") is not None:
            cp = f"{p}.sm_clocks_mhz"
            items = r.array(o["sm_clocks_mhz"], cp)
            if not items:
                raise r.fail(cp, "the clock table is empty; omit the field instead")
            vals = [r.number_value(v, f"{cp}[{k}]", positive=True) for k, v in enumerate(items)]
            clocks = tuple(sorted({round(v) for v in vals}))
        held = _strings(r, o, "held", p)
        shared_by = _strings(r, o, "shared_by", p)
        if len(set(shared_by)) != len(shared_by):
            raise r.fail(f"{p}.shared_by", "a job is listed twice")
        out.append(
            Gpu(
                id=gid,
                host=host,
                model=model,
                min_w=min_w,
                max_w=max_w,
                default_w=default_w,
                idle_w=idle_w,
                domains=doms,
                current_w=current,
                sm_clocks_mhz=clocks,
                held=held,
                shared_by=shared_by,
            )
        )
    return tuple(out)


def _strings(r: _Reader, o: Mapping[str, Any], key: str, path: str) -> tuple[str, ...]:
    """An optional array of non-empty strings (absent or null: empty)."""
    if o.get(key) is None:
        return ()
    return r.id_list(o, key, path)


def _parse_jobs(r: _Reader, top: Mapping[str, Any], gpus: Mapping[str, Gpu]) -> tuple[Job, ...]:
    out: list[Job] = []
    seen: set[str] = set()
    owner: dict[str, str] = {}
    for i, raw in enumerate(r.array(top.get("jobs", []), "jobs")):
        p = f"jobs[{i}]"
        o = r.obj(raw, p, _JOB_KEYS)
        jid = r.string(o, "id", p)
        if jid in seen:
            raise r.fail(f"{p}.id", f"duplicate job id {jid!r}")
        seen.add(jid)
        members = r.id_list(o, "gpus", p)
        if not members:
            raise r.fail(f"{p}.gpus", "a job needs at least one GPU")
        for k, g in enumerate(members):
            gp = f"{p}.gpus[{k}]"
            if g not in gpus:
                raise r.fail(gp, f"unknown GPU {g!r}")
            if g in owner:
                raise r.fail(gp, f"GPU {g!r} is already in job {owner[g]!r}")
            if gpus[g].shared_by:
                raise r.fail(
                    gp,
                    f"GPU {g!r} is shared by jobs {list(gpus[g].shared_by)}: "
                    "no job owns it (list it in none)",
                )
            owner[g] = jid
        weight = r.number(o, "weight", p, default=1.0, positive=True)
        slow = r.number(o, "allowed_slowdown", p, default=0.1)
        if not 0.0 <= slow < 1.0:
            raise r.fail(f"{p}.allowed_slowdown", f"must be in [0, 1), got {slow:g}")
        sync = r.boolean(o, "synchronous", p, False)
        if sync:
            lo = max(gpus[g].min_w for g in members)
            hi = min(gpus[g].max_w for g in members)
            if lo > hi:
                raise r.fail(
                    f"{p}.gpus",
                    f"synchronous job needs one common cap but its GPUs' ranges do not overlap "
                    f"(highest min_w {lo:g} > lowest max_w {hi:g})",
                )
        unit = r.string(o, "unit", p, default="units")
        exempt = r.boolean(o, "exempt", p, False)
        policy = r.string(o, "policy", p) if o.get("policy") is not None else None
        activity = _parse_activity(r, o.get("activity"), f"{p}.activity")
        samples: list[Sample] = []
        for k, sraw in enumerate(r.array(o.get("samples", []), f"{p}.samples")):
            sp = f"{p}.samples[{k}]"
            so = r.obj(sraw, sp, _SAMPLE_KEYS)
            cap = r.opt_number(so, "cap_w", sp)
            pw = r.opt_number(so, "power_w", sp)
            if cap is None and pw is None:
                raise r.fail(sp, "needs cap_w or power_w (or both)")
            if cap is not None and cap <= 0:
                raise r.fail(f"{sp}.cap_w", f"must be > 0, got {cap:g}")
            if pw is not None and pw <= 0:
                raise r.fail(f"{sp}.power_w", f"must be > 0, got {pw:g}")
            thr = r.number(so, "throughput", sp)
            samples.append(Sample(throughput=thr, cap_w=cap, power_w=pw))
        out.append(
            Job(
                id=jid,
                gpus=members,
                samples=tuple(samples),
                weight=weight,
                allowed_slowdown=slow,
                synchronous=sync,
                unit=unit,
                exempt=exempt,
                policy=policy,
                activity=activity,
            )
        )
    return tuple(out)


def _parse_activity(r: _Reader, raw: object, path: str) -> Activity | None:
    if raw is None:
        return None
    o = r.obj(raw, path, _ACTIVITY_KEYS)
    vals: dict[str, float | None] = {}
    for key in sorted(_ACTIVITY_KEYS):
        v = r.opt_number(o, key, path)
        if v is not None and v > 1.0:
            raise r.fail(f"{path}.{key}", f"a share in [0, 1], got {v:g}")
        vals[key] = v
    return Activity(**vals)


def _parse_objective(r: _Reader, raw: object) -> Objective:
    p = "objective"
    o = r.obj(raw, p, _OBJECTIVE_KEYS)
    kind = r.string(o, "kind", p)
    if kind not in OBJECTIVE_KINDS:
        raise r.fail(f"{p}.kind", f"unknown objective {kind!r}; one of {sorted(OBJECTIVE_KINDS)}")
    pue = r.number(o, "pue", p, default=1.0, minimum=1.0)
    horizon = None
    if o.get("horizon_h") is not None:
        horizon = r.number(o, "horizon_h", p, positive=True)
    conf = r.number(o, "slowdown_confidence", p, default=DEFAULT_SLOWDOWN_CONFIDENCE)
    lo, hi = SLOWDOWN_CONFIDENCE_RANGE
    if not lo <= conf <= hi:
        raise r.fail(
            f"{p}.slowdown_confidence", f"must be a probability in [{lo}, {hi}], got {conf:g}"
        )
    job_value = r.string(o, "job_value", p, default="size")
    if job_value not in JOB_VALUES:
        raise r.fail(
            f"{p}.job_value", f"unknown job value {job_value!r}; one of {list(JOB_VALUES)}"
        )
    return Objective(
        kind=kind,
        price_per_kwh=r.number(o, "price_per_kwh", p, default=0.0),
        pue=pue,
        carbon_g_per_kwh=r.number(o, "carbon_g_per_kwh", p, default=0.0),
        value_per_unit=r.number(o, "value_per_unit", p, default=0.0),
        horizon_h=horizon,
        slowdown_confidence=conf,
        job_value=job_value,
    )


def load_problem(path: str | Path) -> Problem:
    """Read and validate a problem file; bad JSON is reported with its line and column."""
    return parse_problem(read_json(path, ProblemError), source=str(path))


# --- writing ----------------------------------------------------------------


def problem_to_json(p: Problem) -> dict[str, Any]:
    """The JSON form of ``p``; ``parse_problem(problem_to_json(p)) == p``."""
    gpus: list[dict[str, Any]] = []
    for g in p.gpus:
        go: dict[str, Any] = {
            "id": g.id,
            "host": g.host,
            "model": g.model,
            "min_w": g.min_w,
            "max_w": g.max_w,
            "default_w": g.default_w,
            "idle_w": g.idle_w,
            "domains": list(g.domains),
        }
        if g.current_w is not None:
            go["current_w"] = g.current_w
        if g.sm_clocks_mhz is not None:
            go["sm_clocks_mhz"] = list(g.sm_clocks_mhz)
        if g.held:
            go["held"] = list(g.held)
        if g.shared_by:
            go["shared_by"] = list(g.shared_by)
        gpus.append(go)
    domains: list[dict[str, Any]] = []
    for d in p.domains:
        do: dict[str, Any] = {"id": d.id, "budget_w": d.budget_w, "baseline_w": d.baseline_w}
        if d.kind is not None:
            do["kind"] = d.kind
        domains.append(do)
    jobs = [
        {
            "id": j.id,
            "gpus": list(j.gpus),
            "weight": j.weight,
            "allowed_slowdown": j.allowed_slowdown,
            "synchronous": j.synchronous,
            "unit": j.unit,
            "samples": [_sample_json(s) for s in j.samples],
            **({"exempt": True} if j.exempt else {}),
            **({"policy": j.policy} if j.policy is not None else {}),
            **({"activity": _activity_json(j.activity)} if j.activity is not None else {}),
        }
        for j in p.jobs
    ]
    return {
        "version": p.version,
        "gpus": gpus,
        "domains": domains,
        "jobs": jobs,
        "objective": objective_to_json(p.objective),
    }


def _activity_json(a: Activity) -> dict[str, float]:
    items = {"dram_active": a.dram_active, "sm_active": a.sm_active}
    items["tensor_active"] = a.tensor_active
    return {k: v for k, v in items.items() if v is not None}


def _sample_json(s: Sample) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if s.cap_w is not None:
        out["cap_w"] = s.cap_w
    if s.power_w is not None:
        out["power_w"] = s.power_w
    out["throughput"] = s.throughput
    return out


def objective_to_json(o: Objective) -> dict[str, Any]:
    """The objective block alone (the plan repeats it)."""
    out: dict[str, Any] = {
        "kind": o.kind,
        "price_per_kwh": o.price_per_kwh,
        "pue": o.pue,
        "carbon_g_per_kwh": o.carbon_g_per_kwh,
        "value_per_unit": o.value_per_unit,
        "slowdown_confidence": o.slowdown_confidence,
        "job_value": o.job_value,
    }
    if o.horizon_h is not None:
        out["horizon_h"] = o.horizon_h
    return out


def measured_domain_power(problem: Problem) -> dict[str, float]:
    """Measured draw per domain (GPUs' ``current_w`` plus baseline), for the
    domains where every GPU reports one; a partial sum would read as headroom."""
    out: dict[str, float] = {d.id: d.baseline_w for d in problem.domains}
    missing: set[str] = set()
    for g in problem.gpus:
        for d in g.domains:
            if g.current_w is None:
                missing.add(d)
            else:
                out[d] += g.current_w
    return {k: v for k, v in out.items() if k not in missing}


def outermost_domains(problem: Problem) -> set[str]:
    """Domains that hold every GPU of the problem (the facility, or a fleet-wide feed)."""
    counts: dict[str, int] = dict.fromkeys((d.id for d in problem.domains), 0)
    for g in problem.gpus:
        for d in g.domains:
            counts[d] += 1
    return {d for d, n in counts.items() if n == len(problem.gpus)}


def gpus_by_domain(p: Problem) -> dict[str, list[str]]:
    """GPU ids drawing from each domain (every domain present, maybe empty)."""
    out: dict[str, list[str]] = {d.id: [] for d in p.domains}
    for g in p.gpus:
        for d in g.domains:
            out[d].append(g.id)
    return out


__all__: Sequence[str] = (
    "DEFAULT_SLOWDOWN_CONFIDENCE",
    "DOMAIN_KINDS",
    "OBJECTIVE_KINDS",
    "PROBLEM_VERSION",
    "Activity",
    "Domain",
    "Gpu",
    "Job",
    "Objective",
    "Problem",
    "Sample",
    "gpus_by_domain",
    "load_problem",
    "measured_domain_power",
    "objective_to_json",
    "outermost_domains",
    "parse_problem",
    "problem_to_json",
)
