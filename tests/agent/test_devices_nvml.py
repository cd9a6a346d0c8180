"""The NVML backend against the fake pynvml: units, error mapping, failure modes."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pynvml
import pytest

from agent.devices.base import SetpointOutOfRange
from agent.devices.nvml import NvmlBackend, NvmlGpu
from dcenergy.errors import DeviceError, DeviceLost, DeviceNotSupported, DevicePermission
from dcenergy.schema import GPU
from tests.agent.fake_pynvml import FakeGpu, FakeNvml

LOGGER = "agent.devices.nvml"


def _two_gpus() -> list[FakeGpu]:
    return [
        FakeGpu(uuid="GPU-aaaaaaaa-0000-4000-8000-000000000000", bus_id=b"00000000:18:00.0"),
        FakeGpu(uuid="GPU-bbbbbbbb-0000-4000-8000-000000000001", bus_id=b"00000000:2A:00.0"),
    ]


@pytest.fixture
def fake() -> FakeNvml:
    return FakeNvml(_two_gpus())


@pytest.fixture
def backend(fake: FakeNvml) -> Iterator[NvmlBackend]:
    b = NvmlBackend(fake)
    b.open()
    yield b
    b.close()


def _gpu(backend: NvmlBackend, index: int) -> NvmlGpu:
    dev = backend.devices()[index]
    assert isinstance(dev, NvmlGpu)
    return dev


# -- failure-mode fixtures ----------------------------------------------------
@pytest.fixture
def fake_no_instant_power() -> FakeNvml:
    """An older GPU: the POWER_INSTANT field value is not supported."""
    return FakeNvml([FakeGpu(power_instant_mw=None, power_usage_mw=455_500)])


@pytest.fixture
def fake_gpu1_lost(fake: FakeNvml) -> FakeNvml:
    """GPU 1 fell off the bus after the backend opened (lose it after open)."""
    return fake


# -- reading ------------------------------------------------------------------
def test_sample_reads_every_field_in_project_units(backend: NvmlBackend) -> None:
    s = _gpu(backend, 0).sample()
    assert not s.lost
    assert s.power_w == pytest.approx(612.345)  # mW -> W, from POWER_INSTANT
    assert s.energy_j == pytest.approx(123_456.789)  # mJ -> J
    assert s.energy_resets == 0
    assert s.power_limit_w == 700.0
    assert s.power_limit_enforced_w == 700.0
    assert (s.power_limit_min_w, s.power_limit_max_w, s.power_limit_default_w) == (
        200.0,
        700.0,
        700.0,
    )
    assert s.temp_c == 45.0
    assert s.mem_temp_c == 51.0
    assert s.mem_used_bytes == 40 * 1024**3
    assert s.mem_total_bytes == 80 * 1024**3
    assert (s.util_gpu_pct, s.util_mem_pct) == (97.0, 41.0)
    assert (s.sm_clock_mhz, s.mem_clock_mhz) == (1980.0, 2619.0)
    assert s.throttle_reasons == 0x4
    assert s.power_violation_s == pytest.approx(2.5)  # ns -> s
    assert s.thermal_violation_s == pytest.approx(0.5)
    assert s.pstate == 0
    fields = s.fields()
    assert set(fields) <= GPU.field_names
    assert [k for k, v in fields.items() if v is None] == []
    assert fields["pci_bus_id"] == "00000000:18:00.0"
    assert fields["mig_mode"] == 0


def test_identity_is_read_at_open(backend: NvmlBackend) -> None:
    ids = [d.identity for d in backend.devices()]
    assert [i.index for i in ids] == [0, 1]
    assert ids[1].uuid == "GPU-bbbbbbbb-0000-4000-8000-000000000001"
    assert ids[1].name == "NVIDIA H100 80GB HBM3"
    assert ids[1].pci_bus_id == "00000000:2A:00.0"  # bytes from NVML, str here
    assert ids[1].mig_mode is False


def test_mig_mode_enabled_and_unsupported() -> None:
    fake = FakeNvml([FakeGpu(mig_mode=pynvml.NVML_DEVICE_MIG_ENABLE), FakeGpu(mig_mode=None)])
    with NvmlBackend(fake) as b:
        assert [d.identity.mig_mode for d in b.devices()] == [True, None]


def test_power_instant_preferred_over_power_usage(fake: FakeNvml, backend: NvmlBackend) -> None:
    _gpu(backend, 0).sample()
    assert fake.calls_to("nvmlDeviceGetPowerUsage") == []


def test_power_falls_back_to_power_usage(
    fake_no_instant_power: FakeNvml, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    with NvmlBackend(fake_no_instant_power) as b:
        samples = [b.devices()[0].sample() for _ in range(3)]
    assert [s.power_w for s in samples] == [455.5, 455.5, 455.5]
    assert all(s.mem_temp_c == 51.0 for s in samples)  # the other field value still read
    assert len([r for r in caplog.records if "POWER_INSTANT" in r.getMessage()]) == 1


def test_field_values_call_unsupported_falls_back(fake: FakeNvml, backend: NvmlBackend) -> None:
    fake.fail("nvmlDeviceGetFieldValues", code=pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)
    s = _gpu(backend, 0).sample()
    assert s.power_w == 600.0
    assert s.mem_temp_c is None


def test_unsupported_field_left_out_and_logged_once(
    fake: FakeNvml, backend: NvmlBackend, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    fake.fail("nvmlDeviceGetTotalEnergyConsumption", gpu=1, code=pynvml.NVML_ERROR_NOT_SUPPORTED)
    for _ in range(4):
        s0, s1 = (d.sample() for d in backend.devices())
        assert s1.energy_j is None
        assert s1.energy_resets is None  # no counter, no resets: absent, not 0
        assert "energy_j" in s1.fields()
        assert s1.fields()["energy_j"] is None
        assert s0.energy_j is not None
        assert s1.power_w is not None
    msgs = [r.getMessage() for r in caplog.records if "energy_j" in r.getMessage()]
    assert len(msgs) == 1
    assert "GPU 1" in msgs[0]
    # NVML said "not supported": not asked again
    assert len([c for c in fake.calls_to("nvmlDeviceGetTotalEnergyConsumption") if c[0] == 1]) == 1


def test_no_permission_on_reader_is_not_fatal(
    fake: FakeNvml, backend: NvmlBackend, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    fake.fail("nvmlDeviceGetViolationStatus", gpu=0, code=pynvml.NVML_ERROR_NO_PERMISSION)
    gpu = _gpu(backend, 0)
    s = gpu.sample()
    s = gpu.sample()
    assert s.power_violation_s is None
    assert s.thermal_violation_s is None
    assert s.power_w is not None
    assert not s.lost
    perm = [r for r in caplog.records if "permission" in r.getMessage()]
    assert len(perm) == 2  # once per field (power, thermal), not once per sample
    fake.clear()
    assert gpu.sample().power_violation_s == pytest.approx(2.5)  # permission is asked again


def test_no_permission_on_setter_raises(fake: FakeNvml, backend: NvmlBackend) -> None:
    fake.fail("nvmlDeviceSetPowerManagementLimit", code=pynvml.NVML_ERROR_NO_PERMISSION)
    with pytest.raises(DevicePermission) as info:
        _gpu(backend, 1).set_power_limit_w(400.0)
    assert info.value.gpu == 1
    assert isinstance(info.value.__cause__, pynvml.NVMLError)
    assert fake.gpus[1].limit_mw == 700_000


def test_other_errors_on_a_reader_are_counted_not_fatal(
    fake: FakeNvml, backend: NvmlBackend
) -> None:
    fake.fail("nvmlDeviceGetTemperature", gpu=0, code=pynvml.NVML_ERROR_TIMEOUT)
    gpu = _gpu(backend, 0)
    s = gpu.sample()
    assert s.temp_c is None
    assert s.power_w is not None
    assert gpu.read_errors == 1


# -- lost GPUs -----------------------------------------------------------------
def test_lost_gpu_gives_lost_sample_and_others_keep_sampling(
    fake_gpu1_lost: FakeNvml, backend: NvmlBackend
) -> None:
    fake_gpu1_lost.lose(1)
    s0, s1 = (d.sample() for d in backend.devices())
    assert s1.lost
    assert s1.power_w is None
    assert s1.fields() == {k: (True if k == "lost" else None) for k in s1.fields()}
    assert not s0.lost
    assert s0.power_w == pytest.approx(612.345)
    gpu1 = _gpu(backend, 1)
    assert gpu1.lost
    n_calls = len(fake_gpu1_lost.calls)
    assert gpu1.sample().lost  # sticky: a lost GPU is not asked again
    assert len(fake_gpu1_lost.calls) == n_calls
    with pytest.raises(DeviceLost):
        gpu1.set_power_limit_w(400.0)


def test_setter_on_a_gpu_that_just_got_lost_marks_it_lost(
    fake: FakeNvml, backend: NvmlBackend
) -> None:
    fake.lose(0)
    gpu = _gpu(backend, 0)
    with pytest.raises(DeviceLost):
        gpu.set_power_limit_w(500.0)
    assert gpu.lost
    n_calls = len(fake.calls)
    assert gpu.sample().lost
    assert len(fake.calls) == n_calls


def test_unknown_error_on_a_lost_gpu_means_lost(fake: FakeNvml, backend: NvmlBackend) -> None:
    fake.fail("nvmlDeviceGetFieldValues", gpu=1, code=pynvml.NVML_ERROR_UNKNOWN)
    fake.fail("nvmlDeviceGetUUID", gpu=1, code=pynvml.NVML_ERROR_GPU_IS_LOST)
    assert _gpu(backend, 1).sample().lost
    assert not _gpu(backend, 0).sample().lost


def test_unknown_error_on_a_healthy_gpu_is_a_glitch(fake: FakeNvml, backend: NvmlBackend) -> None:
    fake.fail("nvmlDeviceGetMemoryInfo", gpu=1, code=pynvml.NVML_ERROR_UNKNOWN)
    s = _gpu(backend, 1).sample()
    assert not s.lost
    assert s.mem_used_bytes is None
    assert s.power_w is not None


def test_gpu_lost_before_open_is_skipped(caplog: pytest.LogCaptureFixture) -> None:
    fake = FakeNvml(_two_gpus())
    fake.lose(0)
    with NvmlBackend(fake) as b:
        assert [d.identity.index for d in b.devices()] == [1]
    assert any("GPU 0 skipped" in r.getMessage() for r in caplog.records)


# -- energy counter -------------------------------------------------------------
def test_energy_counter_reset_is_detected(fake: FakeNvml, backend: NvmlBackend) -> None:
    gpu = _gpu(backend, 0)
    first = gpu.sample()
    fake.gpus[0].energy_mj += 5_000  # +5 J
    second = gpu.sample()
    fake.reset_energy(0, to_mj=2_000)  # driver reload, then 2 J more
    third = gpu.sample()
    fake.gpus[0].energy_mj += 1_000
    fourth = gpu.sample()
    energies = [s.energy_j for s in (first, second, third, fourth)]
    assert [s.energy_resets for s in (first, second, third, fourth)] == [0, 0, 1, 1]
    assert energies == sorted(energies)  # monotonic through the reset
    assert second.energy_j == pytest.approx(123_461.789)
    assert third.energy_j == pytest.approx(123_461.789 + 2.0)
    assert fourth.energy_j == pytest.approx(123_461.789 + 3.0)


# -- errors ---------------------------------------------------------------------
@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (pynvml.NVML_ERROR_NOT_SUPPORTED, DeviceNotSupported),
        (pynvml.NVML_ERROR_FUNCTION_NOT_FOUND, DeviceNotSupported),
        (pynvml.NVML_ERROR_NO_PERMISSION, DevicePermission),
        (pynvml.NVML_ERROR_GPU_IS_LOST, DeviceLost),
        (pynvml.NVML_ERROR_RESET_REQUIRED, DeviceLost),
        (pynvml.NVML_ERROR_DRIVER_NOT_LOADED, DeviceLost),
        (pynvml.NVML_ERROR_TIMEOUT, DeviceError),
        (pynvml.NVML_ERROR_INVALID_ARGUMENT, DeviceError),
    ],
)
def test_error_table(
    fake: FakeNvml, backend: NvmlBackend, code: int, expected: type[DeviceError]
) -> None:
    fake.fail("nvmlDeviceResetGpuLockedClocks", code=code)
    with pytest.raises(DeviceError) as info:
        _gpu(backend, 0).reset_sm_clocks()
    assert type(info.value) is expected
    assert isinstance(info.value.__cause__, pynvml.NVMLError)
    assert info.value.__cause__.value == code
    assert "nvmlDeviceResetGpuLockedClocks" in str(info.value)


def test_throttle_reasons_fall_back_to_the_older_call(fake: FakeNvml, backend: NvmlBackend) -> None:
    fake.fail("nvmlDeviceGetCurrentClocksEventReasons", code=pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)
    fake.gpus[0].reasons = 0x24
    gpu = _gpu(backend, 0)
    assert gpu.sample().throttle_reasons == 0x24
    assert gpu.sample().throttle_reasons == 0x24
    assert len(fake.calls_to("nvmlDeviceGetCurrentClocksEventReasons")) == 1  # decided once


def test_function_missing_from_pynvml_is_not_supported() -> None:
    fake = FakeNvml([FakeGpu()])
    fake.hide("nvmlDeviceGetCurrentClocksEventReasons")
    fake.hide("nvmlDeviceGetPerformanceState")
    with NvmlBackend(fake) as b:
        s = b.devices()[0].sample()
    assert s.throttle_reasons == 0x4
    assert s.pstate is None


# -- lifecycle --------------------------------------------------------------------
def test_init_and_shutdown_exactly_once() -> None:
    fake = FakeNvml(_two_gpus())
    backend = NvmlBackend(fake)
    assert fake.calls == []  # constructing touches nothing
    with backend:
        backend.open()  # idempotent
        assert fake.init_calls == 1
        assert len(backend.devices()) == 2
    backend.close()
    assert fake.init_calls == 1
    assert fake.shutdown_calls == 1
    with pytest.raises(DeviceError):
        backend.devices()


def test_init_failure_is_a_device_error_with_a_hint() -> None:
    fake = FakeNvml([FakeGpu()])
    fake.fail("nvmlInit", code=pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)
    with pytest.raises(DeviceError, match="driver") as info:
        NvmlBackend(fake).open()
    assert isinstance(info.value.__cause__, pynvml.NVMLError)
    assert fake.shutdown_calls == 0


def test_failure_during_discovery_shuts_nvml_down() -> None:
    fake = FakeNvml([FakeGpu()])
    fake.fail("nvmlDeviceGetCount", code=pynvml.NVML_ERROR_UNKNOWN)
    with pytest.raises(DeviceError):
        NvmlBackend(fake).open()
    assert (fake.init_calls, fake.shutdown_calls) == (1, 1)


def test_sampling_sets_nothing(fake: FakeNvml, backend: NvmlBackend) -> None:
    for d in backend.devices():
        d.sample()
        d.compute_pids()
        d.supported_sm_clocks_mhz()
    assert fake.set_calls == []


# -- setters --------------------------------------------------------------------------
def test_set_power_limit_calls_nvml_in_milliwatts(fake: FakeNvml, backend: NvmlBackend) -> None:
    gpu = _gpu(backend, 1)
    gpu.set_power_limit_w(450.5)
    assert fake.set_calls == [("nvmlDeviceSetPowerManagementLimit", 1, (450_500,))]
    assert gpu.power_limit_w() == 450.5
    assert gpu.enforced_power_limit_w() == 450.5


@pytest.mark.parametrize("watts", [199.9, 700.1, float("nan"), float("inf")])
def test_power_limit_out_of_range_is_refused_not_clamped(
    fake: FakeNvml, backend: NvmlBackend, watts: float
) -> None:
    with pytest.raises(SetpointOutOfRange, match=r"\[200, 700\]"):
        _gpu(backend, 0).set_power_limit_w(watts)
    assert fake.set_calls == []


def test_power_limits_are_cached_at_open(fake: FakeNvml, backend: NvmlBackend) -> None:
    before = len(fake.calls_to("nvmlDeviceGetPowerManagementLimitConstraints"))
    for _ in range(3):
        limits = _gpu(backend, 0).power_limits()
        _gpu(backend, 0).sample()
    assert (limits.min_w, limits.max_w, limits.default_w) == (200.0, 700.0, 700.0)
    assert len(fake.calls_to("nvmlDeviceGetPowerManagementLimitConstraints")) == before


def test_lock_and_reset_sm_clocks(fake: FakeNvml, backend: NvmlBackend) -> None:
    gpu = _gpu(backend, 0)
    gpu.lock_sm_clocks_mhz(900, 1500)
    assert fake.gpus[0].locked_clocks == (900, 1500)
    gpu.reset_sm_clocks()
    assert fake.gpus[0].locked_clocks is None
    assert [c[0] for c in fake.set_calls] == [
        "nvmlDeviceSetGpuLockedClocks",
        "nvmlDeviceResetGpuLockedClocks",
    ]


@pytest.mark.parametrize(("lo", "hi"), [(1500, 900), (100, 1500), (900, 2500)])
def test_lock_outside_supported_clocks_is_refused(
    fake: FakeNvml, backend: NvmlBackend, lo: int, hi: int
) -> None:
    with pytest.raises(SetpointOutOfRange):
        _gpu(backend, 0).lock_sm_clocks_mhz(lo, hi)
    assert fake.set_calls == []


def test_supported_clocks_ascending_and_pids(backend: NvmlBackend) -> None:
    gpu = _gpu(backend, 0)
    clocks = gpu.supported_sm_clocks_mhz()
    assert clocks == sorted(clocks)
    assert (clocks[0], clocks[-1]) == (210, 1980)
    assert gpu.compute_pids() == [4242, 4343]
