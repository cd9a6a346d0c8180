"""The NVML backend: the one module in dcenergy that touches ``pynvml``.

Nothing happens at import: ``pynvml`` is imported and ``nvmlInit`` called in
``NvmlBackend.open``; ``nvmlShutdown`` in ``close``. The module object is a
constructor argument, so tests pass a fake (``tests/agent/fake_pynvml.py``).

Every NVML call goes through ``_Nvml.call``, which maps an ``NVMLError`` code
through ``_ERROR_TABLE`` to the project's exception, raised ``from`` the
original. Units are converted here, once: mW → W, mJ → J, ns → s.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Final, TypeVar

from agent.devices.base import (
    DeviceBackend,
    EnergyCounter,
    GpuDevice,
    GpuIdentity,
    GpuSample,
    PowerLimits,
    check_clock_range,
    check_power_limit,
)
from dcenergy.errors import DeviceError, DeviceLost, DeviceNotSupported, DevicePermission

log = logging.getLogger(__name__)

T = TypeVar("T")

# The one table from NVML error codes (by constant name, resolved against the
# module in use) to project exceptions. Codes not listed become DeviceError.
_ERROR_TABLE: Final[dict[str, type[DeviceError]]] = {
    "NVML_ERROR_NOT_SUPPORTED": DeviceNotSupported,
    "NVML_ERROR_FUNCTION_NOT_FOUND": DeviceNotSupported,
    "NVML_ERROR_NO_PERMISSION": DevicePermission,
    "NVML_ERROR_GPU_IS_LOST": DeviceLost,
    "NVML_ERROR_RESET_REQUIRED": DeviceLost,
    "NVML_ERROR_DRIVER_NOT_LOADED": DeviceLost,
    "NVML_ERROR_GPU_NOT_FOUND": DeviceLost,
}

# nvmlValueType_t → the member of the nvmlValue_t union that holds the value.
_VALUE_MEMBERS: Final[dict[str, str]] = {
    "NVML_VALUE_TYPE_DOUBLE": "dVal",
    "NVML_VALUE_TYPE_UNSIGNED_INT": "uiVal",
    "NVML_VALUE_TYPE_UNSIGNED_LONG": "ulVal",
    "NVML_VALUE_TYPE_UNSIGNED_LONG_LONG": "ullVal",
    "NVML_VALUE_TYPE_SIGNED_LONG_LONG": "sllVal",
    "NVML_VALUE_TYPE_SIGNED_INT": "siVal",
    "NVML_VALUE_TYPE_UNSIGNED_SHORT": "usVal",
}

_PSTATE_UNKNOWN: Final = 32


def _text(value: object) -> str:
    """NVML strings arrive as ``bytes`` or ``str`` depending on the pynvml version."""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)


class _Nvml:
    """The pynvml module in use, with the one query function and the error table."""

    def __init__(self, module: Any) -> None:
        self.m = module
        self._classes: dict[int, type[DeviceError]] = {
            getattr(module, name): cls
            for name, cls in _ERROR_TABLE.items()
            if hasattr(module, name)
        }
        self._unknown: int | None = getattr(module, "NVML_ERROR_UNKNOWN", None)
        self._members: dict[int, str] = {
            getattr(module, name): member
            for name, member in _VALUE_MEMBERS.items()
            if hasattr(module, name)
        }

    def error(self, code: int, what: str, gpu: int | None) -> DeviceError:
        """The project exception for an NVML return code (not raised)."""
        cls = self._classes.get(code, DeviceError)
        reason = self._describe(code)
        where = f"GPU {gpu}: " if gpu is not None else ""
        return cls(f"{where}{what}: {reason} (NVML code {code})", gpu=gpu)

    def is_unknown(self, exc: DeviceError) -> bool:
        """Whether ``exc`` came from NVML_ERROR_UNKNOWN (a lost GPU sometimes says only that)."""
        cause = exc.__cause__
        return (
            type(exc) is DeviceError
            and isinstance(cause, self.m.NVMLError)
            and getattr(cause, "value", None) == self._unknown
        )

    def call(self, fn_name: str, *args: Any, gpu: int | None) -> Any:
        """Call one NVML function, mapping its failure to a project exception."""
        fn = getattr(self.m, fn_name, None)
        if fn is None:
            where = f"GPU {gpu}: " if gpu is not None else ""
            raise DeviceNotSupported(f"{where}{fn_name} is not in this pynvml", gpu=gpu)
        try:
            return fn(*args)
        except self.m.NVMLError as e:
            raise self.error(getattr(e, "value", -1), fn_name, gpu) from e

    def field_value(self, fv: Any) -> float:
        """The number held in an ``nvmlFieldValue_t`` (whose return code was SUCCESS)."""
        member = self._members.get(int(fv.valueType), "uiVal")
        return float(getattr(fv.value, member))

    def _describe(self, code: int) -> str:
        try:
            return str(self.m.NVMLError(code))
        except Exception:  # a code this pynvml cannot name; the number says enough
            return "NVML error"


class NvmlGpu(GpuDevice):
    """One GPU reached through NVML. Constant facts are read once, at open."""

    def __init__(
        self,
        nvml: _Nvml,
        handle: Any,
        identity: GpuIdentity,
        limits: PowerLimits | None,
    ) -> None:
        self._nvml = nvml
        self._handle = handle
        self.identity = identity
        self._limits = limits
        self._energy = EnergyCounter()
        self._lost = False
        self._unsupported: set[str] = set()  # fields NVML said it cannot give: not asked again
        self._logged: set[str] = set()  # (field, problem) keys already logged
        self._throttle_fn: str | None = None
        self._sm_clocks: list[int] | None = None
        self.read_errors = 0  # non-fatal failures other than "not supported"

    # -- construction ------------------------------------------------------
    @classmethod
    def discover(cls, nvml: _Nvml, index: int) -> NvmlGpu:
        """Read the identity and the constant limits of GPU ``index``."""
        handle = nvml.call("nvmlDeviceGetHandleByIndex", index, gpu=index)

        def q(fn: str, *args: Any) -> Any:
            return nvml.call(fn, handle, *args, gpu=index)

        pci = q("nvmlDeviceGetPciInfo")
        try:
            current_mig = q("nvmlDeviceGetMigMode")[0]
            mig: bool | None = current_mig == getattr(nvml.m, "NVML_DEVICE_MIG_ENABLE", 1)
        except (DeviceNotSupported, DevicePermission):
            mig = None
        identity = GpuIdentity(
            index=index,
            uuid=_text(q("nvmlDeviceGetUUID")),
            name=_text(q("nvmlDeviceGetName")),
            pci_bus_id=_text(pci.busId),
            mig_mode=mig,
        )
        try:
            min_mw, max_mw = q("nvmlDeviceGetPowerManagementLimitConstraints")
            default_mw = q("nvmlDeviceGetPowerManagementDefaultLimit")
            limits: PowerLimits | None = PowerLimits(
                min_w=min_mw / 1000.0, max_w=max_mw / 1000.0, default_w=default_mw / 1000.0
            )
        except (DeviceNotSupported, DevicePermission) as e:
            log.info("GPU %d: power limits not readable, left out: %s", index, e)
            limits = None
        return cls(nvml, handle, identity, limits)

    # -- the query helper --------------------------------------------------
    def _q(self, fn_name: str, *args: Any) -> Any:
        """Call ``fn_name(handle, *args)``; a lost GPU is marked lost and raises DeviceLost."""
        if self._lost:
            raise DeviceLost(f"GPU {self.identity.index} is lost", gpu=self.identity.index)
        try:
            return self._nvml.call(fn_name, self._handle, *args, gpu=self.identity.index)
        except DeviceLost:
            self._lost = True
            raise
        except DeviceError as e:
            if self._nvml.is_unknown(e) and self._probe_lost():
                raise DeviceLost(str(e), gpu=self.identity.index) from e.__cause__
            raise

    def _probe_lost(self) -> bool:
        """After an UNKNOWN error, ask a cheap question to tell 'lost' from a glitch."""
        try:
            self._nvml.call("nvmlDeviceGetUUID", self._handle, gpu=self.identity.index)
        except DeviceLost:
            self._lost = True
            return True
        except DeviceError:
            return False
        return False

    def _log_once(self, key: str, level: int, msg: str, *args: object) -> None:
        if key not in self._logged:
            self._logged.add(key)
            log.log(level, msg, *args)

    def _read(self, field: str, fn: Callable[[], T]) -> T | None:
        """Read one field; unsupported, forbidden or failing gives None (logged once).

        ``DeviceLost`` passes through: ``sample`` turns it into a lost sample.
        """
        if field in self._unsupported:
            return None
        try:
            return fn()
        except DeviceLost:
            raise
        except DeviceError as e:
            self._note_failure(field, e)
        return None

    def _note_failure(self, field: str, e: DeviceError) -> None:
        """Classify a non-fatal read failure: remember 'unsupported', count the rest; log once."""
        idx = self.identity.index
        if isinstance(e, DeviceNotSupported):
            self._unsupported.add(field)
            self._log_once(
                field, logging.INFO, "GPU %d: %s not supported, left out: %s", idx, field, e
            )
        elif isinstance(e, DevicePermission):
            self._log_once(
                field + ":perm",
                logging.WARNING,
                "GPU %d: no permission to read %s: %s",
                idx,
                field,
                e,
            )
        else:
            self.read_errors += 1
            self._log_once(
                f"{field}:{e}", logging.WARNING, "GPU %d: reading %s failed: %s", idx, field, e
            )

    # -- reading -----------------------------------------------------------
    @property
    def lost(self) -> bool:
        return self._lost

    def sample(self) -> GpuSample:
        """Read every field; a lost GPU gives ``lost=True`` and nothing else."""
        if self._lost:
            return GpuSample(self.identity, lost=True)
        try:
            return self._read_all()
        except DeviceLost as e:
            self._lost = True
            self._log_once("lost", logging.ERROR, "GPU %d is lost: %s", self.identity.index, e)
            return GpuSample(self.identity, lost=True)

    def _read_all(self) -> GpuSample:
        m = self._nvml.m
        s = GpuSample(self.identity)
        instant_w, s.mem_temp_c = self._read_field_values()
        s.power_w = instant_w
        if s.power_w is None:
            s.power_w = self._read("power_w", lambda: self._q("nvmlDeviceGetPowerUsage") / 1000.0)
        s.energy_j = self._read(
            "energy_j",
            lambda: self._energy.update(self._q("nvmlDeviceGetTotalEnergyConsumption") / 1000.0),
        )
        s.energy_resets = self._energy.resets if s.energy_j is not None else None
        s.power_limit_w = self._read(
            "power_limit_w", lambda: self._q("nvmlDeviceGetPowerManagementLimit") / 1000.0
        )
        s.power_limit_enforced_w = self._read(
            "power_limit_enforced_w", lambda: self._q("nvmlDeviceGetEnforcedPowerLimit") / 1000.0
        )
        if self._limits is not None:
            s.power_limit_min_w = self._limits.min_w
            s.power_limit_max_w = self._limits.max_w
            s.power_limit_default_w = self._limits.default_w
        s.temp_c = self._read(
            "temp_c", lambda: float(self._q("nvmlDeviceGetTemperature", m.NVML_TEMPERATURE_GPU))
        )
        mem = self._read("mem_bytes", lambda: self._q("nvmlDeviceGetMemoryInfo"))
        if mem is not None:
            s.mem_used_bytes, s.mem_total_bytes = int(mem.used), int(mem.total)
        util = self._read("util_pct", lambda: self._q("nvmlDeviceGetUtilizationRates"))
        if util is not None:
            s.util_gpu_pct, s.util_mem_pct = float(util.gpu), float(util.memory)
        s.sm_clock_mhz = self._read(
            "sm_clock_mhz", lambda: float(self._q("nvmlDeviceGetClockInfo", m.NVML_CLOCK_SM))
        )
        s.mem_clock_mhz = self._read(
            "mem_clock_mhz", lambda: float(self._q("nvmlDeviceGetClockInfo", m.NVML_CLOCK_MEM))
        )
        s.throttle_reasons = self._read("throttle_reasons", self._read_throttle)
        s.power_violation_s = self._read(
            "power_violation_s", lambda: self._violation_s(m.NVML_PERF_POLICY_POWER)
        )
        s.thermal_violation_s = self._read(
            "thermal_violation_s", lambda: self._violation_s(m.NVML_PERF_POLICY_THERMAL)
        )
        pstate = self._read("pstate", lambda: int(self._q("nvmlDeviceGetPerformanceState")))
        s.pstate = None if pstate == _PSTATE_UNKNOWN else pstate
        return s

    def _read_field_values(self) -> tuple[float | None, float | None]:
        """POWER_INSTANT (W) and MEMORY_TEMP (°C) in one call; None for each one unsupported."""
        m = self._nvml.m
        names = ("power_instant", "mem_temp_c")
        if all(n in self._unsupported for n in names):
            return None, None
        ids = (m.NVML_FI_DEV_POWER_INSTANT, m.NVML_FI_DEV_MEMORY_TEMP)
        values = self._read("field_values", lambda: self._q("nvmlDeviceGetFieldValues", list(ids)))
        if values is None:
            return None, None
        out: list[float | None] = []
        for name, fv in zip(names, values, strict=True):
            code = int(fv.nvmlReturn)
            if code == m.NVML_SUCCESS:
                out.append(self._nvml.field_value(fv))
                continue
            err = self._nvml.error(code, f"field {name}", self.identity.index)
            if isinstance(err, DeviceLost):
                raise err
            if name == "power_instant" and isinstance(err, DeviceNotSupported):
                self._unsupported.add(name)
                self._log_once(
                    name,
                    logging.INFO,
                    "GPU %d: POWER_INSTANT not supported, using nvmlDeviceGetPowerUsage",
                    self.identity.index,
                )
            else:
                self._note_failure(name, err)
            out.append(None)
        power_mw, mem_temp = out
        return (None if power_mw is None else power_mw / 1000.0), mem_temp

    def _read_throttle(self) -> int:
        """Clocks-event reasons: the newer call where the driver has it, else the older one."""
        if self._throttle_fn is not None:
            return int(self._q(self._throttle_fn))
        try:
            value = int(self._q("nvmlDeviceGetCurrentClocksEventReasons"))
            self._throttle_fn = "nvmlDeviceGetCurrentClocksEventReasons"
        except DeviceNotSupported:
            value = int(self._q("nvmlDeviceGetCurrentClocksThrottleReasons"))
            self._throttle_fn = "nvmlDeviceGetCurrentClocksThrottleReasons"
        return value

    def _violation_s(self, policy: int) -> float:
        return float(self._q("nvmlDeviceGetViolationStatus", policy).violationTime) / 1e9

    def power_limits(self) -> PowerLimits:
        if self._limits is None:
            raise DeviceNotSupported(
                f"GPU {self.identity.index}: power limits are not readable", gpu=self.identity.index
            )
        return self._limits

    def power_limit_w(self) -> float:
        return float(self._q("nvmlDeviceGetPowerManagementLimit")) / 1000.0

    def enforced_power_limit_w(self) -> float:
        return float(self._q("nvmlDeviceGetEnforcedPowerLimit")) / 1000.0

    def supported_sm_clocks_mhz(self) -> list[int]:
        """Graphics clocks supported at any memory clock, ascending (cached)."""
        if self._sm_clocks is None:
            clocks: set[int] = set()
            for mem_mhz in self._q("nvmlDeviceGetSupportedMemoryClocks"):
                clocks.update(
                    int(c) for c in self._q("nvmlDeviceGetSupportedGraphicsClocks", mem_mhz)
                )
            self._sm_clocks = sorted(clocks)
        return list(self._sm_clocks)

    def compute_pids(self) -> list[int]:
        return [int(p.pid) for p in self._q("nvmlDeviceGetComputeRunningProcesses")]

    # -- setting -----------------------------------------------------------
    def set_power_limit_w(self, watts: float) -> None:
        """Set the limit in mW; the range is checked here first (never clamped)."""
        check_power_limit(watts, self.power_limits(), gpu=self.identity.index)
        self._q("nvmlDeviceSetPowerManagementLimit", round(watts * 1000.0))

    def lock_sm_clocks_mhz(self, min_mhz: int, max_mhz: int) -> None:
        try:
            supported = self.supported_sm_clocks_mhz()
        except (DeviceNotSupported, DevicePermission):
            supported = []  # NVML still refuses a bad range itself
        check_clock_range(min_mhz, max_mhz, supported, gpu=self.identity.index)
        self._q("nvmlDeviceSetGpuLockedClocks", int(min_mhz), int(max_mhz))

    def reset_sm_clocks(self) -> None:
        self._q("nvmlDeviceResetGpuLockedClocks")


class NvmlBackend(DeviceBackend):
    """The GPUs NVML sees. ``nvml_module=None`` means the real ``pynvml``."""

    name = "nvml"

    def __init__(self, nvml_module: Any | None = None) -> None:
        self._module = nvml_module
        self._nvml: _Nvml | None = None
        self._devices: list[GpuDevice] | None = None

    def open(self) -> None:
        """``nvmlInit`` and discover the GPUs; a GPU that fails discovery is skipped, logged."""
        if self._devices is not None:
            return
        module = self._module
        if module is None:
            import pynvml

            module = pynvml
        nvml = _Nvml(module)
        try:
            nvml.call("nvmlInit", gpu=None)
        except DeviceError as e:
            raise DeviceError(
                f"NVML could not be initialised ({e}); is the NVIDIA driver loaded? "
                "Use the simulated backend to run without GPUs"
            ) from e.__cause__
        try:
            count = int(nvml.call("nvmlDeviceGetCount", gpu=None))
            devices: list[GpuDevice] = []
            for index in range(count):
                try:
                    devices.append(NvmlGpu.discover(nvml, index))
                except DeviceError as e:
                    log.error("GPU %d skipped: %s", index, e)
        except BaseException:
            self._shutdown(nvml)
            raise
        self._nvml = nvml
        self._devices = devices

    def close(self) -> None:
        """``nvmlShutdown`` once; a failure to shut down is logged, not raised."""
        if self._nvml is None:
            return
        nvml, self._nvml, self._devices = self._nvml, None, None
        self._shutdown(nvml)

    @staticmethod
    def _shutdown(nvml: _Nvml) -> None:
        try:
            nvml.call("nvmlShutdown", gpu=None)
        except DeviceError as e:
            log.warning("nvmlShutdown failed: %s", e)

    def devices(self) -> list[GpuDevice]:
        if self._devices is None:
            raise DeviceError("the NVML backend is not open")
        return list(self._devices)
