"""The optimizer service and the operators' levers: reverted hosts and budget overrides.

Same seeded fleet as ``test_service`` (2 nodes x 4 GPUs; the topology's room
3000 W, node-1's rack 1400 W).
"""

# The env/seeded fixtures come from test_service (imported): pytest's fixture-by-name.
# ruff: noqa: F811

from __future__ import annotations

import logging
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from dcenergy import schema
from dcenergy.overrides import BudgetOverride, override_point, sign_override
from dcenergy.publish import fetch_latest_part, newest_parts, publish_revert
from optimizer.budget_overrides import apply_overrides
from optimizer.topology import parse_topology
from tests.optimizer.test_service import (  # noqa: F401 (fixtures)
    HOSTS,
    TOPOLOGY,
    S,
    _parts,
    _service,
    env,
    seeded,
)


def _budgets(env: dict[str, Any], at: int) -> dict[str, float]:
    out = {}
    for p in env["store"].inner.read(schema.PLAN_DOMAIN.name, start_ns=at, end_ns=at + 1):
        w = p.fields["budget_w"]
        assert isinstance(w, float)
        out[p.tags["domain"]] = w
    return out


def _override(env: dict[str, Any], domain: str, w: float, **kw: Any) -> None:
    key = kw.pop("key", env["key"])
    at = kw.pop("at", env["end"] - 60 * S)
    ttl = kw.pop("ttl", 3600 * S)
    o, payload = sign_override(BudgetOverride(domain, w, at, at + ttl, **kw), key)
    env["store"].write([override_point(o, payload)])


def test_a_reverted_host_gets_nothing_until_its_revert_ends(
    env: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    end = env["end"]
    store = env["store"]
    (rev,) = publish_revert(store, ["node-1"], env["key"], end - 10 * S, 600.0)
    svc = _service(env)
    with caplog.at_level(logging.INFO, logger="optimizer.service"):
        plan = svc.run_once(end)
        assert svc.run_once(end + 60 * S) is not None
    assert plan is not None and svc.stats.reverted_hosts == 1
    parts = newest_parts(store, end + 60 * S)
    assert parts["node-1"].revert and parts["node-1"].seq == rev.part.seq
    assert not parts["node-2"].revert
    warned = [r for r in caplog.records if "reverted hosts" in r.getMessage()]
    assert len(warned) == 1 and "node-1" in warned[0].getMessage()  # logged once
    # node-1's GPUs are counted at their default limits, not capped below them
    node1 = [s for s in plan.setpoints if s.host == "node-1"]
    assert node1 and all(s.power_limit_w is not None for s in node1)
    assert all(s.power_limit_w >= 699.0 for s in node1 if s.power_limit_w is not None)

    # once the revert is over the host is planned again
    with caplog.at_level(logging.INFO, logger="optimizer.service"):
        after = svc.run_once(end + 700 * S)
    assert after is not None and svc.stats.reverted_hosts == 0
    assert _parts(env, end + 700 * S)["node-1"].plan_id == after.plan_id
    assert any("no host is reverted" in r.getMessage() for r in caplog.records)


def test_every_host_reverted_publishes_no_part_but_records_the_plan(
    env: dict[str, Any],
) -> None:
    end = env["end"]
    publish_revert(env["store"], list(HOSTS), env["key"], end - 10 * S, 600.0)
    svc = _service(env)
    plan = svc.run_once(end)
    assert plan is not None
    assert all(p.revert for p in newest_parts(env["store"], end).values())
    assert env["store"].inner.read(schema.PLAN.name, start_ns=end, end_ns=end + 1)
    for host in HOSTS:
        assert fetch_latest_part(env["store"], host, end) is not None


def test_a_budget_override_is_applied_at_the_next_run(
    env: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    end = env["end"]
    _override(env, "rack-1", 900.0)
    _override(env, "room", 5000.0)  # above the topology's 3000 W, no --allow-raise
    svc = _service(env)
    with caplog.at_level(logging.WARNING, logger="optimizer.service"):
        plan = svc.run_once(end)
        svc.run_once(end + 10 * S)
    assert plan is not None and svc.stats.overrides_in_force == 2
    assert _budgets(env, end) == {"rack-1": 900.0, "room": 3000.0}
    assert plan.after.domain_power_w["rack-1"] <= 900.0 + 1e-6 or not plan.solver.feasible
    logged = [r.getMessage() for r in caplog.records if "budget overrides" in r.getMessage()]
    assert len(logged) == 1 and "rack-1 900 W" in logged[0] and "asked 5000 W" in logged[0]


def test_allow_raise_expiry_and_a_foreign_key(
    env: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    end = env["end"]
    _override(env, "room", 3500.0, allow_raise=True)
    _override(env, "rack-1", 100.0, key=Ed25519PrivateKey.generate())  # not our key
    _override(env, "node-x", 50.0, at=env["end"] - 7200 * S, ttl=3600 * S)  # ended
    svc = _service(env)
    with caplog.at_level(logging.WARNING, logger="optimizer.service"):
        assert svc.run_once(end) is not None
    assert _budgets(env, end) == {"rack-1": 1400.0, "room": 3500.0}
    assert any("override ignored: rack-1" in r.getMessage() for r in caplog.records)
    assert svc.stats.overrides_in_force == 1
    assert not any("node-x" in r.getMessage() for r in caplog.records)


def test_apply_overrides_is_pure() -> None:
    from dcenergy.overrides import OverrideState

    topo = parse_topology(TOPOLOGY)
    now = 1_000 * S
    states = [
        OverrideState("rack-1", 800.0, now + S, False, False, True),
        OverrideState("room", 9000.0, now - S, False, False, True),  # ended
        OverrideState("ghost", 10.0, now + S, False, False, True),
        OverrideState("room", 1.0, now + S, False, True, True),  # cleared
    ]
    out, applied, ignored = apply_overrides(topo, states, now)
    assert {d.id: d.budget_w for d in out.domains} == {"room": 3000.0, "rack-1": 800.0}
    assert [a.domain for a in applied] == ["rack-1"] and not applied[0].capped
    assert ignored == ["ghost: not a domain of the topology"]
    assert {d.id: d.budget_w for d in topo.domains}["rack-1"] == 1400.0  # unchanged
