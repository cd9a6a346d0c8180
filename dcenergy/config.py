"""Configuration: one TOML file plus ``DCENERGY_<SECTION>_<KEY>`` environment overrides.

Every value is checked once, here; a bad one raises ``ConfigError`` naming the
key, the value and what is allowed, and the CLI exits 78 (EX_CONFIG).
Secrets are never held in the file itself when a ``*_file`` key can point at a
file readable only by its owner (``read_secret`` refuses anything looser).
"""

from __future__ import annotations

import math
import os
import socket
import stat
import tomllib
import types
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

from dcenergy.errors import ConfigError
from dcenergy.lineprotocol import name_problem

DEFAULT_CONFIG_PATH = Path("/etc/dcenergy/dcenergy.toml")
ENV_PREFIX = "DCENERGY_"
# DCENERGY_* variables that are not config overrides (any other one that names no
# section is a typo, refused like an unknown key): the config path, the job report
# directory, Grafana's provisioning variables, the test suite's switch.
OTHER_ENV = frozenset(
    {
        "DCENERGY_CONFIG",
        "DCENERGY_JOBS_DIR",
        "DCENERGY_INFLUX_URL",
        "DCENERGY_INFLUX_DB",
        "DCENERGY_INFLUX_TOKEN",
        "DCENERGY_REQUIRE_INFLUXDB",
        "DCENERGY_REQUIRE_PROMETHEUS",
        "DCENERGY_REQUIRE_SLURM",
    }
)
REDACTED = "***"

Check = Callable[[Any], str | None]  # returns what is allowed when the value is bad


def _positive(v: Any) -> str | None:
    return None if v > 0 else "a number > 0"


def _non_negative(v: Any) -> str | None:
    return None if v >= 0 else "a number >= 0"


def _between(lo: float, hi: float) -> Check:
    def check(v: Any) -> str | None:
        return None if lo <= v <= hi else f"a number in [{lo:g}, {hi:g}]"

    return check


def _one_of(*choices: str) -> Check:
    def check(v: Any) -> str | None:
        return None if v in choices else "one of " + ", ".join(repr(c) for c in choices)

    return check


def _url_or_empty(v: Any) -> str | None:
    if v == "" or str(v).startswith(("http://", "https://")):
        return None
    return "an http:// or https:// URL, or empty for the embedded store"


def _listen_or_empty(v: Any) -> str | None:
    """``host:port`` (``[v6]:port``) with a host, a port in [0, 65535]; empty: no listener."""
    allowed = "host:port ([::1]:port for IPv6, port 0 = any free one), or empty for none"
    if v == "":
        return None
    host, sep, port = str(v).rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or "[" in host or "]" in host or not port.isdigit():
        return allowed
    return None if int(port) <= 65535 else allowed


def _opt(default: Any, check: Check | None = None, *, secret: bool = False, help: str = "") -> Any:
    return field(default=default, metadata={"check": check, "secret": secret, "help": help})


def _default_state_dir() -> Path:
    # systemd's StateDirectory= exports STATE_DIRECTORY; a non-root user gets XDG state.
    if env := os.environ.get("STATE_DIRECTORY"):
        return Path(env.split(":")[0])
    if os.geteuid() == 0:
        return Path("/var/lib/dcenergy")
    xdg = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(xdg) / "dcenergy"


def _default_runtime_dir() -> Path:
    if env := os.environ.get("RUNTIME_DIRECTORY"):
        return Path(env.split(":")[0])
    if os.geteuid() == 0:
        return Path("/run/dcenergy")
    return Path(os.environ.get("XDG_RUNTIME_DIR") or "/tmp") / "dcenergy"  # noqa: S108


@dataclass(frozen=True)
class AgentConfig:
    host: str = _opt("", help="name of this node in telemetry (default: the hostname)")
    state_dir: Path | None = _opt(None, help="spool, saved limits, embedded store")
    runtime_dir: Path | None = _opt(None, help="job report channel lives under <runtime_dir>/jobs")
    backend: str = _opt("nvml", _one_of("nvml", "simulated"), help="GPU backend")
    simulate: int = _opt(0, _non_negative, help="N > 0 uses N simulated GPUs")
    interval_s: float = _opt(1.0, _positive, help="sampling period")
    ship_interval_s: float = _opt(5.0, _positive, help="shipping period")
    spool_max_mb: float = _opt(
        256.0, _positive, help="spool bound on disk, WAL included (+640 KiB); oldest dropped first"
    )
    retention_days: float = _opt(7.0, _positive, help="embedded store retention")
    job_report_max_age_s: float = _opt(120.0, _positive, help="ignore job reports older than")
    metrics_listen: str = _opt(
        "", _listen_or_empty, help="host:port to serve Prometheus /metrics on; empty: no port"
    )
    metrics_dcgm_compat: bool = _opt(
        False, help="/metrics also serves dcgm-exporter's names, units and labels"
    )
    kubelet_socket: str = _opt(
        "",
        help="kubelet pod-resources socket (pods of the GPUs); empty: the default path if present",
    )


@dataclass(frozen=True)
class StoreConfig:
    influx_url: str = _opt("", _url_or_empty, help="InfluxDB URL; empty = embedded SQLite store")
    database: str = _opt("dcenergy", help="database (InfluxDB 2.x: bucket via DBRP)")
    token: str = _opt("", secret=True, help="API token (prefer token_file)")
    token_file: str = _opt("", help="file holding the token, mode 0600")
    username: str = _opt("", help="v1 user (instead of a token)")
    password_file: str = _opt("", help="file holding the password, mode 0600")
    ca_file: str = _opt("", help="CA bundle for TLS verification")
    verify_tls: bool = _opt(True, help="verify the server certificate")
    create_database: bool = _opt(False, help="create the database when it does not exist")
    timeout_s: float = _opt(10.0, _positive, help="HTTP timeout")
    batch_lines: int = _opt(5000, _positive, help="lines per write request (<= 5000)")
    embedded_path: str = _opt("", help="SQLite file (default <state_dir>/dcenergy.sqlite)")

    @property
    def embedded(self) -> bool:
        return self.influx_url == ""


@dataclass(frozen=True)
class OptimizerConfig:
    topology: str = _opt("/etc/dcenergy/topology.json", help="hosts -> racks/rows/feeds, budgets")
    policy: str = _opt(
        "", help="per-job policy from the scheduler (docs/policy.md); empty: every job alike"
    )
    objective: str = _opt("budget", _one_of("budget", "energy", "cost"), help="what to optimize")
    window_s: float = _opt(600.0, _positive, help="telemetry window read for a solve")
    interval_s: float = _opt(300.0, _positive, help="optimizer service solve period")
    plan_ttl_s: float = _opt(900.0, _positive, help="plan lease; agents revert after it")
    allowed_slowdown: float = _opt(0.1, help="default per-job allowed slowdown [0, 1)")
    slowdown_confidence: float = _opt(
        0.95, _between(0.5, 0.999), help="how sure each job's slowdown floor must be to hold"
    )
    job_value: str = _opt(
        "size",
        _one_of("size", "per_job"),
        help="budget objective: a job's progress counts per GPU ('size') or per job ('per_job')",
    )
    probing: str = _opt(
        "off",
        _one_of("off", "on"),
        help="probe jobs whose curve is uncertain with short caps inside their allowance",
    )
    probe_budget_share: float = _opt(
        0.1, _between(0.0, 1.0), help="share of each domain's budget probed at one time"
    )
    probe_lease_s: float = _opt(120.0, _positive, help="how long a probe cap holds")
    price_per_kwh: float = _opt(0.12, _non_negative, help="energy price")
    pue: float = _opt(1.3, help="power usage effectiveness (>= 1)")
    carbon_g_per_kwh: float = _opt(400.0, _non_negative, help="grid carbon intensity")
    signing_key: str = _opt("/etc/dcenergy/plan.key", help="Ed25519 private key (mode 0600)")


@dataclass(frozen=True)
class ReconcilerConfig:
    enabled: bool = _opt(True, help="apply signed plans to the GPUs")
    public_key: str = _opt("/etc/dcenergy/plan.pub", help="Ed25519 public key of the optimizer")
    interval_s: float = _opt(10.0, _positive, help="how often to fetch this host's plan part")
    poll_when_due: bool = _opt(
        False,
        help="while a lease holds, fetch in full only when the next plan is due "
        "(other ticks ask only for a newer part: a revert is still seen)",
    )
    min_w: float = _opt(0.0, _non_negative, help="local floor for caps (0 = hardware minimum)")
    max_w: float = _opt(0.0, _non_negative, help="local ceiling for caps (0 = hardware max)")
    max_step_w: float = _opt(100.0, _positive, help="largest change per reconcile")
    max_clock_skew_s: float = _opt(30.0, _non_negative, help="plan dated this far ahead is ok")
    safe_cap_w: float = _opt(0.0, _non_negative, help="fallback cap on lease loss (0 = saved)")
    thermal_limit_c: float = _opt(87.0, _positive, help="thermal guard threshold")
    thermal_step_w: float = _opt(25.0, _positive, help="thermal guard cap reduction")


@dataclass(frozen=True)
class Config:
    agent: AgentConfig = field(default_factory=AgentConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    reconciler: ReconcilerConfig = field(default_factory=ReconcilerConfig)
    source: str = field(default="<defaults>", metadata={"internal": True})
    # "section.key" -> where its value came from (the file's path or "env VAR"); unset keys absent
    sources: Mapping[str, str] = field(
        default_factory=dict, compare=False, hash=False, repr=False, metadata={"internal": True}
    )

    def source_of(self, key: str) -> str:
        """Where ``key`` ("section.key") got its value: a file, ``env VAR`` or ``<defaults>``."""
        return self.sources.get(key, "<defaults>")

    @property
    def host(self) -> str:
        return self.agent.host or socket.gethostname()

    @property
    def state_dir(self) -> Path:
        return self.agent.state_dir or _default_state_dir()

    @property
    def runtime_dir(self) -> Path:
        return self.agent.runtime_dir or _default_runtime_dir()

    @property
    def embedded_store_path(self) -> Path:
        if self.store.embedded_path:
            return Path(self.store.embedded_path)
        return self.state_dir / "dcenergy.sqlite"


_SECTIONS: dict[str, type[Any]] = {
    "agent": AgentConfig,
    "store": StoreConfig,
    "optimizer": OptimizerConfig,
    "reconciler": ReconcilerConfig,
}


def _convert(key: str, raw: Any, typ: Any, source: str) -> Any:
    """Coerce a TOML or environment value to the field's type, or say what is allowed."""
    if get_origin(typ) in (types.UnionType,):
        typ = next(a for a in get_args(typ) if a is not type(None))
    from_env = isinstance(raw, str) and source.startswith("env")
    try:
        if typ is bool:
            if isinstance(raw, bool):
                return raw
            if from_env and raw.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
                return raw.lower() in ("1", "true", "yes", "on")
            raise ValueError
        if typ is int:
            if isinstance(raw, bool):
                raise ValueError
            if isinstance(raw, int) or from_env:
                return int(raw)
            raise ValueError
        if typ is float:
            if isinstance(raw, bool):
                raise ValueError
            if isinstance(raw, int | float) or from_env:
                value = float(raw)
                if not math.isfinite(value):
                    raise ValueError
                return value
            raise ValueError
        if typ is str:
            if isinstance(raw, str):
                return raw
            raise ValueError
        if typ is Path:
            if isinstance(raw, str) and raw:
                return Path(raw)
            raise ValueError
    except ValueError:
        pass
    names = {
        bool: "true or false",
        int: "an integer",
        float: "a finite number",
        str: "a string",
        Path: "a non-empty path",
    }
    raise ConfigError(key, raw, names.get(typ, str(typ)), source=source)


def _build_section(
    name: str, cls: type[Any], values: Mapping[str, Any], sources: Mapping[str, str]
) -> Any:
    hints = get_type_hints(cls)
    known = {f.name: f for f in fields(cls)}
    for k in values:
        if k not in known:
            allowed = ", ".join(sorted(known))
            raise ConfigError(
                f"{name}.{k}",
                values[k],
                f"a known key of [{name}]: {allowed}",
                source=sources.get(k),
            )
    kwargs: dict[str, Any] = {}
    for k, raw in values.items():
        key = f"{name}.{k}"
        value = _convert(key, raw, hints[k], sources[k])
        check = known[k].metadata.get("check")
        if check is not None and (allowed := check(value)) is not None:
            raise ConfigError(key, raw, allowed, source=sources[k])
        kwargs[k] = value
    return cls(**kwargs)


def _cross_checks(cfg: Config) -> None:
    o, r, s = cfg.optimizer, cfg.reconciler, cfg.store

    def fail(key: str, value: object, allowed: str) -> ConfigError:
        return ConfigError(key, value, allowed, source=cfg.source_of(key))

    if not 0 <= o.allowed_slowdown < 1:
        raise fail("optimizer.allowed_slowdown", o.allowed_slowdown, "a fraction in [0, 1)")
    if o.pue < 1:
        raise fail("optimizer.pue", o.pue, "a number >= 1 (facility power / IT power)")
    if r.max_w and r.min_w > r.max_w:
        raise fail("reconciler.min_w", r.min_w, f"at most reconciler.max_w ({r.max_w})")
    if s.batch_lines > 5000:
        raise fail("store.batch_lines", s.batch_lines, "at most 5000 lines per request")
    if s.token and s.token_file:
        raise fail("store.token", REDACTED, "either store.token or store.token_file")
    host_problem = name_problem(cfg.host, "host name")
    if host_problem is not None:
        if cfg.agent.host:
            raise fail(
                "agent.host", cfg.agent.host, f"a name InfluxDB stores as is: {host_problem}"
            )
        raise ConfigError(
            "agent.host",
            cfg.host,
            f"a name InfluxDB stores as is (this is the hostname): {host_problem}",
            hint="set agent.host in the config file to this node's name",
        )


def load_config(path: Path | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Load ``path`` (or the default, which may be absent), apply env overrides, validate."""
    env = os.environ if env is None else env
    explicit = path is not None or "DCENERGY_CONFIG" in env
    path = path or Path(env.get("DCENERGY_CONFIG", str(DEFAULT_CONFIG_PATH)))
    data: dict[str, Any] = {}
    flag = "--config" if "DCENERGY_CONFIG" not in env else "DCENERGY_CONFIG"
    if path.exists():
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(
                "<file>", str(path), f"valid TOML ({e})", hint=f"fix the TOML syntax in {path}"
            ) from None
        except UnicodeDecodeError as e:
            raise ConfigError(
                "<file>",
                str(path),
                f"a UTF-8 TOML file (byte {e.start}: {e.reason})",
                hint=f"save {path} as UTF-8, or pass another {flag}",
            ) from None
        except OSError as e:
            what = "a file, not a folder" if path.is_dir() else f"a readable file ({e.strerror})"
            raise ConfigError(
                "<file>", str(path), what, hint=f"pass a readable TOML file as {flag}"
            ) from None
    elif explicit:
        raise ConfigError(
            "--config",
            str(path),
            "an existing TOML file",
            hint=f"pass an existing file as {flag}" if flag != "--config" else None,
        )
    source = str(path) if path.exists() else "<defaults>"

    values: dict[str, dict[str, Any]] = {s: {} for s in _SECTIONS}
    sources: dict[str, dict[str, str]] = {s: {} for s in _SECTIONS}
    for section, body in data.items():
        if section not in _SECTIONS:
            raise ConfigError(
                section, "[...]", "a known section: " + ", ".join(_SECTIONS), source=source
            )
        if not isinstance(body, dict):
            raise ConfigError(section, body, "a [section] table", source=source)
        for k, v in body.items():
            values[section][k] = v
            sources[section][k] = source
    for var, raw in env.items():
        if not var.startswith(ENV_PREFIX) or var == "DCENERGY_CONFIG":
            continue
        if var in OTHER_ENV:
            continue
        rest = var[len(ENV_PREFIX) :].lower()
        section, _, key = rest.partition("_")
        if section not in _SECTIONS or not key:
            raise ConfigError(
                var,
                raw,
                "DCENERGY_<SECTION>_<KEY> with a section of "
                + ", ".join(s.upper() for s in _SECTIONS),
                source=f"env {var}",
                hint=f"fix or unset the environment variable {var}",
            )
        values[section][key] = raw
        sources[section][key] = f"env {var}"

    sections = {
        name: _build_section(name, cls, values[name], sources[name])
        for name, cls in _SECTIONS.items()
    }
    agent: AgentConfig = sections["agent"]
    if agent.state_dir is None:
        agent = replace(agent, state_dir=_default_state_dir())
    if agent.runtime_dir is None:
        agent = replace(agent, runtime_dir=_default_runtime_dir())
    cfg = Config(
        agent=agent,
        store=sections["store"],
        optimizer=sections["optimizer"],
        reconciler=sections["reconciler"],
        source=source,
        sources={f"{s}.{k}": src for s, keys in sources.items() for k, src in keys.items()},
    )
    _cross_checks(cfg)
    return cfg


def effective(cfg: Config) -> dict[str, dict[str, Any]]:
    """The configuration as plain data, secrets redacted (for ``dcenergy config check``)."""
    out: dict[str, dict[str, Any]] = {}
    for name in _SECTIONS:
        section = getattr(cfg, name)
        assert is_dataclass(section)
        out[name] = {}
        for f in fields(section):
            v = getattr(section, f.name)
            if f.metadata.get("secret") and v:
                v = REDACTED
            out[name][f.name] = str(v) if isinstance(v, Path) else v
    return out


def describe() -> dict[str, dict[str, tuple[Any, str]]]:
    """Every key with its default and help text (documentation, `config check --defaults`)."""
    out: dict[str, dict[str, tuple[Any, str]]] = {}
    for name, cls in _SECTIONS.items():
        out[name] = {}
        for f in fields(cls):
            default = f.default if f.default is not MISSING else None
            out[name][f.name] = (default, f.metadata.get("help", ""))
    return out


def read_secret(path: str | Path, *, key: str) -> str:
    """Read a token or password file, refusing one that group or others can read."""
    p = Path(path)
    try:
        st = p.stat()
        if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ConfigError(key, str(p), f"a file only its owner can read (chmod 600 {p})")
        return p.read_text().strip()
    except FileNotFoundError as e:
        raise ConfigError(key, str(p), "an existing file") from e
    except PermissionError as e:
        raise ConfigError(key, str(p), "a file this user can read") from e


def store_token(cfg: Config) -> str | None:
    """The InfluxDB token from ``store.token`` or ``store.token_file``; systemd credentials win."""
    if cred := os.environ.get("CREDENTIALS_DIRECTORY"):
        cred_file = Path(cred) / "influx-token"
        # The unit's SetCredential= fallback is an empty credential: fall through then.
        if cred_file.exists() and (token := cred_file.read_text().strip()):
            return token
    if cfg.store.token:
        return cfg.store.token
    if cfg.store.token_file:
        return read_secret(cfg.store.token_file, key="store.token_file")
    return None


def store_password(cfg: Config) -> str | None:
    if cfg.store.password_file:
        return read_secret(cfg.store.password_file, key="store.password_file")
    return None
