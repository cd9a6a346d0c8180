"""Ground-truth workloads for simulated GPUs: jobs whose speed follows the enforced limit.

A closed-loop run needs jobs whose throughput really depends on the power
limit the agent applies, so the optimizer's predictions can be checked
against something it did not compute. The physics lives in the simulated GPU
(``SimulatedGpu.throughput_fraction``: clock under the limit, Amdahl speed
for the kind of work); this module adds what a scheduler would: jobs with an
id, GPUs, a base rate and a unit, and a cumulative work counter reported
through the agent's own channel (:func:`dcenergy.report.report_progress`),
so the real ``ThroughputTracker → Sampler`` path turns it into ``job`` points.

Kinds, within published power-capping measurements (H100-SXM, 700 W):

* ``training``: compute-bound; about 0.89 of its throughput at 70 % of the
  maximum limit, 0.77 at 50 %;
* ``inference``: memory-bound decode; flat down to about 60 % (0.99), then
  falling;
* ``light``: a service that draws well under the default limit (about 45 %),
  so any cap above its draw costs it nothing;
* idle GPUs belong to no job (``SimulatedGpu.set_workload(0.0)``).

A synchronous multi-GPU job runs at the speed of its slowest GPU.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

from agent.devices.simulated import SimulatedGpu
from dcenergy.report import report_progress

JobKind = Literal["training", "inference", "light"]


@dataclass(frozen=True, slots=True)
class WorkloadProfile:
    """How one kind of job drives its GPUs and counts its work."""

    sim_kind: str  # the simulated GPU's kind of work (agent.devices.simulated.KINDS)
    load: float  # busy share of each of its GPUs, 0..1
    unit: str
    rate_per_gpu: float  # units per second per GPU with no cap


PROFILES: Final[dict[str, WorkloadProfile]] = {
    "training": WorkloadProfile("compute", 1.0, "samples", 420.0),
    "inference": WorkloadProfile("memory", 1.0, "tokens", 2600.0),
    "light": WorkloadProfile("compute", 0.4, "requests", 35.0),
}


class SimJob:
    """One job on simulated GPUs: advances a cumulative counter at its true speed.

    ``run_for(dt_s)`` must be called *before* the shared clock moves by
    ``dt_s``: the GPUs' settings then hold for the whole interval (the fleet
    changes limits only between intervals), so the work added is exact.
    """

    def __init__(
        self,
        job_id: str,
        kind: JobKind,
        gpus: Sequence[SimulatedGpu],
        *,
        base_rate: float | None = None,
        unit: str | None = None,
        pids: Sequence[int] = (),
    ) -> None:
        if kind not in PROFILES:
            raise ValueError(f"kind must be one of {sorted(PROFILES)}, got {kind!r}")
        if not gpus:
            raise ValueError(f"job {job_id} needs at least one GPU")
        if pids and len(pids) != len(gpus):
            raise ValueError("give one pid per GPU, or none")
        profile = PROFILES[kind]
        self.job_id = job_id
        self.kind: JobKind = kind
        self.gpus = tuple(gpus)
        self.profile = profile
        self.unit = unit or profile.unit
        self.base_rate = profile.rate_per_gpu * len(gpus) if base_rate is None else base_rate
        self.pids = tuple(pids)
        self.counter = 0.0
        self.last_rate = 0.0

    @property
    def synchronous(self) -> bool:
        """More than one GPU working in lockstep: the slowest one sets the pace."""
        return len(self.gpus) > 1

    def start(self) -> None:
        """Put the job's work on its GPUs (load, kind of work, pids for attribution)."""
        for i, gpu in enumerate(self.gpus):
            gpu.set_workload(
                self.profile.load,
                self.profile.sim_kind,
                job_id=self.job_id,
                pids=(self.pids[i],) if self.pids else (),
            )

    def speed(self) -> float:
        """Throughput relative to the same job uncapped: its slowest GPU's."""
        return min(g.throughput_fraction() for g in self.gpus)

    def rate_per_s(self) -> float:
        """True throughput now, in ``unit`` per second (the ground truth)."""
        return self.base_rate * self.speed()

    def run_for(self, dt_s: float) -> float:
        """Add the work of the next ``dt_s`` at the current settings; returns the rate used."""
        if not math.isfinite(dt_s) or dt_s < 0:
            raise ValueError(f"dt_s must be a finite number >= 0, got {dt_s}")
        self.last_rate = self.rate_per_s()
        self.counter += self.last_rate * dt_s
        return self.last_rate

    def report(self, directory: Path, time_s: float) -> Path:
        """Publish the cumulative counter as the job itself would (the agent's report channel)."""
        return report_progress(self.job_id, self.counter, self.unit, directory, time_s=time_s)

    def __repr__(self) -> str:
        return f"SimJob({self.job_id!r}, {self.kind!r}, gpus={len(self.gpus)})"
