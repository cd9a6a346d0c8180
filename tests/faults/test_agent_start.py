"""Start-up after a crash: saved limits are restored first, whatever state the spool is in.

Before, the spool opened before the reconciler's start-up restore: a damaged
spool file stopped the agent (``sqlite3.DatabaseError``, exit 1, a crash loop
under ``Restart=on-failure``) and GPUs capped before the crash stayed capped.
"""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path

import pytest

from agent.daemon import SPOOL_FILE, AgentDaemon
from agent.devices.simulated import SimulatedBackend
from agent.limits_state import LimitsState, SavedLimit
from dcenergy import schema
from dcenergy.config import load_config
from dcenergy.plan import generate_keypair
from dcenergy.store.embedded import EmbeddedStore
from tests.faults.conftest import filled_spool

CAPPED_W = 450.0


def _crashed_node(tmp_path: Path) -> tuple[AgentDaemon, SimulatedBackend, EmbeddedStore]:
    """A node whose previous agent capped its GPUs and died without restoring them."""
    generate_keypair(tmp_path / "plan.key", tmp_path / "plan.pub")
    cfg_path = tmp_path / "dcenergy.toml"
    cfg_path.write_text(
        f"""[agent]
host = "n1"
state_dir = "{tmp_path / "state"}"
runtime_dir = "{tmp_path / "run"}"
interval_s = 0.2
ship_interval_s = 0.2
[reconciler]
public_key = "{tmp_path / "plan.pub"}"
interval_s = 0.2
"""
    )
    cfg = load_config(cfg_path, env={})
    backend = SimulatedBackend(2, host="n1")
    backend.open()
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    saved = {}
    for g in backend.gpus():
        saved[g.identity.uuid] = SavedLimit(g.identity.uuid, g.power_limit_w())
        g.set_power_limit_w(CAPPED_W)
    LimitsState(state).save_limits(saved)
    store = EmbeddedStore(tmp_path / "store.sqlite")
    return AgentDaemon(cfg, backend=backend, store=store), backend, store


def test_a_damaged_spool_neither_stops_the_agent_nor_keeps_gpus_capped(tmp_path: Path) -> None:
    daemon, backend, store = _crashed_node(tmp_path)
    spool_path = tmp_path / "state" / SPOOL_FILE
    committed = filled_spool(spool_path, points=1000, shipped=0)
    with spool_path.open("r+b") as f:
        f.write(os.urandom(100))  # a bad header: "file is not a database"
    daemon.start()
    try:
        assert [g.power_limit_w() for g in backend.gpus()] == [
            g.power_limits().default_w for g in backend.gpus()
        ]
        deadline = time.monotonic() + 30
        while (
            daemon.shipper.counters.points_shipped_total < committed and time.monotonic() < deadline
        ):
            time.sleep(0.05)
        c = daemon.spool.counters()
        assert c.dropped_corrupt_total == 0  # all 1000 salvaged, and shipped
        assert daemon.shipper.counters.points_shipped_total >= committed
    finally:
        daemon.shutdown()
    restored = [
        p for p in store.read(schema.AUDIT.name, start_ns=0) if p.tags["action"] == "restored"
    ]
    assert restored  # the start-up restore's audit reached the store through the spool
    assert list((tmp_path / "state").glob(f"{SPOOL_FILE}.corrupt-*"))
    store.close()
    backend.close()


def test_limits_are_restored_before_the_spool_even_opens(tmp_path: Path) -> None:
    daemon, backend, store = _crashed_node(tmp_path)
    (tmp_path / "state" / SPOOL_FILE).mkdir()  # a spool that cannot be opened at all
    with pytest.raises(sqlite3.OperationalError):
        daemon.start()
    daemon.shutdown()
    assert [g.power_limit_w() for g in backend.gpus()] == [
        g.power_limits().default_w for g in backend.gpus()
    ]
    store.close()
    backend.close()
