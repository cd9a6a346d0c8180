"""The topology file: which power domains each host draws from, and their budgets.

Telemetry knows hosts and GPUs; only the operator knows racks, rows, feeds and
what each may draw. ``dcenergy recommend`` joins the two. Format (JSON,
versioned, documented in ``docs/topology.md``)::

    {"version": 1,
     "domains": [{"id": "facility", "budget_w": 120000, "baseline_w": 15000, "kind": "facility"},
                 {"id": "rack-a", "budget_w": 20000, "parent": "facility", "kind": "rack"},
                 {"id": "feed-a", "budget_w": 40000, "kind": "feed"}],
     "hosts": {"node-1": {"domains": ["rack-a", "feed-a"], "budget_w": 6000, "baseline_w": 900}},
     "default_domains": ["facility"]}

A host belongs to the domains it lists and to all their parents; a host with
``budget_w`` also gets a node domain of its own. Hosts not listed get
``default_domains``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dcenergy.errors import InputError
from dcenergy.inputs import read_json
from optimizer.problem import DOMAIN_KINDS

TOPOLOGY_VERSION = 1


@dataclass(frozen=True)
class Domain:
    id: str
    budget_w: float
    baseline_w: float = 0.0
    kind: str = "other"
    parent: str | None = None


@dataclass(frozen=True)
class Topology:
    domains: tuple[Domain, ...]
    host_domains: Mapping[str, tuple[str, ...]]
    default_domains: tuple[str, ...] = ()

    def domains_of(self, host: str) -> tuple[str, ...]:
        """Every domain ``host`` draws from, its own node domain and all ancestors included."""
        by_id = {d.id: d for d in self.domains}
        direct = self.host_domains.get(host, self.default_domains)
        out: list[str] = []
        for d in direct:
            cur: str | None = d
            while cur is not None and cur not in out:
                out.append(cur)
                cur = by_id[cur].parent
        return tuple(out)


def _num(path: str, field: str, v: Any, *, positive: bool) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise InputError(path, field, f"expected a finite number, got {v!r}")
    if v < 0 or (positive and v == 0):
        raise InputError(path, field, f"expected a number {'> 0' if positive else '>= 0'}, got {v}")
    return float(v)


def _kind(path: str, field: str, v: Any) -> str:
    if v not in DOMAIN_KINDS:
        raise InputError(path, field, "expected one of " + ", ".join(sorted(DOMAIN_KINDS)))
    return str(v)


_TOP_KEYS = frozenset({"version", "domains", "hosts", "default_domains", "comment"})
_DOMAIN_KEYS = frozenset({"id", "budget_w", "baseline_w", "kind", "parent"})
_HOST_KEYS = frozenset({"domains", "budget_w", "baseline_w"})


def _known_keys(source: str, path: str, obj: Mapping[str, Any], allowed: frozenset[str]) -> None:
    """An unknown key (a typo: ``budget`` for ``budget_w``) would silently drop a budget."""
    for k in obj:
        if k not in allowed:
            field = f"{path}.{k}" if path else str(k)
            raise InputError(
                source, field, "unknown field (typo?); known: " + ", ".join(sorted(allowed))
            )


def parse_topology(obj: Any, source: str = "<topology>") -> Topology:
    """Validate a topology document; every error names its field."""
    if not isinstance(obj, dict):
        raise InputError(source, "$", "expected a JSON object")
    _known_keys(source, "", obj, _TOP_KEYS)
    if obj.get("version") != TOPOLOGY_VERSION:
        got = obj.get("version")
        raise InputError(source, "version", f"expected {TOPOLOGY_VERSION}, got {got!r}")
    raw_domains = obj.get("domains")
    if not isinstance(raw_domains, list) or not raw_domains:
        raise InputError(source, "domains", "expected a non-empty list of domains")
    domains: list[Domain] = []
    seen: set[str] = set()
    for i, d in enumerate(raw_domains):
        f = f"domains[{i}]"
        if not isinstance(d, dict):
            raise InputError(source, f, "expected an object")
        _known_keys(source, f, d, _DOMAIN_KEYS)
        did = d.get("id")
        if not isinstance(did, str) or not did:
            raise InputError(source, f"{f}.id", "expected a non-empty string")
        if did in seen:
            raise InputError(source, f"{f}.id", f"duplicate domain id {did!r}")
        seen.add(did)
        parent = d.get("parent")
        if parent is not None and not isinstance(parent, str):
            raise InputError(source, f"{f}.parent", "expected a domain id")
        domains.append(
            Domain(
                id=did,
                budget_w=_num(source, f"{f}.budget_w", d.get("budget_w"), positive=True),
                baseline_w=_num(
                    source, f"{f}.baseline_w", d.get("baseline_w", 0.0), positive=False
                ),
                kind=_kind(source, f"{f}.kind", d.get("kind", "other")),
                parent=parent,
            )
        )
    for i, dom in enumerate(domains):
        if dom.parent is not None and dom.parent not in seen:
            raise InputError(source, f"domains[{i}].parent", f"unknown domain {dom.parent!r}")
    _check_no_parent_cycle(domains, source)

    hosts = obj.get("hosts", {})
    if not isinstance(hosts, dict):
        raise InputError(source, "hosts", "expected an object: host -> {domains: [...]}")
    host_domains: dict[str, tuple[str, ...]] = {}
    for host, spec in hosts.items():
        f = f"hosts.{host}"
        if not isinstance(spec, dict):
            raise InputError(source, f, "expected an object with 'domains'")
        _known_keys(source, f, spec, _HOST_KEYS)
        if "baseline_w" in spec and "budget_w" not in spec:
            raise InputError(
                source, f"{f}.baseline_w", "needs budget_w (it is the node domain's baseline)"
            )
        listed = spec.get("domains", [])
        if not isinstance(listed, list) or not all(isinstance(x, str) for x in listed):
            raise InputError(source, f"{f}.domains", "expected a list of domain ids")
        for x in listed:
            if x not in seen:
                raise InputError(source, f"{f}.domains", f"unknown domain {x!r}")
        ids = list(listed)
        if "budget_w" in spec:
            node_id = f"node:{host}"
            domains.append(
                Domain(
                    id=node_id,
                    budget_w=_num(source, f"{f}.budget_w", spec["budget_w"], positive=True),
                    baseline_w=_num(
                        source, f"{f}.baseline_w", spec.get("baseline_w", 0.0), positive=False
                    ),
                    kind="node",
                    parent=None,
                )
            )
            ids.insert(0, node_id)
        host_domains[str(host)] = tuple(ids)
    default = obj.get("default_domains", [])
    if not isinstance(default, list) or any(x not in seen for x in default):
        raise InputError(source, "default_domains", "expected a list of known domain ids")
    return Topology(tuple(domains), host_domains, tuple(default))


def _check_no_parent_cycle(domains: list[Domain], source: str) -> None:
    parent = {d.id: d.parent for d in domains}
    for i, d in enumerate(domains):
        seen = {d.id}
        cur = d.parent
        while cur is not None:
            if cur in seen:
                raise InputError(source, f"domains[{i}].parent", f"parent chain loops at {cur!r}")
            seen.add(cur)
            cur = parent[cur]


def load_topology(path: Path) -> Topology:
    """Read and validate a topology file (strict JSON: no duplicate keys)."""
    return parse_topology(read_json(path), str(path))


def coverage(topology: Topology, hosts: Iterable[str]) -> tuple[list[str], list[str]]:
    """Hosts the topology lists that telemetry never saw, and telemetry hosts it does not list."""
    seen = set(hosts)
    listed = set(topology.host_domains)
    return sorted(listed - seen), sorted(seen - listed)


def single_domain(budget_w: float) -> Topology:
    """A whole-fleet budget when no topology file exists (``recommend --budget``)."""
    return Topology((Domain("fleet", budget_w, 0.0, "facility"),), {}, ("fleet",))
