"""Ground-truth workloads: throughput shapes against the limit, and the report channel."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.devices.simulated import MODELS, SimulatedGpu
from agent.throughput import ThroughputTracker
from agent.workloads import PROFILES, SimJob

H100 = MODELS["H100-SXM"]


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def gpus(n: int, clock: Clock, seed: int = 3) -> list[SimulatedGpu]:
    return [SimulatedGpu(i, H100, clock=clock, seed=seed, host="node-1") for i in range(n)]


def speed_at(kind: str, share_of_max: float) -> float:
    """The job's speed at a cap, relative to its speed at the default (uncapped) limit."""
    clock = Clock()
    job = SimJob("j1", kind, gpus(1, clock))  # type: ignore[arg-type]
    job.start()
    uncapped = job.speed()
    job.gpus[0].set_power_limit_w(share_of_max * H100.max_w)
    return job.speed() / uncapped


def test_compute_bound_training_keeps_about_90_percent_at_70_percent_of_max() -> None:
    assert speed_at("training", 0.7) == pytest.approx(0.9, abs=0.03)
    assert speed_at("training", 0.5) < 0.85  # and keeps falling: it is compute-bound


def test_memory_bound_inference_is_flat_down_to_about_60_percent() -> None:
    assert speed_at("inference", 0.7) >= 0.97
    assert speed_at("inference", 0.6) >= 0.95
    assert speed_at("inference", 0.35) < 0.9  # not flat for ever: the test can fail


def test_never_capped_job_loses_nothing_to_a_cap_above_its_draw() -> None:
    clock = Clock()
    job = SimJob("svc", "light", gpus(1, clock))
    job.start()
    draw_w = job.gpus[0].sample().power_w
    assert draw_w is not None
    assert draw_w < 0.55 * H100.default_w  # well below the default limit
    job.gpus[0].set_power_limit_w(draw_w + 5.0)
    assert job.speed() == 1.0
    job.gpus[0].set_power_limit_w(H100.min_w)
    assert job.speed() < 1.0


def test_idle_gpu_draws_idle_power_whatever_the_cap() -> None:
    clock = Clock()
    (gpu,) = gpus(1, clock)
    gpu.set_workload(0.0)
    before = gpu.sample().power_w
    gpu.set_power_limit_w(H100.min_w)
    assert gpu.sample().power_w == before
    assert before is not None and before < 0.15 * H100.max_w


def test_synchronous_job_runs_at_its_slowest_gpu() -> None:
    clock = Clock()
    job = SimJob("train", "training", gpus(4, clock))
    job.start()
    assert job.synchronous
    job.gpus[2].set_power_limit_w(0.5 * H100.max_w)
    slowest = job.gpus[2].throughput_fraction()
    assert job.speed() == pytest.approx(slowest)
    assert job.rate_per_s() == pytest.approx(job.base_rate * slowest)
    assert job.base_rate == 4 * PROFILES["training"].rate_per_gpu


def test_run_for_adds_the_work_of_the_interval_at_the_current_speed() -> None:
    clock = Clock()
    job = SimJob("train", "training", gpus(2, clock), base_rate=100.0, unit="steps")
    job.start()
    job.gpus[0].set_power_limit_w(0.6 * H100.max_w)
    rate = job.run_for(10.0)
    assert rate == pytest.approx(100.0 * job.speed())
    assert job.counter == pytest.approx(10.0 * rate)
    with pytest.raises(ValueError, match="dt_s"):
        job.run_for(-1.0)


def test_reports_are_read_back_as_rates_by_the_agents_tracker(tmp_path: Path) -> None:
    clock = Clock()
    job = SimJob("infer-1", "inference", gpus(1, clock))
    job.start()
    job.gpus[0].set_power_limit_w(0.4 * H100.max_w)  # a cap that costs it something
    tracker = ThroughputTracker(tmp_path, max_age_s=60.0)
    t0 = 1_700_000_000.0
    for k in range(3):
        job.report(tmp_path, t0 + 5.0 * k)
        rates = tracker.rates(t0 + 5.0 * k)
        job.run_for(5.0)
        clock.now += 5.0
    assert (tmp_path / "infer-1.json").exists()
    rate = rates["infer-1"]
    assert rate.source == "report"
    assert rate.unit == "tokens"
    assert rate.value_per_s == pytest.approx(job.last_rate)
    assert rate.value_per_s < PROFILES["inference"].rate_per_gpu


def test_bad_arguments_are_refused() -> None:
    clock = Clock()
    with pytest.raises(ValueError, match="kind"):
        SimJob("j", "mining", gpus(1, clock))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="GPU"):
        SimJob("j", "training", [])
    with pytest.raises(ValueError, match="pid"):
        SimJob("j", "training", gpus(2, clock), pids=[1])
