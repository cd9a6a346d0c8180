"""HostCollector with a fake psutil and a RAPL reader on a fixture tree."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from agent.host import HostCollector
from agent.rapl import RaplReader
from dcenergy.schema import HOST

FIXTURES = Path(__file__).parent.parent / "fixtures" / "powercap"


class FakePsutil:
    """Scripted psutil: cpu_percent returns the next value of ``cpu``."""

    def __init__(self, cpu: list[float], fail: set[str] | None = None) -> None:
        self.cpu = list(cpu)
        self.fail = fail or set()
        self.intervals: list[float | None] = []

    def cpu_percent(self, interval: float | None = None) -> float:
        self.intervals.append(interval)
        if "cpu_percent" in self.fail:
            raise OSError("no /proc/stat")
        return self.cpu.pop(0)

    def virtual_memory(self) -> SimpleNamespace:
        if "virtual_memory" in self.fail:
            raise OSError("no /proc/meminfo")
        return SimpleNamespace(total=64 * 2**30, available=48 * 2**30, used=1)

    def getloadavg(self) -> tuple[float, float, float]:
        return (1.5, 1.0, 0.5)


def test_keys_are_exactly_the_host_fields() -> None:
    sample = HostCollector(FakePsutil([0.0])).sample(0.0)
    assert set(sample) == HOST.field_names


def test_first_cpu_sample_primes_then_reports_non_blocking() -> None:
    fake = FakePsutil([0.0, 37.5])
    host = HostCollector(fake)
    first, second = host.sample(0.0), host.sample(1.0)
    assert first["cpu_pct"] is None  # psutil's first 0.0 means nothing
    assert second["cpu_pct"] == 37.5
    assert fake.intervals == [None, None]  # never blocks the cycle


def test_memory_and_load() -> None:
    sample = HostCollector(FakePsutil([0.0])).sample(0.0)
    assert sample["mem_total_bytes"] == 64 * 2**30
    assert sample["mem_used_bytes"] == 16 * 2**30  # total - available, not psutil's "used"
    assert (sample["load1"], sample["load5"], sample["load15"]) == (1.5, 1.0, 0.5)


def test_without_rapl_power_is_absent_not_zero() -> None:
    sample = HostCollector(FakePsutil([0.0, 1.0])).sample(0.0)
    assert sample["cpu_power_w"] is None
    assert sample["dram_power_w"] is None


def test_rapl_power_flows_through(tmp_path: Path) -> None:
    root = tmp_path / "powercap"
    shutil.copytree(FIXTURES / "intel_2socket", root)
    host = HostCollector(FakePsutil([0.0, 1.0]), rapl=RaplReader(root))
    host.sample(0.0)
    (root / "intel-rapl:0" / "energy_uj").write_text(str(1_000_000 + 120_000_000))
    (root / "intel-rapl:0:1" / "energy_uj").write_text(str(200_000 + 8_000_000))
    sample = host.sample(2.0)
    assert sample["cpu_power_w"] == pytest.approx(60.0)
    assert sample["dram_power_w"] == pytest.approx(4.0)


def test_failing_psutil_call_is_absent_and_counted() -> None:
    host = HostCollector(FakePsutil([], fail={"virtual_memory", "cpu_percent"}))
    sample = host.sample(0.0)
    assert sample["mem_used_bytes"] is None and sample["mem_total_bytes"] is None
    assert sample["cpu_pct"] is None
    assert sample["load1"] == 1.5
    assert host.errors_total == 2


def test_real_psutil_smoke_types() -> None:
    """The real module satisfies the protocol and yields the right types."""
    host = HostCollector()
    host.sample(0.0)
    sample = host.sample(1.0)
    assert isinstance(sample["cpu_pct"], float)
    assert isinstance(sample["mem_total_bytes"], int) and sample["mem_total_bytes"] > 0
