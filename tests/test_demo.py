"""``dcenergy demo``: the closed loop on a small simulated fleet, judged on measured figures."""

from __future__ import annotations

import json
import stat
from pathlib import Path
from typing import Any

import pytest

from dcenergy.cli import main

SMALL = ["--nodes", "2", "--gpus", "4", "--phase", "240", "--probe", "150"]


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "dcenergy.toml"
    path.write_text(
        "[optimizer]\nprice_per_kwh = 0.20\npue = 1.5\ncarbon_g_per_kwh = 300.0\n"
        "allowed_slowdown = 0.1\n"
    )
    return path


def run_json(config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    state = tmp_path / "demo"
    rc = main(["--config", str(config), "demo", "--json", "--state-dir", str(state), *SMALL])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "[4/4]" in out.err  # progress goes to stderr, one line per phase
    report: dict[str, Any] = json.loads(out.out)
    return report


def test_demo_json_measures_power_under_budget_and_real_savings(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    r = run_json(config, tmp_path, capsys)
    fp = r["fleet_power"]
    assert fp["after_peak_w"] <= fp["budget_w"]
    assert fp["before_w"] > fp["budget_w"]  # the budget binds: there was something to do
    assert fp["within_budget"]
    for d in r["domains"]:
        assert d["after_peak_w"] <= d["budget_w"], d
    s = r["savings"]
    assert s["power_w"] > 0
    assert s["it_kwh_per_day"] == pytest.approx(s["power_w"] * 24 / 1000)
    assert s["facility_kwh_per_day"] == pytest.approx(s["it_kwh_per_day"] * 1.5)  # config PUE
    assert s["cost_per_day"] == pytest.approx(s["facility_kwh_per_day"] * 0.20)
    assert s["co2_kg_per_day"] == pytest.approx(s["facility_kwh_per_day"] * 0.3)
    a = r["audit"]
    assert a["records"].get("refused", 0) == 0
    assert a["records"]["applied"] >= r["plan"]["gpus_capped"] > 0
    assert a["at_setpoint"] == a["setpoints"] == r["fleet"]["gpus"]
    for job in r["jobs"]:  # measured per job, and the measurement matches the ground truth
        assert job["before"] > 0 and job["after"] > 0
        assert job["after"] <= job["before"] * 1.001
        if job["job"] not in r["plan"]["slowdown_exceeded"]:
            # a job the plan did not name keeps its 10 % allowed slowdown (config), measured
            assert job["after"] >= job["before"] * (1 - 0.1 - 0.005), job
        assert job["after"] == pytest.approx(job["predicted_after"], rel=0.05), job
        assert job["energy_per_unit_after_j"] <= job["energy_per_unit_before_j"] * 1.001


def test_demo_keeps_its_state_dir_with_a_private_key_only_its_owner_reads(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_json(config, tmp_path, capsys)
    key = tmp_path / "demo" / "keys" / "plan.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert (tmp_path / "demo" / "dcenergy.sqlite").exists()


def test_demo_text_report(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["--config", str(config), "demo", *SMALL])
    out = capsys.readouterr().out
    assert rc == 0
    assert "measured from telemetry" in out
    assert "every domain within budget" in out
    assert "kWh/day" in out and "kg CO2/day" in out
    assert "0 refused" in out
