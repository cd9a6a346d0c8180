"""RaplReader on fixture powercap trees copied to tmp_path, counters advanced by hand."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest

from agent.rapl import RaplPower, RaplReader

FIXTURES = Path(__file__).parent.parent / "fixtures" / "powercap"


def tree(tmp_path: Path, name: str) -> Path:
    root = tmp_path / name
    shutil.copytree(FIXTURES / name, root)
    return root


def set_uj(root: Path, zone: str, value: int) -> None:
    (root / zone / "energy_uj").write_text(f"{value}\n")


def test_discovers_packages_and_dram_only(tmp_path: Path) -> None:
    reader = RaplReader(tree(tmp_path, "intel_2socket"))
    found = sorted((z.path.name, z.kind) for z in reader.zones)
    # core/uncore are inside the package, psys covers more than the CPU, mmio duplicates.
    assert found == [
        ("intel-rapl:0", "package"),
        ("intel-rapl:0:1", "dram"),
        ("intel-rapl:1", "package"),
        ("intel-rapl:1:1", "dram"),
    ]


def test_two_readings_give_summed_watts(tmp_path: Path) -> None:
    root = tree(tmp_path, "intel_2socket")
    reader = RaplReader(root)
    assert reader.power_w(100.0) == RaplPower(None, None)  # first call primes
    # Over 2 s: package 0 +300 J, package 1 +100 J, dram +20 J and +10 J.
    set_uj(root, "intel-rapl:0", 1_000_000 + 300_000_000)
    set_uj(root, "intel-rapl:1", 2_000_000 + 100_000_000)
    set_uj(root, "intel-rapl:0:1", 200_000 + 20_000_000)
    set_uj(root, "intel-rapl:1:1", 300_000 + 10_000_000)
    set_uj(root, "intel-rapl:2", 10**12)  # psys moves a lot; must not count
    set_uj(root, "intel-rapl-mmio:0", 10**12)
    power = reader.power_w(102.0)
    assert power.package_w == pytest.approx(200.0)
    assert power.dram_w == pytest.approx(15.0)
    assert reader.errors_total == 0


def test_wraparound_adds_the_range(tmp_path: Path) -> None:
    root = tree(tmp_path, "intel_2socket")
    max_range = 262143328850
    set_uj(root, "intel-rapl:0", max_range - 50_000_000)  # 50 J before the wrap
    reader = RaplReader(root)
    reader.power_w(10.0)
    set_uj(root, "intel-rapl:0", 150_000_000)  # ... and 150 J after it
    set_uj(root, "intel-rapl:1", 2_000_000)  # package 1 idle
    power = reader.power_w(11.0)
    assert power.package_w == pytest.approx(200.0)
    assert power.dram_w == pytest.approx(0.0)


def test_nested_amd_tree_without_dram(tmp_path: Path) -> None:
    root = tree(tmp_path, "amd_nested")
    reader = RaplReader(root)
    assert [(z.path.name, z.kind) for z in reader.zones] == [("amd-rapl:0", "package")]
    reader.power_w(0.0)
    set_uj(root, "amd-rapl:0", 5_000_000 + 90_000_000)
    set_uj(root, "amd-rapl:0/amd-rapl:0:0", 10**12)  # core: part of the package
    assert reader.power_w(1.0) == RaplPower(pytest.approx(90.0), None)


@pytest.mark.parametrize("name", ["empty", "does-not-exist"])
def test_no_rapl_gives_none(tmp_path: Path, name: str) -> None:
    root = tree(tmp_path, name) if name == "empty" else tmp_path / name
    reader = RaplReader(root)
    assert reader.power_w(0.0) == RaplPower(None, None)
    assert reader.power_w(1.0) == RaplPower(None, None)


def test_permission_denied_is_none_logged_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """energy_uj is root-only on kernels >= 5.10 (tests run as root, so simulate EACCES)."""
    root = tree(tmp_path, "intel_2socket")
    real_read_text = Path.read_text

    def deny_energy(self: Path, *args: object, **kwargs: object) -> str:
        if self.name == "energy_uj":
            raise PermissionError(13, "Permission denied", str(self))
        return real_read_text(self)

    monkeypatch.setattr(Path, "read_text", deny_energy)
    reader = RaplReader(root)
    with caplog.at_level(logging.WARNING, logger="agent.rapl"):
        results = [reader.power_w(float(t)) for t in range(5)]
    assert results == [RaplPower(None, None)] * 5
    assert len([r for r in caplog.records if "Permission denied" in r.getMessage()]) == 1
    assert reader.errors_total == 1


def test_one_unreadable_zone_makes_its_kind_absent(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A partial sum would under-report: DRAM absent, packages still reported."""
    root = tree(tmp_path, "intel_2socket")
    reader = RaplReader(root)
    reader.power_w(0.0)
    (root / "intel-rapl:1:1" / "energy_uj").write_text("garbage\n")
    set_uj(root, "intel-rapl:0", 1_000_000 + 50_000_000)
    with caplog.at_level(logging.WARNING, logger="agent.rapl"):
        power = reader.power_w(1.0)
        reader.power_w(2.0)
    assert power == RaplPower(pytest.approx(50.0), None)
    assert reader.errors_total == 2  # counted every time ...
    assert len(caplog.records) == 1  # ... logged once


def test_non_advancing_clock_gives_none(tmp_path: Path) -> None:
    reader = RaplReader(tree(tmp_path, "intel_2socket"))
    reader.power_w(5.0)
    assert reader.power_w(5.0) == RaplPower(None, None)
