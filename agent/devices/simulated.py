"""The simulated backend: physically plausible GPUs for the demo, the tests and closed-loop runs.

Deterministic: a GPU's chip-to-chip variation and UUID come from (seed, host,
index), and time comes from an injected clock (monotonic seconds), so a test
advances time by hand and gets the same numbers every run. There is no
random noise over time.

The model, per GPU:

* power = idle + load · dynamic · (fixed + sm · f·V(f)²), with f the SM clock
  as a fraction of the top clock and V flat below ``_V_FLOOR`` then linear in f
  (so power grows ~f³ near the top and ~f at low clocks); ``fixed`` and ``sm``
  depend on the workload kind (memory-bound work spends less of its power in
  the SM and gains little from its clock);
* the SM clock is the highest supported clock, under any lock, whose power fits
  the enforced limit; when the limit is what holds it down the SW power cap
  bit (0x4) is set and ``power_violation_s`` accumulates. Where even the lowest
  clock does not fit, the SMs run only part of the time. Power never exceeds
  the enforced limit;
* temperature follows ambient + R·P with first-order lag (time constant tens
  of seconds); past the slowdown temperature the clock is held at 85 % of top;
* the energy counter integrates power over the injected time, piecewise
  constant between calls (every public call first advances time).
"""

from __future__ import annotations

import bisect
import hashlib
import math
import random
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

from agent.devices.base import (
    THROTTLE_GPU_IDLE,
    THROTTLE_SW_POWER_CAP,
    THROTTLE_SW_THERMAL,
    DeviceBackend,
    EnergyCounter,
    GpuDevice,
    GpuIdentity,
    GpuSample,
    PowerLimits,
    check_clock_range,
    check_power_limit,
)
from dcenergy.errors import DeviceError, DeviceLost

_GIB: Final = 1024**3
_V_FLOOR: Final = 0.6  # relative voltage below which V stops falling with f
_THERMAL_CLOCK_SHARE: Final = 0.85  # clock ceiling (share of top) while thermally throttled
_IDLE_PSTATE: Final = 8


def _clock_table(lo_mhz: int, hi_mhz: int, step_mhz: int = 15) -> tuple[int, ...]:
    return tuple(range(lo_mhz, hi_mhz + 1, step_mhz))


@dataclass(frozen=True, slots=True)
class GpuModel:
    """Data-sheet figures of one GPU model (nominal: each GPU varies a little)."""

    name: str  # as NVML reports it, so the rest of dcenergy sees no difference
    min_w: float
    max_w: float
    default_w: float
    idle_w: float
    dynamic_w: float  # dynamic power at full compute-bound load and top clock
    sm_clocks_mhz: tuple[int, ...]
    mem_clock_mhz: int
    mem_total_bytes: int
    thermal_r_c_per_w: float  # steady-state temperature rise per watt
    thermal_tau_s: float
    slowdown_c: float


MODELS: Final[dict[str, GpuModel]] = {
    "H100-SXM": GpuModel(
        "NVIDIA H100 80GB HBM3", 200.0, 700.0, 700.0, 70.0, 620.0,
        _clock_table(210, 1980), 2619, 80 * _GIB, 0.06, 30.0, 87.0,
    ),
    "A100-SXM": GpuModel(
        "NVIDIA A100-SXM4-80GB", 100.0, 400.0, 400.0, 55.0, 335.0,
        _clock_table(210, 1410), 1593, 80 * _GIB, 0.10, 25.0, 87.0,
    ),
    "L40S": GpuModel(
        "NVIDIA L40S", 100.0, 350.0, 350.0, 35.0, 310.0,
        _clock_table(210, 2520), 9001, 48 * _GIB, 0.14, 40.0, 88.0,
    ),
}  # fmt: skip


@dataclass(frozen=True, slots=True)
class WorkloadKind:
    """How a kind of work spends power and how its speed depends on the SM clock."""

    fixed_share: float  # share of dynamic power that does not scale with the SM clock
    sm_share: float  # share that scales with f·V²
    clock_sensitivity: float  # share of run time that scales with 1/f (Amdahl)
    mem_util_pct: float  # memory-controller busy share at full load


KINDS: Final[dict[str, WorkloadKind]] = {
    "compute": WorkloadKind(0.08, 0.92, 0.85, 30.0),
    "mixed": WorkloadKind(0.20, 0.65, 0.55, 55.0),
    "memory": WorkloadKind(0.30, 0.35, 0.15, 85.0),
}


@dataclass(frozen=True, slots=True)
class _OperatingPoint:
    sm_clock_mhz: int
    power_w: float
    power_capped: bool
    thermal_capped: bool
    duty: float = 1.0  # share of time the SMs run; below 1 only when even the lowest clock
    # is over the limit and the GPU has to idle in between (so throughput stays continuous)


def _dvfs_power(x: float) -> float:
    """Relative SM dynamic power at relative clock x: f·V², V = max(floor, f)."""
    v = max(_V_FLOOR, x)
    return x * v * v


def _speed(x: float, sensitivity: float) -> float:
    """Relative speed at relative clock x, by Amdahl: only part of the run time scales."""
    return 1.0 / ((1.0 - sensitivity) + sensitivity / x)


def sim_uuid(seed: int, host: str, index: int) -> str:
    """A deterministic NVML-style UUID ("GPU-" + RFC 4122 text) for a simulated GPU."""
    digest = hashlib.sha256(f"dcenergy-sim:{host}:{seed}:{index}".encode()).digest()
    return f"GPU-{uuid.UUID(bytes=digest[:16], version=4)}"


class SimulatedGpu(GpuDevice):
    """One simulated GPU, driven by ``set_workload`` and advanced by the injected clock."""

    def __init__(
        self,
        index: int,
        model: GpuModel,
        *,
        clock: Callable[[], float],
        seed: int = 0,
        host: str = "sim",
        ambient_c: float = 30.0,
    ) -> None:
        rng = random.Random(f"{seed}:{host}:{index}")
        self.model = model
        self.identity = GpuIdentity(
            index=index,
            uuid=sim_uuid(seed, host, index),
            name=model.name,
            pci_bus_id=f"00000000:{0x18 + 0x10 * index:02X}:00.0",
            mig_mode=False,
        )
        self._limits = PowerLimits(model.min_w, model.max_w, model.default_w)
        self._clock = clock
        # chip-to-chip variation: leakage (idle) ±5 %, dynamic power ±3 %
        self._idle_w = model.idle_w * rng.uniform(0.95, 1.05)
        self._dynamic_w = model.dynamic_w * rng.uniform(0.97, 1.03)
        self.ambient_c = ambient_c
        self._t = clock()
        self._limit_w = model.default_w
        self._locked: tuple[int, int] | None = None
        self._load = 0.0
        self._kind = KINDS["compute"]
        self.job_id: str | None = None
        self._pids: list[int] = []
        self._mem_used_bytes: int | None = None
        self._energy_raw_j = 0.0
        self._energy = EnergyCounter()
        self._power_violation_s = 0.0
        self._thermal_violation_s = 0.0
        self.temp_c = ambient_c + model.thermal_r_c_per_w * self._idle_w
        self.mem_temp_c = self._mem_temp_target(self._idle_w)
        self._lost = False

    # -- driving the simulation -------------------------------------------
    def set_workload(
        self,
        load: float,
        kind: str = "compute",
        job_id: str | None = None,
        pids: Sequence[int] = (),
        mem_used_bytes: int | None = None,
    ) -> None:
        """What the GPU is asked to do from now on: busy share 0..1 and the kind of work."""
        if not 0.0 <= load <= 1.0:
            raise ValueError(f"load must be in [0, 1], got {load}")
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {sorted(KINDS)}, got {kind!r}")
        self._advance()
        self._load = load
        self._kind = KINDS[kind]
        self.job_id = job_id
        self._pids = list(pids)
        self._mem_used_bytes = mem_used_bytes

    def throughput_fraction(self) -> float:
        """Speed of the current work relative to the same work with no cap and no lock.

        The ground truth closed-loop runs compare the optimizer's curves against;
        1.0 when idle (nothing is slowed).
        """
        self._advance()
        if self._load == 0.0:
            return 1.0
        op = self._operating_point()
        x = op.sm_clock_mhz / self.model.sm_clocks_mhz[-1]
        return op.duty * _speed(x, self._kind.clock_sensitivity)

    def mark_lost(self) -> None:
        """Simulate the GPU falling off the bus."""
        self._lost = True

    def reset_energy_counter(self) -> None:
        """Simulate a driver reload: the raw energy counter restarts from zero."""
        self._advance()
        self._energy_raw_j = 0.0

    # -- the model --------------------------------------------------------
    def _power_at(self, sm_clock_mhz: int) -> float:
        if self._load == 0.0:
            return self._idle_w
        x = sm_clock_mhz / self.model.sm_clocks_mhz[-1]
        k = self._kind
        share = k.fixed_share + k.sm_share * _dvfs_power(x)
        return self._idle_w + self._load * self._dynamic_w * share

    def _operating_point(self) -> _OperatingPoint:
        """Where the GPU settles now: highest allowed clock whose power fits the limit."""
        table = self.model.sm_clocks_mhz
        thermal = self.temp_c >= self.model.slowdown_c
        if self._load == 0.0:
            idle_clock = self._locked[0] if self._locked else table[0]
            return _OperatingPoint(idle_clock, self._idle_w, False, thermal)
        ceiling = table[-1]
        if self._locked is not None:
            ceiling = min(ceiling, self._locked[1])
        if thermal:
            ceiling = min(ceiling, round(table[-1] * _THERMAL_CLOCK_SHARE))
        top = bisect.bisect_right(table, ceiling)  # table[:top] are the allowed clocks
        allowed = table[: max(top, 1)]
        n_fit, hi = 0, len(allowed)  # power rises with clock: binary-search how many fit
        while n_fit < hi:
            mid = (n_fit + hi) // 2
            if self._power_at(allowed[mid]) <= self._limit_w:
                n_fit = mid + 1
            else:
                hi = mid
        if n_fit == 0:  # even the lowest clock is over the limit: run part of the time
            p_low = self._power_at(allowed[0])
            duty = min(1.0, max(0.0, (self._limit_w - self._idle_w) / (p_low - self._idle_w)))
            power = self._idle_w + duty * (p_low - self._idle_w)
            return _OperatingPoint(allowed[0], power, True, thermal, duty)
        clock = allowed[n_fit - 1]
        return _OperatingPoint(clock, self._power_at(clock), n_fit < len(allowed), thermal)

    def _mem_temp_target(self, power_w: float) -> float:
        return self.ambient_c + 1.15 * self.model.thermal_r_c_per_w * power_w + 2.0

    def _advance(self) -> None:
        """Integrate energy, violation time and temperature up to now (power held constant)."""
        now = self._clock()
        dt = now - self._t
        if dt <= 0.0:
            return
        op = self._operating_point()
        self._energy_raw_j += op.power_w * dt
        if op.power_capped:
            self._power_violation_s += dt
        if op.thermal_capped:
            self._thermal_violation_s += dt
        tau = self.model.thermal_tau_s
        target = self.ambient_c + self.model.thermal_r_c_per_w * op.power_w
        self.temp_c += (target - self.temp_c) * -math.expm1(-dt / tau)
        mem_target = self._mem_temp_target(op.power_w)
        self.mem_temp_c += (mem_target - self.mem_temp_c) * -math.expm1(-dt / (1.2 * tau))
        self._t = now

    def _check_alive(self) -> None:
        if self._lost:
            raise DeviceLost(f"GPU {self.identity.index} is lost", gpu=self.identity.index)

    # -- GpuDevice ----------------------------------------------------------
    @property
    def lost(self) -> bool:
        return self._lost

    def sample(self) -> GpuSample:
        if self._lost:
            return GpuSample(self.identity, lost=True)
        self._advance()
        op = self._operating_point()
        reasons = 0
        if self._load == 0.0:
            reasons |= THROTTLE_GPU_IDLE
        if op.power_capped:
            reasons |= THROTTLE_SW_POWER_CAP
        if op.thermal_capped:
            reasons |= THROTTLE_SW_THERMAL
        mem_used = self._mem_used_bytes
        if mem_used is None:
            busy = self._load > 0.0 or bool(self._pids)
            mem_used = int(0.7 * self.model.mem_total_bytes) if busy else 0
        return GpuSample(
            self.identity,
            power_w=op.power_w,
            energy_j=self._energy.update(self._energy_raw_j),
            energy_resets=self._energy.resets,
            power_limit_w=self._limit_w,
            power_limit_default_w=self._limits.default_w,
            power_limit_min_w=self._limits.min_w,
            power_limit_max_w=self._limits.max_w,
            power_limit_enforced_w=self._limit_w,
            temp_c=self.temp_c,
            mem_temp_c=self.mem_temp_c,
            util_gpu_pct=100.0 * self._load * op.duty,
            util_mem_pct=self._load * op.duty * self._kind.mem_util_pct,
            sm_clock_mhz=float(op.sm_clock_mhz),
            mem_clock_mhz=float(self.model.mem_clock_mhz),
            power_violation_s=self._power_violation_s,
            thermal_violation_s=self._thermal_violation_s,
            mem_used_bytes=mem_used,
            mem_total_bytes=self.model.mem_total_bytes,
            throttle_reasons=reasons,
            pstate=0 if self._load > 0.0 else _IDLE_PSTATE,
        )

    def power_limits(self) -> PowerLimits:
        return self._limits

    def power_limit_w(self) -> float:
        self._check_alive()
        return self._limit_w

    def enforced_power_limit_w(self) -> float:
        self._check_alive()
        return self._limit_w

    def set_power_limit_w(self, watts: float) -> None:
        self._check_alive()
        check_power_limit(watts, self._limits, gpu=self.identity.index)
        self._advance()
        self._limit_w = float(watts)

    def supported_sm_clocks_mhz(self) -> list[int]:
        return list(self.model.sm_clocks_mhz)

    def lock_sm_clocks_mhz(self, min_mhz: int, max_mhz: int) -> None:
        self._check_alive()
        check_clock_range(min_mhz, max_mhz, list(self.model.sm_clocks_mhz), gpu=self.identity.index)
        self._advance()
        self._locked = (min_mhz, max_mhz)

    def reset_sm_clocks(self) -> None:
        self._check_alive()
        self._advance()
        self._locked = None

    def compute_pids(self) -> list[int]:
        self._check_alive()
        return list(self._pids)


class SimulatedBackend(DeviceBackend):
    """``count`` simulated GPUs on one host; ``models`` cycles when shorter than ``count``."""

    name = "simulated"

    def __init__(
        self,
        count: int = 8,
        *,
        models: str | Sequence[str] = "H100-SXM",
        seed: int = 0,
        host: str = "sim",
        clock: Callable[[], float] = time.monotonic,
        ambient_c: float = 30.0,
    ) -> None:
        names = [models] if isinstance(models, str) else list(models)
        unknown = [n for n in names if n not in MODELS]
        if count < 1 or not names or unknown:
            raise ValueError(
                f"need count >= 1 and models from {sorted(MODELS)}; got {count}, {names}"
            )
        self._count = count
        self._models = [MODELS[n] for n in names]
        self._seed = seed
        self._host = host
        self._clock = clock
        self._ambient_c = ambient_c
        self._devices: list[SimulatedGpu] | None = None

    def open(self) -> None:
        if self._devices is not None:
            return
        self._devices = [
            SimulatedGpu(
                i,
                self._models[i % len(self._models)],
                clock=self._clock,
                seed=self._seed,
                host=self._host,
                ambient_c=self._ambient_c,
            )
            for i in range(self._count)
        ]

    def close(self) -> None:
        self._devices = None

    def devices(self) -> list[GpuDevice]:
        return list(self.gpus())

    def gpus(self) -> list[SimulatedGpu]:
        """The devices with their simulation controls (``set_workload`` and the like)."""
        if self._devices is None:
            raise DeviceError("the simulated backend is not open")
        return list(self._devices)
