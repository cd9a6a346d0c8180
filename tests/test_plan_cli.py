"""``dcenergy keys generate`` and ``dcenergy apply`` end to end, through ``main``."""

from __future__ import annotations

import json
import stat
import time
from pathlib import Path
from typing import Any

import pytest

from dcenergy import schema
from dcenergy.cli import main
from dcenergy.config import load_config
from dcenergy.errors import EX_CONFIG, EX_DATAERR
from dcenergy.plan import load_public_key, verify_part
from dcenergy.publish import fetch_latest_part
from dcenergy.store.embedded import EmbeddedStore

S = 1_000_000_000


@pytest.fixture
def cfg_path(tmp_path: Path) -> Path:
    p = tmp_path / "dcenergy.toml"
    p.write_text(
        f'[agent]\nstate_dir = "{tmp_path / "state"}"\n'
        f'[store]\nembedded_path = "{tmp_path / "store.sqlite"}"\n'
        f'[optimizer]\nsigning_key = "{tmp_path / "keys" / "plan.key"}"\n'
        f'[reconciler]\npublic_key = "{tmp_path / "keys" / "plan.pub"}"\n'
    )
    return p


def run(cfg_path: Path, *args: str) -> int:
    return main(["--config", str(cfg_path), *args])


def plan_file(tmp_path: Path, **kw: Any) -> Path:
    now = time.time_ns()
    plan: dict[str, Any] = {
        "version": 1,
        "plan_id": "cli-1",
        "created_ns": now,
        "expires_ns": now + 900 * S,
        "setpoints": [
            {"gpu": "GPU-a", "host": "n1", "power_limit_w": 300.0, "sm_clock_max_mhz": None},
            {"gpu": "GPU-b", "host": "n2", "power_limit_w": 450.0, "sm_clock_max_mhz": None},
        ],
    }
    plan.update(kw)
    p = tmp_path / "plan.json"
    p.write_text(json.dumps(plan))
    return p


def seed_fleet(tmp_path: Path, *gpus: tuple[str, str]) -> None:
    """Telemetry for ``(host, gpu_uuid)`` pairs (limits 100-700 W): the fleet ``apply`` checks."""
    store = EmbeddedStore(tmp_path / "store.sqlite")
    now = time.time_ns()
    store.write(
        [
            schema.point(
                schema.GPU,
                {"host": host, "gpu": str(i), "gpu_uuid": uuid, "model": "H100"},
                {"power_limit_w": 700.0, "power_limit_min_w": 100.0, "power_limit_max_w": 700.0},
                now - S,
            )
            for i, (host, uuid) in enumerate(gpus)
        ]
    )
    store.close()


def test_keys_generate_uses_config_paths_and_mode_0600(
    cfg_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(cfg_path, "keys", "generate") == 0
    priv = tmp_path / "keys" / "plan.key"
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600
    assert (tmp_path / "keys" / "plan.pub").exists()
    assert "key id:" in capsys.readouterr().out
    # a second run refuses to overwrite; --force replaces
    before = priv.read_bytes()
    assert run(cfg_path, "keys", "generate") == EX_CONFIG
    assert "--force" in capsys.readouterr().err
    assert priv.read_bytes() == before
    assert run(cfg_path, "keys", "generate", "--force") == 0
    assert priv.read_bytes() != before
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600


def test_keys_generate_explicit_paths(cfg_path: Path, tmp_path: Path) -> None:
    priv, pub = tmp_path / "o" / "a.key", tmp_path / "o" / "a.pub"
    assert run(cfg_path, "keys", "generate", "--private", str(priv), "--public", str(pub)) == 0
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600
    assert load_public_key(pub)


def test_apply_publishes_verifiable_parts(cfg_path: Path, tmp_path: Path) -> None:
    assert run(cfg_path, "keys", "generate") == 0
    seed_fleet(tmp_path, ("n1", "GPU-a"), ("n2", "GPU-b"))
    assert run(cfg_path, "apply", str(plan_file(tmp_path))) == 0
    store = EmbeddedStore(tmp_path / "store.sqlite")
    try:
        payload = fetch_latest_part(store, "n2", time.time_ns(), 3600)
    finally:
        store.close()
    assert payload is not None
    pub = load_public_key(tmp_path / "keys" / "plan.pub")
    part = verify_part(payload, pub, now_ns=time.time_ns(), last_seq=None, max_skew_s=5, host="n2")
    assert part.plan_id == "cli-1"
    assert [(s.gpu_uuid, s.power_limit_w) for s in part.setpoints] == [("GPU-b", 450.0)]


def test_apply_dry_run_writes_nothing(
    cfg_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # telemetry exists: the dry run shows current -> planned
    store = EmbeddedStore(tmp_path / "store.sqlite")
    now = time.time_ns()
    store.write(
        [
            schema.point(
                schema.GPU,
                {"host": "n1", "gpu": "0", "gpu_uuid": "GPU-a", "model": "H100"},
                {"power_limit_w": 700.0},
                now - S,
            )
        ]
    )
    before = store.count()
    store.close()
    assert run(cfg_path, "apply", "--dry-run", str(plan_file(tmp_path))) == 0
    out = capsys.readouterr().out
    assert "GPU-a: 700 W -> 300 W" in out
    assert "GPU-b: unknown -> 450 W" in out
    store = EmbeddedStore(tmp_path / "store.sqlite")
    try:
        assert store.count() == before
        assert store.count(schema.PLAN_PART.name) == 0
    finally:
        store.close()
    assert not (tmp_path / "keys").exists()  # no key needed, none made


def test_dry_run_does_not_create_an_embedded_store(cfg_path: Path, tmp_path: Path) -> None:
    assert run(cfg_path, "apply", "--dry-run", str(plan_file(tmp_path))) == 0
    assert not (tmp_path / "store.sqlite").exists()


def test_apply_bad_plan_exits_65(
    cfg_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    p = plan_file(tmp_path)
    p.write_text(json.dumps({"plan_id": "x", "created_ns": 1, "expires_ns": 2}))
    assert run(cfg_path, "apply", str(p)) == EX_DATAERR
    err = capsys.readouterr().err
    assert "field 'setpoints': is missing" in err
    assert err.count("\n") <= 2  # one line and at most a hint, no traceback
    p.write_text("{not json")
    assert run(cfg_path, "apply", str(p)) == EX_DATAERR
    assert run(cfg_path, "apply", str(tmp_path / "absent.json")) == EX_DATAERR


def test_apply_expired_plan_exits_65(cfg_path: Path, tmp_path: Path) -> None:
    p = plan_file(tmp_path, created_ns=1, expires_ns=2)
    assert run(cfg_path, "apply", str(p)) == EX_DATAERR


def test_apply_refuses_a_loose_signing_key(
    cfg_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(cfg_path, "keys", "generate") == 0
    (tmp_path / "keys" / "plan.key").chmod(0o644)
    assert run(cfg_path, "apply", str(plan_file(tmp_path))) == EX_CONFIG
    assert "chmod 600" in capsys.readouterr().err
    store_file = tmp_path / "store.sqlite"
    if store_file.exists():
        store = EmbeddedStore(store_file)
        try:
            assert store.count(schema.PLAN_PART.name) == 0
        finally:
            store.close()
    assert load_config(cfg_path).optimizer.signing_key.endswith("plan.key")
