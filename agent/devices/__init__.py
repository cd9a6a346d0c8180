"""GPU devices: the interface (``base``) and its backends (``nvml``, ``simulated``).

``open_backend`` is the one way the rest of the agent gets GPUs. Importing this
package imports neither backend's hardware library: ``pynvml`` is loaded only
when an NVML backend opens.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from agent.devices.base import (
    DeviceBackend,
    GpuDevice,
    GpuIdentity,
    GpuSample,
    PowerLimits,
    SetpointOutOfRange,
)

__all__ = [
    "DeviceBackend",
    "GpuDevice",
    "GpuIdentity",
    "GpuSample",
    "PowerLimits",
    "SetpointOutOfRange",
    "open_backend",
]

DEFAULT_SIMULATED_GPUS = 8  # one HGX node


def open_backend(
    kind: Literal["nvml", "simulated"],
    *,
    simulate: int = 0,
    seed: int = 0,
    host: str = "sim",
    clock: Callable[[], float] | None = None,
    nvml_module: Any | None = None,
) -> DeviceBackend:
    """Build a backend and open it; close it (or use it as a context manager) when done.

    ``simulate`` is the number of simulated GPUs (0: ``DEFAULT_SIMULATED_GPUS``);
    ``seed`` and ``host`` make their variation and UUIDs; ``clock`` (monotonic
    seconds) drives their time. ``nvml_module`` replaces ``pynvml`` (tests).
    """
    backend: DeviceBackend
    if kind == "simulated":
        from agent.devices.simulated import SimulatedBackend

        count = simulate if simulate > 0 else DEFAULT_SIMULATED_GPUS
        if clock is None:
            backend = SimulatedBackend(count, seed=seed, host=host)
        else:
            backend = SimulatedBackend(count, seed=seed, host=host, clock=clock)
    elif kind == "nvml":
        if simulate:
            raise ValueError("simulate applies to the simulated backend only")
        from agent.devices.nvml import NvmlBackend

        backend = NvmlBackend(nvml_module)
    else:
        raise ValueError(f"unknown device backend {kind!r}: expected 'nvml' or 'simulated'")
    backend.open()
    return backend
