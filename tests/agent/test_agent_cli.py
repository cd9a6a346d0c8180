"""``dcenergy agent once`` / ``agent run`` through the real entry point (``main``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dcenergy.cli import main
from dcenergy.errors import EX_CONFIG, EX_UNAVAILABLE
from dcenergy.lineprotocol import decode
from dcenergy.schema import GPU, HOST
from dcenergy.store.embedded import EmbeddedStore


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No config file or DCENERGY_* of the developer's leaks in; state under tmp."""
    import os

    for var in list(os.environ):
        if var.startswith(("DCENERGY_", "NOTIFY_SOCKET")):
            monkeypatch.delenv(var)
    cfg = tmp_path / "dcenergy.toml"
    cfg.write_text('[agent]\nhost = "clinode"\n')
    monkeypatch.setenv("DCENERGY_CONFIG", str(cfg))
    monkeypatch.setenv("DCENERGY_AGENT_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("DCENERGY_AGENT_RUNTIME_DIR", str(tmp_path / "run"))
    return tmp_path


def test_once_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["agent", "once", "--simulate", "3", "--json"]) == 0
    points = json.loads(capsys.readouterr().out)
    gpus = [p for p in points if p["measurement"] == "gpu"]
    hosts = [p for p in points if p["measurement"] == "host"]
    assert [p["tags"]["gpu"] for p in gpus] == ["0", "1", "2"]
    assert len(hosts) == 1 and hosts[0]["tags"] == {"host": "clinode"}
    assert len({p["time_ns"] for p in points}) == 1
    for p in gpus:
        assert set(p["fields"]) <= GPU.field_names and "power_w" in p["fields"]
        assert p["tags"]["host"] == "clinode"
    assert set(hosts[0]["fields"]) <= HOST.field_names


def test_once_line_protocol(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["agent", "once", "--simulate", "2", "--line-protocol"]) == 0
    lines = capsys.readouterr().out.splitlines()
    points = [decode(line) for line in lines]
    assert [p.measurement for p in points] == ["gpu", "gpu", "host", "gpu_health", "gpu_health"]
    assert points[0].tags["model"] == "NVIDIA H100 80GB HBM3"
    assert isinstance(points[0].fields["power_w"], float)


def test_once_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["agent", "once", "--simulate", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:4] == ["GPU", "MODEL", "POWER", "W"]
    assert out[1].startswith("0 ") and out[2].startswith("1 ")
    assert "NVIDIA H100 80GB HBM3" in out[1]
    assert any(line.startswith("host clinode:") for line in out)


def test_json_and_line_protocol_exclude_each_other(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["agent", "once", "--simulate", "1", "--json", "--line-protocol"]) == 2


def test_bad_config_exits_78_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[agent]\ninterval_s = -1\n")
    monkeypatch.setenv("DCENERGY_CONFIG", str(bad))
    assert main(["agent", "once", "--simulate", "1"]) == EX_CONFIG
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("dcenergy: error:")]
    assert len(errors) == 1 and "agent.interval_s" in errors[0]
    assert "Traceback" not in captured.err and captured.out == ""


def test_without_a_gpu_nvml_fails_with_a_hint(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["agent", "once"])
    captured = capsys.readouterr()
    if rc == 0:
        pytest.skip("NVML works here: this machine has a GPU")
    assert rc == EX_UNAVAILABLE
    assert "hint: use --simulate N to try it without a GPU" in captured.err
    assert "Traceback" not in captured.err


def test_run_bounded(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["agent", "run", "--simulate", "2", "--duration", "0"]) == 0
    store = EmbeddedStore(tmp_path / "state" / "dcenergy.sqlite")
    try:
        assert store.count("agent") == 1  # the shutdown self-stats point, flushed
    finally:
        store.close()
