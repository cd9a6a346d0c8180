"""The reconciler through the real NVML backend on the fake pynvml (every set call recorded).

Time is a plain integer passed in; nothing here reads the wall clock.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.devices.base import GpuDevice
from agent.devices.nvml import NvmlBackend
from agent.devices.simulated import SimulatedBackend
from agent.limits_state import LimitsState
from agent.reconciler import AuditRecord, Reconciler, reconciler_from_config
from dcenergy import schema
from dcenergy.config import ReconcilerConfig
from dcenergy.errors import StoreUnavailable
from dcenergy.plan import canonical_json, sign_part
from dcenergy.publish import part_point, publish, split_plan
from dcenergy.store.embedded import EmbeddedStore
from tests.agent.fake_pynvml import FakeGpu, FakeNvml

NOW = 1_700_000_000_000_000_000
S = 1_000_000_000
HOST = "node-1"
KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
OTHER_KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(1, 33)))
UUID0 = "GPU-00000000-0000-4000-8000-000000000000"
UUID1 = "GPU-11111111-1111-4111-8111-111111111111"
TTL = 900 * S


class DriftingNvml(FakeNvml):
    """A driver that enforces at most ``enforced_cap_mw`` whatever limit is requested."""

    enforced_cap_mw = 350_000

    def nvmlDeviceSetPowerManagementLimit(self, h: Any, limit_mw: int) -> None:
        super().nvmlDeviceSetPowerManagementLimit(h, limit_mw)
        g = self._gpu(h)
        g.enforced_limit_mw = min(limit_mw, self.enforced_cap_mw)


class Rig:
    """Fake NVML GPUs, an embedded store, a state dir and a reconciler over them."""

    def __init__(self, tmp_path: Path, fake: FakeNvml | None = None, **cfg: Any) -> None:
        self.tmp_path = tmp_path
        self.fake = fake or FakeNvml([FakeGpu(uuid=UUID0), FakeGpu(uuid=UUID1)])
        self.backend = NvmlBackend(self.fake)
        self.backend.open()
        self.store = EmbeddedStore(tmp_path / "store.sqlite")
        self.state_dir = tmp_path / "state"
        cfg.setdefault("max_step_w", 1000.0)
        self.config = ReconcilerConfig(**cfg)
        self.rec = self.new_reconciler()

    def new_reconciler(self) -> Reconciler:
        """A fresh reconciler on the same GPUs, store and state dir: an agent restart."""
        return Reconciler(
            self.backend.devices(),
            HOST,
            self.store,
            KEY.public_key(),
            self.config,
            self.state_dir,
            clock_ns=lambda: NOW,
        )

    def publish(
        self, setpoints: dict[str, Any], *, at: int = NOW, ttl: int = TTL, **kw: Any
    ) -> None:
        sps = []
        for uuid, value in setpoints.items():
            w, clk = value if isinstance(value, tuple) else (value, None)
            sps.append({"gpu": uuid, "host": HOST, "power_limit_w": w, "sm_clock_max_mhz": clk})
        plan = {"plan_id": kw.pop("plan_id", "p1"), "created_ns": at, "expires_ns": at + ttl}
        publish({**plan, "setpoints": sps, **kw}, self.store, KEY, at)

    def put_payload(self, payload: str, *, at: int = NOW, seq: int = NOW) -> None:
        self.store.write(
            [
                schema.point(
                    schema.PLAN_PART,
                    {schema.TAG_HOST: HOST},
                    {"plan_id": "x", "seq": seq, "payload": payload, "expires_ns": at + TTL},
                    at,
                )
            ]
        )

    def limit_w(self, i: int) -> float:
        return self.fake.gpus[i].limit_mw / 1000

    def audits(self) -> list[schema.Point]:
        return self.store.read(schema.AUDIT.name, start_ns=0)

    def saved(self) -> dict[str, Any]:
        return json.loads((self.state_dir / "saved_limits.json").read_text())["gpus"]

    def close(self) -> None:
        self.backend.close()
        self.store.close()


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    r = Rig(tmp_path)
    yield r
    r.close()


def only(records: list[AuditRecord], action: str) -> list[AuditRecord]:
    return [r for r in records if r.action == action]


def signed_raw(raw: str, key: Ed25519PrivateKey = KEY) -> str:
    sig = base64.b64encode(key.sign(raw.encode())).decode()
    return '{"part":' + raw + ',"sig":"' + sig + '"}'


def good_raw(**change: Any) -> str:
    """Canonical bytes of a valid 300 W part for GPU 0, key id set, for tampering."""
    part = split_plan(
        {
            "plan_id": "p1",
            "created_ns": NOW,
            "expires_ns": NOW + TTL,
            "setpoints": [{"gpu": UUID0, "host": HOST, "power_limit_w": 300.0}],
        },
        seq_from_ns=NOW,
    )[0]
    part = replace(sign_part(part, KEY).part, **change)
    from dcenergy.plan import canonical_part

    return canonical_part(part).decode()


# --- refusals: an audit record and not one set call -------------------------------------


def assert_refused(rig: Rig, now: int, reason: str, gpu: str = "all") -> None:
    records = rig.rec.reconcile_once(now)
    assert rig.fake.set_calls == []
    refused = only(records, "refused")
    assert refused, records
    assert refused[0].reason.startswith(reason), refused[0].reason
    assert refused[0].gpu_uuid == gpu
    points = [p for p in rig.audits() if p.tags["action"] == "refused"]
    assert points and points[0].tags["gpu_uuid"] == gpu
    assert str(points[0].fields["reason"]).startswith(reason)
    assert rig.rec.lease is None
    assert not (rig.state_dir / "saved_limits.json").exists()


def test_unsigned_is_refused(rig: Rig) -> None:
    body = json.loads(signed_raw(good_raw()))["part"]
    rig.put_payload(json.dumps({"part": body}))
    assert_refused(rig, NOW, "unsigned")


def test_bad_signature_is_refused(rig: Rig) -> None:
    payload = signed_raw(good_raw()).replace("300.000", "200.000")
    rig.put_payload(payload)
    assert_refused(rig, NOW, "bad_signature")


def test_other_key_is_refused(rig: Rig) -> None:
    part = split_plan(
        {
            "plan_id": "evil",
            "created_ns": NOW,
            "expires_ns": NOW + TTL,
            "setpoints": [{"gpu": UUID0, "host": HOST, "power_limit_w": 200.0}],
        },
        seq_from_ns=NOW,
    )[0]
    rig.store.write([part_point(sign_part(part, OTHER_KEY), NOW)])
    assert_refused(rig, NOW, "other_key")


def test_expired_is_refused(rig: Rig) -> None:
    rig.publish({UUID0: 300.0}, at=NOW - 2 * TTL)
    assert_refused(rig, NOW, "expired")


def test_future_dated_beyond_skew_is_refused(rig: Rig) -> None:
    rig.publish({UUID0: 300.0}, at=NOW + 31 * S)  # skew allowed: 30 s
    assert_refused(rig, NOW, "future")


def test_unknown_gpu_refuses_the_whole_part(rig: Rig) -> None:
    rig.publish({UUID0: 300.0, "GPU-not-here": 300.0})
    assert_refused(rig, NOW, "unknown_gpu", gpu="GPU-not-here")


@pytest.mark.parametrize("value", ["NaN", "-300.000", "Infinity"])
def test_nan_and_negative_are_refused(rig: Rig, value: str) -> None:
    rig.put_payload(signed_raw(good_raw().replace("300.000", value)))
    assert_refused(rig, NOW, "bad_value")


def test_malformed_is_refused(rig: Rig) -> None:
    rig.put_payload("{not json")
    assert_refused(rig, NOW, "malformed")


def test_part_for_another_host_is_refused(rig: Rig) -> None:
    rig.put_payload(signed_raw(good_raw(host="node-2")))
    assert_refused(rig, NOW, "wrong_host")


def test_replay_is_refused_within_a_run(rig: Rig) -> None:
    rig.publish({UUID0: 300.0}, at=NOW, plan_id="old")
    old_payload = rig.store.read(schema.PLAN_PART.name, start_ns=0)[0].fields["payload"]
    rig.publish({UUID0: 500.0}, at=NOW + S, plan_id="new")
    rig.rec.reconcile_once(NOW + 2 * S)
    assert rig.limit_w(0) == 500.0
    calls = len(rig.fake.set_calls)
    rig.put_payload(str(old_payload), at=NOW + 3 * S)  # an old signed part re-written as newest
    records = rig.rec.reconcile_once(NOW + 4 * S)
    assert only(records, "refused")[0].reason.startswith("replayed")
    assert len(rig.fake.set_calls) == calls  # the old part changes nothing
    assert rig.limit_w(0) == 500.0
    assert rig.rec.lease is not None and rig.rec.lease.plan_id == "new"  # valid lease kept


def test_replay_is_refused_after_a_restart(rig: Rig) -> None:
    rig.publish({UUID0: 700.0}, at=NOW, plan_id="old")  # no change needed
    old_payload = rig.store.read(schema.PLAN_PART.name, start_ns=0)[0].fields["payload"]
    rig.publish({UUID0: 700.0}, at=NOW + S, plan_id="new")
    rig.rec.reconcile_once(NOW + 2 * S)
    assert rig.fake.set_calls == []
    restarted = rig.new_reconciler()
    rig.put_payload(str(old_payload), at=NOW + 3 * S)
    records = restarted.reconcile_once(NOW + 4 * S)
    assert only(records, "refused")[0].reason.startswith("replayed")
    assert rig.fake.set_calls == []


def test_same_refusal_is_written_and_logged_once(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    rig.put_payload('{"part": {}}')
    for i in range(3):
        assert only(rig.rec.reconcile_once(NOW + i * 10 * S), "refused")
    assert len([p for p in rig.audits() if p.tags["action"] == "refused"]) == 1
    assert len([r for r in caplog.records if "refused" in r.getMessage()]) == 1


# --- applying: clamp, step, read back --------------------------------------------------------


def test_apply_saves_pre_agent_limit_first_then_audits(rig: Rig) -> None:
    rig.publish({UUID0: 300.0})
    records = rig.rec.reconcile_once(NOW)
    assert rig.limit_w(0) == 300.0
    assert rig.limit_w(1) == 700.0  # not in the plan: untouched
    assert rig.fake.set_calls == [("nvmlDeviceSetPowerManagementLimit", 0, (300_000,))]
    assert rig.saved() == {
        UUID0: {"power_limit_w": 700.0, "clocks_locked_by_agent": False, "clock_restore": "reset"}
    }
    applied = only(records, "applied")
    assert len(applied) == 1
    a = applied[0]
    assert (a.gpu_uuid, a.plan_id, a.requested_w, a.applied_w, a.enforced_w) == (
        UUID0,
        "p1",
        300.0,
        300.0,
        300.0,
    )
    point = next(p for p in rig.audits() if p.tags["action"] == "applied")
    assert point.tags == {"host": HOST, "gpu_uuid": UUID0, "action": "applied"}
    assert point.fields["seq"] == NOW and point.fields["applied_w"] == 300.0
    # steady state: nothing more to do
    assert rig.rec.reconcile_once(NOW + 10 * S) == []
    assert len(rig.fake.set_calls) == 1


def test_clamped_to_hardware_range(rig: Rig) -> None:
    rig.publish({UUID0: 150.0})  # hardware minimum: 200 W
    records = rig.rec.reconcile_once(NOW)
    assert rig.limit_w(0) == 200.0
    c = only(records, "clamped")[0]
    assert (c.requested_w, c.applied_w, c.reason) == (150.0, 200.0, "hw_min")


def test_clamped_to_hardware_max(tmp_path: Path) -> None:
    r = Rig(tmp_path, FakeNvml([FakeGpu(uuid=UUID0, limit_mw=500_000)]))
    r.publish({UUID0: 900.0})
    c = only(r.rec.reconcile_once(NOW), "clamped")[0]
    assert (c.applied_w, c.reason) == (700.0, "hw_max")
    r.close()


def test_clamped_to_local_policy(tmp_path: Path) -> None:
    r = Rig(tmp_path, min_w=250.0, max_w=600.0)
    r.publish({UUID0: 220.0, UUID1: 650.0})
    records = r.rec.reconcile_once(NOW)
    assert (r.limit_w(0), r.limit_w(1)) == (250.0, 600.0)
    assert sorted(c.reason for c in only(records, "clamped")) == ["policy_max", "policy_min"]
    r.close()


def test_max_step_per_change(tmp_path: Path) -> None:
    r = Rig(tmp_path, max_step_w=150.0)
    r.publish({UUID0: 300.0})
    seen = []
    for i in range(4):
        records = r.rec.reconcile_once(NOW + i * 10 * S)
        seen.append((r.limit_w(0), [x.action for x in records]))
    assert seen == [
        (550.0, ["clamped"]),
        (400.0, ["clamped"]),
        (300.0, ["applied"]),
        (300.0, []),
    ]
    r.close()


def test_read_back_drift_is_reported(tmp_path: Path) -> None:
    r = Rig(tmp_path, DriftingNvml([FakeGpu(uuid=UUID0)]))
    r.publish({UUID0: 500.0})
    records = r.rec.reconcile_once(NOW)
    drift = only(records, "drift")
    assert len(drift) == 1
    assert (drift[0].applied_w, drift[0].enforced_w) == (500.0, 350.0)
    assert "enforced 350" in drift[0].reason
    assert only(records, "applied")[0].enforced_w == 350.0
    assert [p for p in r.audits() if p.tags["action"] == "drift"]
    r.close()


def test_no_drift_within_one_watt(rig: Rig) -> None:
    rig.publish({UUID0: 300.0})
    rig.rec.reconcile_once(NOW)
    rig.fake.gpus[0].enforced_limit_mw = 299_200
    assert only(rig.rec.reconcile_once(NOW + 10 * S), "drift") == []


def test_dvfs_locks_clocks_and_restore_resets_them(rig: Rig) -> None:
    rig.publish({UUID0: (400.0, 1400)})
    records = rig.rec.reconcile_once(NOW)
    # supported clocks are 210..1980 in 15 MHz steps: 1400 is not one, 1395 is the next below
    assert rig.fake.gpus[0].locked_clocks == (210, 1395)
    clocks = [r for r in records if r.sm_clock_max_mhz is not None]
    assert clocks[0].sm_clock_max_mhz == 1395 and clocks[0].reason == "clocks_hw"
    assert rig.saved()[UUID0]["clocks_locked_by_agent"] is True
    assert rig.limit_w(0) == 400.0
    # already locked: the next cycle sets nothing
    n = len(rig.fake.set_calls)
    rig.rec.reconcile_once(NOW + 10 * S)
    assert len(rig.fake.set_calls) == n
    rig.rec.restore_all("shutdown", NOW + 20 * S)
    assert rig.fake.gpus[0].locked_clocks is None
    assert rig.limit_w(0) == 700.0


def test_device_error_is_audited_not_raised(rig: Rig) -> None:
    import pynvml

    rig.fake.fail("nvmlDeviceSetPowerManagementLimit", code=pynvml.NVML_ERROR_NO_PERMISSION)
    rig.publish({UUID0: 300.0})
    records = rig.rec.reconcile_once(NOW)
    assert only(records, "error")[0].reason.startswith("device:")


# --- leases: expiry, shutdown, restart -----------------------------------------------------


def test_lease_expiry_restores_saved_limits(rig: Rig) -> None:
    rig.publish({UUID0: 300.0, UUID1: 450.0})
    rig.rec.reconcile_once(NOW)
    assert (rig.limit_w(0), rig.limit_w(1)) == (300.0, 450.0)
    assert rig.rec.reconcile_once(NOW + TTL - 1) == []  # still leased
    records = rig.rec.reconcile_once(NOW + TTL)
    assert (rig.limit_w(0), rig.limit_w(1)) == (700.0, 700.0)
    restored = only(records, "restored")
    assert {r.gpu_uuid for r in restored} == {UUID0, UUID1}
    assert all(r.reason == "lease_expired" for r in restored)
    assert not (rig.state_dir / "saved_limits.json").exists()
    assert rig.rec.lease is None
    # nothing left to do afterwards
    n = len(rig.fake.set_calls)
    assert rig.rec.reconcile_once(NOW + TTL + 10 * S) == []
    assert len(rig.fake.set_calls) == n


def test_a_newer_part_renews_the_lease(rig: Rig) -> None:
    rig.publish({UUID0: 300.0}, at=NOW)
    rig.rec.reconcile_once(NOW)
    rig.publish({UUID0: 300.0}, at=NOW + TTL - 60 * S, plan_id="p2")
    rig.rec.reconcile_once(NOW + TTL + S)
    assert rig.limit_w(0) == 300.0
    assert rig.rec.lease is not None and rig.rec.lease.plan_id == "p2"


def test_gpu_leaving_the_plan_is_restored(rig: Rig) -> None:
    rig.publish({UUID0: 300.0, UUID1: 400.0}, at=NOW)
    rig.rec.reconcile_once(NOW)
    rig.publish({UUID0: 300.0}, at=NOW + S, plan_id="p2")
    records = rig.rec.reconcile_once(NOW + 2 * S)
    assert rig.limit_w(1) == 700.0
    assert only(records, "restored")[0].reason == "not_in_plan"


def test_safe_cap_replaces_the_saved_value(tmp_path: Path) -> None:
    r = Rig(tmp_path, safe_cap_w=450.0)
    r.publish({UUID0: 300.0})
    r.rec.reconcile_once(NOW)
    r.rec.reconcile_once(NOW + TTL)
    assert r.limit_w(0) == 450.0
    r.close()


def test_restore_all_on_shutdown(rig: Rig) -> None:
    rig.publish({UUID0: 300.0, UUID1: 250.0})
    rig.rec.reconcile_once(NOW)
    records = rig.rec.restore_all("sigterm", NOW + S)
    assert (rig.limit_w(0), rig.limit_w(1)) == (700.0, 700.0)
    assert {r.reason for r in records} == {"sigterm"}
    assert {p.tags["gpu_uuid"] for p in rig.audits() if p.tags["action"] == "restored"} == {
        UUID0,
        UUID1,
    }
    assert not (rig.state_dir / "saved_limits.json").exists()


def test_restart_mid_lease_keeps_the_lease(rig: Rig) -> None:
    rig.publish({UUID0: 300.0})
    rig.rec.reconcile_once(NOW)
    n = len(rig.fake.set_calls)
    restarted = rig.new_reconciler()  # crash: no restore_all
    assert restarted.on_start(NOW + 60 * S) == []
    assert restarted.lease is not None and restarted.lease.plan_id == "p1"
    assert restarted.reconcile_once(NOW + 70 * S) == []
    assert len(rig.fake.set_calls) == n
    assert rig.limit_w(0) == 300.0
    # and when that lease runs out, the limit saved by the first run is restored
    restarted.reconcile_once(NOW + TTL)
    assert rig.limit_w(0) == 700.0


def test_restart_after_the_lease_expired_restores(rig: Rig) -> None:
    rig.publish({UUID0: 300.0})
    rig.rec.reconcile_once(NOW)
    restarted = rig.new_reconciler()
    records = restarted.on_start(NOW + TTL + S)
    assert rig.limit_w(0) == 700.0
    assert only(records, "restored")[0].reason == "restart_without_lease"
    assert not (rig.state_dir / "saved_limits.json").exists()


def test_cannot_save_pre_agent_limits_means_no_change(rig: Rig) -> None:
    rig.state_dir.parent.mkdir(exist_ok=True)
    rig.state_dir.write_text("a file where the state dir should be")
    rec = rig.new_reconciler()
    rig.publish({UUID0: 300.0})
    records = rec.reconcile_once(NOW)
    assert rig.fake.set_calls == []
    assert only(records, "error")


# --- thermal guard ---------------------------------------------------------------------------


def test_thermal_guard_without_a_plan(rig: Rig) -> None:
    rig.fake.gpus[0].temp_c = 90  # limit 87 °C
    records = rig.rec.reconcile_once(NOW)
    assert rig.limit_w(0) == 675.0
    assert only(records, "thermal")[0].reason == "thermal"
    assert rig.saved()[UUID0]["power_limit_w"] == 700.0
    rig.rec.reconcile_once(NOW + 10 * S)
    assert rig.limit_w(0) == 650.0  # still hot: lower again
    rig.fake.gpus[0].temp_c = 86  # below the limit but inside the hysteresis: hold
    rig.rec.reconcile_once(NOW + 20 * S)
    assert rig.limit_w(0) == 650.0
    rig.fake.gpus[0].temp_c = 70  # cool: lift step by step, then restore
    rig.rec.reconcile_once(NOW + 30 * S)
    assert rig.limit_w(0) == 675.0
    rig.rec.reconcile_once(NOW + 40 * S)
    assert rig.limit_w(0) == 700.0
    assert not (rig.state_dir / "saved_limits.json").exists()


def test_thermal_guard_overrides_the_plan(rig: Rig) -> None:
    rig.publish({UUID0: 600.0})
    rig.rec.reconcile_once(NOW)
    rig.fake.gpus[0].temp_c = 95
    records = rig.rec.reconcile_once(NOW + 10 * S)
    assert rig.limit_w(0) == 575.0
    t = only(records, "thermal")[0]
    assert (t.requested_w, t.applied_w, t.plan_id) == (600.0, 575.0, "p1")


# --- the simulated backend (another GpuDevice implementation) --------------------------------


class Recording(GpuDevice):
    """Wraps a device and records every set call."""

    def __init__(self, inner: GpuDevice, calls: list[tuple[str, Any]]) -> None:
        self.inner = inner
        self.identity = inner.identity
        self.calls = calls

    @property
    def lost(self) -> bool:
        return self.inner.lost

    def sample(self) -> Any:
        return self.inner.sample()

    def power_limits(self) -> Any:
        return self.inner.power_limits()

    def power_limit_w(self) -> float:
        return self.inner.power_limit_w()

    def enforced_power_limit_w(self) -> float:
        return self.inner.enforced_power_limit_w()

    def set_power_limit_w(self, watts: float) -> None:
        self.calls.append(("power", watts))
        self.inner.set_power_limit_w(watts)

    def supported_sm_clocks_mhz(self) -> list[int]:
        return self.inner.supported_sm_clocks_mhz()

    def lock_sm_clocks_mhz(self, min_mhz: int, max_mhz: int) -> None:
        self.calls.append(("lock", (min_mhz, max_mhz)))
        self.inner.lock_sm_clocks_mhz(min_mhz, max_mhz)

    def reset_sm_clocks(self) -> None:
        self.calls.append(("reset", None))
        self.inner.reset_sm_clocks()

    def compute_pids(self) -> list[int]:
        return self.inner.compute_pids()


def test_simulated_backend_apply_and_refuse(tmp_path: Path) -> None:
    t = [0.0]
    with SimulatedBackend(2, host=HOST, clock=lambda: t[0]) as backend:
        calls: list[tuple[str, Any]] = []
        devices = [Recording(d, calls) for d in backend.devices()]
        store = EmbeddedStore(tmp_path / "s.sqlite")
        rec = Reconciler(
            devices, HOST, store, KEY.public_key(), ReconcilerConfig(max_step_w=1000.0), tmp_path
        )
        uuid = devices[0].identity.uuid
        default_w = devices[0].power_limits().default_w
        # a part signed by another key: nothing set
        part = split_plan(
            {
                "plan_id": "evil",
                "created_ns": NOW,
                "expires_ns": NOW + TTL,
                "setpoints": [{"gpu": uuid, "host": HOST, "power_limit_w": 300.0}],
            },
            seq_from_ns=NOW,
        )[0]
        store.write([part_point(sign_part(part, OTHER_KEY), NOW)])
        assert only(rec.reconcile_once(NOW), "refused")
        assert calls == []
        # the real key: applied, then restored at expiry
        publish(
            {
                "plan_id": "good",
                "created_ns": NOW + S,
                "expires_ns": NOW + S + TTL,
                "setpoints": [{"gpu": uuid, "host": HOST, "power_limit_w": 300.0}],
            },
            store,
            KEY,
            NOW + S,
        )
        rec.reconcile_once(NOW + 2 * S)
        assert devices[0].power_limit_w() == 300.0
        rec.reconcile_once(NOW + S + TTL)
        assert devices[0].power_limit_w() == default_w
        assert calls == [("power", 300.0), ("power", default_w)]
        store.close()


def test_limits_state_ignores_a_corrupt_file(tmp_path: Path) -> None:
    (tmp_path / "saved_limits.json").write_text("{broken")
    assert LimitsState(tmp_path).load_limits() == {}
    assert canonical_json({"a": 1}) == b'{"a":1}'


# --- the store goes away ----------------------------------------------------------------------


class FlakyStore:
    """An embedded store whose reads can be switched to 'unavailable'."""

    def __init__(self, inner: EmbeddedStore) -> None:
        self.inner = inner
        self.down = False

    def write(self, points: Any) -> None:
        if self.down:
            raise StoreUnavailable("down")
        self.inner.write(points)

    def read(self, measurement: str, **kw: Any) -> list[schema.Point]:
        if self.down:
            raise StoreUnavailable("down")
        return self.inner.read(measurement, **kw)

    def newest(self, measurement: str, **kw: Any) -> schema.Point | None:
        if self.down:
            raise StoreUnavailable("down")
        return self.inner.newest(measurement, **kw)

    def close(self) -> None:
        self.inner.close()


def test_store_outage_keeps_the_lease_then_restores_at_expiry(rig: Rig) -> None:
    flaky = FlakyStore(rig.store)
    sunk: list[schema.Point] = []
    rec = Reconciler(
        rig.backend.devices(),
        HOST,
        flaky,
        KEY.public_key(),
        rig.config,
        rig.state_dir,
        audit_sink=sunk.extend,
    )
    rig.publish({UUID0: 300.0})
    rec.reconcile_once(NOW)
    assert rig.limit_w(0) == 300.0
    flaky.down = True
    records = rec.reconcile_once(NOW + 10 * S)
    assert only(records, "error")[0].reason.startswith("store:")
    assert rig.limit_w(0) == 300.0 and rec.lease is not None
    rec.reconcile_once(NOW + TTL)  # the optimizer and the database are gone: lease lapses
    assert rig.limit_w(0) == 700.0
    assert [p.tags["action"] for p in sunk] == ["applied", "error", "restored"]
    assert rig.audits() == []  # everything went to the sink given, not the store


def test_reconciler_from_config(tmp_path: Path) -> None:
    from dcenergy.config import AgentConfig, Config
    from dcenergy.errors import ConfigError
    from dcenergy.plan import generate_keypair

    cfg = Config(
        agent=AgentConfig(host=HOST, state_dir=tmp_path / "state"),
        reconciler=ReconcilerConfig(public_key=str(tmp_path / "plan.pub")),
    )
    with pytest.raises(ConfigError, match="keys generate"):
        reconciler_from_config(cfg, [], EmbeddedStore(tmp_path / "s.sqlite"))
    generate_keypair(tmp_path / "plan.key", tmp_path / "plan.pub")
    rec = reconciler_from_config(cfg, [], EmbeddedStore(tmp_path / "s.sqlite"))
    assert rec.host == HOST and rec.reconcile_once(NOW) == []


# --- polling less: the part names when the next plan is due ------------------------------
def _count_fetches(rig: Rig) -> list[int]:
    """Full polls (the day's lookback); the narrow "anything new?" polls a skipped tick
    still makes (so that a revert is seen at once) are not counted."""
    calls: list[int] = []
    inner = rig.store.newest

    def counted(*a: Any, **kw: Any) -> Any:
        if kw["start_ns"] < NOW - 3600 * S:
            calls.append(1)
        return inner(*a, **kw)

    rig.store.newest = counted  # type: ignore[method-assign]
    return calls


def _publish_due(rig: Rig, plan_id: str, at: int, due: int, w: float = 300.0) -> None:
    plan = {
        "plan_id": plan_id,
        "created_ns": at,
        "expires_ns": at + TTL,
        "setpoints": [{"gpu": UUID0, "host": HOST, "power_limit_w": w}],
    }
    publish(plan, rig.store, KEY, at, next_plan_ns=due)


def test_poll_when_due_skips_fetches_until_the_next_plan_is_due(tmp_path: Path) -> None:
    rig = Rig(tmp_path, poll_when_due=True)
    fetches = _count_fetches(rig)
    _publish_due(rig, "p1", NOW, due=NOW + 300 * S)
    rig.rec.reconcile_once(NOW)
    assert rig.limit_w(0) == 300.0 and len(fetches) == 1
    for t in (10, 100, 299):  # the lease holds and the next plan is not due: no query
        rig.rec.reconcile_once(NOW + t * S)
    assert len(fetches) == 1 and rig.rec.polls_skipped_total == 3
    _publish_due(rig, "p2", NOW + 300 * S, due=NOW + 600 * S, w=250.0)
    rig.rec.reconcile_once(NOW + 300 * S)  # due: fetched and applied
    assert len(fetches) == 2 and rig.limit_w(0) == 250.0
    assert rig.rec.lease is not None and rig.rec.lease.plan_id == "p2"
    rig.close()


def test_poll_when_due_still_fetches_before_the_lease_lapses(tmp_path: Path) -> None:
    rig = Rig(tmp_path, poll_when_due=True, interval_s=10.0)
    fetches = _count_fetches(rig)
    _publish_due(rig, "p1", NOW, due=NOW + 10 * TTL)  # a due time past the lease
    rig.rec.reconcile_once(NOW)
    rig.rec.reconcile_once(NOW + TTL - 11 * S)
    assert len(fetches) == 1
    rig.rec.reconcile_once(NOW + TTL - 9 * S)  # within one interval of the lease's end
    assert len(fetches) == 2
    rig.close()


def test_without_poll_when_due_every_tick_fetches(rig: Rig) -> None:
    fetches = _count_fetches(rig)
    _publish_due(rig, "p1", NOW, due=NOW + 300 * S)
    for t in (0, 10, 20):
        rig.rec.reconcile_once(NOW + t * S)
    assert len(fetches) == 3 and rig.rec.polls_skipped_total == 0


def test_a_part_without_a_due_time_keeps_its_signed_bytes() -> None:
    """Parts that do not name a due time encode exactly as before the field existed."""
    (part,) = split_plan(
        {
            "plan_id": "p1",
            "created_ns": NOW,
            "expires_ns": NOW + TTL,
            "setpoints": [{"gpu": UUID0, "host": HOST, "power_limit_w": 300.0}],
        },
        seq_from_ns=NOW,
    )
    from dcenergy.plan import canonical_part

    assert b"next_plan_ns" not in canonical_part(part)
    assert b'"next_plan_ns":7' in canonical_part(replace(part, next_plan_ns=7))


# --- probes: a short cap below the plan, audited 'probe', then the plan's limit ----------


def test_a_probe_is_applied_audited_and_its_lease_expires_to_the_plan(rig: Rig) -> None:
    sp = {"gpu": UUID0, "host": HOST, "power_limit_w": 400.0, "probe_w": 300.0}
    sp["probe_until_ns"] = NOW + 120 * S
    publish(
        {"plan_id": "p1", "created_ns": NOW, "expires_ns": NOW + TTL, "setpoints": [sp]},
        rig.store,
        KEY,
        NOW,
    )
    records = rig.rec.reconcile_once(NOW)
    assert rig.limit_w(0) == 300.0
    (probe,) = only(records, "probe")
    assert (probe.gpu_uuid, probe.requested_w, probe.applied_w) == (UUID0, 300.0, 300.0)
    assert any(p.tags["action"] == "probe" for p in rig.audits())
    assert rig.rec.reconcile_once(NOW + 60 * S) == []  # held while the probe lasts
    records = rig.rec.reconcile_once(NOW + 120 * S)  # the probe's lease is over: the plan
    assert rig.limit_w(0) == 400.0
    (applied,) = only(records, "applied")
    assert applied.requested_w == 400.0


def test_a_probe_above_the_plan_or_outside_the_lease_is_refused(rig: Rig) -> None:
    for probe_w, until in ((450.0, NOW + 60 * S), (300.0, NOW + TTL + S)):
        body = json.loads(good_raw())
        body["setpoints"][0].update(probe_w=probe_w, probe_until_ns=until)
        rig.put_payload(signed_raw(canonical_json(body).decode()))
        assert_refused(rig, NOW, "bad_value")
