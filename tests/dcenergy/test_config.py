from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from dcenergy.cli import main
from dcenergy.config import REDACTED, effective, load_config, read_secret, store_token
from dcenergy.errors import EX_CONFIG, ConfigError


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "dcenergy.toml"
    p.write_text(text)
    return p


def test_defaults_without_a_file(tmp_path: Path) -> None:
    cfg = load_config(None, env={"DCENERGY_JOBS_DIR": "x", "HOME": str(tmp_path)})
    assert cfg.agent.interval_s == 1.0
    assert cfg.store.embedded
    assert cfg.source == "<defaults>"


def test_file_then_env_override(tmp_path: Path) -> None:
    p = write(tmp_path, '[agent]\ninterval_s = 2.5\nsimulate = 4\n[store]\ndatabase = "gpu"\n')
    cfg = load_config(
        p, env={"DCENERGY_AGENT_INTERVAL_S": "0.5", "DCENERGY_STORE_VERIFY_TLS": "no"}
    )
    assert cfg.agent.interval_s == 0.5
    assert cfg.agent.simulate == 4
    assert cfg.store.database == "gpu"
    assert cfg.store.verify_tls is False


@pytest.mark.parametrize(
    ("text", "key", "allowed"),
    [
        ("[agent]\ninterval_s = 0\n", "agent.interval_s", "> 0"),
        ('[agent]\ninterval_s = "fast"\n', "agent.interval_s", "finite number"),
        ('[agent]\nbackend = "rocm"\n', "agent.backend", "'nvml', 'simulated'"),
        ("[agent]\nsimulate = 1.5\n", "agent.simulate", "integer"),
        ("[agent]\nintervall_s = 1\n", "agent.intervall_s", "known key"),
        ('[store]\ninflux_url = "localhost:8086"\n', "store.influx_url", "URL"),
        ("[store]\nbatch_lines = 10000\n", "store.batch_lines", "5000"),
        ("[optimizer]\nallowed_slowdown = 1.0\n", "optimizer.allowed_slowdown", "[0, 1)"),
        ("[optimizer]\npue = 0.9\n", "optimizer.pue", ">= 1"),
        ("[gpu]\nx = 1\n", "gpu", "known section"),
    ],
)
def test_bad_values_name_key_value_and_allowed(
    tmp_path: Path, text: str, key: str, allowed: str
) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, text), env={})
    assert e.value.key == key
    assert allowed in str(e.value)
    assert e.value.exit_code == EX_CONFIG


def test_bad_env_value_names_the_variable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(None, env={"DCENERGY_STORE_TIMEOUT_S": "-3", "HOME": str(tmp_path)})
    assert "DCENERGY_STORE_TIMEOUT_S" in str(e.value)


def test_missing_explicit_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="existing TOML file"):
        load_config(tmp_path / "nope.toml", env={})


def test_broken_toml_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="valid TOML"):
        load_config(write(tmp_path, "[agent\n"), env={})


def test_secrets_are_redacted(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, '[store]\ntoken = "s3cret"\n'), env={})
    assert effective(cfg)["store"]["token"] == REDACTED
    assert "s3cret" not in json.dumps(effective(cfg))


def test_secret_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    f = tmp_path / "token"
    f.write_text("abc\n")
    os.chmod(f, 0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        read_secret(f, key="store.token_file")
    os.chmod(f, 0o600)
    assert read_secret(f, key="store.token_file") == "abc"


def test_systemd_credential_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "influx-token").write_text("from-systemd\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    cfg = load_config(write(tmp_path, '[store]\ntoken = "from-file"\n'), env={})
    assert store_token(cfg) == "from-systemd"


def test_cli_config_check_exit_78_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    p = write(tmp_path, "[agent]\ninterval_s = -1\n")
    rc = main(["--config", str(p), "config", "check"])
    err = capsys.readouterr().err
    assert rc == EX_CONFIG
    assert err.startswith("dcenergy: error: config key 'agent.interval_s'")
    assert "Traceback" not in err


def test_cli_config_check_prints_effective_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    p = write(tmp_path, '[store]\ninflux_url = "http://db:8086"\ntoken = "t"\n')
    assert main(["--config", str(p), "config", "check", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["store"]["influx_url"] == "http://db:8086"
    assert data["store"]["token"] == REDACTED


def test_empty_systemd_credential_falls_through(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "influx-token").write_text("\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    cfg = load_config(write(tmp_path, '[store]\ntoken = "from-file"\n'), env={})
    assert store_token(cfg) == "from-file"
