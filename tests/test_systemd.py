"""Every unit in systemd/ passes ``systemd-analyze verify`` with no warning about it.

``verify`` exits 0 even for an unknown key or bad syntax (it only warns), so
the test fails on any output line naming the unit. ExecStart's binary must
exist for ``verify``; the unit is copied with it pointed at this interpreter.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNIT_DIR = Path(__file__).resolve().parent.parent / "systemd"
UNITS = sorted(UNIT_DIR.glob("*.service")) + sorted(UNIT_DIR.glob("*.timer"))
_EXEC = re.compile(
    r"^(Exec(?:Start|StartPre|StartPost|Stop|StopPost|Reload|Condition)=[-@:+!]*)(\S+)",
    re.MULTILINE,
)


def _analyze() -> str:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.skip("systemd-analyze not installed")
    return exe


def _verify(unit_text: str, name: str, tmp_path: Path) -> tuple[int, list[str]]:
    rewritten = _EXEC.sub(lambda m: m.group(1) + sys.executable, unit_text)
    path = tmp_path / name
    path.write_text(rewritten)
    proc = subprocess.run(
        [_analyze(), "verify", "--man=no", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    lines = (proc.stdout + proc.stderr).splitlines()
    return proc.returncode, [line for line in lines if name in line]


def test_units_exist() -> None:
    assert any(u.name == "dcenergy-agent.service" for u in UNITS)


@pytest.mark.parametrize("unit", UNITS, ids=[u.name for u in UNITS])
def test_unit_verifies_cleanly(unit: Path, tmp_path: Path) -> None:
    rc, about_unit = _verify(unit.read_text(), unit.name, tmp_path)
    assert rc == 0
    assert about_unit == []


def test_verify_catches_a_bad_key(tmp_path: Path) -> None:
    """The check above can fail: a misspelt key is reported on a line naming the unit."""
    text = (UNIT_DIR / "dcenergy-agent.service").read_text()
    text = text.replace("\n[Service]\n", "\n[Service]\nWatchdogSecs=30s\n", 1)
    _, about_unit = _verify(text, "dcenergy-agent.service", tmp_path)
    assert any("WatchdogSecs" in line for line in about_unit)


def test_agent_unit_contract() -> None:
    """The settings the daemon relies on (notify + watchdog, credentials, state dir)."""
    text = (UNIT_DIR / "dcenergy-agent.service").read_text()
    settings = {
        line.split("=", 1)[0]: line.split("=", 1)[1]
        for line in text.splitlines()
        if "=" in line and not line.startswith("#")
    }
    assert settings["Type"] == "notify"
    assert settings["NotifyAccess"] == "main"
    assert settings["WatchdogSec"]
    assert settings["StateDirectory"] == "dcenergy"
    assert settings["RuntimeDirectory"] == "dcenergy"
    assert settings["LoadCredential"] == "influx-token:/etc/dcenergy/influx-token"
    assert settings["CapabilityBoundingSet"] == "CAP_SYS_ADMIN"
    assert settings["ExecStart"].startswith("/")


def test_example_config_loads_and_shows_the_defaults() -> None:
    """The documented example is valid, and every value it shows is the real default."""
    from dataclasses import fields

    from dcenergy.config import AgentConfig, ReconcilerConfig, StoreConfig, load_config

    example = UNIT_DIR / "dcenergy.toml.example"
    cfg = load_config(example, env={})
    for section, cls in (
        ("agent", AgentConfig),
        ("store", StoreConfig),
        ("reconciler", ReconcilerConfig),
    ):
        defaults = cls()
        for f in fields(cls):
            if getattr(defaults, f.name) is None:
                continue  # derived at load time (state_dir, runtime_dir)
            assert getattr(getattr(cfg, section), f.name) == getattr(defaults, f.name), (
                f"{section}.{f.name}"
            )
