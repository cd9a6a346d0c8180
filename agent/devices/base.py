"""The GPU device interface every backend (NVML, simulated) implements.

The agent samples and sets GPUs only through these classes, so the daemon, the
reconciler and the tests never know which backend is underneath. Units are in
the names and are converted once, inside each backend (NVML speaks mW, ns, mJ).

Error contract, for every backend:

* ``sample()`` never raises for one GPU's trouble: an unsupported or forbidden
  field is left ``None`` (absent, never 0); a GPU that is gone gives a sample
  with ``lost=True`` and every other field ``None``, so the other GPUs keep
  sampling. A lost GPU stays lost until the backend is reopened.
* Every other method raises a ``DeviceError`` subclass: ``DeviceNotSupported``,
  ``DevicePermission``, ``DeviceLost``, or ``SetpointOutOfRange`` for a setpoint
  outside what the GPU allows (never silently clamped: clamping is the caller's job).
"""

from __future__ import annotations

import dataclasses
import operator
from abc import ABC, abstractmethod
from dataclasses import dataclass
from types import TracebackType
from typing import Self

from dcenergy.errors import DeviceError

# Clocks-event ("throttle") reason bits, as NVML defines them. Repeated here so
# that code outside the NVML backend can read the bitmask without pynvml.
THROTTLE_GPU_IDLE = 0x1
THROTTLE_APPLICATIONS_CLOCKS = 0x2
THROTTLE_SW_POWER_CAP = 0x4
THROTTLE_HW_SLOWDOWN = 0x8
THROTTLE_SW_THERMAL = 0x20
THROTTLE_HW_THERMAL = 0x40
THROTTLE_HW_POWER_BRAKE = 0x80


class SetpointOutOfRange(DeviceError, ValueError):
    """A power limit or clock outside what the GPU accepts.

    Both a ``DeviceError`` (the agent's handlers see it) and a ``ValueError``
    (it is the caller's bad argument: the reconciler clamps before it sets).
    """


@dataclass(frozen=True, slots=True)
class GpuIdentity:
    """What names one GPU; constant while the backend is open."""

    index: int
    uuid: str
    name: str
    pci_bus_id: str
    mig_mode: bool | None


@dataclass(frozen=True, slots=True)
class PowerLimits:
    """The settable power-limit range and the default limit, in watts."""

    min_w: float
    max_w: float
    default_w: float

    def contains(self, watts: float) -> bool:
        return self.min_w <= watts <= self.max_w


_IDENTITY_FIELDS = frozenset({"identity", "lost"})


@dataclass(slots=True)
class GpuSample:
    """One reading of one GPU. ``None`` means not supported or not read: absent, never 0.

    Field names match ``dcenergy.schema.GPU``; ``fields()`` gives the mapping a
    ``schema.point`` is built from.
    """

    identity: GpuIdentity
    lost: bool = False
    power_w: float | None = None
    energy_j: float | None = None
    power_limit_w: float | None = None
    power_limit_default_w: float | None = None
    power_limit_min_w: float | None = None
    power_limit_max_w: float | None = None
    power_limit_enforced_w: float | None = None
    temp_c: float | None = None
    mem_temp_c: float | None = None
    util_gpu_pct: float | None = None
    util_mem_pct: float | None = None
    sm_clock_mhz: float | None = None
    mem_clock_mhz: float | None = None
    power_violation_s: float | None = None
    thermal_violation_s: float | None = None
    mem_used_bytes: int | None = None
    mem_total_bytes: int | None = None
    throttle_reasons: int | None = None
    pstate: int | None = None
    energy_resets: int | None = None
    # profiling activity (GPM, Hopper and newer): means since the previous sample
    sm_active_pct: float | None = None
    sm_occupancy_pct: float | None = None
    tensor_active_pct: float | None = None
    dram_active_pct: float | None = None
    pcie_tx_bytes_per_s: float | None = None
    pcie_rx_bytes_per_s: float | None = None
    nvlink_tx_bytes_per_s: float | None = None
    nvlink_rx_bytes_per_s: float | None = None
    # newer power controls (Grace Hopper, Blackwell), read where the GPU has them
    module_power_w: float | None = None
    module_power_limit_w: float | None = None
    power_smoothing_enabled: int | None = None
    power_smoothing_profile: int | None = None
    power_profiles: str | None = None

    def fields(self) -> dict[str, float | int | bool | str | None]:
        """The sample as ``schema.GPU`` fields; a lost GPU reports only ``lost``."""
        out: dict[str, float | int | bool | str | None] = {"lost": self.lost}
        if self.lost:
            out.update(dict.fromkeys(_SAMPLE_FIELDS))
        else:
            out.update(zip(_SAMPLE_FIELDS, _SAMPLE_VALUES(self), strict=True))
        ident = self.identity
        if self.lost:
            out["mig_mode"] = None
            out["pci_bus_id"] = None
        else:
            out["mig_mode"] = None if ident.mig_mode is None else int(ident.mig_mode)
            out["pci_bus_id"] = ident.pci_bus_id
        return out


# GpuSample's reading fields, listed once (``dataclasses.fields`` per sample is slow)
_SAMPLE_FIELDS: tuple[str, ...] = tuple(
    f.name for f in dataclasses.fields(GpuSample) if f.name not in _IDENTITY_FIELDS
)
_SAMPLE_VALUES = operator.attrgetter(*_SAMPLE_FIELDS)


# XIDs an application causes (illegal address, MMU fault in user code, channel
# reset, preemptive clean-up): recorded, but they say nothing about the GPU's health.
APPLICATION_XIDS: frozenset[int] = frozenset({13, 31, 43, 45})


@dataclass(slots=True)
class GpuHealth:
    """Error counters, XID events and slowdowns of one GPU; ``None``: not reported.

    Field names match ``dcenergy.schema.GPU_HEALTH``. Counters are the
    driver's (volatile: since driver load; aggregate: lifetime); ``xid_events``
    counts the XIDs seen since the previous ``health()`` call.
    """

    ecc_corrected_volatile: int | None = None
    ecc_uncorrected_volatile: int | None = None
    ecc_corrected_aggregate: int | None = None
    ecc_uncorrected_aggregate: int | None = None
    retired_pages_sbe: int | None = None
    retired_pages_dbe: int | None = None
    retired_pages_pending: int | None = None
    remap_corrected_rows: int | None = None
    remap_uncorrected_rows: int | None = None
    remap_pending: int | None = None
    remap_failure: int | None = None
    xid_events: int | None = None
    xid_critical_events: int | None = None
    xid_last: int | None = None
    xid_last_critical: int | None = None
    pcie_replay_total: int | None = None
    nvlink_crc_flit_errors_total: int | None = None
    nvlink_crc_data_errors_total: int | None = None
    nvlink_replay_errors_total: int | None = None
    nvlink_recovery_errors_total: int | None = None
    fan_speed_pct: float | None = None
    hw_slowdown: int | None = None
    hw_thermal_slowdown: int | None = None
    power_brake: int | None = None

    def reasons(self) -> list[str]:
        """Why this GPU should not be trusted with work now ([] when healthy).

        Uncorrected ECC errors since driver load, a page retirement or row
        remap waiting for a reset, a failed row remap, or an XID that no
        application explains since the previous reading.
        """
        out: list[str] = []
        if self.ecc_uncorrected_volatile:
            out.append(f"{self.ecc_uncorrected_volatile} uncorrected ECC errors")
        if self.retired_pages_pending:
            out.append("page retirement pending")
        if self.remap_pending:
            out.append("row remap pending")
        if self.remap_failure:
            out.append("row remap failed")
        if self.xid_critical_events:
            out.append(f"XID {self.xid_last_critical}")
        return out

    def fields(self) -> dict[str, float | int | bool | str | None]:
        """The reading as ``schema.GPU_HEALTH`` fields, the verdict included."""
        out: dict[str, float | int | bool | str | None] = {
            f.name: getattr(self, f.name) for f in dataclasses.fields(self)
        }
        reasons = self.reasons()
        out["unhealthy"] = int(bool(reasons))
        out["health_reasons"] = "; ".join(reasons)
        return out


def throttle_flags(reasons: int | None) -> tuple[int | None, int | None, int | None]:
    """(HW slowdown, HW thermal slowdown, HW power brake) as 0/1 from a clocks-event mask."""
    if reasons is None:
        return None, None, None
    return (
        int(bool(reasons & THROTTLE_HW_SLOWDOWN)),
        int(bool(reasons & THROTTLE_HW_THERMAL)),
        int(bool(reasons & THROTTLE_HW_POWER_BRAKE)),
    )


@dataclass(frozen=True, slots=True)
class MigInstance:
    """One MIG instance (a GPU instance and one of its compute instances), read now.

    Identity (constant while the instance exists), memory, activity where NVML
    reports it per GPU instance (GPM; ``None`` elsewhere), and the host PIDs of
    the processes running on it (the process list of the MIG device handle).
    """

    parent_uuid: str
    uuid: str  # MIG-<uuid>
    gpu_instance_id: int
    compute_instance_id: int
    profile: str  # 1g.10gb, or 1c.3g.40gb for a compute slice of a GPU instance; "" unknown
    sm_count: int | None = None
    mem_used_bytes: int | None = None
    mem_total_bytes: int | None = None
    sm_active_pct: float | None = None
    tensor_active_pct: float | None = None
    dram_active_pct: float | None = None
    pids: tuple[int, ...] = ()


class EnergyCounter:
    """Turns a device's total-energy counter into a monotonic, reset-corrected total.

    The driver's counter restarts from zero when the driver reloads; a reading
    lower than the previous one counts as a reset, and the energy seen up to
    the reset is kept as an offset so the total never goes backwards.
    """

    __slots__ = ("_last_raw_j", "_offset_j", "resets")

    def __init__(self) -> None:
        self._last_raw_j: float | None = None
        self._offset_j = 0.0
        self.resets = 0

    def update(self, raw_j: float) -> float:
        """Feed one raw reading (J); return the corrected cumulative energy (J)."""
        if self._last_raw_j is not None and raw_j < self._last_raw_j:
            self.resets += 1
            self._offset_j += self._last_raw_j
        self._last_raw_j = raw_j
        return self._offset_j + raw_j


def check_power_limit(watts: float, limits: PowerLimits, *, gpu: int) -> None:
    """Refuse a power limit outside [min, max] (or not finite) with a clear message."""
    if not limits.contains(watts):  # NaN compares false, so it is refused too
        raise SetpointOutOfRange(
            f"GPU {gpu}: power limit {watts} W is outside the allowed range "
            f"[{limits.min_w:g}, {limits.max_w:g}] W",
            gpu=gpu,
        )


def check_clock_range(min_mhz: int, max_mhz: int, supported: list[int], *, gpu: int) -> None:
    """Refuse a clock lock that is inverted or outside the supported SM clocks."""
    if min_mhz > max_mhz:
        raise SetpointOutOfRange(
            f"GPU {gpu}: locked clock range [{min_mhz}, {max_mhz}] MHz has min > max", gpu=gpu
        )
    if supported and (min_mhz < supported[0] or max_mhz > supported[-1]):
        raise SetpointOutOfRange(
            f"GPU {gpu}: locked clock range [{min_mhz}, {max_mhz}] MHz is outside the "
            f"supported SM clocks [{supported[0]}, {supported[-1]}] MHz",
            gpu=gpu,
        )


class GpuDevice(ABC):
    """One GPU: read it, set its power limit or SM clocks, list its compute processes."""

    identity: GpuIdentity

    @property
    @abstractmethod
    def lost(self) -> bool:
        """True once the GPU is gone; it stays so until the backend is reopened."""

    @abstractmethod
    def sample(self) -> GpuSample:
        """Read everything readable; never raises (see the module docstring)."""

    @abstractmethod
    def power_limits(self) -> PowerLimits:
        """The settable range and the default limit (cached: they do not change)."""

    @abstractmethod
    def power_limit_w(self) -> float:
        """The current requested power limit."""

    @abstractmethod
    def enforced_power_limit_w(self) -> float:
        """The limit the driver enforces, after every constraint (may be below the request)."""

    @abstractmethod
    def set_power_limit_w(self, watts: float) -> None:
        """Set the power limit; ``SetpointOutOfRange`` outside ``power_limits()``."""

    @abstractmethod
    def supported_sm_clocks_mhz(self) -> list[int]:
        """Supported SM clocks, ascending."""

    @abstractmethod
    def lock_sm_clocks_mhz(self, min_mhz: int, max_mhz: int) -> None:
        """Lock the SM clock into [min_mhz, max_mhz] (DVFS); power limits still win."""

    @abstractmethod
    def reset_sm_clocks(self) -> None:
        """Undo ``lock_sm_clocks_mhz``."""

    @abstractmethod
    def compute_pids(self) -> list[int]:
        """Host PIDs of the compute processes running on this GPU."""

    # Optional readings: a backend without them keeps these defaults (never raise).
    def mig_instances(self) -> list[MigInstance]:
        """The MIG instances of this GPU ([] when MIG is off or not reported)."""
        return []

    def process_utilization(self) -> dict[int, float]:
        """Per host PID, its SM utilization (%) since the previous call ({} when unknown)."""
        return {}

    def health(self) -> GpuHealth | None:
        """Error counters, XIDs since the previous call, slowdowns (None: not reported)."""
        return None


class DeviceBackend(ABC):
    """A source of GPUs. Nothing happens at construction; ``open`` initialises.

    Use as a context manager (``with open_backend(...) as backend``) or call
    ``open``/``close``; both are idempotent.
    """

    name: str

    @abstractmethod
    def open(self) -> None:
        """Initialise the backend and discover its GPUs."""

    @abstractmethod
    def close(self) -> None:
        """Release the backend; its devices must not be used afterwards."""

    @abstractmethod
    def devices(self) -> list[GpuDevice]:
        """The GPUs found at ``open``, by index; ``DeviceError`` when not open."""

    def __enter__(self) -> Self:
        self.open()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
