"""Telemetry depth through the fake pynvml: GPM, newer power controls, health and XIDs, MIG,
per-process utilization; each optional field's NOT_SUPPORTED, NO_PERMISSION and GPU_IS_LOST
paths (left out, logged once, never fatal; a lost GPU gives a lost sample)."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pynvml
import pytest

from agent.devices.nvml import NvmlBackend, NvmlGpu
from dcenergy.schema import GPU, GPU_HEALTH
from tests.agent.fake_pynvml import XID, FakeGpm, FakeGpu, FakeMig, FakeNvml

LOGGER = "agent.devices.nvml"
MIB = 1024 * 1024
SM = pynvml.NVML_GPM_METRIC_SM_UTIL
DRAM = pynvml.NVML_GPM_METRIC_DRAM_BW_UTIL
TENSOR = pynvml.NVML_GPM_METRIC_ANY_TENSOR_UTIL
NOT_SUPPORTED = pynvml.NVML_ERROR_NOT_SUPPORTED
NO_PERMISSION = pynvml.NVML_ERROR_NO_PERMISSION
GPU_IS_LOST = pynvml.NVML_ERROR_GPU_IS_LOST


def _open(*gpus: FakeGpu) -> tuple[FakeNvml, NvmlBackend]:
    fake = FakeNvml(list(gpus))
    backend = NvmlBackend(fake)
    backend.open()
    return fake, backend


@pytest.fixture
def one() -> Iterator[tuple[FakeNvml, NvmlGpu]]:
    fake, backend = _open(FakeGpu())
    gpu = backend.devices()[0]
    assert isinstance(gpu, NvmlGpu)
    yield fake, gpu
    backend.close()


def _logged(caplog: pytest.LogCaptureFixture, text: str) -> int:
    return len([r for r in caplog.records if text in r.getMessage()])


# -- GPM ------------------------------------------------------------------------------------
def test_gpm_metrics_in_project_units_from_the_first_sample(
    one: tuple[FakeNvml, NvmlGpu],
) -> None:
    _fake, gpu = one
    s = gpu.sample()  # the first buffer was filled at open: this covers the time since
    assert s.sm_active_pct == pytest.approx(71.5)
    assert s.sm_occupancy_pct == pytest.approx(40.0)
    assert s.tensor_active_pct == pytest.approx(55.0)
    assert s.dram_active_pct == pytest.approx(62.0)
    assert s.pcie_tx_bytes_per_s == pytest.approx(1024 * MIB)  # MiB/s -> B/s
    assert s.pcie_rx_bytes_per_s == pytest.approx(2048 * MIB)
    assert s.nvlink_tx_bytes_per_s == s.nvlink_rx_bytes_per_s == pytest.approx(40960 * MIB)
    assert set(s.fields()) <= GPU.field_names


def test_gpm_metric_is_the_mean_between_two_samples(one: tuple[FakeNvml, NvmlGpu]) -> None:
    fake, gpu = one
    gpu.sample()
    gpm = fake.gpus[0].gpm
    assert gpm is not None
    # between this sample and the next: 3 s at 20 % SM, then the 1 s step at 80 %
    gpm.advance(3.0, {**gpm.rates, SM: 20.0})
    gpm.rates[SM] = 80.0
    assert gpu.sample().sm_active_pct == pytest.approx((3 * 20.0 + 1 * 80.0) / 4)
    assert gpu.sample().sm_active_pct == pytest.approx(80.0)  # the interval since, only
    # two buffers, alternated: no allocation per sample
    assert len(fake.calls_to("nvmlGpmSampleAlloc")) == 2


def test_gpm_off_before_hopper_and_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    fake, backend = _open(FakeGpu(name="NVIDIA A100-SXM4-80GB", gpm=None))
    with backend:
        samples = [backend.devices()[0].sample() for _ in range(3)]
    assert all(s.sm_active_pct is None and s.dram_active_pct is None for s in samples)
    assert not samples[0].lost and samples[0].power_w is not None
    assert fake.calls_to("nvmlGpmSampleGet") == [] and fake.calls_to("nvmlGpmSampleAlloc") == []
    assert _logged(caplog, "gpm not supported") == 1


def test_gpm_missing_from_an_older_pynvml_is_off() -> None:
    fake = FakeNvml([FakeGpu()])
    fake.hide("nvmlGpmQueryDeviceSupport")
    with NvmlBackend(fake) as backend:
        s = backend.devices()[0].sample()
    assert s.sm_active_pct is None and s.power_w is not None


def test_a_gpm_metric_the_gpu_lacks_is_left_out_and_not_asked_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    rates = {SM: 50.0, DRAM: 30.0}  # no tensor, occupancy, PCIe or NVLink metric
    _fake, backend = _open(FakeGpu(gpm=FakeGpm(rates=rates)))
    with backend:
        gpu = backend.devices()[0]
        for _ in range(3):
            s = gpu.sample()
            assert (s.sm_active_pct, s.dram_active_pct) == (50.0, 30.0)
            assert s.tensor_active_pct is None and s.nvlink_rx_bytes_per_s is None
    assert _logged(caplog, "tensor_active_pct not supported") == 1


@pytest.mark.parametrize("code", [NO_PERMISSION, pynvml.NVML_ERROR_UNKNOWN])
def test_a_failing_gpm_sample_is_left_out_not_fatal(
    one: tuple[FakeNvml, NvmlGpu], code: int, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    fake, gpu = one
    fake.fail("nvmlGpmSampleGet", code=code)
    s1, s2 = gpu.sample(), gpu.sample()
    assert s1.sm_active_pct is None and s2.sm_active_pct is None
    assert not s2.lost and s2.power_w is not None
    assert _logged(caplog, "gpm") == 1
    fake.clear()
    assert gpu.sample().sm_active_pct is not None  # asked again: it was not "unsupported"


def test_gpm_on_a_lost_gpu_gives_a_lost_sample(one: tuple[FakeNvml, NvmlGpu]) -> None:
    fake, gpu = one
    fake.fail("nvmlGpmMetricsGet", code=GPU_IS_LOST)
    assert gpu.sample().lost and gpu.lost


def test_close_frees_the_gpm_samples_and_the_event_set() -> None:
    fake, backend = _open(FakeGpu(), FakeGpu(mig_mode=1, mig=[_mig("MIG-a", 1)]))
    for dev in backend.devices():
        dev.sample()
        dev.health()
        dev.mig_instances()
    assert fake.gpm_samples_live == 6  # 2 per GPU, 2 per GPU instance
    backend.close()
    assert fake.gpm_samples_live == 0
    assert fake.event_sets and all(es.freed for es in fake.event_sets)
    assert fake.shutdown_calls == 1


# -- newer power controls -------------------------------------------------------------------
def test_module_power_smoothing_and_profiles(one: tuple[FakeNvml, NvmlGpu]) -> None:
    fake, gpu = one
    fake.gpus[0].power_profiles = [pynvml.NVML_POWER_PROFILE_TRAINING, 33]
    s = gpu.sample()
    assert s.module_power_w == pytest.approx(1012.0)  # mW -> W, module scope
    assert s.module_power_limit_w == pytest.approx(1200.0)
    assert (s.power_smoothing_enabled, s.power_smoothing_profile) == (1, 2)
    assert s.power_profiles == "training,profile_33"
    (ids,) = {tuple(args[0]) for _, args in fake.calls_to("nvmlDeviceGetFieldValues")}
    assert (pynvml.NVML_FI_DEV_POWER_INSTANT, pynvml.NVML_POWER_SCOPE_MODULE) in ids
    assert pynvml.NVML_FI_DEV_POWER_INSTANT in ids  # board power: the device's own scope


def test_a_gpu_without_them_leaves_them_out_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    bare = FakeGpu(
        module_power_mw=None,
        module_limit_mw=None,
        smoothing_enabled=None,
        smoothing_profile=None,
        power_profiles=None,
    )
    fake, backend = _open(bare)
    with backend:
        gpu = backend.devices()[0]
        samples = [gpu.sample() for _ in range(3)]
    for s in samples:
        assert s.module_power_w is None and s.module_power_limit_w is None
        assert s.power_smoothing_enabled is None and s.power_profiles is None
        assert s.power_w == pytest.approx(612.345)
    for name in ("module_power_w", "power_smoothing_enabled", "power_profiles"):
        assert _logged(caplog, f"{name} not supported") == 1
    # not asked again: the later field-value calls carry only what the GPU has
    asked = [args[0] for _, args in fake.calls_to("nvmlDeviceGetFieldValues")]
    assert len(asked[0]) > len(asked[-1])
    assert len(fake.calls_to("nvmlDeviceWorkloadPowerProfileGetCurrentProfiles")) == 1


def test_no_permission_on_a_power_field_is_left_out_and_asked_again(
    one: tuple[FakeNvml, NvmlGpu], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    fake, gpu = one
    fake.fail_field(pynvml.NVML_FI_PWR_SMOOTHING_ENABLED, code=NO_PERMISSION, gpu=0)
    fake.fail("nvmlDeviceWorkloadPowerProfileGetCurrentProfiles", code=NO_PERMISSION)
    for _ in range(2):
        s = gpu.sample()
        assert s.power_smoothing_enabled is None and s.power_profiles is None
        assert s.power_smoothing_profile == 2 and s.module_power_w is not None
    assert _logged(caplog, "no permission") == 2  # once per field
    fake.clear()
    s = gpu.sample()
    assert s.power_smoothing_enabled == 1 and s.power_profiles == "max_p"


@pytest.mark.parametrize(
    "lose",
    [
        lambda f: f.fail_field(pynvml.NVML_FI_DEV_POWER_INSTANT, code=GPU_IS_LOST, gpu=0),
        lambda f: f.fail("nvmlDeviceWorkloadPowerProfileGetCurrentProfiles", code=GPU_IS_LOST),
    ],
    ids=["field value", "profiles"],
)
def test_a_power_control_read_on_a_lost_gpu_gives_a_lost_sample(
    one: tuple[FakeNvml, NvmlGpu], lose: object
) -> None:
    fake, gpu = one
    lose(fake)  # type: ignore[operator]
    s = gpu.sample()
    assert s.lost and s.power_w is None


# -- health -----------------------------------------------------------------------------------
def test_health_counters_and_slowdowns(one: tuple[FakeNvml, NvmlGpu]) -> None:
    fake, gpu = one
    fake.gpus[0].reasons = 0x8 | 0x80  # HW slowdown + power brake
    fake.gpus[0].fan_pct = 45
    h = gpu.health()
    assert h is not None
    assert (h.ecc_corrected_volatile, h.ecc_uncorrected_volatile) == (3, 0)
    assert (h.ecc_corrected_aggregate, h.ecc_uncorrected_aggregate) == (12, 0)
    assert (h.remap_corrected_rows, h.remap_pending, h.remap_failure) == (1, 0, 0)
    assert h.pcie_replay_total == 5 and h.nvlink_replay_errors_total == 0
    assert h.fan_speed_pct == 45.0
    assert (h.hw_slowdown, h.hw_thermal_slowdown, h.power_brake) == (1, 0, 1)
    assert (h.xid_events, h.xid_critical_events) == (0, 0)
    fields = h.fields()
    assert set(fields) <= GPU_HEALTH.field_names
    assert fields["unhealthy"] == 0 and fields["health_reasons"] == ""


def test_xids_are_drained_without_blocking(one: tuple[FakeNvml, NvmlGpu]) -> None:
    fake, gpu = one
    assert gpu.health() is not None  # registers the event set
    fake.xid(0, 13)  # an application's illegal address: recorded, not a health problem
    fake.xid(0, 79)  # fell off the bus
    fake.xid(0, 31)
    h = gpu.health()
    assert h is not None
    assert (h.xid_events, h.xid_critical_events, h.xid_last, h.xid_last_critical) == (3, 1, 31, 79)
    assert h.reasons() == ["XID 79"] and h.fields()["unhealthy"] == 1
    waits = fake.calls_to("nvmlEventSetWait_v2")
    assert {args[1] for _, args in waits} == {0}  # timeout 0: a poll, never a wait
    h = gpu.health()
    assert h is not None and (h.xid_events, h.xid_critical_events) == (0, 0)
    assert h.xid_last_critical == 79  # remembered; the window decides (snapshot)
    ((gpu_index, args),) = fake.calls_to("nvmlDeviceRegisterEvents")
    assert gpu_index == 0 and args[0] == XID


def test_uncorrected_ecc_and_pending_remap_are_unhealthy(one: tuple[FakeNvml, NvmlGpu]) -> None:
    fake, gpu = one
    fake.gpus[0].ecc_dbe_vol = 2
    fake.gpus[0].remap_pending = 1
    h = gpu.health()
    assert h is not None
    assert h.reasons() == ["2 uncorrected ECC errors", "row remap pending"]


def test_health_fields_a_gpu_lacks_are_left_out_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    ampere_pcie = FakeGpu(
        retired_sbe=None,
        retired_dbe=None,
        retired_pending=None,
        nvlink_crc_flit=None,
        nvlink_crc_data=None,
        nvlink_replay=None,
        nvlink_recovery=None,
        supported_events=0,  # no XID events on this GPU
    )
    fake, backend = _open(ampere_pcie)
    with backend:
        gpu = backend.devices()[0]
        for _ in range(3):
            h = gpu.health()
            assert h is not None
            assert h.retired_pages_sbe is None and h.nvlink_replay_errors_total is None
            assert h.xid_events is None and h.xid_critical_events is None
            assert h.fan_speed_pct is None  # passively cooled
            assert h.ecc_corrected_volatile == 3  # the rest is still read
    assert _logged(caplog, "retired_pages_sbe not supported") == 1
    assert _logged(caplog, "xid_events not supported") == 1
    assert _logged(caplog, "fan_speed_pct not supported") == 1
    assert fake.event_sets == []


def test_no_permission_on_health_reads_is_not_fatal(
    one: tuple[FakeNvml, NvmlGpu], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    fake, gpu = one
    fake.fail("nvmlDeviceRegisterEvents", code=NO_PERMISSION)
    fake.fail_field(pynvml.NVML_FI_DEV_ECC_DBE_VOL_TOTAL, code=NO_PERMISSION, gpu=0)
    h = gpu.health()
    assert h is not None
    assert h.ecc_uncorrected_volatile is None and h.xid_events is None
    assert h.ecc_corrected_volatile == 3
    assert not gpu.lost and gpu.sample().power_w is not None
    assert _logged(caplog, "no permission") == 2


@pytest.mark.parametrize(
    "lose",
    [
        lambda f: f.fail("nvmlDeviceGetFieldValues", code=GPU_IS_LOST),
        lambda f: f.lose(0),
    ],
    ids=["field values", "event wait"],
)
def test_health_of_a_lost_gpu_is_none_and_the_gpu_lost(
    one: tuple[FakeNvml, NvmlGpu], lose: object
) -> None:
    fake, gpu = one
    assert gpu.health() is not None
    lose(fake)  # type: ignore[operator]
    assert gpu.health() is None
    assert gpu.lost and gpu.sample().lost


# -- MIG ----------------------------------------------------------------------------------
def _mig(uuid: str, gi: int, **kw: object) -> FakeMig:
    return FakeMig(uuid, gi_id=gi, gpm=FakeGpm(rates={SM: 50.0, DRAM: 20.0, TENSOR: 5.0}), **kw)  # type: ignore[arg-type]


def _mig_gpu() -> FakeGpu:
    return FakeGpu(
        uuid="GPU-11111111-0000-4000-8000-000000000000",
        mig_mode=pynvml.NVML_DEVICE_MIG_ENABLE,
        mig=[
            _mig("MIG-aaaa", 1, pids=[4242]),
            None,  # an empty slot: NOT_FOUND, skipped
            _mig(
                "MIG-bbbb",
                2,
                profile_id=pynvml.NVML_GPU_INSTANCE_PROFILE_3_SLICE,
                profile_name=b"MIG 3g.40gb",
                gi_slices=3,
                ci_slices=1,  # a compute slice of the 3g instance
                sm_count=20,
                mem_total=40448 * MIB,
                mem_used=8 * 1024 * MIB,
                pids=[4343, 4444],
            ),
        ],
    )


def test_mig_instances_identity_memory_activity_and_processes() -> None:
    fake, backend = _open(_mig_gpu())
    with backend:
        gpu = backend.devices()[0]
        assert gpu.identity.mig_mode is True
        a, b = gpu.mig_instances()
    assert (a.parent_uuid, a.uuid, a.gpu_instance_id, a.compute_instance_id) == (
        "GPU-11111111-0000-4000-8000-000000000000",
        "MIG-aaaa",
        1,
        0,
    )
    assert a.profile == "1g.10gb" and a.sm_count == 16 and a.pids == (4242,)
    assert b.profile == "1c.3g.40gb" and b.sm_count == 20
    assert (b.mem_used_bytes, b.mem_total_bytes) == (8 * 1024 * MIB, 40448 * MIB)
    assert b.pids == (4343, 4444)
    assert (b.sm_active_pct, b.dram_active_pct, b.tensor_active_pct) == (50.0, 20.0, 5.0)
    # each instance's own processes: the list of its MIG device handle (the parent's
    # handle would give every instance's), one call per instance
    assert len(fake.calls_to("nvmlDeviceGetComputeRunningProcesses")) == 2
    assert {(gi, args[0]) for gi, args in fake.calls_to("nvmlGpmMigSampleGet")} == {
        (0, 1),
        (0, 2),
    }


def test_mig_profile_falls_back_to_the_device_attributes() -> None:
    fake = FakeNvml([_mig_gpu()])
    fake.fail("nvmlDeviceGetGpuInstanceById", code=NO_PERMISSION)
    with NvmlBackend(fake) as backend:
        a, b = backend.devices()[0].mig_instances()
    assert (a.profile, b.profile) == ("1g.10gb", "1c.3g.40gb")  # 9856 MB, 40448 MB


def test_mig_list_is_reread_now_and_then_not_every_sample() -> None:
    fake, backend = _open(_mig_gpu())
    with backend:
        gpu = backend.devices()[0]
        for _ in range(31):
            assert len(gpu.mig_instances()) == 2
    assert len(fake.calls_to("nvmlDeviceGetMaxMigDeviceCount")) == 2  # at 1 and at 31


def test_mig_not_supported_gives_no_instances_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    fake = FakeNvml([_mig_gpu()])
    fake.fail("nvmlDeviceGetMaxMigDeviceCount", code=NOT_SUPPORTED)
    with NvmlBackend(fake) as backend:
        gpu = backend.devices()[0]
        assert [gpu.mig_instances() for _ in range(3)] == [[], [], []]
        assert not gpu.lost
    assert _logged(caplog, "mig not supported") == 1


def test_mig_per_instance_reads_failing_leave_fields_out() -> None:
    fake = FakeNvml([_mig_gpu()])
    fake.fail("nvmlGpmMigSampleGet", code=NOT_SUPPORTED)
    fake.fail("nvmlDeviceGetAttributes", code=NO_PERMISSION)
    fake.fail("nvmlDeviceGetGpuInstanceById", code=NO_PERMISSION)
    with NvmlBackend(fake) as backend:
        a, b = backend.devices()[0].mig_instances()
    assert a.sm_active_pct is None and a.sm_count is None and a.profile == ""
    assert b.pids == (4343, 4444) and b.mem_total_bytes == 40448 * MIB


def test_mig_on_a_lost_gpu_gives_nothing_and_marks_it_lost() -> None:
    fake, backend = _open(_mig_gpu())
    with backend:
        gpu = backend.devices()[0]
        fake.lose(0)
        assert gpu.mig_instances() == []
        assert gpu.lost


# -- per-process utilization -----------------------------------------------------------------
def test_process_utilization_is_the_mean_since_the_last_sample_seen(
    one: tuple[FakeNvml, NvmlGpu],
) -> None:
    fake, gpu = one
    fake.gpus[0].proc_util = {4242: (60, 10), 4343: (20, 5)}
    assert gpu.process_utilization() == {4242: 60.0, 4343: 20.0}
    first_seen = fake.calls_to("nvmlDeviceGetProcessUtilization")[0][1][0]
    assert gpu.process_utilization() == {4242: 60.0, 4343: 20.0}
    second_seen = fake.calls_to("nvmlDeviceGetProcessUtilization")[1][1][0]
    assert first_seen == 0 and second_seen > 0  # only samples newer than the last seen


def test_no_process_sample_is_empty_not_an_error(
    one: tuple[FakeNvml, NvmlGpu], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    _fake, gpu = one
    assert gpu.process_utilization() == {}  # NVML says NOT_FOUND: nothing since
    assert caplog.records == []


@pytest.mark.parametrize("code", [NOT_SUPPORTED, NO_PERMISSION])
def test_process_utilization_refused_is_empty_logged_once(
    one: tuple[FakeNvml, NvmlGpu], code: int, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    fake, gpu = one
    fake.gpus[0].proc_util = {4242: (60, 10)}
    fake.fail("nvmlDeviceGetProcessUtilization", code=code)
    assert [gpu.process_utilization() for _ in range(3)] == [{}, {}, {}]
    assert _logged(caplog, "process_util") == 1
    assert not gpu.lost


def test_process_utilization_on_a_lost_gpu_is_empty(one: tuple[FakeNvml, NvmlGpu]) -> None:
    fake, gpu = one
    fake.gpus[0].proc_util = {4242: (60, 10)}
    fake.lose(0)
    assert gpu.process_utilization() == {}
    assert gpu.sample().lost
