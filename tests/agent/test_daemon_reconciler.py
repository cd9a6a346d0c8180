"""The daemon wires the plan reconciler: apply on start, restore on shutdown, audit shipped."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from agent.daemon import AgentDaemon
from agent.devices.simulated import SimulatedBackend
from dcenergy import schema
from dcenergy.config import load_config
from dcenergy.errors import ConfigError
from dcenergy.plan import generate_keypair, load_private_key
from dcenergy.publish import publish
from dcenergy.store.embedded import EmbeddedStore


def _config(tmp_path: Path, public_key: Path) -> Path:
    cfg = tmp_path / "dcenergy.toml"
    cfg.write_text(
        f"""[agent]
host = "n1"
state_dir = "{tmp_path / "state"}"
runtime_dir = "{tmp_path / "run"}"
interval_s = 0.2
ship_interval_s = 0.2
[reconciler]
public_key = "{public_key}"
interval_s = 0.2
max_step_w = 1000
"""
    )
    return cfg


def _wait_for(pred: object, timeout_s: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():  # type: ignore[operator]
            return True
        time.sleep(0.05)
    return False


def test_agent_applies_a_signed_plan_and_restores_on_shutdown(tmp_path: Path) -> None:
    generate_keypair(tmp_path / "plan.key", tmp_path / "plan.pub")
    cfg = load_config(_config(tmp_path, tmp_path / "plan.pub"), env={})
    backend = SimulatedBackend(2, host="n1")
    backend.open()
    gpus = backend.gpus()
    store = EmbeddedStore(tmp_path / "store.sqlite")
    now = time.time_ns()
    plan = {
        "plan_id": "p1",
        "created_ns": now,
        "expires_ns": now + int(600e9),
        "setpoints": [
            {"gpu": g.identity.uuid, "host": "n1", "power_limit_w": 450.0, "sm_clock_max_mhz": None}
            for g in gpus
        ],
    }
    publish(plan, store, load_private_key(tmp_path / "plan.key"), now)

    daemon = AgentDaemon(cfg, backend=backend, store=store)
    daemon.start()
    try:
        assert daemon.reconciler is not None
        applied = _wait_for(lambda: all(g.power_limit_w() == 450.0 for g in gpus))
    finally:
        daemon.shutdown()
    assert applied, [g.power_limit_w() for g in gpus]
    # SIGTERM / systemctl stop path: the pre-agent limits are back.
    assert [g.power_limit_w() for g in gpus] == [g.power_limits().default_w for g in gpus]
    actions = {p.tags["action"] for p in store.read(schema.AUDIT.name, start_ns=0)}
    assert {"applied", "restored"} <= actions
    store.close()
    backend.close()


def test_no_key_at_the_default_path_means_telemetry_only(tmp_path: Path) -> None:
    cfg_path = _config(tmp_path, tmp_path / "unused.pub")
    text = cfg_path.read_text().replace(f'public_key = "{tmp_path / "unused.pub"}"\n', "")
    cfg_path.write_text(text)
    cfg = load_config(cfg_path, env={})
    daemon = AgentDaemon(
        cfg, backend=SimulatedBackend(1, host="n1"), store=EmbeddedStore(tmp_path / "s.sqlite")
    )
    daemon.start()
    try:
        assert daemon.reconciler is None
    finally:
        daemon.shutdown()


def test_a_configured_key_that_is_missing_is_a_config_error(tmp_path: Path) -> None:
    cfg = load_config(_config(tmp_path, tmp_path / "missing.pub"), env={})
    daemon = AgentDaemon(
        cfg, backend=SimulatedBackend(1, host="n1"), store=EmbeddedStore(tmp_path / "s.sqlite")
    )
    with pytest.raises(ConfigError, match=r"missing\.pub"):
        daemon.start()
    daemon.shutdown()
