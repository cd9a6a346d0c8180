"""The benchmarks still run and print their figures (tiny sizes; no timing is asserted)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.influx_server import REQUIRE_ENV, influxd_path

BENCH = Path(__file__).resolve().parents[1] / "bench"


def run(script: str, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, str(BENCH / script), *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_agent_overhead_bench_prints_cpu_and_rss() -> None:
    out = run("agent_overhead.py", "--cycles", "20", "--daemon-s", "0")
    assert "RSS:" in out and "% of one core" in out
    assert "ratio on/off" in out  # /metrics scraped every cycle against off


@pytest.mark.parametrize("seed", ["1", "2"])
def test_quality_bench_scores_every_policy_on_the_true_curves(seed: str) -> None:
    out = run("optimizer_quality.py", "--nodes", "8", "--seed", seed)
    for line in ("vs uniform", "vs oracle", "budget violations: 0", "no margin", "oracle  "):
        assert line in out, line


def test_closed_loop_learning_bench_measures_every_cycle() -> None:
    out = run("closed_loop_learning.py", "--cycles", "2", "--interval", "200", "--nodes", "1")
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert [r[0] for r in rows] == ["1", "2", "1", "2"]  # probing off, then on
    assert "prior" in out  # the first plan rests on priors: no cap was ever tried


@pytest.mark.influxdb
@pytest.mark.slow
def test_fleet_scale_bench_fills_runs_both_commands_and_estimates(tmp_path: Path) -> None:
    if influxd_path() is None:
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"influxd not installed, and {REQUIRE_ENV}=1")
        pytest.skip("influxd not installed")
    out = run("fleet_scale.py", "--quick", "--root", str(tmp_path), "--estimate-gpus", "500")
    for text in ("fill: ", "lines/s", "data folder refilled", "bytes/point", "== results"):
        assert text in out, text
    rows = [line.split() for line in out.splitlines() if line.startswith(("influx ", "embedded "))]
    assert [(r[0], r[1], r[2]) for r in rows] == [
        ("influx", "16x60", "recommend"),
        ("influx", "16x60", "optimizer"),
        ("influx", "32x60", "recommend"),
        ("influx", "32x60", "optimizer"),
        ("embedded", "16x60", "recommend"),
    ]
    # every command exited 0 with every GPU of the fill in its plan (columns: ... GPUs, exit)
    assert [(r[-2], r[-1]) for r in rows] == [
        ("16", "0"),
        ("16", "0"),
        ("32", "0"),
        ("32", "0"),
        ("16", "0"),
    ]
    assert "500 GPUs estimate" in out and "synthetic 500 GPUs" in out
