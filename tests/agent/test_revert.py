"""``dcenergy revert``'s parts through the real reconciler on the fake pynvml.

A revert part is signed like any part, carries no setpoints, and until it
expires the agent keeps every GPU at its saved pre-agent limit, auditing
``reverted``, within one poll, with ``reconciler.poll_when_due`` too.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent import reconciler as rec_mod
from dcenergy import schema
from dcenergy.errors import ConfigError
from dcenergy.plan import canonical_part, verify_part
from dcenergy.publish import (
    MAX_REVERT_S,
    newest_parts,
    publish,
    publish_revert,
    revert_parts,
    split_plan,
)
from tests.agent.test_reconciler import HOST, KEY, NOW, TTL, UUID0, UUID1, Rig, S, only, signed_raw


def _plan(rig: Rig, at: int, w: float = 300.0, *, due: int | None = None) -> None:
    plan = {
        "plan_id": f"p-{at}",
        "created_ns": at,
        "expires_ns": at + TTL,
        "setpoints": [
            {"gpu": UUID0, "host": HOST, "power_limit_w": w},
            {"gpu": UUID1, "host": HOST, "power_limit_w": w},
        ],
    }
    publish(plan, rig.store, KEY, at, next_plan_ns=due)


@pytest.fixture
def rig(tmp_path: Path) -> Rig:
    r = Rig(tmp_path)
    yield r  # type: ignore[misc]
    r.close()


def test_a_revert_restores_every_gpu_within_one_poll_and_audits_it(rig: Rig) -> None:
    _plan(rig, NOW)
    rig.rec.reconcile_once(NOW)
    assert rig.limit_w(0) == rig.limit_w(1) == 300.0
    (signed,) = publish_revert(rig.store, [HOST], KEY, NOW + 5 * S, 600.0)
    assert signed.part.revert and signed.part.setpoints == ()

    records = rig.rec.reconcile_once(NOW + 10 * S)  # the next poll
    assert rig.limit_w(0) == rig.limit_w(1) == 700.0  # the saved pre-agent limits
    reverted = only(records, "reverted")
    assert {r.gpu_uuid for r in reverted} == {rec_mod.ALL_GPUS, UUID0, UUID1}
    assert all(r.plan_id == signed.part.plan_id and r.seq == signed.part.seq for r in reverted)
    assert not only(records, "restored")
    assert rig.rec.lease is not None and rig.rec.lease.revert
    assert not (rig.state_dir / "saved_limits.json").exists()
    stored = {(p.tags["gpu_uuid"], p.tags["action"]) for p in rig.audits()}
    assert {("all", "reverted"), (UUID0, "reverted"), (UUID1, "reverted")} <= stored

    calls = len(rig.fake.set_calls)  # while it lasts: nothing more to do, nothing re-audited
    for t in (20, 30, 300):
        assert rig.rec.reconcile_once(NOW + t * S) == []
    assert len(rig.fake.set_calls) == calls


def test_a_revert_is_seen_within_one_poll_with_poll_when_due(tmp_path: Path) -> None:
    rig = Rig(tmp_path, poll_when_due=True, interval_s=10.0)
    _plan(rig, NOW, due=NOW + 300 * S)  # the next plan is due in five minutes
    rig.rec.reconcile_once(NOW)
    rig.rec.reconcile_once(NOW + 10 * S)
    assert rig.rec.polls_skipped_total == 1 and rig.limit_w(0) == 300.0
    publish_revert(rig.store, [HOST], KEY, NOW + 15 * S, 600.0)
    records = rig.rec.reconcile_once(NOW + 20 * S)  # a skipped full poll, still seen
    assert rig.rec.polls_skipped_total == 2
    assert rig.limit_w(0) == rig.limit_w(1) == 700.0
    assert only(records, "reverted")
    rig.close()


def test_the_narrow_poll_fetches_nothing_while_nothing_is_new(tmp_path: Path) -> None:
    """poll_when_due's skipped ticks ask only for points since the last poll (no payload)."""
    rig = Rig(tmp_path, poll_when_due=True, interval_s=10.0)
    _plan(rig, NOW, due=NOW + 300 * S)
    rig.rec.reconcile_once(NOW)
    starts: list[int] = []
    inner = rig.store.newest

    def spy(*a: object, **kw: int) -> object:
        starts.append(kw["start_ns"])
        return inner(*a, **kw)  # type: ignore[arg-type]

    rig.store.newest = spy  # type: ignore[method-assign]
    calls = len(rig.fake.set_calls)
    for t in (10, 20, 100):
        assert rig.rec.reconcile_once(NOW + t * S) == []
    assert starts == [NOW - 40 * S, NOW - 30 * S, NOW - 20 * S]
    assert len(rig.fake.set_calls) == calls
    rig.close()


def test_after_the_revert_a_newer_plan_applies_again(rig: Rig) -> None:
    _plan(rig, NOW)
    rig.rec.reconcile_once(NOW)
    publish_revert(rig.store, [HOST], KEY, NOW + S, 60.0)
    rig.rec.reconcile_once(NOW + 10 * S)
    assert rig.limit_w(0) == 700.0
    rig.rec.reconcile_once(NOW + 70 * S)  # the revert's lease is over: nothing to undo
    assert rig.rec.lease is None and rig.limit_w(0) == 700.0
    _plan(rig, NOW + 80 * S, 400.0)
    rig.rec.reconcile_once(NOW + 90 * S)
    assert rig.limit_w(0) == 400.0


def test_a_revert_outranks_a_part_from_a_clock_running_ahead(rig: Rig) -> None:
    """The optimizer's clock is 20 s ahead: its part's seq and time are above our now."""
    _plan(rig, NOW + 20 * S)
    rig.rec.reconcile_once(NOW + 20 * S)
    (signed,) = publish_revert(rig.store, [HOST], KEY, NOW, 600.0)
    assert signed.part.seq == NOW + 20 * S + 1  # not refused as a replay, and the newest
    rig.rec.reconcile_once(NOW + 25 * S)
    assert rig.limit_w(0) == 700.0 and rig.rec.lease is not None and rig.rec.lease.revert


def test_a_revert_survives_an_agent_restart(rig: Rig) -> None:
    _plan(rig, NOW)
    rig.rec.reconcile_once(NOW)
    publish_revert(rig.store, [HOST], KEY, NOW + S, 600.0)
    restarted = rig.new_reconciler()  # crashed before its next poll: limits still planned
    restarted.on_start(NOW + 2 * S)
    restarted.reconcile_once(NOW + 3 * S)
    assert rig.limit_w(0) == rig.limit_w(1) == 700.0


def test_the_thermal_guard_still_holds_a_hot_gpu_under_a_revert(rig: Rig) -> None:
    _plan(rig, NOW)
    rig.rec.reconcile_once(NOW)
    rig.fake.gpus[0].temp_c = 95
    publish_revert(rig.store, [HOST], KEY, NOW + S, 600.0)
    records = rig.rec.reconcile_once(NOW + 10 * S)
    assert rig.limit_w(0) < 300.0 and rig.limit_w(1) == 700.0
    assert [r.gpu_uuid for r in only(records, "thermal")] == [UUID0]


def test_a_revert_part_with_setpoints_is_refused(rig: Rig) -> None:
    (part,) = split_plan(
        {
            "plan_id": "x",
            "created_ns": NOW,
            "expires_ns": NOW + TTL,
            "setpoints": [{"gpu": UUID0, "host": HOST, "power_limit_w": 300.0}],
        },
        seq_from_ns=NOW,
    )
    from dataclasses import replace

    from dcenergy.plan import key_id

    body = canonical_part(replace(part, key_id=key_id(KEY.public_key()), revert=True)).decode()
    assert '"revert":true' in body
    rig.put_payload(signed_raw(body))
    records = rig.rec.reconcile_once(NOW)
    assert only(records, "refused")[0].reason.startswith("bad_value")
    assert rig.fake.set_calls == []


def test_revert_parts_are_signed_and_old_parts_keep_their_bytes() -> None:
    (part,) = revert_parts(["n1"], NOW, 900.0)
    assert part.expires_ns == NOW + 900 * S and part.setpoints == ()
    from dcenergy.plan import sign_part

    signed = sign_part(part, KEY)
    body = json.loads(signed.payload)["part"]
    assert body["revert"] is True and body["setpoints"] == []
    back = verify_part(
        signed.payload, KEY.public_key(), now_ns=NOW, last_seq=None, max_skew_s=30, host="n1"
    )
    assert back.revert
    (plain,) = split_plan(
        {
            "plan_id": "p",
            "created_ns": NOW,
            "expires_ns": NOW + TTL,
            "setpoints": [{"gpu": UUID0, "host": "n1", "power_limit_w": 300.0}],
        },
        seq_from_ns=NOW,
    )
    assert b"revert" not in canonical_part(plain)


@pytest.mark.parametrize("duration", [0.5, MAX_REVERT_S + 1])
def test_revert_durations_out_of_range_are_refused(duration: float) -> None:
    with pytest.raises(ConfigError, match="--for"):
        revert_parts(["n1"], NOW, duration)


def test_newest_parts_reads_every_hosts_newest_with_its_revert_flag(rig: Rig) -> None:
    _plan(rig, NOW)
    publish_revert(rig.store, [HOST, "node-2"], KEY, NOW + S, 600.0)
    parts = newest_parts(rig.store, NOW + 2 * S)
    assert set(parts) == {HOST, "node-2"}
    assert all(p.revert for p in parts.values())
    assert parts[HOST].lease_left_s(NOW + 2 * S) == pytest.approx(599.0)
    points = rig.store.read(schema.PLAN_PART.name, start_ns=0)
    assert [p.fields["revert"] for p in points if p.tags["host"] == HOST] == [False, True]


def test_the_schema_lists_exactly_the_reconcilers_actions() -> None:
    """Dashboards and alerts take the action names from dcenergy.schema.AUDIT_ACTIONS."""
    names = {
        v
        for k, v in vars(rec_mod).items()
        if k.isupper() and isinstance(v, str) and k not in ("ALL_GPUS",)
    }
    assert names == set(schema.AUDIT_ACTIONS)
