"""The simulated backend: physics that the optimizer's closed-loop tests rely on."""

from __future__ import annotations

import math
import re

import pytest

from agent.devices.base import (
    THROTTLE_GPU_IDLE,
    THROTTLE_SW_POWER_CAP,
    THROTTLE_SW_THERMAL,
    SetpointOutOfRange,
)
from agent.devices.simulated import KINDS, MODELS, SimulatedBackend, SimulatedGpu
from dcenergy.errors import DeviceError, DeviceLost
from dcenergy.schema import GPU


class FakeClock:
    """Monotonic seconds that only move when the test says so."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        self.t += dt


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def _gpu(clock: FakeClock, model: str = "H100-SXM", **kw: float) -> SimulatedGpu:
    backend = SimulatedBackend(1, models=model, clock=clock, **kw)  # type: ignore[arg-type]
    backend.open()
    return backend.gpus()[0]


@pytest.fixture
def h100(clock: FakeClock) -> SimulatedGpu:
    return _gpu(clock)


@pytest.fixture
def hot_h100(clock: FakeClock) -> SimulatedGpu:
    """An H100 in a hot aisle: full load drives it past its slowdown temperature."""
    return _gpu(clock, ambient_c=50.0)


# -- power and clocks ----------------------------------------------------------
@pytest.mark.parametrize("model", sorted(MODELS))
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_power_never_exceeds_the_enforced_limit(clock: FakeClock, model: str, kind: str) -> None:
    gpu = _gpu(clock, model)
    gpu.set_workload(1.0, kind)
    limits = gpu.power_limits()
    watts = limits.min_w
    while watts <= limits.max_w:
        gpu.set_power_limit_w(watts)
        clock.advance(1.0)
        s = gpu.sample()
        assert s.power_w is not None
        assert s.power_limit_enforced_w == watts
        assert s.power_w <= watts + 1e-9, (model, kind, watts, s.power_w)
        watts += 5.0


def test_lowering_the_limit_lowers_clock_and_power_and_sets_the_cap_bit(
    h100: SimulatedGpu, clock: FakeClock
) -> None:
    h100.set_workload(1.0, "compute")
    uncapped = h100.sample()
    assert uncapped.throttle_reasons is not None
    assert not uncapped.throttle_reasons & THROTTLE_SW_POWER_CAP
    assert uncapped.sm_clock_mhz == 1980.0
    assert uncapped.power_w is not None
    assert 600.0 < uncapped.power_w <= 700.0
    previous = uncapped
    for watts in (600.0, 500.0, 400.0, 300.0):
        h100.set_power_limit_w(watts)
        clock.advance(1.0)
        s = h100.sample()
        assert s.sm_clock_mhz is not None
        assert previous.sm_clock_mhz is not None
        assert s.sm_clock_mhz < previous.sm_clock_mhz
        assert s.power_w is not None
        assert previous.power_w is not None
        assert s.power_w < previous.power_w
        assert s.throttle_reasons is not None
        assert s.throttle_reasons & THROTTLE_SW_POWER_CAP
        assert s.power_w > watts - 15.0  # a capped GPU runs close to its cap
        previous = s


def test_clock_is_the_highest_supported_clock_that_fits(h100: SimulatedGpu) -> None:
    h100.set_workload(1.0, "compute")
    h100.set_power_limit_w(450.0)
    s = h100.sample()
    clocks = h100.supported_sm_clocks_mhz()
    assert s.sm_clock_mhz in clocks
    assert s.sm_clock_mhz is not None
    nxt = clocks[clocks.index(int(s.sm_clock_mhz)) + 1]
    h100.lock_sm_clocks_mhz(clocks[0], nxt)  # one step up would not fit: still the same clock
    assert h100.sample().sm_clock_mhz == s.sm_clock_mhz


def test_power_violation_time_accumulates_only_while_capped(
    h100: SimulatedGpu, clock: FakeClock
) -> None:
    h100.set_workload(1.0, "compute")
    clock.advance(10.0)
    assert h100.sample().power_violation_s == 0.0
    h100.set_power_limit_w(400.0)
    clock.advance(7.0)
    assert h100.sample().power_violation_s == pytest.approx(7.0)
    h100.set_workload(0.0)
    clock.advance(5.0)
    assert h100.sample().power_violation_s == pytest.approx(7.0)


def test_idle_gpu_draws_idle_power(h100: SimulatedGpu) -> None:
    s = h100.sample()
    assert s.power_w is not None
    assert 60.0 < s.power_w < 80.0
    assert s.throttle_reasons == THROTTLE_GPU_IDLE
    assert s.util_gpu_pct == 0.0


def test_memory_bound_work_draws_less_than_compute_bound(h100: SimulatedGpu) -> None:
    h100.set_workload(1.0, "compute")
    compute = h100.sample().power_w
    h100.set_workload(1.0, "memory")
    memory = h100.sample()
    assert compute is not None
    assert memory.power_w is not None
    assert memory.power_w < compute
    assert memory.util_mem_pct is not None
    assert memory.util_mem_pct > 50.0


def test_locked_clocks_cap_the_clock_and_reset_restores(h100: SimulatedGpu) -> None:
    h100.set_workload(1.0, "compute")
    free = h100.sample()
    h100.lock_sm_clocks_mhz(210, 1410)
    locked = h100.sample()
    assert locked.sm_clock_mhz == 1410.0
    assert locked.power_w is not None
    assert free.power_w is not None
    assert locked.power_w < free.power_w
    assert locked.throttle_reasons is not None
    assert not locked.throttle_reasons & THROTTLE_SW_POWER_CAP  # the lock, not the cap
    assert h100.throughput_fraction() < 0.85
    h100.reset_sm_clocks()
    assert h100.sample().sm_clock_mhz == 1980.0


@pytest.mark.parametrize(("lo", "hi"), [(1500, 900), (100, 1500), (900, 2000)])
def test_clock_lock_outside_the_table_is_refused(h100: SimulatedGpu, lo: int, hi: int) -> None:
    with pytest.raises(SetpointOutOfRange):
        h100.lock_sm_clocks_mhz(lo, hi)


@pytest.mark.parametrize("watts", [199.9, 700.1, 0.0, float("nan")])
def test_limits_out_of_range_are_refused(h100: SimulatedGpu, watts: float) -> None:
    with pytest.raises(SetpointOutOfRange, match="outside the allowed range") as info:
        h100.set_power_limit_w(watts)
    assert isinstance(info.value, DeviceError)
    assert isinstance(info.value, ValueError)
    assert h100.power_limit_w() == 700.0


def test_limits_per_model() -> None:
    assert (MODELS["H100-SXM"].min_w, MODELS["H100-SXM"].max_w) == (200.0, 700.0)
    assert (MODELS["A100-SXM"].min_w, MODELS["A100-SXM"].max_w) == (100.0, 400.0)
    assert MODELS["L40S"].max_w == 350.0
    h100 = MODELS["H100-SXM"].sm_clocks_mhz
    assert (h100[0], h100[-1], h100[1] - h100[0]) == (210, 1980, 15)


# -- energy ----------------------------------------------------------------------
def test_energy_counter_is_the_integral_of_power(h100: SimulatedGpu, clock: FakeClock) -> None:
    steps = [
        (3.0, lambda: h100.set_workload(1.0, "compute")),
        (2.5, lambda: h100.set_power_limit_w(350.0)),
        (4.0, lambda: h100.set_workload(0.5, "memory")),
        (1.5, lambda: h100.set_workload(0.0)),
        (6.0, lambda: h100.lock_sm_clocks_mhz(210, 1200)),
    ]
    start = h100.sample()
    assert start.energy_j == 0.0
    expected = 0.0
    for dt, action in steps:
        action()
        p = h100.sample().power_w  # power holds until the next change
        assert p is not None
        clock.advance(dt)
        expected += p * dt
    assert h100.sample().energy_j == pytest.approx(expected, rel=1e-12)
    assert expected > 1000.0


def test_energy_counter_reset_stays_monotonic(h100: SimulatedGpu, clock: FakeClock) -> None:
    h100.set_workload(1.0)
    clock.advance(10.0)
    before = h100.sample()
    h100.reset_energy_counter()
    clock.advance(1.0)
    after = h100.sample()
    assert (before.energy_resets, after.energy_resets) == (0, 1)
    assert before.energy_j is not None
    assert after.energy_j is not None
    assert after.energy_j > before.energy_j


# -- temperature ---------------------------------------------------------------------
def test_temperature_lags_toward_steady_state(h100: SimulatedGpu, clock: FakeClock) -> None:
    idle = h100.sample().temp_c
    h100.set_workload(1.0, "compute")
    p = h100.sample().power_w
    assert idle is not None
    assert p is not None
    steady = h100.ambient_c + h100.model.thermal_r_c_per_w * p
    temps = []
    for _ in range(30):
        clock.advance(5.0)
        temps.append(h100.sample().temp_c)
    assert temps == sorted(temps)  # rises, never overshoots
    assert temps[0] is not None
    assert temps[0] - idle < 0.3 * (steady - idle)  # not instantly
    tau = h100.model.thermal_tau_s
    assert 10.0 <= tau <= 120.0
    assert temps[-1] == pytest.approx(steady, abs=0.01 * (steady - idle))
    # one time constant covers 1 - 1/e of the way
    clock6 = FakeClock()
    g = _gpu(clock6)
    start = g.sample().temp_c
    g.set_workload(1.0, "compute")
    clock6.advance(tau)
    assert start is not None
    frac = (g.sample().temp_c - start) / (steady - start)  # type: ignore[operator]
    assert frac == pytest.approx(1 - math.exp(-1), abs=0.02)
    assert g.sample().mem_temp_c > g.sample().temp_c  # type: ignore[operator]


def test_hot_gpu_throttles_thermally(hot_h100: SimulatedGpu, clock: FakeClock) -> None:
    hot_h100.set_workload(1.0, "compute")
    for _ in range(40):
        clock.advance(5.0)
        s = hot_h100.sample()
    assert s.temp_c is not None
    assert s.temp_c >= hot_h100.model.slowdown_c - 1.0
    assert s.thermal_violation_s is not None
    assert s.thermal_violation_s > 0.0
    seen = 0
    for _ in range(20):
        clock.advance(1.0)
        s = hot_h100.sample()
        assert s.throttle_reasons is not None
        if s.throttle_reasons & THROTTLE_SW_THERMAL:
            seen += 1
            assert s.sm_clock_mhz is not None
            assert s.sm_clock_mhz < 1980.0
    assert seen > 0


# -- throughput ground truth -----------------------------------------------------------
def test_throughput_fraction_shapes(h100: SimulatedGpu) -> None:
    h100.set_workload(1.0, "compute")
    assert h100.throughput_fraction() == 1.0
    h100.set_power_limit_w(0.7 * 700.0)
    compute_70 = h100.throughput_fraction()
    assert 0.86 <= compute_70 <= 0.92  # ~0.9: compute-bound work loses about 10 %
    h100.set_workload(1.0, "memory")
    assert h100.throughput_fraction() >= 0.97
    h100.set_workload(0.0)
    assert h100.throughput_fraction() == 1.0


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_throughput_fraction_rises_with_the_limit(h100: SimulatedGpu, kind: str) -> None:
    h100.set_workload(1.0, kind)
    fractions = []
    for watts in range(200, 701, 25):
        h100.set_power_limit_w(float(watts))
        fractions.append(h100.throughput_fraction())
    assert fractions == sorted(fractions)
    assert fractions[-1] == 1.0
    assert 0.0 < fractions[0] < 1.0


# -- workload and identity ---------------------------------------------------------------
def test_workload_pids_and_validation(h100: SimulatedGpu) -> None:
    assert h100.compute_pids() == []
    h100.set_workload(0.8, "mixed", job_id="job-7", pids=[11, 12])
    assert h100.compute_pids() == [11, 12]
    assert h100.job_id == "job-7"
    assert h100.sample().util_gpu_pct == pytest.approx(80.0)
    with pytest.raises(ValueError, match="load"):
        h100.set_workload(1.5)
    with pytest.raises(ValueError, match="kind"):
        h100.set_workload(0.5, "graphics")


def test_deterministic_with_a_seed(clock: FakeClock) -> None:
    def run(seed: int, host: str = "n1") -> list[tuple[str, float | None]]:
        b = SimulatedBackend(4, seed=seed, host=host, clock=clock)
        b.open()
        out = []
        for g in b.gpus():
            g.set_workload(1.0, "compute")
            g.set_power_limit_w(500.0)
            out.append((g.identity.uuid, g.sample().power_w))
        return out

    assert run(1) == run(1)
    assert run(1) != run(2)
    assert run(1) != run(1, host="n2")
    uuids = [u for u, _ in run(3)]
    assert len(set(uuids)) == 4
    for u in uuids:
        assert re.fullmatch(r"GPU-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", u)


def test_models_cycle_and_identity(clock: FakeClock) -> None:
    b = SimulatedBackend(3, models=["H100-SXM", "A100-SXM"], clock=clock)
    with b:
        names = [d.identity.name for d in b.devices()]
        buses = [d.identity.pci_bus_id for d in b.devices()]
    assert names == ["NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB", "NVIDIA H100 80GB HBM3"]
    assert len(set(buses)) == 3
    with pytest.raises(DeviceError):
        b.devices()  # closed
    with pytest.raises(ValueError, match="models"):
        SimulatedBackend(1, models="B200")


def test_lost_gpu(h100: SimulatedGpu) -> None:
    h100.mark_lost()
    s = h100.sample()
    assert s.lost
    assert s.power_w is None
    with pytest.raises(DeviceLost):
        h100.set_power_limit_w(500.0)
    with pytest.raises(DeviceLost):
        h100.compute_pids()


def test_sample_fields_are_schema_fields(h100: SimulatedGpu) -> None:
    h100.set_workload(1.0)
    fields = h100.sample().fields()
    assert set(fields) <= GPU.field_names
    # an H100 SXM has no module power, power smoothing or workload profiles: left out
    absent = {"module_power_w", "module_power_limit_w", "power_smoothing_enabled"}
    absent |= {"power_smoothing_profile", "power_profiles"}
    assert {k for k, v in fields.items() if v is None} == absent
    fields = {k: v for k, v in fields.items() if v is not None}
    for name, value in fields.items():
        kind = GPU.spec(name).kind
        assert isinstance(value, kind) or (kind is float and isinstance(value, int)), name
