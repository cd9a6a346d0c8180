"""The NVML backend: the one module in dcenergy that touches ``pynvml``.

Nothing happens at import: ``pynvml`` is imported and ``nvmlInit`` called in
``NvmlBackend.open``; ``nvmlShutdown`` in ``close``. The module object is a
constructor argument, so tests pass a fake (``tests/agent/fake_pynvml.py``).

Every NVML call goes through ``_Nvml.call``, which maps an ``NVMLError`` code
through ``_ERROR_TABLE`` to the project's exception, raised ``from`` the
original. Units are converted here, once: mW → W, mJ → J, ns → s, MiB/s → B/s.

Beyond the basic readings (power, energy, limits, temperatures, clocks,
utilization), each optional one is left out, and logged once, where the GPU,
the driver or this pynvml lacks it; none is ever fatal:

* field values, in one ``nvmlDeviceGetFieldValues`` call per sample: instant
  power and memory temperature, and where the GPU reports them (Grace Hopper,
  Blackwell) module-scope power and limit (``scopeId`` =
  ``NVML_POWER_SCOPE_MODULE``) and the power-smoothing state; the workload
  power profiles in force (``nvmlDeviceWorkloadPowerProfileGetCurrentProfiles``);
* GPM profiling metrics (Hopper and newer, ``nvmlGpmQueryDeviceSupport``): two
  sample buffers alternate, the first filled at open, so each sample's metrics
  (``nvmlGpmMetricsGet``) cover the time since the previous one;
* MIG instances (``mig_instances``): the MIG device handles, their identity,
  profile and memory, their processes (``nvmlDeviceGetComputeRunningProcesses``
  on the MIG handle) and GPM per GPU instance (``nvmlGpmMigSampleGet``); the
  list is re-read every ``_MIG_REFRESH_SAMPLES`` calls;
* per-process SM utilization (``nvmlDeviceGetProcessUtilization``, samples
  since the last one seen);
* health (``health``): ECC, retired-page, row-remap, PCIe-replay and NVLink
  error counters in one field-values call, fan speed, HW slowdown and power
  brake, and XID events from an event set polled without blocking
  (``nvmlEventSetWait_v2`` with timeout 0), registered on the first call.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, TypeVar

from agent.devices.base import (
    APPLICATION_XIDS,
    DeviceBackend,
    EnergyCounter,
    GpuDevice,
    GpuHealth,
    GpuIdentity,
    GpuSample,
    MigInstance,
    PowerLimits,
    check_clock_range,
    check_power_limit,
    throttle_flags,
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
_MIB: Final = 1024.0 * 1024.0
_MIG_REFRESH_SAMPLES: Final = 30  # MIG instances are re-listed this often (calls)
_MAX_EVENTS_PER_READ: Final = 64  # events drained per health read, at most
_XID_EVENT: Final = 0x8  # nvmlEventTypeXidCriticalError, where pynvml lacks the name


@dataclass(frozen=True, slots=True)
class _Field:
    """One field value: our name, the ``NVML_FI_*`` constant, its scope, a unit factor."""

    name: str
    const: str
    scope: str | None = None  # NVML_POWER_SCOPE_* name; None: the device's own
    scale: float = 1.0


_SAMPLE_FIELDS: Final = (
    _Field("power_instant", "NVML_FI_DEV_POWER_INSTANT", scale=1e-3),
    _Field("mem_temp_c", "NVML_FI_DEV_MEMORY_TEMP"),
    _Field("module_power_w", "NVML_FI_DEV_POWER_INSTANT", "NVML_POWER_SCOPE_MODULE", 1e-3),
    _Field(
        "module_power_limit_w", "NVML_FI_DEV_POWER_CURRENT_LIMIT", "NVML_POWER_SCOPE_MODULE", 1e-3
    ),
    _Field("power_smoothing_enabled", "NVML_FI_PWR_SMOOTHING_ENABLED"),
    _Field("power_smoothing_profile", "NVML_FI_PWR_SMOOTHING_ACTIVE_PRESET_PROFILE"),
)
_HEALTH_FIELDS: Final = (
    _Field("ecc_corrected_volatile", "NVML_FI_DEV_ECC_SBE_VOL_TOTAL"),
    _Field("ecc_uncorrected_volatile", "NVML_FI_DEV_ECC_DBE_VOL_TOTAL"),
    _Field("ecc_corrected_aggregate", "NVML_FI_DEV_ECC_SBE_AGG_TOTAL"),
    _Field("ecc_uncorrected_aggregate", "NVML_FI_DEV_ECC_DBE_AGG_TOTAL"),
    _Field("retired_pages_sbe", "NVML_FI_DEV_RETIRED_SBE"),
    _Field("retired_pages_dbe", "NVML_FI_DEV_RETIRED_DBE"),
    _Field("retired_pages_pending", "NVML_FI_DEV_RETIRED_PENDING"),
    _Field("remap_corrected_rows", "NVML_FI_DEV_REMAPPED_COR"),
    _Field("remap_uncorrected_rows", "NVML_FI_DEV_REMAPPED_UNC"),
    _Field("remap_pending", "NVML_FI_DEV_REMAPPED_PENDING"),
    _Field("remap_failure", "NVML_FI_DEV_REMAPPED_FAILURE"),
    _Field("pcie_replay_total", "NVML_FI_DEV_PCIE_REPLAY_COUNTER"),
    _Field("nvlink_crc_flit_errors_total", "NVML_FI_DEV_NVLINK_CRC_FLIT_ERROR_COUNT_TOTAL"),
    _Field("nvlink_crc_data_errors_total", "NVML_FI_DEV_NVLINK_CRC_DATA_ERROR_COUNT_TOTAL"),
    _Field("nvlink_replay_errors_total", "NVML_FI_DEV_NVLINK_REPLAY_ERROR_COUNT_TOTAL"),
    _Field("nvlink_recovery_errors_total", "NVML_FI_DEV_NVLINK_RECOVERY_ERROR_COUNT_TOTAL"),
)

# GPM metrics: (our field, NVML_GPM_METRIC_* name, unit factor)
_GPM_METRICS: Final = (
    ("sm_active_pct", "NVML_GPM_METRIC_SM_UTIL", 1.0),
    ("sm_occupancy_pct", "NVML_GPM_METRIC_SM_OCCUPANCY", 1.0),
    ("tensor_active_pct", "NVML_GPM_METRIC_ANY_TENSOR_UTIL", 1.0),
    ("dram_active_pct", "NVML_GPM_METRIC_DRAM_BW_UTIL", 1.0),
    ("pcie_tx_bytes_per_s", "NVML_GPM_METRIC_PCIE_TX_PER_SEC", _MIB),
    ("pcie_rx_bytes_per_s", "NVML_GPM_METRIC_PCIE_RX_PER_SEC", _MIB),
    ("nvlink_tx_bytes_per_s", "NVML_GPM_METRIC_NVLINK_TOTAL_TX_PER_SEC", _MIB),
    ("nvlink_rx_bytes_per_s", "NVML_GPM_METRIC_NVLINK_TOTAL_RX_PER_SEC", _MIB),
)
_GPM_MIG_METRICS: Final = _GPM_METRICS[:1] + _GPM_METRICS[2:4]  # SM, tensor, DRAM


def _bind(fn: Callable[..., T], *args: Any) -> Callable[[], T]:
    """``fn`` with its arguments bound now (a lambda in a loop would see the last ones)."""
    return lambda: fn(*args)


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

    def code(self, exc: DeviceError) -> int | None:
        """The NVML return code behind ``exc`` (``None`` when it did not come from NVML)."""
        cause = exc.__cause__
        if isinstance(cause, self.m.NVMLError):
            value = getattr(cause, "value", None)
            return int(value) if value is not None else None
        return None

    def has_code(self, exc: DeviceError, *names: str) -> bool:
        """Whether ``exc`` came from one of the named ``NVML_ERROR_*`` (or ``NVML_SUCCESS``)."""
        code = self.code(exc)
        return code is not None and any(getattr(self.m, n, None) == code for n in names)

    def power_profile_names(self) -> dict[int, str]:
        """``NVML_POWER_PROFILE_*`` bit numbers to names (``max_p``, ``training``)."""
        prefix = "NVML_POWER_PROFILE_"
        out: dict[int, str] = {}
        for name in dir(self.m):
            if name.startswith(prefix) and "OPERATION" not in name and name != prefix + "MAX":
                value = getattr(self.m, name)
                if isinstance(value, int):
                    out.setdefault(value, name[len(prefix) :].lower())
        return out

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
        self._gpm: _Gpm | None = None
        self._mig: list[_MigSlot] | None = None
        self._mig_age = 0
        self._mig_gpm: dict[int, _Gpm] = {}  # GPU-instance id -> its GPM sampler
        self._util_seen_us = 0
        self._events: Any = None  # the XID event set, registered on the first health()
        self._xid_last: int | None = None
        self._xid_last_critical: int | None = None
        self._profile_names: dict[int, str] | None = None

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
        gpu = cls(nvml, handle, identity, limits)
        gpu._gpm = gpu._start_gpm(None)
        return gpu

    # -- the query helper --------------------------------------------------
    def _q(self, fn_name: str, *args: Any) -> Any:
        """Call ``fn_name(handle, *args)``; a lost GPU is marked lost and raises DeviceLost."""
        return self._call(fn_name, self._handle, *args)

    def _call(self, fn_name: str, *args: Any) -> Any:
        """Call ``fn_name(*args)`` for this GPU (its handle, a MIG handle, a GPM sample)."""
        if self._lost:
            raise DeviceLost(f"GPU {self.identity.index} is lost", gpu=self.identity.index)
        try:
            return self._nvml.call(fn_name, *args, gpu=self.identity.index)
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
        if isinstance(e, DeviceNotSupported) or self._nvml.has_code(
            e,
            "NVML_ERROR_INVALID_ARGUMENT",  # a field id or metric this driver does not know
        ):
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
        fv = self._field_values("field_values", _SAMPLE_FIELDS)
        instant_w, s.mem_temp_c = fv.get("power_instant"), fv.get("mem_temp_c")
        s.module_power_w = fv.get("module_power_w")
        s.module_power_limit_w = fv.get("module_power_limit_w")
        for name in ("power_smoothing_enabled", "power_smoothing_profile"):
            if (v := fv.get(name)) is not None:
                setattr(s, name, int(v))
        s.power_profiles = self._read("power_profiles", self._read_power_profiles)
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
        if self._gpm is not None:
            for name, value in (self._read("gpm", self._gpm.read) or {}).items():
                setattr(s, name, value)
        return s

    def _field_values(self, call_key: str, fields: Sequence[_Field]) -> dict[str, float]:
        """The supported ``fields`` in one ``nvmlDeviceGetFieldValues`` call, in our units.

        Each value has its own return code: one the GPU lacks is left out (and
        not asked again), logged once; ``DeviceLost`` passes through.
        """
        m = self._nvml.m
        asked: list[_Field] = []
        ids: list[Any] = []
        for f in fields:
            if f.name in self._unsupported:
                continue
            fid = getattr(m, f.const, None)
            scope = getattr(m, f.scope, None) if f.scope else None
            if fid is None or (f.scope and scope is None):
                self._note_failure(
                    f.name,
                    DeviceNotSupported(f"{f.const} is not in this pynvml", gpu=self.identity.index),
                )
                continue
            asked.append(f)
            ids.append(fid if scope is None else (fid, scope))
        if not ids:
            return {}
        values = self._read(call_key, lambda: self._q("nvmlDeviceGetFieldValues", ids))
        if values is None:
            return {}
        out: dict[str, float] = {}
        for f, fv in zip(asked, values, strict=True):
            code = int(fv.nvmlReturn)
            if code == m.NVML_SUCCESS:
                out[f.name] = self._nvml.field_value(fv) * f.scale
                continue
            err = self._nvml.error(code, f"field {f.name}", self.identity.index)
            if isinstance(err, DeviceLost):
                raise err
            if f.name == "power_instant" and isinstance(err, DeviceNotSupported):
                self._unsupported.add(f.name)
                self._log_once(
                    f.name,
                    logging.INFO,
                    "GPU %d: POWER_INSTANT not supported, using nvmlDeviceGetPowerUsage",
                    self.identity.index,
                )
            else:
                self._note_failure(f.name, err)
        return out

    def _read_power_profiles(self) -> str:
        """The enforced workload power profiles, by name, comma-separated ('' for none)."""
        m = self._nvml.m
        cls = getattr(m, "c_nvmlWorkloadPowerProfileCurrentProfiles_v1_t", None)
        if cls is None:
            raise DeviceNotSupported(
                "workload power profiles are not in this pynvml", gpu=self.identity.index
            )
        info = cls()
        self._q("nvmlDeviceWorkloadPowerProfileGetCurrentProfiles", ctypes.byref(info))
        if self._profile_names is None:
            self._profile_names = self._nvml.power_profile_names()
        names = self._profile_names
        bits = [
            word * 32 + bit
            for word, value in enumerate(info.enforcedProfilesMask.mask)
            for bit in range(32)
            if value >> bit & 1
        ]
        return ",".join(names.get(b, f"profile_{b}") for b in bits)

    # -- GPM, MIG, processes, health ------------------------------------------
    def _start_gpm(self, gpu_instance: int | None) -> _Gpm | None:
        """A GPM sampler with its first sample taken, or None where GPM is unavailable."""
        key = "gpm" if gpu_instance is None else f"mig_gpm:{gpu_instance}"
        if key in self._unsupported:
            return None
        try:
            if gpu_instance is None:
                support = self._q("nvmlGpmQueryDeviceSupport")
                if not int(support.isSupportedDevice):
                    raise DeviceNotSupported(
                        "GPM needs a Hopper or newer GPU", gpu=self.identity.index
                    )
            metrics = _GPM_METRICS if gpu_instance is None else _GPM_MIG_METRICS
            gpm = _Gpm(self, metrics, gpu_instance)
            try:
                gpm.start()
            except BaseException:
                gpm.free()
                raise
            return gpm
        except DeviceLost:
            self._lost = True
        except DeviceError as e:
            self._note_failure(key, e)
        return None

    def mig_instances(self) -> list[MigInstance]:
        """Every MIG instance with its memory, processes and (GPM) activity now."""
        if not self.identity.mig_mode or self._lost or "mig" in self._unsupported:
            return []
        try:
            if self._mig is None or self._mig_age >= _MIG_REFRESH_SAMPLES:
                self._mig = self._read("mig", self._list_mig)
                self._mig_age = 0
            self._mig_age += 1
            return [self._read_instance(slot) for slot in self._mig or ()]
        except DeviceLost as e:
            self._lost = True
            self._log_once("lost", logging.ERROR, "GPU %d is lost: %s", self.identity.index, e)
            return []

    def _list_mig(self) -> list[_MigSlot]:
        """The MIG devices under this GPU (empty slots say NOT_FOUND and are skipped)."""
        slots: list[_MigSlot] = []
        for i in range(int(self._q("nvmlDeviceGetMaxMigDeviceCount"))):
            try:
                h = self._q("nvmlDeviceGetMigDeviceHandleByIndex", i)
            except DeviceLost:
                raise
            except DeviceError as e:
                if self._nvml.has_code(e, "NVML_ERROR_NOT_FOUND", "NVML_ERROR_INVALID_ARGUMENT"):
                    continue
                raise
            gi = int(self._call("nvmlDeviceGetGpuInstanceId", h))
            ci = int(self._call("nvmlDeviceGetComputeInstanceId", h))
            attrs = self._read("mig_attributes", _bind(self._call, "nvmlDeviceGetAttributes", h))
            slots.append(
                _MigSlot(
                    handle=h,
                    uuid=_text(self._call("nvmlDeviceGetUUID", h)),
                    gpu_instance_id=gi,
                    compute_instance_id=ci,
                    profile=self._mig_profile(gi, attrs),
                    sm_count=int(attrs.multiprocessorCount) if attrs is not None else None,
                )
            )
        live = {s.gpu_instance_id for s in slots}
        for gi in sorted(set(self._mig_gpm) - live):  # instances destroyed since the last list
            self._mig_gpm.pop(gi).free()
        for gi in sorted(live - set(self._mig_gpm)):
            if (gpm := self._start_gpm(gi)) is not None:
                self._mig_gpm[gi] = gpm
        return slots

    def _mig_profile(self, gpu_instance: int, attrs: Any) -> str:
        """``1g.10gb`` (NVML's GPU-instance profile name), ``1c.3g.40gb`` for a compute slice.

        Without the profile info (permissions, older driver), built from the
        device attributes: slices and memory rounded to GB, as nvidia-smi names them.
        """
        name = ""
        try:
            gi = self._q("nvmlDeviceGetGpuInstanceById", gpu_instance)
            info = self._call("nvmlGpuInstanceGetInfo", gi)
            pinfo = self._q("nvmlDeviceGetGpuInstanceProfileInfoById", int(info.profileId))
            name = _text(pinfo.name).strip().removeprefix("MIG ").strip()
        except DeviceLost:
            raise
        except DeviceError as e:
            self._note_failure("mig_profile", e)
        if attrs is None:
            return name
        gi_slices, ci_slices = (
            int(attrs.gpuInstanceSliceCount),
            int(attrs.computeInstanceSliceCount),
        )
        if not name:
            name = f"{gi_slices}g.{round(int(attrs.memorySizeMB) / 1024)}gb"
        return f"{ci_slices}c.{name}" if 0 < ci_slices < gi_slices else name

    def _read_instance(self, slot: _MigSlot) -> MigInstance:
        h = slot.handle
        mem = self._read("mig_mem_bytes", lambda: self._call("nvmlDeviceGetMemoryInfo", h))
        procs = self._read(
            "mig_pids", lambda: self._call("nvmlDeviceGetComputeRunningProcesses", h)
        )
        gpm = self._mig_gpm.get(slot.gpu_instance_id)
        key = f"mig_gpm:{slot.gpu_instance_id}"
        activity = (self._read(key, gpm.read) or {}) if gpm is not None else {}
        return MigInstance(
            parent_uuid=self.identity.uuid,
            uuid=slot.uuid,
            gpu_instance_id=slot.gpu_instance_id,
            compute_instance_id=slot.compute_instance_id,
            profile=slot.profile,
            sm_count=slot.sm_count,
            mem_used_bytes=int(mem.used) if mem is not None else None,
            mem_total_bytes=int(mem.total) if mem is not None else None,
            sm_active_pct=activity.get("sm_active_pct"),
            tensor_active_pct=activity.get("tensor_active_pct"),
            dram_active_pct=activity.get("dram_active_pct"),
            pids=tuple(int(p.pid) for p in procs or ()),
        )

    def process_utilization(self) -> dict[int, float]:
        """Mean SM utilization (%) per PID over the samples since the last call."""
        if self._lost or "process_util" in self._unsupported:
            return {}
        try:
            samples = self._q("nvmlDeviceGetProcessUtilization", self._util_seen_us)
        except DeviceLost as e:
            self._log_once("lost", logging.ERROR, "GPU %d is lost: %s", self.identity.index, e)
            return {}
        except DeviceError as e:
            # NOT_FOUND: no sample since the last seen (pynvml raises SUCCESS for an empty list)
            if not self._nvml.has_code(e, "NVML_ERROR_NOT_FOUND", "NVML_SUCCESS"):
                self._note_failure("process_util", e)
            return {}
        total: dict[int, float] = {}
        count: dict[int, int] = {}
        for smp in samples:
            pid = int(smp.pid)
            total[pid] = total.get(pid, 0.0) + float(smp.smUtil)
            count[pid] = count.get(pid, 0) + 1
            self._util_seen_us = max(self._util_seen_us, int(smp.timeStamp))
        return {pid: total[pid] / count[pid] for pid in total}

    def health(self) -> GpuHealth | None:
        """Error counters, XIDs since the previous call and HW slowdowns; None once lost."""
        if self._lost:
            return None
        try:
            fv = self._field_values("health_field_values", _HEALTH_FIELDS)
            h = GpuHealth(**{name: int(v) for name, v in fv.items()})
            h.fan_speed_pct = self._read(
                "fan_speed_pct", lambda: float(self._q("nvmlDeviceGetFanSpeed"))
            )
            reasons = self._read("throttle_reasons", self._read_throttle)
            h.hw_slowdown, h.hw_thermal_slowdown, h.power_brake = throttle_flags(reasons)
            h.xid_events, h.xid_critical_events = self._drain_xids()
            h.xid_last = self._xid_last
            h.xid_last_critical = self._xid_last_critical
            return h
        except DeviceLost as e:
            self._lost = True
            self._log_once("lost", logging.ERROR, "GPU %d is lost: %s", self.identity.index, e)
            return None

    def _drain_xids(self) -> tuple[int | None, int | None]:
        """(XIDs, of which not application-caused) waiting in the event set; never blocks."""
        if self._events is None:
            self._events = self._read("xid_events", self._register_xids)
            if self._events is None:
                return None, None
        m = self._nvml.m
        mask = int(getattr(m, "nvmlEventTypeXidCriticalError", _XID_EVENT))
        wait = "nvmlEventSetWait_v2" if hasattr(m, "nvmlEventSetWait_v2") else "nvmlEventSetWait"
        seen = critical = 0
        last_critical: int | None = None
        for _ in range(_MAX_EVENTS_PER_READ):
            try:
                data = self._call(wait, self._events, 0)
            except DeviceLost:
                raise
            except DeviceError as e:
                if not self._nvml.has_code(e, "NVML_ERROR_TIMEOUT"):  # TIMEOUT: none waiting
                    self._note_failure("xid_events", e)
                break
            if not int(data.eventType) & mask:
                continue
            xid = int(data.eventData)
            seen += 1
            self._xid_last = xid
            if xid not in APPLICATION_XIDS:
                critical += 1
                last_critical = xid
            self._log_once(
                f"xid:{xid}", logging.WARNING, "GPU %d: XID %d (first of its kind)",
                self.identity.index, xid,
            )  # fmt: skip
        if last_critical is not None:
            self._xid_last_critical = last_critical
        return seen, critical

    def _register_xids(self) -> Any:
        """An event set for this GPU's XID events, or DeviceNotSupported."""
        mask = int(getattr(self._nvml.m, "nvmlEventTypeXidCriticalError", _XID_EVENT))
        if not int(self._q("nvmlDeviceGetSupportedEventTypes")) & mask:
            raise DeviceNotSupported(
                "XID events are not reported by this GPU", gpu=self.identity.index
            )
        events = self._call("nvmlEventSetCreate")
        try:
            self._q("nvmlDeviceRegisterEvents", mask, events)
        except BaseException:
            self._free_events(events)
            raise
        return events

    def _free_events(self, events: Any) -> None:
        try:
            self._nvml.call("nvmlEventSetFree", events, gpu=self.identity.index)
        except DeviceError as e:
            log.warning("GPU %d: freeing the event set failed: %s", self.identity.index, e)

    def release(self) -> None:
        """Free the GPM samples and the event set (before ``nvmlShutdown``); never raises."""
        for gpm in [self._gpm, *self._mig_gpm.values()]:
            if gpm is not None:
                gpm.free()
        self._gpm, self._mig_gpm, self._mig = None, {}, None
        if self._events is not None:
            events, self._events = self._events, None
            self._free_events(events)

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


def _gpm_rounded(value: float, *, per_s: bool) -> float:
    """GPM figures to 0.01 % and 1 B/s: finer digits are noise and cost bytes every sample."""
    return float(round(value)) if per_s else round(value, 2)


@dataclass(frozen=True, slots=True)
class _MigSlot:
    """A MIG device as listed: its handle and what does not change while it exists."""

    handle: Any
    uuid: str
    gpu_instance_id: int
    compute_instance_id: int
    profile: str
    sm_count: int | None


class _Gpm:
    """GPM metrics of one GPU (or one of its GPU instances) from two alternating samples.

    ``start`` fills the first buffer; each ``read`` fills the other and asks
    ``nvmlGpmMetricsGet`` for the metrics between the two, so a value is the
    mean over the time since the previous read. A metric the GPU does not
    report is dropped from later requests (logged once).
    """

    def __init__(
        self, gpu: NvmlGpu, metrics: Sequence[tuple[str, str, float]], gpu_instance: int | None
    ) -> None:
        m = gpu._nvml.m
        self._gpu = gpu
        self._gi = gpu_instance
        self._metrics = [
            (name, int(getattr(m, const)), scale)
            for name, const, scale in metrics
            if hasattr(m, const)
        ]
        self._samples: list[Any] = []
        self._request: Any = None

    def start(self) -> None:
        nvml = self._gpu._nvml
        for _ in range(2):
            self._samples.append(nvml.call("nvmlGpmSampleAlloc", gpu=self._gpu.identity.index))
        self._take(self._samples[0])
        m = nvml.m
        self._request = m.c_nvmlGpmMetricsGet_t()
        self._request.version = m.NVML_GPM_METRICS_GET_VERSION

    def _take(self, sample: Any) -> None:
        if self._gi is None:
            self._gpu._q("nvmlGpmSampleGet", sample)
        else:
            self._gpu._q("nvmlGpmMigSampleGet", self._gi, sample)

    def read(self) -> dict[str, float]:
        prev, cur = self._samples
        self._take(cur)
        self._samples.reverse()  # this sample is the start of the next interval
        req = self._request
        req.numMetrics = len(self._metrics)
        req.sample1, req.sample2 = prev, cur
        for i, (_, metric_id, _) in enumerate(self._metrics):
            req.metrics[i].metricId = metric_id
        self._gpu._call("nvmlGpmMetricsGet", req)
        out: dict[str, float] = {}
        gone: list[str] = []
        ok = self._gpu._nvml.m.NVML_SUCCESS
        for i, (name, _, scale) in enumerate(self._metrics):
            r = req.metrics[i]
            if int(r.nvmlReturn) == ok:
                out[name] = _gpm_rounded(float(r.value) * scale, per_s=scale != 1.0)
                continue
            err = self._gpu._nvml.error(int(r.nvmlReturn), f"GPM {name}", self._gpu.identity.index)
            if isinstance(err, DeviceLost):
                raise err
            self._gpu._note_failure(name if self._gi is None else f"mig{self._gi}_{name}", err)
            if isinstance(err, DeviceNotSupported):
                gone.append(name)
        if gone:
            self._metrics = [x for x in self._metrics if x[0] not in gone]
        return out

    def free(self) -> None:
        """Free both samples; a failure is logged, never raised."""
        samples, self._samples = self._samples, []
        for sample in samples:
            try:
                self._gpu._nvml.call("nvmlGpmSampleFree", sample, gpu=self._gpu.identity.index)
            except DeviceError as e:
                log.warning("GPU %d: freeing a GPM sample failed: %s", self._gpu.identity.index, e)


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
        """Free what the GPUs hold, then ``nvmlShutdown`` once; failures are logged, not raised."""
        if self._nvml is None:
            return
        nvml, devices, self._nvml, self._devices = self._nvml, self._devices, None, None
        for dev in devices or ():
            if isinstance(dev, NvmlGpu):
                dev.release()
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
