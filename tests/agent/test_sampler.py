"""The sampling cycle over simulated GPUs: one timestamp, schema names, attribution, isolation."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import pytest

from agent.devices.base import GpuSample
from agent.devices.simulated import SimulatedBackend
from agent.jobs import JobResolver
from agent.sampler import PROXY_SOURCE, Sampler
from agent.throughput import Rate
from dcenergy.errors import DeviceError
from dcenergy.schema import GPU, HOST, JOB, Point

T0_NS = 1_700_000_000_000_000_000


class FakeHost:
    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.calls: list[float] = []

    def sample(self, now_s: float) -> dict[str, float | int | None]:
        self.calls.append(now_s)
        if self.fail:
            raise OSError("psutil exploded")
        out: dict[str, float | int | None] = dict.fromkeys(HOST.field_names)
        out.update(cpu_pct=12.5, mem_used_bytes=1 << 30, mem_total_bytes=4 << 30, load1=0.5)
        return out


class FakeRates:
    def __init__(self, rates: Mapping[str, Rate] | None = None) -> None:
        self._rates = dict(rates or {})
        self.active: list[list[str]] = []

    def rates(self, now_s: float, active_jobs: Iterable[str] | None = None) -> dict[str, Rate]:
        self.active.append(sorted(active_jobs or ()))
        return dict(self._rates)


def _proc(tmp_path: Path, jobs: Mapping[int, str]) -> Path:
    """A /proc tree where each pid's cgroup names its Slurm job."""
    root = tmp_path / "proc"
    for pid, job in jobs.items():
        d = root / str(pid)
        d.mkdir(parents=True)
        (d / "cgroup").write_text(f"0::/system.slice/slurmstepd.scope/job_{job}/step_0/task_0\n")
    return root


@pytest.fixture
def backend() -> SimulatedBackend:
    t = itertools.count(start=1000.0, step=1.0)
    b = SimulatedBackend(4, seed=1, host="n1", clock=lambda: next(t))
    b.open()
    return b


def _counting_clock() -> tuple[list[int], Callable[[], int]]:
    calls: list[int] = []
    counter = itertools.count(T0_NS, 1_000_000)

    def clock() -> int:
        calls.append(next(counter))
        return calls[-1]

    return calls, clock


def _by(points: list[Point], measurement: str) -> list[Point]:
    return [p for p in points if p.measurement == measurement]


def test_one_timestamp_for_every_point_of_a_cycle(
    backend: SimulatedBackend, tmp_path: Path
) -> None:
    backend.gpus()[0].set_workload(0.9, pids=[100])
    calls, clock = _counting_clock()
    s = Sampler(
        backend,
        "n1",
        FakeHost(),
        JobResolver(_proc(tmp_path, {100: "7"})),
        FakeRates(),
        clock=clock,
    )
    points = s.sample()
    # the first cycle of every health_every carries the GPUs' health too
    assert {p.measurement for p in points} == {"gpu", "gpu_health", "host", "job"}
    assert len(calls) == 1  # the clock is read once per cycle ...
    assert {p.time_ns for p in points} == {calls[0]}  # ... and every point carries it
    second = s.sample()
    assert {p.time_ns for p in second} == {calls[1]} and calls[1] != calls[0]
    assert s.samples_total == 2


def test_fields_and_tags_are_named_per_schema(backend: SimulatedBackend, tmp_path: Path) -> None:
    backend.gpus()[1].set_workload(0.8, pids=[200], mem_used_bytes=10 << 30)
    host = FakeHost()
    s = Sampler(
        backend,
        "n1",
        host,
        JobResolver(_proc(tmp_path, {200: "42"})),
        FakeRates(),
        clock=lambda: T0_NS,
    )
    points = s.sample()
    gpus = _by(points, "gpu")
    assert [p.tags["gpu"] for p in gpus] == ["0", "1", "2", "3"]
    for p in gpus:
        assert set(p.tags) == set(GPU.tags)
        assert p.tags["host"] == "n1"
        assert p.tags["model"] == "NVIDIA H100 80GB HBM3"
        assert p.tags["gpu_uuid"].startswith("GPU-")
        assert set(p.fields) <= GPU.field_names
        for name in (
            "power_w",
            "energy_j",
            "power_limit_w",
            "power_limit_default_w",
            "power_limit_min_w",
            "power_limit_max_w",
            "temp_c",
            "util_gpu_pct",
            "sm_clock_mhz",
            "mem_total_bytes",
            "pci_bus_id",
            "lost",
            "job_id",
        ):
            assert name in p.fields, name
        for name, value in p.fields.items():
            kind = GPU.spec(name).kind
            assert isinstance(value, kind) or (kind is float and isinstance(value, int)), name
    [h] = _by(points, "host")
    assert set(h.tags) == set(HOST.tags) and set(h.fields) <= HOST.field_names
    assert h.fields["cpu_pct"] == 12.5 and "cpu_power_w" not in h.fields  # None → absent
    assert host.calls == [T0_NS / 1e9]
    for j in _by(points, "job"):
        assert set(j.tags) == set(JOB.tags) and set(j.fields) <= JOB.field_names


def test_job_attribution_goes_into_the_job_id_field(
    backend: SimulatedBackend, tmp_path: Path
) -> None:
    g = backend.gpus()
    g[0].set_workload(0.9, pids=[100])
    g[1].set_workload(0.7, pids=[101, 102])
    g[3].set_workload(0.5, pids=[300])
    proc = _proc(tmp_path, {100: "1234", 101: "1234", 102: "1234", 300: "99"})
    rates = FakeRates({"99": Rate(1500.0, "tokens", "report")})
    s = Sampler(backend, "n1", FakeHost(), JobResolver(proc), rates, clock=lambda: T0_NS)
    points = s.sample()
    gpus = {p.tags["gpu"]: p for p in _by(points, "gpu")}
    assert [gpus[i].fields["job_id"] for i in "0123"] == ["1234", "1234", "", "99"]
    assert "job_id" not in gpus["0"].tags  # a field, never a tag, on the gpu measurement
    jobs = {p.tags["job_id"]: p for p in _by(points, "job")}
    assert set(jobs) == {"1234", "99"}
    assert rates.active == [["1234", "99"]]

    proxy = jobs["1234"].fields
    assert proxy["gpu_count"] == 2
    assert proxy["gpu_uuids"] == f"{g[0].identity.uuid},{g[1].identity.uuid}"
    assert proxy["power_w"] == pytest.approx(
        float(gpus["0"].fields["power_w"]) + float(gpus["1"].fields["power_w"])
    )
    assert proxy["power_limit_w"] == pytest.approx(700.0)
    assert proxy["throughput_source"] == PROXY_SOURCE
    assert "throughput" not in proxy and "throughput_unit" not in proxy
    assert proxy["sm_util_pct"] == pytest.approx(
        (float(gpus["0"].fields["util_gpu_pct"]) + float(gpus["1"].fields["util_gpu_pct"])) / 2
    )

    reported = jobs["99"].fields
    assert reported["throughput"] == 1500.0
    assert reported["throughput_unit"] == "tokens"
    assert reported["throughput_source"] == "report"
    assert reported["gpu_count"] == 1


def test_error_on_one_gpu_does_not_stop_the_others(
    backend: SimulatedBackend, caplog: pytest.LogCaptureFixture
) -> None:
    broken = backend.gpus()[2]

    def boom() -> GpuSample:
        raise DeviceError("NVML_ERROR_UNKNOWN", gpu=2)

    broken.sample = boom  # type: ignore[method-assign]
    s = Sampler(backend, "n1", FakeHost(), None, None, clock=lambda: T0_NS)
    with caplog.at_level(logging.WARNING, logger="agent.sampler"):
        first = s.sample()
        second = s.sample()
    for points in (first, second):
        assert [p.tags["gpu"] for p in _by(points, "gpu")] == ["0", "1", "3"]
        assert len(_by(points, "host")) == 1
    assert s.errors_total == 2  # counted every time ...
    assert len([r for r in caplog.records if "gpu2" in r.getMessage()]) == 1  # ... logged once
    assert "NVML_ERROR_UNKNOWN" in s.last_error
    assert s.healthy  # three of four GPUs were read


def test_all_gpus_failing_is_unhealthy(backend: SimulatedBackend) -> None:
    for gpu in backend.gpus():
        gpu.sample = lambda: (_ for _ in ()).throw(DeviceError("gone"))  # type: ignore[method-assign]
    s = Sampler(backend, "n1", FakeHost(), None, None, clock=lambda: T0_NS)
    points = s.sample()
    assert _by(points, "gpu") == [] and len(_by(points, "host")) == 1
    assert not s.healthy and s.errors_total == 4


def test_failing_host_collector_and_attribution_are_isolated(
    backend: SimulatedBackend, tmp_path: Path
) -> None:
    backend.gpus()[0].set_workload(0.9, pids=[100])

    class BadResolver:
        def attribute(self, gpu_pids: Mapping[str, list[int]]) -> dict[str, str | None]:
            raise RuntimeError("proc vanished")

    s = Sampler(backend, "n1", FakeHost(fail=True), BadResolver(), FakeRates(), clock=lambda: T0_NS)
    points = s.sample()
    gpus = _by(points, "gpu")
    assert len(gpus) == 4 and _by(points, "host") == [] and _by(points, "job") == []
    assert all(p.fields["job_id"] == "" for p in gpus)
    assert s.errors_total == 2


def test_lost_gpu_reports_lost_and_is_not_an_error(backend: SimulatedBackend) -> None:
    backend.gpus()[1].mark_lost()
    s = Sampler(
        backend, "n1", FakeHost(), JobResolver(Path("/nonexistent")), None, clock=lambda: T0_NS
    )
    gpus = {p.tags["gpu"]: p for p in _by(s.sample(), "gpu")}
    assert dict(gpus["1"].fields) == {"lost": True}
    assert gpus["0"].fields["lost"] is False and "power_w" in gpus["0"].fields
    assert s.errors_total == 0 and s.healthy
