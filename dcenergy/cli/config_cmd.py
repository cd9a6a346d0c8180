"""``dcenergy config``: show and validate the effective configuration.

``config check`` also checks every file the configuration names (the token and
password files' mode, the CA bundle, the topology, the signing and public
keys: present, right mode, parse) and, with ``--connect``, reaches the store.
A default path with nothing there is reported, not an error: a node needs
only the files of its role.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from dcenergy.cli.context import state
from dcenergy.errors import EX_CONFIG, ConfigError, DcenergyError

if TYPE_CHECKING:
    from dcenergy.config import Config

app = typer.Typer(help="Inspect the configuration.", no_args_is_help=True)


@dataclass(frozen=True)
class Check:
    """One file (or the store) the configuration names, and what checking it found."""

    key: str
    path: str
    status: str  # "ok", "absent" (a default path, nothing there: fine), "skipped" or "error"
    detail: str
    hint: str | None = None
    exit_code: int = EX_CONFIG

    def to_json(self) -> dict[str, Any]:
        return {"key": self.key, "path": self.path, "status": self.status, "detail": self.detail}


def _run(key: str, path: str, probe: Callable[[], str]) -> Check:
    try:
        return Check(key, path, "ok", probe())
    except DcenergyError as e:
        return Check(key, path, "error", e.message, e.hint, e.exit_code)


def _optional(cfg: Config, key: str, path: str, needed_by: str, probe: Callable[[], str]) -> Check:
    """A path with a default: absent and never set is fine; set, or present, it must be good."""
    if key not in cfg.sources and not Path(path).exists() and not Path(path).is_symlink():
        return Check(key, path, "absent", f"not present (default path; {needed_by})")
    return _run(key, path, probe)


def file_checks(cfg: Config) -> list[Check]:
    """Every file the configuration names: exists, right mode, parses."""
    from dcenergy.config import read_secret
    from dcenergy.plan import load_private_key, load_public_key
    from dcenergy.store.configured import check_ca_file, check_embedded_path
    from optimizer.topology import load_topology

    s, o, r = cfg.store, cfg.optimizer, cfg.reconciler
    out: list[Check] = []

    def state_dir() -> str:
        if s.embedded:
            check_embedded_path(cfg)
        if cfg.state_dir.exists() and not cfg.state_dir.is_dir():
            raise ConfigError(
                "agent.state_dir",
                str(cfg.state_dir),
                "a folder, but it is a file",
                source=cfg.source_of("agent.state_dir"),
            )
        return "a folder" if cfg.state_dir.is_dir() else "created on first use"

    out.append(_run("agent.state_dir", str(cfg.state_dir), state_dir))
    for key, path in (("store.token_file", s.token_file), ("store.password_file", s.password_file)):
        if path:

            def secret(key: str = key, path: str = path) -> str:
                try:
                    read_secret(path, key=key)
                except ConfigError as e:
                    raise ConfigError(key, path, e.allowed, source=cfg.source_of(key)) from None
                return "mode 0600, readable"

            out.append(_run(key, path, secret))
    if s.ca_file and not s.embedded:

        def ca() -> str:
            check_ca_file(cfg)
            return "a PEM CA bundle" if s.verify_tls else "not used (store.verify_tls = false)"

        out.append(_run("store.ca_file", s.ca_file, ca))

    def topology() -> str:
        if not Path(o.topology).exists():
            raise ConfigError(
                "optimizer.topology",
                o.topology,
                "an existing topology file (docs/topology.md)",
                source=cfg.source_of("optimizer.topology"),
            )
        topo = load_topology(Path(o.topology))
        return f"{len(topo.domains)} domains, {len(topo.host_domains)} hosts"

    def policy() -> str:
        from optimizer.policy import load_policy

        pol = load_policy(o.policy)
        facts = "job facts from Slurm" if pol.slurm is not None else "no scheduler facts"
        cons = ", consolidation" if pol.consolidation is not None else ""
        return f"{len(pol.rules)} rules, {facts}{cons}"

    def signing_key() -> str:
        load_private_key(o.signing_key, source=cfg.source_of("optimizer.signing_key"))
        return "an Ed25519 private key, mode 0600"

    def public_key() -> str:
        load_public_key(r.public_key, source=cfg.source_of("reconciler.public_key"))
        return "an Ed25519 public key"

    out.append(
        _optional(
            cfg, "optimizer.topology", o.topology, "optimizer host only; or --budget W", topology
        )
    )
    if o.policy:
        out.append(_run("optimizer.policy", o.policy, policy))
    out.append(
        _optional(cfg, "optimizer.signing_key", o.signing_key, "optimizer host only", signing_key)
    )
    out.append(
        _optional(
            cfg,
            "reconciler.public_key",
            r.public_key,
            "without it agents send telemetry but apply no plans",
            public_key,
        )
    )
    return out


def connect_check(cfg: Config) -> Check:
    """Reach the store with one cheap query (the newest agent point of the last minute)."""
    from dcenergy import schema
    from dcenergy.store.configured import open_configured_store_if_exists

    where = cfg.store.influx_url or str(cfg.embedded_store_path)

    def probe() -> str:
        store = open_configured_store_if_exists(cfg)
        if store is None:
            return "embedded store not created yet (the agent creates it)"
        try:
            now = time.time_ns()
            p = store.newest(schema.AGENT.name, tags={}, start_ns=now - 60 * 10**9)
        finally:
            store.close()
        if p is None:
            return "reachable; no agent wrote in the last minute"
        host = p.tags.get(schema.TAG_HOST, "?")
        return f"reachable; agent {host} wrote {(now - p.time_ns) / 1e9:.0f} s ago"

    c = _run("store", where, probe)
    if c.status == "error" and c.hint is None and cfg.store.influx_url:
        src = cfg.source_of("store.influx_url")
        return replace(c, hint=f"check that the server is up and store.influx_url (from {src})")
    return c


@app.command("check")
def check(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of TOML.")] = False,
    connect: Annotated[
        bool, typer.Option("--connect", help="Also reach the store with one cheap query.")
    ] = False,
) -> None:
    """Validate the configuration and every file it names (keys, topology, CA, token
    files: present, mode, parse), print the effective values, secrets redacted.

    Exits 78 when a value or a file is wrong, 69 when --connect cannot reach the store.
    """
    from dcenergy.config import effective

    cfg = state(ctx).config()
    data = effective(cfg)
    checks = file_checks(cfg)
    if connect:
        if any(c.status == "error" and c.key.startswith("store.") for c in checks):
            where = cfg.store.influx_url or str(cfg.embedded_store_path)
            checks.append(Check("store", where, "skipped", "not tried: fix store.* first"))
        else:
            checks.append(connect_check(cfg))
    if as_json:
        doc = {"source": cfg.source, **data, "checks": [c.to_json() for c in checks]}
        typer.echo(json.dumps(doc, indent=2))
    else:
        typer.echo(f"# effective configuration (source: {cfg.source})")
        for section, values in data.items():
            typer.echo(f"\n[{section}]")
            for k, v in values.items():
                typer.echo(f"{k} = {json.dumps(v)}")
        typer.echo("\n# checks")
        for c in checks:
            typer.echo(f"# {c.status:6} {c.key} {c.path}: {c.detail}")
    bad = [c for c in checks if c.status == "error"]
    for c in bad:
        typer.echo(f"dcenergy: error: {c.detail}", err=True)
    if bad:
        hint = next((c.hint for c in bad if c.hint), None)
        if hint:
            typer.echo(f"hint: {hint}", err=True)
        raise typer.Exit(max(c.exit_code for c in bad))
