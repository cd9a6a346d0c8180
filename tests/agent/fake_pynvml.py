"""A stand-in for the ``pynvml`` module: per-GPU state, error injection, a call log.

It reuses the real ``pynvml``'s ``NVMLError`` class, constants and ctypes
structures (importing ``pynvml`` needs no driver), so the backend's error table
and unit conversions are exercised against the real codes and layouts.

    fake = FakeNvml([FakeGpu(), FakeGpu(power_instant_mw=None)])
    fake.fail("nvmlDeviceGetTotalEnergyConsumption", gpu=1, code=NVML_ERROR_NOT_SUPPORTED)
    fake.lose(0)               # every call on GPU 0 now says GPU_IS_LOST
    fake.reset_energy(1)       # driver reload: the energy counter restarts
    fake.xid(0, 79)            # an XID event for GPU 0's event set
    fake.set_calls             # every setter call, for "nothing was set" assertions

What each call returns follows the NVML documentation for the pinned
nvidia-ml-py (13.x): field values carry one return code each (``scopeId``
selects the power scope); ``nvmlDeviceGetProcessUtilization`` and
``nvmlDeviceGetMigDeviceHandleByIndex`` say ``NOT_FOUND`` for "no sample since"
and "no MIG device at this index"; ``nvmlEventSetWait_v2`` says ``TIMEOUT``
when no event is waiting; GPM samples are the real opaque pointers and
``nvmlGpmMetricsGet`` fills the real ``c_nvmlGpmMetricsGet_t``, one return code
per metric; GPM and process utilization are not available on a MIG device
handle. GPM counters advance by ``FakeGpm.step_s`` at every sample taken, at
the rates set (``FakeGpm.advance`` adds a stretch at other rates), so a metric
is the mean rate between two samples. Event data leave ``device`` NULL (each
GPU has its own event set, so nothing reads it).
"""

from __future__ import annotations

import ctypes
import types
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pynvml

# re-export the real constants and error classes, as ``pynvml`` has them
_EXPORTED = {
    name: getattr(pynvml, name)
    for name in dir(pynvml)
    if name.startswith(
        ("NVML_", "NVMLError", "nvmlClocks", "nvmlEventType", "c_nvml", "struct_c_nvml")
    )
}
globals().update(_EXPORTED)
NVMLError = pynvml.NVMLError
NVML_SUCCESS = pynvml.NVML_SUCCESS
NVML_ERROR_NOT_SUPPORTED = pynvml.NVML_ERROR_NOT_SUPPORTED
NVML_ERROR_NO_PERMISSION = pynvml.NVML_ERROR_NO_PERMISSION
NVML_ERROR_GPU_IS_LOST = pynvml.NVML_ERROR_GPU_IS_LOST
NVML_ERROR_UNKNOWN = pynvml.NVML_ERROR_UNKNOWN
NVML_ERROR_FUNCTION_NOT_FOUND = pynvml.NVML_ERROR_FUNCTION_NOT_FOUND
NVML_ERROR_UNINITIALIZED = pynvml.NVML_ERROR_UNINITIALIZED
NVML_ERROR_TIMEOUT = pynvml.NVML_ERROR_TIMEOUT
NVML_ERROR_NOT_FOUND = pynvml.NVML_ERROR_NOT_FOUND
NVML_ERROR_INVALID_ARGUMENT = pynvml.NVML_ERROR_INVALID_ARGUMENT
NOT_MIG = 0xFFFFFFFF  # gpuInstanceId / computeInstanceId of a process outside MIG
XID = pynvml.nvmlEventTypeXidCriticalError

# GPM metric rates of a busy Hopper GPU (%, or MiB/s for the bandwidths)
GPM_BUSY: dict[int, float] = {
    pynvml.NVML_GPM_METRIC_SM_UTIL: 71.5,
    pynvml.NVML_GPM_METRIC_SM_OCCUPANCY: 40.0,
    pynvml.NVML_GPM_METRIC_ANY_TENSOR_UTIL: 55.0,
    pynvml.NVML_GPM_METRIC_DRAM_BW_UTIL: 62.0,
    pynvml.NVML_GPM_METRIC_PCIE_TX_PER_SEC: 1024.0,
    pynvml.NVML_GPM_METRIC_PCIE_RX_PER_SEC: 2048.0,
    pynvml.NVML_GPM_METRIC_NVLINK_TOTAL_TX_PER_SEC: 40960.0,
    pynvml.NVML_GPM_METRIC_NVLINK_TOTAL_RX_PER_SEC: 40960.0,
}

_SETTERS = ("nvmlDeviceSet", "nvmlDeviceReset")


@dataclass
class FakeGpm:
    """GPM counters of one GPU or one GPU instance: ``rates`` per metric id."""

    rates: dict[int, float] = field(default_factory=lambda: dict(GPM_BUSY))
    step_s: float = 1.0  # time that passes at ``rates`` before each sample
    t_s: float = 0.0
    totals: dict[int, float] = field(default_factory=dict)

    def advance(self, seconds: float, rates: dict[int, float] | None = None) -> None:
        """Let ``seconds`` pass at ``rates`` (default: the current ones)."""
        for mid, rate in (self.rates if rates is None else rates).items():
            self.totals[mid] = self.totals.get(mid, 0.0) + rate * seconds
        self.t_s += seconds

    def snapshot(self) -> tuple[float, dict[int, float], frozenset[int]]:
        self.advance(self.step_s)
        return self.t_s, dict(self.totals), frozenset(self.rates)


@dataclass
class FakeMig:
    """One MIG device (GPU instance + compute instance) of a MIG-enabled FakeGpu."""

    uuid: str
    gi_id: int
    ci_id: int = 0
    profile_id: int = pynvml.NVML_GPU_INSTANCE_PROFILE_1_SLICE
    profile_name: bytes = b"MIG 1g.10gb"
    gi_slices: int = 1
    ci_slices: int = 1
    sm_count: int = 16
    mem_total: int = 9856 * 1024**2
    mem_used: int = 0
    pids: list[int] = field(default_factory=list)
    gpm: FakeGpm | None = None  # None: GPM per GPU instance not supported


@dataclass
class FakeGpu:
    """The state NVML would report for one GPU, in NVML's own units (mW, mJ, ns)."""

    uuid: str = "GPU-00000000-0000-4000-8000-000000000000"
    name: str = "NVIDIA H100 80GB HBM3"
    bus_id: bytes = b"00000000:18:00.0"
    mig_mode: int | None = 0  # None: GetMigMode says NOT_SUPPORTED
    power_instant_mw: int | None = 612_345  # None: the field value says NOT_SUPPORTED
    power_usage_mw: int = 600_000
    mem_temp_c: int | None = 51
    energy_mj: int = 123_456_789
    limit_mw: int = 700_000
    default_limit_mw: int = 700_000
    min_limit_mw: int = 200_000
    max_limit_mw: int = 700_000
    enforced_limit_mw: int = 700_000
    temp_c: int = 45
    mem_used: int = 40 * 1024**3
    mem_total: int = 80 * 1024**3
    util_gpu: int = 97
    util_mem: int = 41
    sm_clock_mhz: int = 1980
    mem_clock_mhz: int = 2619
    reasons: int = 0x4
    power_violation_ns: int = 2_500_000_000
    thermal_violation_ns: int = 500_000_000
    pstate: int = 0
    pids: list[int] = field(default_factory=lambda: [4242, 4343])
    mem_clocks_mhz: list[int] = field(default_factory=lambda: [2619])
    graphics_clocks_mhz: list[int] = field(default_factory=lambda: list(range(1980, 209, -15)))
    locked_clocks: tuple[int, int] | None = None
    lost: bool = False
    lost_code: int = pynvml.NVML_ERROR_GPU_IS_LOST
    # newer power controls; None: the field (or call) says NOT_SUPPORTED
    module_power_mw: int | None = 1_012_000
    module_limit_mw: int | None = 1_200_000
    smoothing_enabled: int | None = 1
    smoothing_profile: int | None = 2
    power_profiles: list[int] | None = field(
        default_factory=lambda: [pynvml.NVML_POWER_PROFILE_MAX_P]
    )
    # profiling (GPM); None: the device is not GPM-capable (before Hopper)
    gpm: FakeGpm | None = field(default_factory=FakeGpm)
    # per-process utilization samples: pid -> (smUtil, memUtil)
    proc_util: dict[int, tuple[int, int]] = field(default_factory=dict)
    # MIG devices by index (None: an empty slot); used when mig_mode is 1
    mig: list[FakeMig | None] = field(default_factory=list)
    # health: field values (None: NOT_SUPPORTED), fan, events
    ecc_sbe_vol: int | None = 3
    ecc_dbe_vol: int | None = 0
    ecc_sbe_agg: int | None = 12
    ecc_dbe_agg: int | None = 0
    retired_sbe: int | None = 0
    retired_dbe: int | None = 0
    retired_pending: int | None = 0
    remap_cor: int | None = 1
    remap_unc: int | None = 0
    remap_pending: int | None = 0
    remap_failure: int | None = 0
    pcie_replay: int | None = 5
    nvlink_crc_flit: int | None = 0
    nvlink_crc_data: int | None = 0
    nvlink_replay: int | None = 0
    nvlink_recovery: int | None = 0
    fan_pct: int | None = None  # passively cooled SXM: NOT_SUPPORTED
    supported_events: int = (
        pynvml.nvmlEventTypeXidCriticalError
        | pynvml.nvmlEventTypeSingleBitEccError
        | pynvml.nvmlEventTypeDoubleBitEccError
    )
    events: deque[tuple[int, int, int, int]] = field(default_factory=deque)


@dataclass(frozen=True)
class Handle:
    index: int


@dataclass(frozen=True)
class MigHandle(Handle):
    """A MIG device handle: ``slot`` is its index under the parent GPU ``index``."""

    slot: int


@dataclass(frozen=True)
class GpuInstanceHandle(Handle):
    gi_id: int


class FakeEventSet:
    def __init__(self) -> None:
        self.masks: dict[int, int] = {}  # GPU index -> registered event types
        self.freed = False


# field id -> (FakeGpu attribute, value type); power fields are scoped (below)
_FIELDS: dict[int, tuple[str, int]] = {
    pynvml.NVML_FI_DEV_MEMORY_TEMP: ("mem_temp_c", pynvml.NVML_VALUE_TYPE_UNSIGNED_INT),
    pynvml.NVML_FI_PWR_SMOOTHING_ENABLED: (
        "smoothing_enabled",
        pynvml.NVML_VALUE_TYPE_UNSIGNED_INT,
    ),
    pynvml.NVML_FI_PWR_SMOOTHING_ACTIVE_PRESET_PROFILE: (
        "smoothing_profile",
        pynvml.NVML_VALUE_TYPE_UNSIGNED_INT,
    ),
    **{
        fid: (attr, pynvml.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG)
        for fid, attr in (
            (pynvml.NVML_FI_DEV_ECC_SBE_VOL_TOTAL, "ecc_sbe_vol"),
            (pynvml.NVML_FI_DEV_ECC_DBE_VOL_TOTAL, "ecc_dbe_vol"),
            (pynvml.NVML_FI_DEV_ECC_SBE_AGG_TOTAL, "ecc_sbe_agg"),
            (pynvml.NVML_FI_DEV_ECC_DBE_AGG_TOTAL, "ecc_dbe_agg"),
            (pynvml.NVML_FI_DEV_RETIRED_SBE, "retired_sbe"),
            (pynvml.NVML_FI_DEV_RETIRED_DBE, "retired_dbe"),
            (pynvml.NVML_FI_DEV_RETIRED_PENDING, "retired_pending"),
            (pynvml.NVML_FI_DEV_REMAPPED_COR, "remap_cor"),
            (pynvml.NVML_FI_DEV_REMAPPED_UNC, "remap_unc"),
            (pynvml.NVML_FI_DEV_REMAPPED_PENDING, "remap_pending"),
            (pynvml.NVML_FI_DEV_REMAPPED_FAILURE, "remap_failure"),
            (pynvml.NVML_FI_DEV_PCIE_REPLAY_COUNTER, "pcie_replay"),
            (pynvml.NVML_FI_DEV_NVLINK_CRC_FLIT_ERROR_COUNT_TOTAL, "nvlink_crc_flit"),
            (pynvml.NVML_FI_DEV_NVLINK_CRC_DATA_ERROR_COUNT_TOTAL, "nvlink_crc_data"),
            (pynvml.NVML_FI_DEV_NVLINK_REPLAY_ERROR_COUNT_TOTAL, "nvlink_replay"),
            (pynvml.NVML_FI_DEV_NVLINK_RECOVERY_ERROR_COUNT_TOTAL, "nvlink_recovery"),
        )
    },
}
_SCOPED: dict[tuple[int, int], str] = {
    (pynvml.NVML_FI_DEV_POWER_INSTANT, pynvml.NVML_POWER_SCOPE_GPU): "power_instant_mw",
    (pynvml.NVML_FI_DEV_POWER_INSTANT, pynvml.NVML_POWER_SCOPE_MODULE): "module_power_mw",
    (pynvml.NVML_FI_DEV_POWER_CURRENT_LIMIT, pynvml.NVML_POWER_SCOPE_MODULE): "module_limit_mw",
}


class FakeNvml(types.SimpleNamespace):
    """The subset of ``pynvml`` the NVML backend uses, plus controls for tests."""

    def __init__(self, gpus: list[FakeGpu] | None = None) -> None:
        super().__init__(**_EXPORTED)
        self.NVMLError = pynvml.NVMLError
        self.gpus = gpus if gpus is not None else [FakeGpu()]
        self.calls: list[tuple[str, int | None, tuple[Any, ...]]] = []
        self.init_calls = 0
        self.shutdown_calls = 0
        self._initialised = False
        self._failures: dict[tuple[str, int | None], int] = {}
        self._field_failures: dict[tuple[int, int], int] = {}
        self._gpm_samples: dict[int, Any] = {}  # address -> the sample's pointer (kept alive)
        self._gpm_taken: dict[int, tuple[tuple[int, int | None], Any]] = {}
        self.event_sets: list[FakeEventSet] = []
        self._util_clock_us = 1_000_000
        for name in dir(self):
            if name.startswith("nvml"):
                impl = getattr(self, name)
                if callable(impl):
                    setattr(self, name, self._wrap(name, impl))

    # -- controls ----------------------------------------------------------
    def fail(self, fn: str, *, code: int, gpu: int | None = None) -> None:
        """Make ``fn`` fail with ``code`` on ``gpu`` (None: on every GPU)."""
        self._failures[(fn, gpu)] = code

    def fail_field(self, field_id: int, *, code: int, gpu: int) -> None:
        """Make one field of ``nvmlDeviceGetFieldValues`` return ``code``."""
        self._field_failures[(field_id, gpu)] = code

    def clear(self) -> None:
        self._failures.clear()
        self._field_failures.clear()

    def hide(self, fn: str) -> None:
        """Remove a function, as an older pynvml would lack it."""
        setattr(self, fn, None)

    def lose(self, gpu: int, *, code: int = pynvml.NVML_ERROR_GPU_IS_LOST) -> None:
        self.gpus[gpu].lost = True
        self.gpus[gpu].lost_code = code

    def reset_energy(self, gpu: int, to_mj: int = 0) -> None:
        self.gpus[gpu].energy_mj = to_mj

    def xid(self, gpu: int, code: int, *, gi: int = NOT_MIG, ci: int = NOT_MIG) -> None:
        """An XID (critical error) event on ``gpu``, for the event sets it is registered in."""
        self.gpus[gpu].events.append((XID, code, gi, ci))

    @property
    def gpm_samples_live(self) -> int:
        """GPM samples allocated and not freed (a leak check)."""
        return len(self._gpm_samples)

    @property
    def set_calls(self) -> list[tuple[str, int | None, tuple[Any, ...]]]:
        return [c for c in self.calls if c[0].startswith(_SETTERS)]

    def calls_to(self, fn: str) -> list[tuple[int | None, tuple[Any, ...]]]:
        return [(gpu, args) for name, gpu, args in self.calls if name == fn]

    # -- machinery ---------------------------------------------------------
    def _wrap(self, name: str, impl: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any) -> Any:
            gpu = args[0].index if args and isinstance(args[0], Handle) else None
            self.calls.append((name, gpu, args[1:] if gpu is not None else args))
            if name != "nvmlInit" and not self._initialised:
                raise pynvml.NVMLError(pynvml.NVML_ERROR_UNINITIALIZED)
            if gpu is not None and self.gpus[gpu].lost:
                raise pynvml.NVMLError(self.gpus[gpu].lost_code)
            code = self._failures.get((name, gpu), self._failures.get((name, None)))
            if code is not None:
                raise pynvml.NVMLError(code)
            return impl(*args)

        return call

    def _gpu(self, handle: Handle) -> FakeGpu:
        return self.gpus[handle.index]

    def _mig(self, h: Handle) -> FakeMig:
        if not isinstance(h, MigHandle):
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        m = self._gpu(h).mig[h.slot]
        assert m is not None
        return m

    def _instance(self, h: Handle, gi_id: int) -> FakeMig:
        for m in self._gpu(h).mig:
            if m is not None and m.gi_id == gi_id:
                return m
        raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_FOUND)

    # -- pynvml API ----------------------------------------------------------
    def nvmlInit(self) -> None:
        self.init_calls += 1
        self._initialised = True

    def nvmlShutdown(self) -> None:
        self.shutdown_calls += 1
        self._initialised = False

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> Handle:
        if self.gpus[index].lost:
            raise pynvml.NVMLError(self.gpus[index].lost_code)
        return Handle(index)

    def nvmlDeviceGetUUID(self, h: Handle) -> str:
        if isinstance(h, MigHandle):
            return self._mig(h).uuid
        return self._gpu(h).uuid

    def nvmlDeviceGetName(self, h: Handle) -> str:
        return self._gpu(h).name

    def nvmlDeviceGetPciInfo(self, h: Handle) -> Any:
        return pynvml.nvmlPciInfo_t(busId=self._gpu(h).bus_id)

    def nvmlDeviceGetMigMode(self, h: Handle) -> list[int]:
        mode = self._gpu(h).mig_mode
        if mode is None:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return [mode, mode]

    def nvmlDeviceGetFieldValues(self, h: Handle, field_ids: list[Any]) -> list[Any]:
        """One ``c_nvmlFieldValue_t`` per id; an id may be ``(fieldId, scopeId)``, as in pynvml."""
        g = self._gpu(h)
        out = []
        for entry in field_ids:
            fid, scope = entry if isinstance(entry, tuple) else (entry, 0)
            fv = pynvml.c_nvmlFieldValue_t()
            fv.fieldId, fv.scopeId = fid, scope
            vtype = pynvml.NVML_VALUE_TYPE_UNSIGNED_INT
            if (fid, scope) in _SCOPED:
                value = getattr(g, _SCOPED[(fid, scope)])
            elif fid in _FIELDS and scope == 0:
                attr, vtype = _FIELDS[fid]
                value = getattr(g, attr)
            else:
                value = None
            code = self._field_failures.get((fid, h.index))
            if code is None:
                code = pynvml.NVML_ERROR_NOT_SUPPORTED if value is None else pynvml.NVML_SUCCESS
            fv.nvmlReturn = code
            if code == pynvml.NVML_SUCCESS:
                fv.valueType = vtype
                if vtype == pynvml.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG:
                    fv.value.ullVal = value
                else:
                    fv.value.uiVal = value
            out.append(fv)
        return out

    def nvmlDeviceGetPowerUsage(self, h: Handle) -> int:
        return self._gpu(h).power_usage_mw

    def nvmlDeviceGetTotalEnergyConsumption(self, h: Handle) -> int:
        return self._gpu(h).energy_mj

    def nvmlDeviceGetPowerManagementLimit(self, h: Handle) -> int:
        return self._gpu(h).limit_mw

    def nvmlDeviceGetPowerManagementDefaultLimit(self, h: Handle) -> int:
        return self._gpu(h).default_limit_mw

    def nvmlDeviceGetPowerManagementLimitConstraints(self, h: Handle) -> list[int]:
        g = self._gpu(h)
        return [g.min_limit_mw, g.max_limit_mw]

    def nvmlDeviceGetEnforcedPowerLimit(self, h: Handle) -> int:
        return self._gpu(h).enforced_limit_mw

    def nvmlDeviceGetTemperature(self, h: Handle, sensor: int) -> int:
        assert sensor == pynvml.NVML_TEMPERATURE_GPU
        return self._gpu(h).temp_c

    def nvmlDeviceGetMemoryInfo(self, h: Handle) -> Any:
        if isinstance(h, MigHandle):
            m = self._mig(h)
            free = m.mem_total - m.mem_used
            return pynvml.c_nvmlMemory_t(total=m.mem_total, free=free, used=m.mem_used)
        g = self._gpu(h)
        return pynvml.c_nvmlMemory_t(
            total=g.mem_total, free=g.mem_total - g.mem_used, used=g.mem_used
        )

    def nvmlDeviceGetUtilizationRates(self, h: Handle) -> Any:
        g = self._gpu(h)
        return pynvml.c_nvmlUtilization_t(gpu=g.util_gpu, memory=g.util_mem)

    def nvmlDeviceGetClockInfo(self, h: Handle, clock_type: int) -> int:
        g = self._gpu(h)
        if clock_type == pynvml.NVML_CLOCK_SM:
            return g.sm_clock_mhz
        if clock_type == pynvml.NVML_CLOCK_MEM:
            return g.mem_clock_mhz
        raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)

    def nvmlDeviceGetCurrentClocksEventReasons(self, h: Handle) -> int:
        return self._gpu(h).reasons

    def nvmlDeviceGetCurrentClocksThrottleReasons(self, h: Handle) -> int:
        return self._gpu(h).reasons

    def nvmlDeviceGetViolationStatus(self, h: Handle, policy: int) -> Any:
        g = self._gpu(h)
        ns = {
            pynvml.NVML_PERF_POLICY_POWER: g.power_violation_ns,
            pynvml.NVML_PERF_POLICY_THERMAL: g.thermal_violation_ns,
        }[policy]
        return pynvml.c_nvmlViolationTime_t(referenceTime=0, violationTime=ns)

    def nvmlDeviceGetPerformanceState(self, h: Handle) -> int:
        return self._gpu(h).pstate

    def nvmlDeviceGetComputeRunningProcesses(self, h: Handle) -> list[Any]:
        """Processes of one MIG device, of every MIG device (parent in MIG mode), or the GPU's."""
        g = self._gpu(h)

        def proc(pid: int, gi: int = NOT_MIG, ci: int = NOT_MIG) -> Any:
            info = pynvml.c_nvmlProcessInfo_v3_t(
                pid=pid, usedGpuMemory=1 << 30, gpuInstanceId=gi, computeInstanceId=ci
            )
            return pynvml.nvmlStructToFriendlyObject(info)

        if isinstance(h, MigHandle):
            m = self._mig(h)
            return [proc(p, m.gi_id, m.ci_id) for p in m.pids]
        if g.mig_mode == pynvml.NVML_DEVICE_MIG_ENABLE:
            return [proc(p, m.gi_id, m.ci_id) for m in g.mig if m is not None for p in m.pids]
        return [proc(p) for p in g.pids]

    def nvmlDeviceGetProcessUtilization(self, h: Handle, last_seen_us: int) -> list[Any]:
        """Samples newer than ``last_seen_us``; none: NOT_FOUND (as NVML says it)."""
        if isinstance(h, MigHandle):
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        g = self._gpu(h)
        self._util_clock_us += 1_000_000
        if not g.proc_util or last_seen_us >= self._util_clock_us:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_FOUND)
        return [
            pynvml.c_nvmlProcessUtilizationSample_t(
                pid=pid, timeStamp=self._util_clock_us, smUtil=sm, memUtil=mem
            )
            for pid, (sm, mem) in g.proc_util.items()
        ]

    # -- MIG -------------------------------------------------------------------
    def nvmlDeviceGetMaxMigDeviceCount(self, h: Handle) -> int:
        return 7 if self._gpu(h).mig_mode == pynvml.NVML_DEVICE_MIG_ENABLE else 0

    def nvmlDeviceGetMigDeviceHandleByIndex(self, h: Handle, index: int) -> Handle:
        g = self._gpu(h)
        if g.mig_mode != pynvml.NVML_DEVICE_MIG_ENABLE:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        if index >= len(g.mig) or g.mig[index] is None:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_FOUND)
        return MigHandle(h.index, index)

    def nvmlDeviceGetGpuInstanceId(self, h: Handle) -> int:
        return self._mig(h).gi_id

    def nvmlDeviceGetComputeInstanceId(self, h: Handle) -> int:
        return self._mig(h).ci_id

    def nvmlDeviceGetAttributes(self, h: Handle) -> Any:
        m = self._mig(h)
        return pynvml.c_nvmlDeviceAttributes(
            multiprocessorCount=m.sm_count,
            gpuInstanceSliceCount=m.gi_slices,
            computeInstanceSliceCount=m.ci_slices,
            memorySizeMB=m.mem_total // 1024**2,
        )

    def nvmlDeviceGetGpuInstanceById(self, h: Handle, gi_id: int) -> Handle:
        self._instance(h, gi_id)
        return GpuInstanceHandle(h.index, gi_id)

    def nvmlGpuInstanceGetInfo(self, gi: GpuInstanceHandle) -> Any:
        m = self._instance(gi, gi.gi_id)
        return pynvml.c_nvmlGpuInstanceInfo_t(id=m.gi_id, profileId=m.profile_id)

    def nvmlDeviceGetGpuInstanceProfileInfoById(self, h: Handle, profile_id: int) -> Any:
        for m in self._gpu(h).mig:
            if m is not None and m.profile_id == profile_id:
                info = pynvml.c_nvmlGpuInstanceProfileInfo_v2_t()
                info.id = profile_id
                info.sliceCount = m.gi_slices
                info.multiprocessorCount = m.sm_count
                info.memorySizeMB = m.mem_total // 1024**2
                info.name = m.profile_name
                return info
        raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)

    # -- GPM -------------------------------------------------------------------
    def nvmlGpmQueryDeviceSupport(self, h: Handle) -> Any:
        support = pynvml.c_nvmlGpmSupport_t()
        support.version = pynvml.NVML_GPM_SUPPORT_VERSION
        support.isSupportedDevice = int(self._gpu(h).gpm is not None)
        return support

    def nvmlGpmSampleAlloc(self) -> Any:
        sample = pynvml.c_nvmlGpmSample_t(pynvml.struct_c_nvmlGpmSample_t())
        self._gpm_samples[ctypes.addressof(sample.contents)] = sample
        return sample

    def nvmlGpmSampleFree(self, sample: Any) -> None:
        addr = ctypes.addressof(sample.contents)
        if self._gpm_samples.pop(addr, None) is None:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        self._gpm_taken.pop(addr, None)

    def _take(self, sample: Any, source: tuple[int, int | None], gpm: FakeGpm | None) -> Any:
        addr = ctypes.addressof(sample.contents)
        if addr not in self._gpm_samples:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        if gpm is None:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        self._gpm_taken[addr] = (source, gpm.snapshot())
        return sample

    def nvmlGpmSampleGet(self, h: Handle, sample: Any) -> Any:
        return self._take(sample, (h.index, None), self._gpu(h).gpm)

    def nvmlGpmMigSampleGet(self, h: Handle, gi_id: int, sample: Any) -> Any:
        return self._take(sample, (h.index, gi_id), self._instance(h, gi_id).gpm)

    def nvmlGpmMetricsGet(self, mg: Any) -> Any:
        if mg.version != pynvml.NVML_GPM_METRICS_GET_VERSION:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_ARGUMENT_VERSION_MISMATCH)
        a = self._gpm_taken.get(ctypes.addressof(mg.sample1.contents))
        b = self._gpm_taken.get(ctypes.addressof(mg.sample2.contents))
        if a is None or b is None or a[0] != b[0]:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        (t1, tot1, _), (t2, tot2, rated) = a[1], b[1]
        if t2 <= t1:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        for i in range(mg.numMetrics):
            m = mg.metrics[i]
            if m.metricId in rated:
                m.nvmlReturn = pynvml.NVML_SUCCESS
                m.value = (tot2.get(m.metricId, 0.0) - tot1.get(m.metricId, 0.0)) / (t2 - t1)
            else:
                m.nvmlReturn = pynvml.NVML_ERROR_NOT_SUPPORTED
        return mg

    # -- events and health -------------------------------------------------------
    def nvmlDeviceGetSupportedEventTypes(self, h: Handle) -> int:
        return self._gpu(h).supported_events

    def nvmlEventSetCreate(self) -> FakeEventSet:
        es = FakeEventSet()
        self.event_sets.append(es)
        return es

    def nvmlDeviceRegisterEvents(self, h: Handle, event_types: int, es: FakeEventSet) -> None:
        if event_types & ~self._gpu(h).supported_events:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        es.masks[h.index] = es.masks.get(h.index, 0) | event_types

    def nvmlEventSetWait_v2(self, es: FakeEventSet, timeout_ms: int) -> Any:
        for index, mask in es.masks.items():
            g = self.gpus[index]
            if g.lost:
                raise pynvml.NVMLError(g.lost_code)
            for k, (etype, data, gi, ci) in enumerate(g.events):
                if etype & mask:
                    del g.events[k]
                    return pynvml.c_nvmlEventData_t(
                        eventType=etype, eventData=data, gpuInstanceId=gi, computeInstanceId=ci
                    )
        raise pynvml.NVMLError(pynvml.NVML_ERROR_TIMEOUT)

    def nvmlEventSetFree(self, es: FakeEventSet) -> None:
        es.freed = True

    def nvmlDeviceGetFanSpeed(self, h: Handle) -> int:
        pct = self._gpu(h).fan_pct
        if pct is None:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return pct

    def nvmlDeviceWorkloadPowerProfileGetCurrentProfiles(self, h: Handle, ref: Any) -> int:
        """Fills the ``c_nvmlWorkloadPowerProfileCurrentProfiles_v1_t`` passed by reference."""
        g = self._gpu(h)
        if g.power_profiles is None:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        info = ref._obj  # what ctypes.byref wraps
        if info.version != pynvml.nvmlWorkloadPowerProfileCurrentProfiles_v1:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_ARGUMENT_VERSION_MISMATCH)
        for p in g.power_profiles:
            info.enforcedProfilesMask.mask[p // 32] |= 1 << (p % 32)
            info.requestedProfilesMask.mask[p // 32] |= 1 << (p % 32)
        return int(pynvml.NVML_SUCCESS)

    def nvmlDeviceGetSupportedMemoryClocks(self, h: Handle) -> list[int]:
        return list(self._gpu(h).mem_clocks_mhz)

    def nvmlDeviceGetSupportedGraphicsClocks(self, h: Handle, mem_mhz: int) -> list[int]:
        return list(self._gpu(h).graphics_clocks_mhz)

    def nvmlDeviceSetPowerManagementLimit(self, h: Handle, limit_mw: int) -> None:
        g = self._gpu(h)
        if not g.min_limit_mw <= limit_mw <= g.max_limit_mw:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        g.limit_mw = g.enforced_limit_mw = limit_mw

    def nvmlDeviceSetGpuLockedClocks(self, h: Handle, min_mhz: int, max_mhz: int) -> None:
        self._gpu(h).locked_clocks = (min_mhz, max_mhz)

    def nvmlDeviceResetGpuLockedClocks(self, h: Handle) -> None:
        self._gpu(h).locked_clocks = None
