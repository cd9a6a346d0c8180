"""The one error tree of the product.

::

    DcenergyError                 root: the CLI catches it, prints message + hint
    ├── ConfigError               bad configuration (exit 78, EX_CONFIG)
    ├── InputError                bad input file: problem, plan, topology (exit 65, EX_DATAERR)
    │   └── ProblemError          a problem file that fails validation
    ├── DeviceError               a GPU could not be read or set
    │   ├── DeviceNotSupported    the field/function does not exist on this GPU (never fatal)
    │   ├── DevicePermission      NO_PERMISSION (never fatal)
    │   └── DeviceLost            GPU fell off the bus / driver reloaded; mark it, keep the rest
    ├── StoreError                the telemetry store could not be reached or refused us
    │   └── StoreUnavailable      connection refused, timeout, 5xx: retry later, keep the data
    └── PlanError                 a plan that is unsigned, badly signed, expired or invalid

System errors (database down, NVML error on one GPU) are handled where they
happen; user errors travel up to the CLI, which exits with ``exit_code``.
"""

from __future__ import annotations

EX_DATAERR = 65
EX_SOFTWARE = 70
EX_UNAVAILABLE = 69
EX_CONFIG = 78


class DcenergyError(Exception):
    """Root of every error dcenergy raises on purpose."""

    exit_code: int = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


class ConfigError(DcenergyError):
    """A configuration key has a value we cannot use."""

    exit_code = EX_CONFIG

    def __init__(self, key: str, value: object, allowed: str, *, source: str | None = None) -> None:
        where = f" (from {source})" if source else ""
        super().__init__(
            f"config key '{key}'{where} has value {value!r}: expected {allowed}",
            hint=f"fix '{key}' in the config file or its DCENERGY_* environment override",
        )
        self.key = key
        self.value = value
        self.allowed = allowed


class InputError(DcenergyError):
    """An input file (problem, plan, topology) the user gave us is malformed."""

    exit_code = EX_DATAERR

    def __init__(self, path: str, field: str, problem: str) -> None:
        super().__init__(f"{path}: field '{field}': {problem}")
        self.path = path
        self.field = field
        self.problem = problem


class ProblemError(InputError):
    """An optimizer problem file failed validation."""


class DeviceError(DcenergyError):
    """A GPU operation failed; ``gpu`` names the device where known."""

    exit_code = EX_UNAVAILABLE

    def __init__(self, message: str, *, gpu: int | None = None) -> None:
        super().__init__(message)
        self.gpu = gpu


class DeviceNotSupported(DeviceError):
    """The device or driver does not support this query or setting."""


class DevicePermission(DeviceError):
    """The process lacks the privilege for this operation."""


class DeviceLost(DeviceError):
    """The GPU is gone (fell off the bus, driver reloaded, reset required)."""


class StoreError(DcenergyError):
    """The telemetry store refused a request."""

    exit_code = EX_UNAVAILABLE


class StoreUnavailable(StoreError):
    """The store cannot be reached right now; the caller keeps its data and retries."""


class PlanError(DcenergyError):
    """A plan or plan part is not acceptable (unsigned, bad signature, expired, malformed)."""

    exit_code = EX_DATAERR
