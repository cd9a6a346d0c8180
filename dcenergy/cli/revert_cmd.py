"""``dcenergy revert``: the emergency stop.

Publishes, for each host named (or every host the store knows), a signed
part with the ``revert`` marker and no setpoints, leased for ``--for``
(default 1 h, at most a day): each agent puts every GPU it changed back at
its saved pre-agent limit (``reconciler.safe_cap_w`` where the site set one)
at its next poll, and audits ``reverted``; the optimizer service publishes
nothing for those hosts until the revert ends. A newer revert for the same
host replaces it (``--for 1s`` ends one early); a plan published by hand
(``dcenergy apply``) replaces it too. Signed with ``optimizer.signing_key``,
as ``apply`` signs.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Annotated

import typer

from dcenergy.cli.context import state
from dcenergy.errors import NoTelemetry, UsageError


def revert(
    ctx: typer.Context,
    host: Annotated[
        list[str] | None,
        typer.Option("--host", metavar="H", help="A host to revert (repeat for more)."),
    ] = None,
    all_hosts: Annotated[
        bool,
        typer.Option(
            "--all",
            help="Every host the store knows (GPU telemetry in the last hour, a plan part "
            "in the last day).",
        ),
    ] = False,
    duration: Annotated[
        str,
        typer.Option(
            "--for", metavar="DURATION", help="How long the GPUs stay at their saved limits."
        ),
    ] = "1h",
) -> None:
    """Return every GPU of the hosts to its saved pre-agent limit now (the emergency stop)."""
    from dcenergy.cli.plan_cmd import known_gpus
    from dcenergy.plan import load_private_key
    from dcenergy.publish import newest_parts, publish_revert
    from dcenergy.store.configured import open_configured_store
    from dcenergy.timespec import format_duration, parse_duration_s

    hosts = sorted(set(host or []))
    if hosts and all_hosts:
        raise UsageError("--host and --all exclude each other", hint="pass one of them")
    if not hosts and not all_hosts:
        raise UsageError("name the hosts to revert", hint="pass --host H (repeatable) or --all")
    seconds = parse_duration_s(duration, "--for")
    cfg = state(ctx).config()
    key = load_private_key(cfg.optimizer.signing_key, source=cfg.source_of("optimizer.signing_key"))
    now = time.time_ns()
    store = open_configured_store(cfg)
    try:
        known = {g.host for g in known_gpus(store, now).values()} | set(newest_parts(store, now))
        if all_hosts:
            hosts = sorted(known)
            if not hosts:
                raise NoTelemetry(
                    "--all: the store knows no host (no GPU telemetry in the last hour, "
                    "no plan part in the last day)",
                    hint="name them with --host H",
                )
        for h in hosts:
            if h not in known:
                typer.echo(
                    f"warning: host {h} sent no GPU telemetry in the last hour and holds no "
                    "plan part: reverting it anyway",
                    err=True,
                )
        signed = publish_revert(store, hosts, key, now, seconds)
    finally:
        store.close()
    until = datetime.fromtimestamp(signed[0].part.expires_ns / 1e9, UTC)
    shown = ", ".join(hosts[:10]) + (f" and {len(hosts) - 10} more" if len(hosts) > 10 else "")
    typer.echo(
        f"reverted {len(hosts)} host{'' if len(hosts) == 1 else 's'} "
        f"for {format_duration(seconds)} "
        f"(until {until:%Y-%m-%d %H:%M:%S} UTC): {shown}"
    )
    typer.echo(
        f"agents put their GPUs back at the saved limits at their next poll "
        f"(reconciler.interval_s, {cfg.reconciler.interval_s:g} s); the optimizer publishes "
        "nothing for these hosts until then (end it early: --for 1s)"
    )


def register(app: typer.Typer) -> None:
    app.command("revert")(revert)
