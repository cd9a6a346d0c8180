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

The work on a GPU is one workload (``set_workload``), several sharing it in
time (``set_shared_workloads``: time slicing or MPS, each with its share), or
one per MIG instance (``enable_mig`` then ``set_instance_workload``; an
instance of ``k`` slices counts ``k/7`` of the GPU). Each contributes its
share of the dynamic power above; all run at the GPU's one clock.

Beyond power, the simulation gives what NVML would, where the model's GPU has
it: GPM activity on Hopper (SM, tensor and DRAM activity, occupancy, PCIe and
NVLink traffic from the workload kind, the load, the duty and — for DRAM and
the links — the speed at the current clock); per-process SM utilization;
MIG instances with their activity; health counters that stay at zero until a
test injects ECC errors or XIDs (``inject_ecc``, ``inject_xid``); no module
power, power smoothing, workload profiles or fan (none of the modelled parts
report them: they are left out, as NVML would say NOT_SUPPORTED).
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import math
import random
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

from agent.devices.base import (
    APPLICATION_XIDS,
    THROTTLE_GPU_IDLE,
    THROTTLE_SW_POWER_CAP,
    THROTTLE_SW_THERMAL,
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
from dcenergy.errors import DeviceError, DeviceLost

_GIB: Final = 1024**3
_V_FLOOR: Final = 0.6  # relative voltage below which V stops falling with f
_THERMAL_CLOCK_SHARE: Final = 0.85  # clock ceiling (share of top) while thermally throttled
_IDLE_PSTATE: Final = 8
_MIG_SLICES: Final = 7  # compute slices of a MIG-capable GPU
_GB: Final = 1e9


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
    gpm: bool = False  # GPM profiling metrics (Hopper and newer)
    mig_sms_per_slice: int = 0  # SMs per MIG slice; 0: no MIG
    nvlink: bool = True  # SXM parts have NVLink; PCIe cards here do not


MODELS: Final[dict[str, GpuModel]] = {
    "H100-SXM": GpuModel(
        "NVIDIA H100 80GB HBM3", 200.0, 700.0, 700.0, 70.0, 620.0,
        _clock_table(210, 1980), 2619, 80 * _GIB, 0.06, 30.0, 87.0,
        gpm=True, mig_sms_per_slice=16,
    ),
    "A100-SXM": GpuModel(
        "NVIDIA A100-SXM4-80GB", 100.0, 400.0, 400.0, 55.0, 335.0,
        _clock_table(210, 1410), 1593, 80 * _GIB, 0.10, 25.0, 87.0,
        mig_sms_per_slice=14,
    ),
    "L40S": GpuModel(
        "NVIDIA L40S", 100.0, 350.0, 350.0, 35.0, 310.0,
        _clock_table(210, 2520), 9001, 48 * _GIB, 0.14, 40.0, 88.0,
        nvlink=False,
    ),
}  # fmt: skip


@dataclass(frozen=True, slots=True)
class WorkloadKind:
    """How a kind of work spends power and how its speed depends on the SM clock."""

    fixed_share: float  # share of dynamic power that does not scale with the SM clock
    sm_share: float  # share that scales with f·V²
    clock_sensitivity: float  # share of run time that scales with 1/f (Amdahl)
    mem_util_pct: float  # memory-controller busy share at full load
    # GPM activity at full load and full speed (shares 0-1; traffic in GB/s)
    sm_active: float = 0.9
    tensor_active: float = 0.5
    occupancy: float = 0.4
    pcie_gbps: float = 2.0
    nvlink_gbps: float = 20.0


KINDS: Final[dict[str, WorkloadKind]] = {
    "compute": WorkloadKind(0.08, 0.92, 0.85, 30.0, 0.95, 0.70, 0.45, 2.0, 60.0),
    "mixed": WorkloadKind(0.20, 0.65, 0.55, 55.0, 0.80, 0.40, 0.35, 4.0, 20.0),
    "memory": WorkloadKind(0.30, 0.35, 0.15, 85.0, 0.60, 0.10, 0.25, 6.0, 5.0),
}


@dataclass(frozen=True, slots=True)
class SimWork:
    """One workload among those sharing a GPU in time (``set_shared_workloads``)."""

    load: float
    kind: str = "compute"
    job_id: str | None = None
    pids: Sequence[int] = ()
    share: float = 1.0  # share of the GPU's time (time slicing) or SMs (MPS) it gets


@dataclass(frozen=True, slots=True)
class _Work:
    load: float
    kind: WorkloadKind
    weight: float  # share of the GPU: 1 alone, its share when shared, slices/7 on MIG
    job_id: str | None = None
    pids: tuple[int, ...] = ()
    mem_used_bytes: int | None = None


@dataclass(slots=True)
class _SimMig:
    uuid: str
    gpu_instance_id: int
    profile: str
    slices: int
    sm_count: int
    mem_total_bytes: int
    work: _Work


def _parse_profile(profile: str) -> tuple[int, int]:
    """(slices, memory GB) of a MIG profile name such as ``3g.40gb``."""
    g, _, rest = profile.partition("g.")
    if not (g.isdigit() and rest.endswith("gb") and rest[:-2].isdigit()):
        raise ValueError(f"MIG profile must look like 3g.40gb, got {profile!r}")
    return int(g), int(rest[:-2])


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


def _work(
    load: float,
    kind: str,
    weight: float,
    job_id: str | None,
    pids: Sequence[int],
    mem_used_bytes: int | None = None,
) -> _Work:
    if not 0.0 <= load <= 1.0:
        raise ValueError(f"load must be in [0, 1], got {load}")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {sorted(KINDS)}, got {kind!r}")
    return _Work(load, KINDS[kind], weight, job_id, tuple(pids), mem_used_bytes)


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
        self._set_works([_Work(0.0, KINDS["compute"], 1.0)])
        self._mig: list[_SimMig] | None = None
        self.job_id: str | None = None
        self._seed_host = (seed, host)
        self._health = GpuHealth(
            ecc_corrected_volatile=0,
            ecc_uncorrected_volatile=0,
            ecc_corrected_aggregate=0,
            ecc_uncorrected_aggregate=0,
            remap_corrected_rows=0,
            remap_uncorrected_rows=0,
            remap_pending=0,
            remap_failure=0,
            pcie_replay_total=0,
        )
        if model.nvlink:
            self._health.nvlink_crc_flit_errors_total = 0
            self._health.nvlink_crc_data_errors_total = 0
            self._health.nvlink_replay_errors_total = 0
            self._health.nvlink_recovery_errors_total = 0
        self._xids: list[int] = []
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
        if self._mig is not None:
            raise ValueError("MIG is enabled: use set_instance_workload")
        work = _work(load, kind, 1.0, job_id, pids, mem_used_bytes)
        self._advance()
        self._set_works([work])
        self.job_id = job_id

    def set_shared_workloads(self, works: Sequence[SimWork]) -> None:
        """Several workloads sharing the GPU (time slicing, MPS), each with its share."""
        if self._mig is not None:
            raise ValueError("MIG is enabled: use set_instance_workload")
        if not works or sum(w.share for w in works) > 1.0 + 1e-9:
            raise ValueError("need at least one workload and shares that sum to at most 1")
        parts = [_work(w.load, w.kind, w.share, w.job_id, w.pids) for w in works]
        self._advance()
        self._set_works(parts)
        self.job_id = works[0].job_id

    def enable_mig(self, profiles: Sequence[str]) -> None:
        """Turn MIG on with one instance per profile (``1g.10gb``, ``3g.40gb``), all idle."""
        if not self.model.mig_sms_per_slice:
            raise ValueError(f"{self.model.name} has no MIG")
        parsed = [_parse_profile(p) for p in profiles]
        if not parsed or sum(k for k, _ in parsed) > _MIG_SLICES:
            raise ValueError(f"MIG profiles need 1 to {_MIG_SLICES} slices in all: {profiles}")
        self._advance()
        seed, host = self._seed_host
        self._mig = [
            _SimMig(
                uuid="MIG-" + sim_uuid(seed, f"{host}/mig{i}", self.identity.index)[4:],
                gpu_instance_id=i + 1,
                profile=profile,
                slices=k,
                sm_count=k * self.model.mig_sms_per_slice,
                mem_total_bytes=gb * 1000**3,
                work=_Work(0.0, KINDS["compute"], k / _MIG_SLICES),
            )
            for i, (profile, (k, gb)) in enumerate(zip(profiles, parsed, strict=True))
        ]
        self._set_works([m.work for m in self._mig])
        self.identity = dataclasses.replace(self.identity, mig_mode=True)
        self.job_id = None

    def set_instance_workload(
        self,
        instance: int,
        load: float,
        kind: str = "compute",
        job_id: str | None = None,
        pids: Sequence[int] = (),
        mem_used_bytes: int | None = None,
    ) -> None:
        """What MIG instance ``instance`` (0-based, in ``enable_mig`` order) runs from now on."""
        if self._mig is None:
            raise ValueError("MIG is not enabled")
        inst = self._mig[instance]
        work = _work(load, kind, inst.slices / _MIG_SLICES, job_id, pids, mem_used_bytes)
        self._advance()
        inst.work = work
        self._set_works([m.work for m in self._mig])
        self.job_id = next((w.job_id for w in self._works if w.job_id), None)

    def inject_xid(self, code: int) -> None:
        """An XID event, as the driver would report it (79: fell off the bus, 48: DBE)."""
        self._xids.append(code)

    def inject_ecc(self, *, corrected: int = 0, uncorrected: int = 0) -> None:
        """ECC errors; an uncorrected one remaps its row, pending until a GPU reset."""
        h = self._health
        for name, n in (("corrected", corrected), ("uncorrected", uncorrected)):
            for scope in ("volatile", "aggregate"):
                key = f"ecc_{name}_{scope}"
                setattr(h, key, (getattr(h, key) or 0) + n)
        if uncorrected:
            h.remap_uncorrected_rows = (h.remap_uncorrected_rows or 0) + uncorrected
            h.remap_pending = 1

    def throughput_fraction(self, job_id: str | None = None) -> float:
        """Speed of the current work relative to the same work with no cap and no lock.

        The ground truth closed-loop runs compare the optimizer's curves against;
        1.0 when idle (nothing is slowed). ``job_id`` picks one of several
        workloads (shared GPU, MIG); the first one by default.
        """
        self._advance()
        work = next((w for w in self._works if job_id is None or w.job_id == job_id), None)
        if work is None or work.load == 0.0:
            return 1.0
        op = self._operating_point()
        x = op.sm_clock_mhz / self.model.sm_clocks_mhz[-1]
        return op.duty * _speed(x, work.kind.clock_sensitivity)

    def mark_lost(self) -> None:
        """Simulate the GPU falling off the bus."""
        self._lost = True

    def reset_energy_counter(self) -> None:
        """Simulate a driver reload: the raw energy counter restarts from zero."""
        self._advance()
        self._energy_raw_j = 0.0

    # -- the model --------------------------------------------------------
    def _set_works(self, works: list[_Work]) -> None:
        """The work from now on, with the sums the power model needs (computed once)."""
        self._works = works
        self._busy = any(w.load > 0.0 for w in works)
        self._fixed_load = sum(w.weight * w.load * w.kind.fixed_share for w in works)
        self._sm_load = sum(w.weight * w.load * w.kind.sm_share for w in works)

    def _power_at(self, sm_clock_mhz: int) -> float:
        if not self._busy:
            return self._idle_w
        dvfs = _dvfs_power(sm_clock_mhz / self.model.sm_clocks_mhz[-1])
        return self._idle_w + self._dynamic_w * (self._fixed_load + self._sm_load * dvfs)

    def _operating_point(self) -> _OperatingPoint:
        """Where the GPU settles now: highest allowed clock whose power fits the limit."""
        table = self.model.sm_clocks_mhz
        thermal = self.temp_c >= self.model.slowdown_c
        if not self._busy:
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
        reasons = self._reasons(op)
        mig = self._mig is not None
        mem_used = sum(self._mem_used(w, self.model.mem_total_bytes) for w in self._works)
        if mig:
            assert self._mig is not None
            mem_used = sum(self._mem_used(m.work, m.mem_total_bytes) for m in self._mig)
        busy_share = min(1.0, sum(w.weight * w.load for w in self._works)) * op.duty
        mem_util = sum(w.weight * w.load * w.kind.mem_util_pct for w in self._works) * op.duty
        s = GpuSample(
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
            # NVML has no utilization for a MIG-enabled GPU as a whole
            util_gpu_pct=None if mig else 100.0 * busy_share,
            util_mem_pct=None if mig else mem_util,
            sm_clock_mhz=float(op.sm_clock_mhz),
            mem_clock_mhz=float(self.model.mem_clock_mhz),
            power_violation_s=self._power_violation_s,
            thermal_violation_s=self._thermal_violation_s,
            mem_used_bytes=mem_used,
            mem_total_bytes=self.model.mem_total_bytes,
            throttle_reasons=reasons,
            pstate=0 if self._busy else _IDLE_PSTATE,
        )
        if self.model.gpm:
            for name, value in self._activity(self._works, op).items():
                setattr(s, name, value)
        return s

    def _reasons(self, op: _OperatingPoint) -> int:
        reasons = 0
        if not self._busy:
            reasons |= THROTTLE_GPU_IDLE
        if op.power_capped:
            reasons |= THROTTLE_SW_POWER_CAP
        if op.thermal_capped:
            reasons |= THROTTLE_SW_THERMAL
        return reasons

    @staticmethod
    def _mem_used(work: _Work, total: int) -> int:
        if work.mem_used_bytes is not None:
            return work.mem_used_bytes
        return int(0.7 * total * work.weight) if work.load > 0.0 or work.pids else 0

    def _activity(
        self, works: Sequence[_Work], op: _OperatingPoint, *, scale: float = 1.0
    ) -> dict[str, float]:
        """GPM metrics of ``works`` at ``op`` (``scale``: 1 over the share they fill)."""
        x = op.sm_clock_mhz / self.model.sm_clocks_mhz[-1]
        sm = tensor = occ = dram = pcie = nvl = 0.0
        for w in works:
            busy = w.weight * w.load * op.duty * scale
            rate = busy * _speed(x, w.kind.clock_sensitivity)  # traffic follows the work done
            sm += busy * w.kind.sm_active
            tensor += busy * w.kind.tensor_active
            occ += busy * w.kind.occupancy
            dram += rate * w.kind.mem_util_pct / 100.0
            pcie += rate * w.kind.pcie_gbps
            nvl += rate * w.kind.nvlink_gbps
        # rounded as the NVML backend rounds them: 0.01 %, 1 B/s
        out = {
            "sm_active_pct": round(100.0 * sm, 2),
            "sm_occupancy_pct": round(100.0 * occ, 2),
            "tensor_active_pct": round(100.0 * tensor, 2),
            "dram_active_pct": round(100.0 * dram, 2),
            "pcie_tx_bytes_per_s": float(round(0.25 * pcie * _GB)),
            "pcie_rx_bytes_per_s": float(round(0.75 * pcie * _GB)),
        }
        if self.model.nvlink:
            out["nvlink_tx_bytes_per_s"] = float(round(0.5 * nvl * _GB))
            out["nvlink_rx_bytes_per_s"] = out["nvlink_tx_bytes_per_s"]
        return out

    def mig_instances(self) -> list[MigInstance]:
        if self._lost or self._mig is None:
            return []
        self._advance()
        op = self._operating_point()
        out = []
        for m in self._mig:
            act = self._activity([m.work], op, scale=_MIG_SLICES / m.slices)
            gpm = self.model.gpm
            out.append(
                MigInstance(
                    parent_uuid=self.identity.uuid,
                    uuid=m.uuid,
                    gpu_instance_id=m.gpu_instance_id,
                    compute_instance_id=0,
                    profile=m.profile,
                    sm_count=m.sm_count,
                    mem_used_bytes=self._mem_used(m.work, m.mem_total_bytes),
                    mem_total_bytes=m.mem_total_bytes,
                    sm_active_pct=act["sm_active_pct"] if gpm else None,
                    tensor_active_pct=act["tensor_active_pct"] if gpm else None,
                    dram_active_pct=act["dram_active_pct"] if gpm else None,
                    pids=m.work.pids,
                )
            )
        return out

    def process_utilization(self) -> dict[int, float]:
        """SM utilization per PID: its workload's busy share, split among its PIDs."""
        if self._lost or self._mig is not None:
            return {}  # NVML gives no per-process utilization on MIG
        self._advance()
        op = self._operating_point()
        out: dict[int, float] = {}
        for w in self._works:
            for pid in w.pids:
                out[pid] = 100.0 * w.weight * w.load * op.duty / len(w.pids)
        return out

    def health(self) -> GpuHealth | None:
        if self._lost:
            return None
        self._advance()
        h = dataclasses.replace(self._health)
        h.hw_slowdown, h.hw_thermal_slowdown, h.power_brake = throttle_flags(
            self._reasons(self._operating_point())
        )
        xids, self._xids = self._xids, []
        h.xid_events = len(xids)
        critical = [x for x in xids if x not in APPLICATION_XIDS]
        h.xid_critical_events = len(critical)
        if xids:
            self._health.xid_last = xids[-1]
        if critical:
            self._health.xid_last_critical = critical[-1]
        h.xid_last, h.xid_last_critical = self._health.xid_last, self._health.xid_last_critical
        return h

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
        return [pid for w in self._works for pid in w.pids]


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
