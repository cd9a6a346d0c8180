"""The held-out quality bench runs and prints its figures (tiny fleets, one seed; no thresholds)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bench.fleets import HELD_OUT, TUNING

BENCH = Path(__file__).resolve().parents[1] / "bench"


def run(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, str(BENCH / "heldout_quality.py"), *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.parametrize("split", ["held-out", "tuning"])
def test_heldout_bench_prints_every_family_mode_and_summary(split: str) -> None:
    out = run("--quick", *(["--tuning"] if split == "tuning" else []))
    for family in TUNING if split == "tuning" else HELD_OUT:
        assert f"== {family}:" in out, family
    for text in (
        "budget   70 %",
        "budget   50 %",
        "energy   5 %",
        "energy  10 %",
        "energy  20 %",
        "energy  mix",
        "== summary",
        "budget: worst",
        "energy 5 %: saving ratio worst",
        "coverage",
        "runtime",
    ):
        assert text in out, text
    assert "CRASH" not in out


def test_heldout_bench_reports_a_crash_and_goes_on() -> None:
    # the fast path solves budget mode only, on laminar domains: every energy cell and
    # the A/B-feeds family's budget cells crash; the run still prints the others
    out = run("--quick", "--method", "fast", "--family", "mixed-models-ab-feeds")
    assert "CRASH" in out and "FastPathNotApplicable" in out
    assert "== summary" in out and "runtime" in out
