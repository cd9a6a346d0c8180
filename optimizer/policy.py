"""Per-job policy from the scheduler: weight, allowed slowdown, exempt, consolidation inputs.

Telemetry knows a job's id; the scheduler knows its partition, QOS, account,
user and comment (Kubernetes: its namespace and labels). The operator's
policy file (JSON, ``docs/policy.md``) maps those *facts* to what the
optimizer needs per job::

    {"version": 1,
     "defaults": {"weight": 1, "allowed_slowdown": 0.1},
     "rules": [{"name": "interactive", "match": {"partition": "interactive"}, "exempt": true},
               {"match": {"qos": ["high", "urgent"]}, "weight": 4, "allowed_slowdown": 0.02},
               {"match": {"comment.class": "critical"}, "exempt": true}],
     "job_comment": {"key": "dcenergy", "allow": ["weight", "allowed_slowdown"], "weight_max": 2},
     "slurm": {"cache_ttl_s": 60},
     "consolidation": {"horizon_h": 24, "nodes": {"gpu-017": {"may_power_down": true}}}}

The matcher is generic: a job is a flat ``dict`` of string facts
(``partition``, ``qos``, ``account``, ``user``, ``job_name``, ``scheduler``,
``namespace``, ``comment.<key>``, ``label.<key>``), whoever supplies them
(``optimizer/slurm.py`` for Slurm). Precedence, weakest first: the
configuration's ``optimizer.allowed_slowdown`` and weight 1, the file's
``defaults``, the rules (top to bottom, the **first** matching rule that sets
a field decides it), then the job's own comment (``dcenergy:weight=2,slowdown=0.05``)
for the fields ``job_comment.allow`` lists, bounded by ``weight_max`` and
``allowed_slowdown_max``. A value a user wrote that cannot be used (not a
number, out of range) is ignored and named in the job's policy source, never
an error: the comment is user input, the file is the operator's.

Validation is the strict reader the other input files use (``dcenergy.inputs``:
no duplicate keys, no NaN); unknown keys are refused and every error is one
``InputError`` naming the JSON path (``rules[2].match.partiton``), exit 65.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, Final, Protocol

from dcenergy.errors import InputError
from dcenergy.inputs import read_json

log = logging.getLogger(__name__)

POLICY_VERSION: Final = 1
FACT_KEYS: Final = frozenset(
    {"scheduler", "partition", "qos", "account", "user", "job_name", "namespace"}
)
FACT_PREFIXES: Final = ("comment.", "label.")
# what defaults, rules and comments may set, and their kinds
JOB_FIELDS: Final = {
    "weight": "weight",
    "allowed_slowdown": "slowdown",
    "exempt": "bool",
    "pinned": "bool",
    "shareable": "bool",
    "migration_cost_wh": "nonneg",
}
COMMENT_FIELDS: Final = frozenset({"weight", "allowed_slowdown", "exempt"})
COMMENT_ALIASES: Final = {"slowdown": "allowed_slowdown"}
DEFAULT_COMMENT_KEY: Final = "dcenergy"
DEFAULT_CACHE_TTL_S: Final = 60.0
DEFAULT_TIMEOUT_S: Final = 10.0
DEFAULT_HORIZON_H: Final = 24.0
DEFAULT_DRAIN_REASON: Final = "dcenergy: consolidation frees this node"

# "comment" is free text for people, as in the other input files; "job_comment" is the policy
_TOP_KEYS = frozenset(
    {"version", "comment", "defaults", "rules", "job_comment", "slurm", "consolidation"}
)
_RULE_KEYS = frozenset({"name", "match", *JOB_FIELDS})
_COMMENT_KEYS = frozenset({"key", "allow", "weight_max", "allowed_slowdown_max"})
_SLURM_KEYS = frozenset({"cache_ttl_s", "timeout_s", "squeue", "sinfo", "scontrol", "sacctmgr"})
_CONS_KEYS = frozenset(
    {
        "horizon_h",
        "may_power_down",
        "node_base_w",
        "nodes",
        "time_limit_s",
        "drain_reason",
    }
)
_NODE_KEYS = frozenset({"may_power_down", "base_w"})


# --- the file -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """One rule: when every ``match`` fact matches one of its patterns, set ``sets``."""

    index: int
    match: Mapping[str, tuple[str, ...]]
    sets: Mapping[str, float | bool]
    name: str | None = None

    @property
    def label(self) -> str:
        what = ", ".join(f"{k}={'|'.join(v)}" for k, v in self.match.items())
        return f"rules[{self.index}]" + (f" {self.name}" if self.name else "") + f" ({what})"

    def matches(self, facts: Mapping[str, str]) -> bool:
        for key, patterns in self.match.items():
            value = facts.get(key)
            if value is None or not any(fnmatchcase(value, p) for p in patterns):
                return False
        return True


@dataclass(frozen=True)
class CommentPolicy:
    """What a job's own comment may set (``<key>:weight=2,slowdown=0.05``) and its bounds."""

    key: str = DEFAULT_COMMENT_KEY
    allow: frozenset[str] = frozenset()
    weight_max: float | None = None
    allowed_slowdown_max: float | None = None


@dataclass(frozen=True)
class SlurmSource:
    """Where job facts come from: Slurm's client commands, cached ``cache_ttl_s``."""

    cache_ttl_s: float = DEFAULT_CACHE_TTL_S
    timeout_s: float = DEFAULT_TIMEOUT_S
    squeue: str = "squeue"
    sinfo: str = "sinfo"
    scontrol: str = "scontrol"
    sacctmgr: str = "sacctmgr"


@dataclass(frozen=True)
class NodePolicy:
    may_power_down: bool | None = None
    base_w: float | None = None  # non-GPU draw of the node, W (overrides RAPL readings)


@dataclass(frozen=True)
class ConsolidationPolicy:
    """What only the operator knows about consolidating nodes (docs/policy.md)."""

    horizon_h: float = DEFAULT_HORIZON_H
    may_power_down: bool = False  # the default for nodes not listed
    node_base_w: float | None = None  # non-GPU draw where no RAPL reading exists
    nodes: Mapping[str, NodePolicy] = field(default_factory=dict)
    time_limit_s: float = 10.0
    drain_reason: str = DEFAULT_DRAIN_REASON

    def node(self, host: str) -> NodePolicy:
        return self.nodes.get(host, NodePolicy())

    def may_power_down_node(self, host: str) -> bool:
        own = self.node(host).may_power_down
        return self.may_power_down if own is None else own


@dataclass(frozen=True)
class Policy:
    """A validated policy file; build it with :func:`parse_policy` or :func:`load_policy`."""

    defaults: Mapping[str, float | bool] = field(default_factory=dict)
    rules: tuple[Rule, ...] = ()
    comment: CommentPolicy | None = None
    slurm: SlurmSource | None = None
    consolidation: ConsolidationPolicy | None = None
    source: str = "<policy>"

    def resolve(self, facts: Mapping[str, str] | None, default_slowdown: float) -> JobPolicy:
        """The policy of one job from its facts (``None``: the scheduler does not know it)."""
        values: dict[str, float | bool] = {"weight": 1.0, "allowed_slowdown": default_slowdown}
        sources: dict[str, str] = {}
        for k, v in self.defaults.items():
            values[k], sources[k] = v, "defaults"
        facts = dict(facts or {})
        notes: list[str] = []
        comment_sets: dict[str, float | bool] = {}
        if "comment" in facts:  # rules match comment.<key> with or without a job_comment section
            key = self.comment.key if self.comment is not None else DEFAULT_COMMENT_KEY
            pairs = parse_comment(facts["comment"], key)
            facts.update({f"comment.{k}": v for k, v in pairs.items()})
            if self.comment is not None:
                comment_sets, notes = self._comment_values(pairs)
        decided: set[str] = set()
        for rule in self.rules:
            if not rule.matches(facts):
                continue
            for k, v in rule.sets.items():
                if k not in decided:
                    values[k], sources[k] = v, rule.label
                    decided.add(k)
        for k, v in comment_sets.items():
            values[k], sources[k] = v, "comment"
        return JobPolicy(
            weight=float(values["weight"]),
            allowed_slowdown=float(values["allowed_slowdown"]),
            exempt=bool(values.get("exempt", False)),
            pinned=bool(values.get("pinned", False)),
            shareable=bool(values.get("shareable", False)),
            migration_cost_wh=float(values.get("migration_cost_wh", 0.0)),
            sources=sources,
            notes=tuple(notes),
            known=bool(facts),
        )

    def _comment_values(
        self, pairs: Mapping[str, str]
    ) -> tuple[dict[str, float | bool], list[str]]:
        assert self.comment is not None
        c = self.comment
        out: dict[str, float | bool] = {}
        notes: list[str] = []
        for raw_key, text in pairs.items():
            key = _canonical(raw_key)
            if key not in COMMENT_FIELDS:
                continue  # a free key: only rules read it (comment.<key>)
            if key not in c.allow:
                notes.append(f"comment {raw_key}={text} ignored (not in job_comment.allow)")
                continue
            value, problem = _comment_value(key, text)
            bound = {"weight": c.weight_max, "allowed_slowdown": c.allowed_slowdown_max}.get(key)
            if problem is None and bound is not None and isinstance(value, float) and value > bound:
                problem = f"above job_comment.{key}_max {bound:g}"
            if problem is not None or value is None:
                notes.append(f"comment {raw_key}={text} ignored ({problem})")
                continue
            out[key] = value
        return out, notes


@dataclass(frozen=True)
class JobPolicy:
    """What the policy decided for one job, and where each field came from."""

    weight: float = 1.0
    allowed_slowdown: float = 0.1
    exempt: bool = False
    pinned: bool = False
    shareable: bool = False
    migration_cost_wh: float = 0.0
    sources: Mapping[str, str] = field(default_factory=dict)  # field -> rule label / "comment"
    notes: tuple[str, ...] = ()
    known: bool = True  # the scheduler knew the job (False: defaults only)

    def describe(self) -> str:
        """One line for reports: which source set which field (``default`` when none did)."""
        by_source: dict[str, list[str]] = {}
        for k, src in sorted(self.sources.items(), key=lambda kv: list(JOB_FIELDS).index(kv[0])):
            by_source.setdefault(src, []).append(f"{k}={_fmt(getattr(self, k))}")
        parts = [f"{src}: {', '.join(fields)}" for src, fields in by_source.items()]
        text = "; ".join(parts) if parts else "default"
        if not self.known:
            text += " (job unknown to the scheduler)"
        if self.notes:
            text += "; " + "; ".join(self.notes)
        return text


def _canonical(key: str) -> str:
    return COMMENT_ALIASES.get(key, key)


def _fmt(v: object) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


_COMMENT_PATTERN = r"(?:^|[\s;|])%s:(?P<body>[^\s;|]*)"


def parse_comment(comment: str, key: str = DEFAULT_COMMENT_KEY) -> dict[str, str]:
    """The ``k=v`` pairs after ``<key>:`` in a free-text comment (the first such token).

    ``"train run; dcenergy:weight=2,slowdown=0.05"`` -> ``{"weight": "2", "slowdown": "0.05"}``.
    A pair without ``=`` reads as ``"true"`` (``dcenergy:exempt``).
    """
    m = re.search(_COMMENT_PATTERN % re.escape(key), comment)
    if m is None:
        return {}
    out: dict[str, str] = {}
    for item in m.group("body").split(","):
        k, sep, v = item.partition("=")
        k = k.strip().lower()
        if k and k not in out:
            out[k] = v.strip() if sep else "true"
    return out


def _comment_value(key: str, text: str) -> tuple[float | bool | None, str | None]:
    kind = JOB_FIELDS[key]
    if kind == "bool":
        low = text.lower()
        if low in ("1", "true", "yes", "on"):
            return True, None
        if low in ("0", "false", "no", "off"):
            return False, None
        return None, "expected true or false"
    try:
        x = float(text)
    except ValueError:
        return None, "not a number"
    if not math.isfinite(x):
        return None, "not a finite number"
    if kind == "weight" and x <= 0:
        return None, "weight must be > 0"
    if kind == "slowdown" and not 0 <= x < 1:
        return None, "allowed slowdown must be in [0, 1)"
    return x, None


# --- reading ----------------------------------------------------------------------------


class _Reader:
    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, path: str, problem: str) -> InputError:
        return InputError(self.source, path, problem)

    def obj(self, v: object, path: str, allowed: frozenset[str]) -> Mapping[str, Any]:
        if not isinstance(v, dict):
            raise self.fail(path or "$", "expected a JSON object")
        for k in v:
            if k not in allowed:
                where = f"{path}.{k}" if path else str(k)
                raise self.fail(
                    where, "unknown field (typo?); known: " + ", ".join(sorted(allowed))
                )
        return v

    def number(self, v: object, path: str, *, positive: bool = False) -> float:
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise self.fail(path, f"expected a finite number, got {v!r}")
        if v < 0 or (positive and v == 0):
            raise self.fail(path, f"expected a number {'> 0' if positive else '>= 0'}, got {v}")
        return float(v)

    def boolean(self, v: object, path: str) -> bool:
        if not isinstance(v, bool):
            raise self.fail(path, f"expected true or false, got {v!r}")
        return v

    def string(self, v: object, path: str) -> str:
        if not isinstance(v, str) or not v:
            raise self.fail(path, f"expected a non-empty string, got {v!r}")
        return v

    def job_value(self, key: str, v: object, path: str) -> float | bool:
        kind = JOB_FIELDS[key]
        if kind == "bool":
            return self.boolean(v, path)
        x = self.number(v, path, positive=kind == "weight")
        if kind == "slowdown" and not x < 1:
            raise self.fail(path, f"expected a fraction in [0, 1), got {v}")
        return x


def _fact_key(r: _Reader, key: str, path: str) -> str:
    if key in FACT_KEYS:
        return key
    for prefix in FACT_PREFIXES:
        if key.startswith(prefix) and len(key) > len(prefix):
            return key
    raise r.fail(
        path,
        "unknown fact (typo?); known: "
        + ", ".join(sorted(FACT_KEYS))
        + ", "
        + ", ".join(f"{p}<key>" for p in FACT_PREFIXES),
    )


def _patterns(r: _Reader, v: object, path: str) -> tuple[str, ...]:
    if isinstance(v, str) and v:
        return (v,)
    if isinstance(v, list) and v and all(isinstance(x, str) and x for x in v):
        return tuple(v)
    raise r.fail(path, "expected a pattern string or a non-empty list of them")


def parse_policy(obj: object, source: str = "<policy>") -> Policy:
    """Validate a decoded policy document; every error names its JSON path."""
    r = _Reader(source)
    top = r.obj(obj, "", _TOP_KEYS)
    if top.get("version") != POLICY_VERSION:
        raise r.fail("version", f"expected {POLICY_VERSION}, got {top.get('version')!r}")
    defaults: dict[str, float | bool] = {}
    if "defaults" in top:
        d = r.obj(top["defaults"], "defaults", frozenset(JOB_FIELDS))
        defaults = {k: r.job_value(k, v, f"defaults.{k}") for k, v in d.items()}
    rules: list[Rule] = []
    raw_rules = top.get("rules", [])
    if not isinstance(raw_rules, list):
        raise r.fail("rules", "expected a list of rules")
    for i, raw in enumerate(raw_rules):
        p = f"rules[{i}]"
        o = r.obj(raw, p, _RULE_KEYS)
        if "match" not in o:
            raise r.fail(f"{p}.match", "missing: which jobs the rule is for")
        m = o["match"]
        if not isinstance(m, dict):
            raise r.fail(f"{p}.match", "expected an object: fact -> pattern(s)")
        if not m:
            raise r.fail(f"{p}.match", "empty: a rule for every job belongs in defaults")
        match = {
            _fact_key(r, k, f"{p}.match.{k}"): _patterns(r, v, f"{p}.match.{k}")
            for k, v in m.items()
        }
        sets = {k: r.job_value(k, v, f"{p}.{k}") for k, v in o.items() if k in JOB_FIELDS}
        if not sets:
            raise r.fail(p, "sets nothing: give weight, allowed_slowdown, exempt, ...")
        name = r.string(o["name"], f"{p}.name") if "name" in o else None
        rules.append(Rule(i, match, sets, name))
    comment = None
    if "job_comment" in top:
        cp = "job_comment"
        c = r.obj(top[cp], cp, _COMMENT_KEYS)
        allow = c.get("allow", [])
        if not isinstance(allow, list) or any(
            not isinstance(a, str) or _canonical(a) not in COMMENT_FIELDS for a in allow
        ):
            raise r.fail(f"{cp}.allow", "expected a list of: " + ", ".join(sorted(COMMENT_FIELDS)))
        comment = CommentPolicy(
            key=r.string(c["key"], f"{cp}.key") if "key" in c else DEFAULT_COMMENT_KEY,
            allow=frozenset(_canonical(str(a)) for a in allow),
            weight_max=(
                r.number(c["weight_max"], f"{cp}.weight_max", positive=True)
                if "weight_max" in c
                else None
            ),
            allowed_slowdown_max=(
                float(
                    r.job_value(
                        "allowed_slowdown", c["allowed_slowdown_max"], f"{cp}.allowed_slowdown_max"
                    )
                )
                if "allowed_slowdown_max" in c
                else None
            ),
        )
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", comment.key):
            raise r.fail(f"{cp}.key", "letters, digits, '_', '.', '-' only")
    slurm = None
    if "slurm" in top:
        s = r.obj(top["slurm"], "slurm", _SLURM_KEYS)
        slurm = SlurmSource(
            cache_ttl_s=(
                r.number(s["cache_ttl_s"], "slurm.cache_ttl_s")
                if "cache_ttl_s" in s
                else DEFAULT_CACHE_TTL_S
            ),
            timeout_s=(
                r.number(s["timeout_s"], "slurm.timeout_s", positive=True)
                if "timeout_s" in s
                else DEFAULT_TIMEOUT_S
            ),
            squeue=r.string(s["squeue"], "slurm.squeue") if "squeue" in s else "squeue",
            sinfo=r.string(s["sinfo"], "slurm.sinfo") if "sinfo" in s else "sinfo",
            scontrol=r.string(s["scontrol"], "slurm.scontrol") if "scontrol" in s else "scontrol",
            sacctmgr=r.string(s["sacctmgr"], "slurm.sacctmgr") if "sacctmgr" in s else "sacctmgr",
        )
    consolidation = None
    if "consolidation" in top:
        consolidation = _parse_consolidation_policy(r, top["consolidation"])
    return Policy(
        defaults=defaults,
        rules=tuple(rules),
        comment=comment,
        slurm=slurm,
        consolidation=consolidation,
        source=source,
    )


def _parse_consolidation_policy(r: _Reader, raw: object) -> ConsolidationPolicy:
    p = "consolidation"
    c = r.obj(raw, p, _CONS_KEYS)
    nodes: dict[str, NodePolicy] = {}
    raw_nodes = c.get("nodes", {})
    if not isinstance(raw_nodes, dict):
        raise r.fail(f"{p}.nodes", "expected an object: node name -> {may_power_down, base_w}")
    for name, spec in raw_nodes.items():
        np_ = f"{p}.nodes.{name}"
        n = r.obj(spec, np_, _NODE_KEYS)
        nodes[str(name)] = NodePolicy(
            may_power_down=(
                r.boolean(n["may_power_down"], f"{np_}.may_power_down")
                if "may_power_down" in n
                else None
            ),
            base_w=r.number(n["base_w"], f"{np_}.base_w") if "base_w" in n else None,
        )
    return ConsolidationPolicy(
        horizon_h=(
            r.number(c["horizon_h"], f"{p}.horizon_h", positive=True)
            if "horizon_h" in c
            else DEFAULT_HORIZON_H
        ),
        may_power_down=(
            r.boolean(c["may_power_down"], f"{p}.may_power_down")
            if "may_power_down" in c
            else False
        ),
        node_base_w=r.number(c["node_base_w"], f"{p}.node_base_w") if "node_base_w" in c else None,
        nodes=nodes,
        time_limit_s=(
            r.number(c["time_limit_s"], f"{p}.time_limit_s", positive=True)
            if "time_limit_s" in c
            else 10.0
        ),
        drain_reason=_drain_reason(r, c, p),
    )


def _drain_reason(r: _Reader, c: Mapping[str, Any], p: str) -> str:
    if "drain_reason" not in c:
        return DEFAULT_DRAIN_REASON
    reason = r.string(c["drain_reason"], f"{p}.drain_reason")
    if not reason.startswith("dcenergy:"):
        raise r.fail(f"{p}.drain_reason", "must start 'dcenergy:' (how its drains are known)")
    return reason


def load_policy(path: str | Path) -> Policy:
    """Read and validate a policy file (strict JSON: no duplicate keys, no NaN)."""
    return parse_policy(read_json(path), str(path))


# --- resolving a fleet's jobs ----------------------------------------------------------------


class FactSource(Protocol):
    """Who knows the jobs: job id -> facts (``optimizer.slurm.SlurmJobFacts`` for Slurm)."""

    def facts(self, job_ids: Sequence[str]) -> Mapping[str, Mapping[str, str]]:
        """Facts of the jobs it knows among ``job_ids`` (others absent); may raise."""
        ...


class PolicyResolver(Protocol):
    """What ``build_problem`` asks: the policy of each job in the window."""

    def resolve(self, job_ids: Sequence[str]) -> Mapping[str, JobPolicy]: ...


class SchedulerPolicy:
    """A policy file joined with a fact source; a failing source leaves jobs at defaults.

    The scheduler being down must not stop a solve: the jobs get the file's
    defaults (their policy source says so), the failure is logged once per
    distinct message and kept in ``last_error`` (``recommend`` prints it).
    """

    def __init__(
        self, policy: Policy, facts: FactSource | None, *, default_slowdown: float
    ) -> None:
        self.policy = policy
        self.source = facts
        self.default_slowdown = default_slowdown
        self.last_error = ""

    def resolve(self, job_ids: Sequence[str]) -> dict[str, JobPolicy]:
        known: Mapping[str, Mapping[str, str]] = {}
        if self.source is not None and job_ids:
            try:
                known = self.source.facts(job_ids)
                self.last_error = ""
            except Exception as e:  # the scheduler is an input, not a dependency
                message = f"job facts unavailable, jobs get the policy defaults: {e}"
                if message != self.last_error:
                    log.warning("%s", message)
                self.last_error = message
        return {j: self.policy.resolve(known.get(j), self.default_slowdown) for j in job_ids}


__all__ = [
    "FACT_KEYS",
    "POLICY_VERSION",
    "CommentPolicy",
    "ConsolidationPolicy",
    "FactSource",
    "JobPolicy",
    "NodePolicy",
    "Policy",
    "PolicyResolver",
    "Rule",
    "SchedulerPolicy",
    "SlurmSource",
    "load_policy",
    "parse_comment",
    "parse_policy",
]
