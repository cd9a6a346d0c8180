"""The store the configuration names: InfluxDB when ``store.influx_url`` is set, else embedded.

Every command and service opens its store through here, so the agent, the
optimizer and the CLI always agree on where telemetry and plans live. A
configuration that names a path the store cannot use (a state directory that
is a file, a CA bundle that is missing) is a ``ConfigError`` naming its key.
A read-only command opens with :func:`open_configured_store_if_exists`, which
creates nothing: no state directory, no empty embedded store.
"""

from __future__ import annotations

import os
import ssl
from pathlib import Path

from dcenergy.config import Config, store_password, store_token
from dcenergy.errors import ConfigError
from dcenergy.store import EmbeddedStore, InfluxStore, open_store


def _embedded_key(cfg: Config) -> str:
    return "store.embedded_path" if cfg.store.embedded_path else "agent.state_dir"


def _embedded_error(cfg: Config, allowed: str) -> ConfigError:
    key = _embedded_key(cfg)
    value = cfg.store.embedded_path or str(cfg.state_dir)
    return ConfigError(key, value, allowed, source=cfg.source_of(key))


def check_embedded_path(cfg: Config) -> None:
    """Refuse an embedded store path that is a folder, or whose folder is a file."""
    path = cfg.embedded_store_path
    if path.is_dir():
        raise _embedded_error(cfg, f"a file for the embedded store, but {path} is a folder")
    for parent in (path.parent, *path.parent.parents):
        if parent.exists():
            if not parent.is_dir():
                raise _embedded_error(cfg, f"a folder, but {parent} is a file")
            break


def check_state_dir(cfg: Config, path: Path | None = None) -> None:
    """Refuse a state directory (``agent.state_dir``, or ``path``) that is, or is under, a
    file, or that this process cannot write (a read-only mount, another owner's mode)."""
    target = cfg.state_dir if path is None else path
    for p in (target, *target.parents):
        if p.exists():
            problem = None
            if not p.is_dir():
                problem = "it is a file" if p == target else f"{p} is a file"
            elif not os.access(p, os.W_OK | os.X_OK):
                what = "it" if p == target else str(p)
                problem = f"{what} is not writable by this user (owner, mode or a read-only mount)"
            if problem is not None:
                raise ConfigError(
                    "agent.state_dir",
                    str(target),
                    f"a folder, but {problem}",
                    source=cfg.source_of("agent.state_dir"),
                )
            return


def check_ca_file(cfg: Config) -> None:
    s = cfg.store
    if not s.ca_file or not s.verify_tls:
        return
    source = cfg.source_of("store.ca_file")
    p = Path(s.ca_file)
    if not p.exists():
        raise ConfigError("store.ca_file", s.ca_file, "an existing CA bundle (PEM)", source=source)
    if not p.is_file():
        raise ConfigError(
            "store.ca_file", s.ca_file, "a CA bundle file (PEM), not a folder", source=source
        )
    try:
        ssl.create_default_context(cafile=s.ca_file)
    except (ssl.SSLError, OSError, ValueError) as e:
        raise ConfigError(
            "store.ca_file", s.ca_file, f"a readable CA bundle in PEM ({e})", source=source
        ) from None


def open_configured_store(cfg: Config) -> InfluxStore | EmbeddedStore:
    s = cfg.store
    if s.embedded:
        check_embedded_path(cfg)
        try:
            cfg.embedded_store_path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise _embedded_error(cfg, f"a folder this user can create ({e.strerror})") from None
        return open_store(None, s.database, embedded_path=cfg.embedded_store_path)
    check_ca_file(cfg)
    return open_store(
        s.influx_url,
        s.database,
        embedded_path=cfg.embedded_store_path,
        token=store_token(cfg),
        username=s.username or None,
        password=store_password(cfg),
        ca_file=s.ca_file or None,
        verify_tls=s.verify_tls,
        timeout_s=s.timeout_s,
        create_database=s.create_database,
    )


def open_configured_store_if_exists(cfg: Config) -> InfluxStore | EmbeddedStore | None:
    """The configured store for reading, or None for an embedded store that does not exist
    yet (a read-only command must not create it, nor the state directory)."""
    if cfg.store.embedded:
        check_embedded_path(cfg)
        if not cfg.embedded_store_path.exists():
            return None
    return open_configured_store(cfg)
