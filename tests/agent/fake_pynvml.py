"""A stand-in for the ``pynvml`` module: per-GPU state, error injection, a call log.

It reuses the real ``pynvml``'s ``NVMLError`` class, constants and ctypes
structures (importing ``pynvml`` needs no driver), so the backend's error table
and unit conversions are exercised against the real codes and layouts.

    fake = FakeNvml([FakeGpu(), FakeGpu(power_instant_mw=None)])
    fake.fail("nvmlDeviceGetTotalEnergyConsumption", gpu=1, code=NVML_ERROR_NOT_SUPPORTED)
    fake.lose(0)               # every call on GPU 0 now says GPU_IS_LOST
    fake.reset_energy(1)       # driver reload: the energy counter restarts
    fake.set_calls             # every setter call, for "nothing was set" assertions
"""

from __future__ import annotations

import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pynvml

# re-export the real constants and error classes, as ``pynvml`` has them
_EXPORTED = {
    name: getattr(pynvml, name)
    for name in dir(pynvml)
    if name.startswith(("NVML_", "NVMLError", "nvmlClocks"))
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

_SETTERS = ("nvmlDeviceSet", "nvmlDeviceReset")


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


@dataclass(frozen=True)
class Handle:
    index: int


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

    def nvmlDeviceGetFieldValues(self, h: Handle, field_ids: list[int]) -> list[Any]:
        g = self._gpu(h)
        known: dict[int, int | None] = {
            pynvml.NVML_FI_DEV_POWER_INSTANT: g.power_instant_mw,
            pynvml.NVML_FI_DEV_MEMORY_TEMP: g.mem_temp_c,
        }
        out = []
        for fid in field_ids:
            fv = pynvml.c_nvmlFieldValue_t()
            fv.fieldId = fid
            value = known.get(fid)
            code = self._field_failures.get((fid, h.index))
            if code is None:
                code = pynvml.NVML_ERROR_NOT_SUPPORTED if value is None else pynvml.NVML_SUCCESS
            fv.nvmlReturn = code
            if code == pynvml.NVML_SUCCESS:
                fv.valueType = pynvml.NVML_VALUE_TYPE_UNSIGNED_INT
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
        return [types.SimpleNamespace(pid=p, usedGpuMemory=None) for p in self._gpu(h).pids]

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
