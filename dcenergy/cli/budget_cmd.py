"""``dcenergy budget set|list|clear``: signed, expiring budget overrides (demand response).

``set`` signs an override with ``optimizer.signing_key`` and writes it to the
store; the optimizer service applies it at its next run (its watts become the
domain's budget, never above the topology's own budget unless
``--allow-raise``) until ``--until``; ``clear`` ends it early; ``list`` shows
each domain's newest override and whether the optimizer will use it
(``dcenergy.overrides``, docs/operations.md).
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from dcenergy.cli.context import state
from dcenergy.errors import ConfigError, DcenergyError

if TYPE_CHECKING:
    from dcenergy.config import Config

app = typer.Typer(help="Budget overrides for demand response.", no_args_is_help=True)

DomainOpt = Annotated[
    str, typer.Option("--domain", metavar="D", help="Power domain id (from the topology).")
]


def _utc(ns: int) -> str:
    return f"{datetime.fromtimestamp(ns / 1e9, UTC):%Y-%m-%d %H:%M:%S} UTC"


def _topology_budget(cfg: Config, domain: str) -> float | None:
    """The topology's budget of ``domain`` (None, with a warning, when it cannot be read);
    a domain the topology lacks is a ConfigError naming the ones it has."""
    from optimizer.topology import load_topology

    path = Path(cfg.optimizer.topology)
    try:
        topo = load_topology(path)
    except DcenergyError as e:
        typer.echo(f"warning: cannot check --domain against the topology ({e.message})", err=True)
        return None
    by_id = {d.id: d for d in topo.domains}
    if domain not in by_id:
        known = ", ".join(sorted(by_id)[:12])
        raise ConfigError("--domain", domain, f"a domain of the topology {path} ({known})")
    return by_id[domain].budget_w


@app.command("set")
def budget_set(
    ctx: typer.Context,
    domain: DomainOpt,
    watts: Annotated[float, typer.Option("--watts", metavar="W", help="The domain's budget.")],
    until: Annotated[
        str,
        typer.Option(
            "--until",
            metavar="T",
            help="When it ends: a duration from now (2h, 90m) or an ISO 8601 time "
            "(2026-07-01T18:00, local time without an offset); at most 7 days.",
        ),
    ],
    allow_raise: Annotated[
        bool,
        typer.Option("--allow-raise", help="Let the override exceed the topology's budget."),
    ] = False,
) -> None:
    """Publish a signed budget override the optimizer applies at its next run."""
    from dcenergy.overrides import MAX_OVERRIDE_S, BudgetOverride, override_point, sign_override
    from dcenergy.plan import load_private_key
    from dcenergy.store.configured import open_configured_store
    from dcenergy.timespec import format_duration, parse_until_ns

    cfg = state(ctx).config()
    now = time.time_ns()
    expires = parse_until_ns(until, now)
    if expires <= now:
        raise ConfigError("--until", until, "a time in the future")
    if expires - now > MAX_OVERRIDE_S * 1e9:
        raise ConfigError("--until", until, f"at most {MAX_OVERRIDE_S / 86400:g} days from now")
    o = BudgetOverride(domain, watts, now, expires, allow_raise=allow_raise)
    key = load_private_key(cfg.optimizer.signing_key, source=cfg.source_of("optimizer.signing_key"))
    o, payload = sign_override(o, key)  # checks the values first
    own = _topology_budget(cfg, domain)
    store = open_configured_store(cfg)
    try:
        store.write([override_point(o, payload)])
    finally:
        store.close()
    typer.echo(
        f"budget override: {domain} {o.watts:g} W until {_utc(expires)} "
        f"({format_duration((expires - now) / 1e9)}); the optimizer applies it at its next run "
        f"(optimizer.interval_s, {cfg.optimizer.interval_s:g} s)"
    )
    if own is not None and o.watts > own and not allow_raise:
        typer.echo(
            f"note: {o.watts:g} W is above the topology's {own:g} W for {domain}: the optimizer "
            "keeps the topology's budget (--allow-raise to exceed it)",
            err=True,
        )


@app.command("clear")
def budget_clear(ctx: typer.Context, domain: DomainOpt) -> None:
    """End a domain's budget override now (the topology's budget applies at the next run)."""
    from dcenergy.cli.status_cmd import status_public_key
    from dcenergy.overrides import BudgetOverride, override_point, read_overrides, sign_override
    from dcenergy.plan import load_private_key
    from dcenergy.store.configured import open_configured_store

    cfg = state(ctx).config()
    now = time.time_ns()
    key = load_private_key(cfg.optimizer.signing_key, source=cfg.source_of("optimizer.signing_key"))
    store = open_configured_store(cfg)
    try:
        live = [
            o
            for o in read_overrides(store, now, status_public_key(cfg))
            if o.domain == domain and o.live(now)
        ]
        if not live:
            typer.echo(f"no budget override in force for {domain}: nothing to clear")
            return
        o, payload = sign_override(BudgetOverride(domain, 0.0, now, now + 1, cleared=True), key)
        store.write([override_point(o, payload)])
    finally:
        store.close()
    typer.echo(
        f"cleared the budget override of {domain} ({live[0].watts:g} W); the topology's budget "
        "applies from the optimizer's next run"
    )


@app.command("list")
def budget_list(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON document on stdout.")] = False,
    show_all: Annotated[
        bool, typer.Option("--all", help="Also ended, cleared and refused ones (7 days).")
    ] = False,
) -> None:
    """Each domain's newest budget override: in force, ended, cleared or refused."""
    from dcenergy.cli.status_cmd import status_public_key
    from dcenergy.overrides import read_overrides
    from dcenergy.store.configured import open_configured_store_if_exists
    from dcenergy.timespec import format_duration

    cfg = state(ctx).config()
    now = time.time_ns()
    store = open_configured_store_if_exists(cfg)
    states = []
    if store is not None:
        try:
            states = read_overrides(store, now, status_public_key(cfg))
        finally:
            store.close()
    shown = [s for s in states if show_all or s.live(now)]

    def what(s: object) -> str:
        from dcenergy.overrides import OverrideState

        assert isinstance(s, OverrideState)
        if s.problem:
            return f"refused: {s.problem}"
        if s.cleared:
            return "cleared"
        if s.expires_ns <= now:
            return "ended"
        return "in force" + (" (signature not checked)" if s.verified is None else "")

    if as_json:
        doc = [
            {
                "domain": s.domain,
                "watts": s.watts,
                "expires_ns": s.expires_ns,
                "left_s": round(s.left_s(now), 1),
                "allow_raise": s.allow_raise,
                "cleared": s.cleared,
                "verified": s.verified,
                "live": s.live(now),
                "state": what(s),
            }
            for s in shown
        ]
        typer.echo(json.dumps({"now_ns": now, "overrides": doc}, indent=2, sort_keys=True))
        return
    if not shown:
        typer.echo("no budget override in force" + ("" if show_all else " (--all: ended ones)"))
        return
    for s in shown:
        raise_note = ", may raise" if s.allow_raise else ""
        left = f", {format_duration(s.left_s(now))} left" if s.live(now) else ""
        typer.echo(
            f"{s.domain}: {s.watts:g} W until {_utc(s.expires_ns)}{left}{raise_note} - {what(s)}"
        )


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="budget")
