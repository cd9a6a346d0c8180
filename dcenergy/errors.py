"""The one error tree of the product.

::

    DcenergyError                 root: the CLI catches it, prints message + hint
    ├── ConfigError               bad configuration or option value (exit 78, EX_CONFIG)
    ├── UsageError                options that exclude each other (exit 64, EX_USAGE)
    ├── InputError                bad input file: problem, plan, topology (exit 65, EX_DATAERR)
    │   └── ProblemError          a problem file that fails validation
    ├── OutputError               an output file (-o) that cannot be written (exit 73, EX_CANTCREAT)
    ├── NoTelemetry               the store has no telemetry for the window (exit 4)
    ├── BestEffortPlan            no plan meets every budget; the best effort was emitted (exit 3)
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

# The CLI's exit codes (README "Commands"); 2 is click's own usage error (unknown option).
EX_OK = 0
EX_FAILURE = 1  # a failure not listed here
EX_INFEASIBLE = 3  # a best-effort plan: some budget cannot be met (the plan is still emitted)
EX_NO_TELEMETRY = 4  # the store holds no telemetry for the window
EX_ATTENTION = 5  # dcenergy status: something needs attention (a silent agent, a refusal...)
EX_USAGE = 64
EX_DATAERR = 65
EX_UNAVAILABLE = 69
EX_SOFTWARE = 70
EX_CANTCREAT = 73
EX_CONFIG = 78
EX_INTERRUPTED = 130

EXIT_CODES: dict[int, str] = {
    EX_OK: "success",
    EX_FAILURE: "a failure not listed here",
    2: "unknown command or option (usage)",
    EX_INFEASIBLE: "best-effort plan: a budget unmet or jobs past their allowed slowdown "
    "(the plan is still printed, written, published)",
    EX_NO_TELEMETRY: "no telemetry in the window",
    EX_ATTENTION: "status: something needs attention (silent agent, refused part, "
    "lapsed lease or restore, drops, lost GPU, thermal guard)",
    EX_USAGE: "options that exclude each other",
    EX_DATAERR: "bad input file (problem, plan, topology) or a plan the fleet refuses",
    EX_UNAVAILABLE: "device or store unavailable, or data left unwritten",
    EX_SOFTWARE: "internal error (a bug): --debug shows the traceback",
    EX_CANTCREAT: "an output file cannot be written",
    EX_CONFIG: "configuration or option value",
    EX_INTERRUPTED: "interrupted (Ctrl-C)",
}


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

    def __init__(
        self,
        key: str,
        value: object,
        allowed: str,
        *,
        source: str | None = None,
        hint: str | None = None,
    ) -> None:
        """``source`` says where the value came from: a config file's path, ``env VAR``,
        ``<defaults>``, or None for a command-line option (``key`` then is the flag,
        ``--budget``) or an unknown origin. The hint names that source."""
        where = f" (from {source})" if source and source != "<defaults>" else ""
        what = f"option '{key}'" if key.startswith("-") else f"config key '{key}'"
        super().__init__(
            f"{what}{where} has value {value!r}: expected {allowed}",
            hint=hint or config_hint(key, source),
        )
        self.key = key
        self.value = value
        self.allowed = allowed
        self.source = source


def config_hint(key: str, source: str | None) -> str:
    """Where to fix ``key``: the flag, the environment variable or the file it came from."""
    if key.startswith("-"):
        return f"pass a valid {key}"
    if source is not None and source.startswith("env "):
        return f"fix the environment variable {source.removeprefix('env ')}"
    if source == "<defaults>":
        return f"set '{key}' in the config file (--config) or DCENERGY_{_env_name(key)}"
    if source:
        return f"fix '{key}' in {source}"
    return f"fix '{key}' in the config file or its DCENERGY_* environment override"


def _env_name(key: str) -> str:
    return key.replace(".", "_").upper()


class UsageError(DcenergyError):
    """Command-line options that cannot be used together."""

    exit_code = EX_USAGE


class OutputError(DcenergyError):
    """An output file the user named cannot be written (missing folder, a folder, no access)."""

    exit_code = EX_CANTCREAT


class NoTelemetry(DcenergyError):
    """The store holds no telemetry for what was asked."""

    exit_code = EX_NO_TELEMETRY


class BestEffortPlan(DcenergyError):
    """No plan meets every budget; the best-effort plan was printed or written anyway."""

    exit_code = EX_INFEASIBLE


class InputError(DcenergyError):
    """An input file (problem, plan, topology) the user gave us is malformed."""

    exit_code = EX_DATAERR

    def __init__(self, path: str, field: str, problem: str, *, hint: str | None = None) -> None:
        super().__init__(f"{path}: field '{field}': {problem}", hint=hint)
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
