"""``dcenergy status``, ``check``, ``revert`` and ``budget`` end to end, through ``main``.

A simulated fleet (real agent code: sampler, spool, shipper, reconciler) writes
into an embedded store; the commands run on the configured store at the wall
clock, the fleet's virtual clock kept just behind it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.simfleet import SimFleet
from dcenergy import schema
from dcenergy.cli import main
from dcenergy.config import ReconcilerConfig
from dcenergy.errors import EX_ATTENTION, EX_CONFIG, EX_NO_TELEMETRY, EX_USAGE
from dcenergy.plan import generate_keypair, load_private_key, load_public_key
from dcenergy.publish import newest_parts, publish
from dcenergy.store.embedded import EmbeddedStore

S = 1_000_000_000
TOPOLOGY = {
    "version": 1,
    "domains": [
        {"id": "room", "kind": "facility", "budget_w": 5000},
        {"id": "rack-1", "kind": "rack", "parent": "room", "budget_w": 2000},
    ],
    "hosts": {"node-1": {"domains": ["rack-1"]}},
    "default_domains": ["room"],
}


class Env:
    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.db = tmp_path / "store.sqlite"
        keys = tmp_path / "keys"
        generate_keypair(keys / "plan.key", keys / "plan.pub")
        self.key = load_private_key(keys / "plan.key")
        (tmp_path / "topology.json").write_text(json.dumps(TOPOLOGY))
        self.cfg = tmp_path / "dcenergy.toml"
        self.cfg.write_text(
            f'[agent]\nstate_dir = "{tmp_path / "state"}"\n'
            f'[store]\nembedded_path = "{self.db}"\n'
            f'[optimizer]\ntopology = "{tmp_path / "topology.json"}"\n'
            f'signing_key = "{keys / "plan.key"}"\nwindow_s = 300\n'
            f'[reconciler]\npublic_key = "{keys / "plan.pub"}"\n'
        )
        self.store = EmbeddedStore(self.db)
        self.fleet = SimFleet(
            2,
            2,
            store=self.store,
            state_root=tmp_path / "fleet",
            public_key=load_public_key(keys / "plan.pub"),
            reconciler_config=ReconcilerConfig(interval_s=10.0, max_step_w=1000.0),
            ship_interval_s=5.0,
            start_ns=time.time_ns() - 200 * S,
        )
        self.fleet.__enter__()

    def catch_up(self, behind_s: float = 5.0) -> None:
        """Run the fleet to ``behind_s`` before the wall clock, and ship everything."""
        self.fleet.run(max(0.0, (time.time_ns() - self.fleet.now_ns) / 1e9 - behind_s))
        assert self.fleet.flush() == 0

    def publish_plan(self, w: float) -> None:
        now = self.fleet.now_ns
        sps = [
            {"gpu": g.identity.uuid, "host": h, "power_limit_w": w} for h, g in self.fleet.gpus()
        ]
        plan = {"plan_id": f"p-{w:g}", "created_ns": now, "expires_ns": now + 900 * S}
        publish({**plan, "setpoints": sps}, self.store, self.key, now)

    def run(self, *args: str, capsys: pytest.CaptureFixture[str] | None = None) -> int:
        return main(["--config", str(self.cfg), *args])

    def close(self) -> None:
        self.fleet.__exit__(None, None, None)
        self.store.close()


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    e = Env(tmp_path)
    e.catch_up(behind_s=40)
    e.publish_plan(450.0)
    e.catch_up()
    yield e
    e.close()


def _json(capsys: pytest.CaptureFixture[str]) -> Any:
    return json.loads(capsys.readouterr().out)


def test_status_and_check_on_a_healthy_fleet(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    assert env.run("status", "--json") == 0
    doc = _json(capsys)
    assert doc["severity"] == "ok" and doc["exit_code"] == 0
    hosts = {h["host"]: h for h in doc["hosts"]}
    assert set(hosts) == {"node-1", "node-2"}
    for h in hosts.values():
        assert not h["silent"] and h["gpus"] == 2 and h["plan"]["plan_id"] == "p-450"
        assert h["plan"]["state"] == "in_force" and h["audit"]["applied"] >= 2
    assert env.run("status") == 0
    text = capsys.readouterr().out
    assert text.startswith("fleet: 2 hosts, 4 GPUs") and "node-1" in text and "p-450" in text
    assert env.run("check") == 0
    (line, *_) = capsys.readouterr().out.splitlines()
    assert line.startswith("DCENERGY OK - 2 hosts, 4 GPUs, 2 under a plan|hosts=2;;;0 ")


def test_revert_is_applied_by_the_agents_within_one_poll_and_shown(
    env: Env, capsys: pytest.CaptureFixture[str]
) -> None:
    gpus = dict(env.fleet.gpus())
    assert all(g.power_limit_w() == 450.0 for _, g in env.fleet.gpus())
    assert env.run("revert", "--host", "node-1", "--for", "10m") == 0
    assert "reverted 1 host for 10m" in capsys.readouterr().out
    env.fleet.run(10)  # one reconciler interval
    limits = {h: g.power_limit_w() for h, g in env.fleet.gpus()}
    assert limits["node-2"] == 450.0
    node1 = [g for h, g in env.fleet.gpus() if h == "node-1"]
    assert all(g.power_limit_w() == g.power_limits().default_w for g in node1), gpus
    actions = [(a.action, a.gpu_uuid) for a in env.fleet.audit if a.action == "reverted"]
    assert len(actions) == 3  # the host-wide record and each GPU
    assert env.fleet.flush() == 0

    assert env.run("status", "--json") == 0  # a revert is a note, not an alarm
    doc = _json(capsys)
    n1 = next(h for h in doc["hosts"] if h["host"] == "node-1")
    assert n1["plan"]["state"] == "reverted" and n1["plan"]["revert"] is True
    assert n1["audit"]["reverted"] == 3
    assert 590 < n1["plan"]["lease_left_s"] <= 600
    assert doc["totals"]["hosts_reverted"] == 1
    assert [f["code"] for f in doc["findings"]] == ["reverted"]
    assert env.run("check") == 0
    assert "1 reverted" in capsys.readouterr().out.splitlines()[0]

    # the optimizer service publishes nothing for node-1 until the revert ends
    capsys.readouterr()
    assert env.run("optimizer", "run", "--once") in (0, 3)
    assert "(not sent to 1 reverted hosts)" in capsys.readouterr().out
    parts = newest_parts(env.store, time.time_ns())
    assert parts["node-1"].revert and not parts["node-2"].revert
    assert parts["node-2"].plan_id != "p-450"

    # a plan published by hand ends the revert, and says so
    now = time.time_ns()
    plan = {
        "plan_id": "by-hand",
        "created_ns": now,
        "expires_ns": now + 600 * S,
        "setpoints": [
            {"gpu": g.identity.uuid, "host": h, "power_limit_w": 400.0} for h, g in env.fleet.gpus()
        ],
    }
    (env.tmp / "plan.json").write_text(json.dumps(plan))
    assert env.run("apply", str(env.tmp / "plan.json")) == 0
    assert "warning: this plan ends the revert of node-1" in capsys.readouterr().err
    assert not newest_parts(env.store, time.time_ns())["node-1"].revert


def test_a_silent_agent_makes_status_exit_5_and_check_critical(
    env: Env, capsys: pytest.CaptureFixture[str]
) -> None:
    assert env.run("status", "--silent", "1s") == EX_ATTENTION
    out = capsys.readouterr().out
    assert "needs attention (exit 5):" in out and "CRITICAL node-1: agent silent" in out
    assert env.run("check", "--silent", "1s") == 2
    assert capsys.readouterr().out.startswith("DCENERGY CRITICAL - 2 silent")


def test_check_is_unknown_on_errors_and_bad_options(
    env: Env, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert env.run("check", "--silent", "soon") == 3
    assert capsys.readouterr().out.startswith("DCENERGY UNKNOWN - option '--silent'")
    assert env.run("check", "--no-such-option") == 3
    assert capsys.readouterr().out.startswith("DCENERGY UNKNOWN - bad command line")
    empty = tmp_path / "empty.toml"
    empty.write_text(f'[store]\nembedded_path = "{tmp_path / "none.sqlite"}"\n')
    assert main(["--config", str(empty), "check"]) == 3
    assert main(["--config", str(empty), "status"]) == EX_NO_TELEMETRY


def test_revert_options(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    assert env.run("revert") == EX_USAGE
    assert env.run("revert", "--all", "--host", "node-1") == EX_USAGE
    assert env.run("revert", "--all", "--for", "2d") == EX_CONFIG
    assert env.run("revert", "--all", "--for", "soon") == EX_CONFIG
    capsys.readouterr()
    assert env.run("revert", "--all", "--for", "90s") == 0
    assert "reverted 2 hosts for 90s" in capsys.readouterr().out
    parts = newest_parts(env.store, time.time_ns())
    assert all(p.revert and 85 < p.lease_left_s(time.time_ns()) <= 90 for p in parts.values())
    assert env.run("revert", "--host", "ghost-9") == 0  # an emergency stop is never refused
    assert "warning: host ghost-9 sent no GPU telemetry" in capsys.readouterr().err


def test_budget_set_list_clear_and_the_optimizer_uses_it(
    env: Env, capsys: pytest.CaptureFixture[str]
) -> None:
    assert env.run("budget", "set", "--domain", "rack-1", "--watts", "900", "--until", "2h") == 0
    assert "budget override: rack-1 900 W until" in capsys.readouterr().out
    assert env.run("budget", "set", "--domain", "room", "--watts", "9000", "--until", "1h") == 0
    assert "above the topology's 5000 W for room: the optimizer keeps" in capsys.readouterr().err
    assert env.run("budget", "set", "--domain", "nope", "--watts", "1", "--until", "1h") == (
        EX_CONFIG
    )
    assert env.run("budget", "set", "--domain", "room", "--watts", "-1", "--until", "1h") == (
        EX_CONFIG
    )
    assert env.run("budget", "set", "--domain", "room", "--watts", "9", "--until", "8d") == (
        EX_CONFIG
    )
    capsys.readouterr()
    assert env.run("budget", "list", "--json") == 0
    doc = _json(capsys)
    by = {o["domain"]: o for o in doc["overrides"]}
    assert by["rack-1"]["watts"] == 900.0 and by["rack-1"]["verified"] is True
    assert 7190 < by["rack-1"]["left_s"] <= 7200

    assert env.run("optimizer", "run", "--once") in (0, 3)
    capsys.readouterr()
    domains = {p.tags["domain"]: p.fields for p in env.store.read("plan_domain", start_ns=0)}
    assert domains["rack-1"]["budget_w"] == 900.0  # the override
    assert domains["room"]["budget_w"] == 5000.0  # 9000 asked, no --allow-raise
    assert env.run("status", "--json") in (0, EX_ATTENTION)
    st = _json(capsys)
    assert {o["domain"] for o in st["budget_overrides"]} == {"rack-1", "room"}
    assert st["totals"]["budget_overrides"] == 2

    assert env.run("budget", "clear", "--domain", "rack-1") == 0
    assert "cleared the budget override of rack-1 (900 W)" in capsys.readouterr().out
    assert env.run("budget", "clear", "--domain", "rack-1") == 0
    assert "nothing to clear" in capsys.readouterr().out
    assert env.run("budget", "list") == 0
    out = capsys.readouterr().out
    assert "rack-1" not in out and "room: 9000 W" in out
    assert env.run("budget", "list", "--all") == 0
    assert "rack-1: 0 W until" in capsys.readouterr().out
    points = env.store.read(schema.BUDGET_OVERRIDE.name, start_ns=0)
    assert [p.fields["cleared"] for p in points if p.tags["domain"] == "rack-1"] == [False, True]
