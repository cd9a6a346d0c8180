"""Demand response: live budget overrides applied to the topology's budgets.

Pure: a topology and the overrides the store holds in, a topology with the
budgets in force out. A live override (``dcenergy.overrides.OverrideState.live``:
signed by our key, not cleared, not expired) replaces its domain's budget,
but never raises it above the topology's own budget unless it was set with
``--allow-raise``. An override for a domain the topology does not have, or
one that fails its signature check, changes nothing and is reported.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from dcenergy.overrides import OverrideState
from optimizer.topology import Topology


@dataclass(frozen=True, slots=True)
class Applied:
    """One override the run used: the budget it gives, and the topology's own."""

    domain: str
    budget_w: float
    topology_w: float
    requested_w: float
    expires_ns: int

    @property
    def capped(self) -> bool:
        """Asked for more than the topology allows, without --allow-raise."""
        return self.requested_w > self.budget_w


def apply_overrides(
    topology: Topology, overrides: Sequence[OverrideState], now_ns: int
) -> tuple[Topology, list[Applied], list[str]]:
    """The topology with live overrides applied; what was applied; why others were not."""
    by_id = {d.id: d for d in topology.domains}
    applied: list[Applied] = []
    ignored: list[str] = []
    budgets: dict[str, float] = {}
    for o in overrides:
        if o.problem:
            ignored.append(f"{o.domain}: {o.problem}")
            continue
        if not o.live(now_ns):
            continue
        dom = by_id.get(o.domain)
        if dom is None:
            ignored.append(f"{o.domain}: not a domain of the topology")
            continue
        w = o.watts if o.allow_raise else min(o.watts, dom.budget_w)
        budgets[o.domain] = w
        applied.append(Applied(o.domain, w, dom.budget_w, o.watts, o.expires_ns))
    if not budgets:
        return topology, applied, ignored
    domains = tuple(
        replace(d, budget_w=budgets[d.id]) if d.id in budgets else d for d in topology.domains
    )
    return replace(topology, domains=domains), applied, ignored
