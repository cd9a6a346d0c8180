"""``dcenergy status`` (the fleet at a glance) and ``dcenergy check`` (a Nagios/Icinga plugin).

Both read the configured store through ``dcenergy.status.collect`` (a handful
of aggregate queries) and judge it with the same thresholds. ``status`` prints
fleet totals, one line per host and what needs attention, or ``--json`` (the
schema is in docs/operations.md), and exits 5 (``EX_ATTENTION``) when
something needs attention, 4 when the store holds nothing at all, so that it
can run from cron. ``check`` follows the plugin conventions instead: one
status line ``DCENERGY OK - …|perfdata`` (then one line per finding) and exit
0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN (the store unreachable, a bad option,
any error).
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, NoReturn

import typer

from dcenergy.cli.context import state
from dcenergy.errors import EX_ATTENTION, DcenergyError, NoTelemetry

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    from dcenergy.config import Config
    from dcenergy.status import FleetStatus, HostStatus, Thresholds

NO_DATA_HINT = (
    "start the agents (dcenergy agent run), or check store.influx_url / store.database "
    "(dcenergy config check --connect)"
)

HostOpt = Annotated[
    list[str] | None,
    typer.Option("--host", metavar="H", help="Only this host (repeat for more)."),
]
SilentOpt = Annotated[
    str, typer.Option("--silent", metavar="DURATION", help="An agent this quiet is silent.")
]
WindowOpt = Annotated[
    str,
    typer.Option("--window", metavar="DURATION", help="Hosts that reported within this."),
]
DropsOpt = Annotated[
    str,
    typer.Option(
        "--drops-window", metavar="DURATION", help="Drops and errors that rose within this."
    ),
]
SpoolWarnOpt = Annotated[
    int, typer.Option("--spool-warn", min=1, metavar="N", help="Spool depth that warns.")
]
SpoolCritOpt = Annotated[
    int, typer.Option("--spool-crit", min=1, metavar="N", help="Spool depth that is critical.")
]
LeaseWarnOpt = Annotated[
    str,
    typer.Option(
        "--lease-warn",
        metavar="DURATION",
        help="Warn when a lease has less than this left (0: only a lapsed lease).",
    ),
]


def thresholds_from(
    silent: str, window: str, drops_window: str, spool_warn: int, spool_crit: int, lease_warn: str
) -> Thresholds:
    """The options as ``Thresholds`` (a bad duration is a ConfigError naming its option)."""
    from dcenergy.errors import ConfigError
    from dcenergy.status import Thresholds
    from dcenergy.timespec import parse_duration_s

    if spool_crit < spool_warn:
        raise ConfigError("--spool-crit", spool_crit, f"at least --spool-warn ({spool_warn})")
    return Thresholds(
        silent_s=parse_duration_s(silent, "--silent"),
        window_s=parse_duration_s(window, "--window"),
        drops_window_s=parse_duration_s(drops_window, "--drops-window"),
        spool_warn=spool_warn,
        spool_crit=spool_crit,
        lease_warn_s=0.0
        if lease_warn.strip() == "0"
        else parse_duration_s(lease_warn, "--lease-warn"),
    )


def status_public_key(cfg: Config) -> Ed25519PublicKey | None:
    """The key that checks budget overrides: reconciler.public_key, else the signing key's
    public half, else None (overrides are shown unverified)."""
    from pathlib import Path

    from dcenergy.plan import load_private_key, load_public_key

    try:
        if Path(cfg.reconciler.public_key).is_file():
            return load_public_key(cfg.reconciler.public_key)
        if Path(cfg.optimizer.signing_key).is_file():
            return load_private_key(cfg.optimizer.signing_key).public_key()
    except DcenergyError:
        return None
    return None


def fleet_status(
    cfg: Config, thresholds: Thresholds, hosts: list[str], now_ns: int | None = None
) -> FleetStatus:
    """Collect the status from the configured store; NoTelemetry when it holds nothing."""
    from dcenergy.status import collect
    from dcenergy.store.configured import open_configured_store_if_exists

    now = time.time_ns() if now_ns is None else now_ns
    store = open_configured_store_if_exists(cfg)
    if store is None:
        raise NoTelemetry(
            f"no store yet: the embedded store {cfg.embedded_store_path} does not exist",
            hint=NO_DATA_HINT,
        )
    try:
        st = collect(store, now, thresholds, hosts=hosts, public_key=status_public_key(cfg))
    finally:
        store.close()
    if not st.hosts:
        from dcenergy.timespec import format_duration

        what = f"host {', '.join(hosts)}" if hosts else "any host"
        raise NoTelemetry(
            f"no agent or GPU telemetry from {what} in the last "
            f"{format_duration(thresholds.window_s)}, and no plan part in the last day",
            hint=NO_DATA_HINT,
        )
    return st


def status(
    ctx: typer.Context,
    host: HostOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON document on stdout.")] = False,
    silent: SilentOpt = "2m",
    window: WindowOpt = "1h",
    drops_window: DropsOpt = "15m",
    spool_warn: SpoolWarnOpt = 10_000,
    spool_crit: SpoolCritOpt = 100_000,
    lease_warn: LeaseWarnOpt = "0",
) -> None:
    """Per host: last sample, GPUs, the plan part in force, the agent's actions, spool, drops.

    Exits 5 when something needs attention (a silent agent, a refused part, a
    lapsed lease or a restore, drops, a lost GPU, the thermal guard, a deep
    spool), 4 when the store holds no telemetry: fit for cron.
    """
    cfg = state(ctx).config()
    t = thresholds_from(silent, window, drops_window, spool_warn, spool_crit, lease_warn)
    st = fleet_status(cfg, t, list(host or []))
    if as_json:
        typer.echo(json.dumps(st.to_json(), indent=2, sort_keys=True))
    else:
        for line in render(st):
            typer.echo(line)
    if st.severity is not None:
        raise typer.Exit(EX_ATTENTION)


# --- text ----------------------------------------------------------------------------------


def _age(s: float | None, *, bucketed: bool) -> str:
    from dcenergy.status import AGE_RESOLUTION_S
    from dcenergy.timespec import format_duration

    if s is None:
        return "-"
    if bucketed and s <= AGE_RESOLUTION_S:
        return f"<{AGE_RESOLUTION_S:g}s"
    return format_duration(s)


def _plan_cell(h: HostStatus, now_ns: int) -> tuple[str, str]:
    from dcenergy.status import LAPSED, REVERT_ENDED, REVERTED
    from dcenergy.timespec import format_duration

    p = h.part
    if p is None:
        return "-", "-"
    left = p.lease_left_s(now_ns)
    if h.plan_state == REVERTED:
        return "REVERTED", format_duration(left)
    if h.plan_state == REVERT_ENDED:
        return "(revert ended)", "-"
    if h.plan_state == LAPSED:
        return p.plan_id, f"lapsed {format_duration(-left)}"
    return p.plan_id, format_duration(left)


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]


AUDIT_COLUMNS = (
    ("applied", "APPL"),
    ("clamped", "CLAMP"),
    ("refused", "REFUSED"),
    ("restored", "RESTORED"),
    ("reverted", "REVERTED"),
    ("thermal", "THERMAL"),
    ("drift", "DRIFT"),
    ("error", "ERR"),
)


def render(st: FleetStatus) -> list[str]:
    """The text report: totals, one line per host, then what needs attention."""
    from dcenergy.status import INFO, plural
    from dcenergy.timespec import format_duration

    now = st.now_ns
    tot = st.totals()
    when = datetime.fromtimestamp(now / 1e9, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    lost = f" ({tot['gpus_lost']} lost)" if tot["gpus_lost"] else ""
    silent = f" ({tot['hosts_silent']} silent)" if tot["hosts_silent"] else ""
    out = [
        f"fleet: {plural(tot['hosts'], 'host')}{silent}, "
        f"{plural(tot['gpus'], 'GPU')}{lost}, at {when}"
    ]
    plan = f"newest plan {st.plan.plan_id} ({st.plan.status})" if st.plan else "no plan record"
    out.append(
        f"  plans: {plan}; hosts under a lease {tot['hosts_in_force']}, "
        f"lapsed {tot['hosts_lapsed']}, reverted {tot['hosts_reverted']}"
    )
    for o in st.live_overrides():
        out.append(
            f"  budget override: {o.domain} {o.watts:g} W for {format_duration(o.left_s(now))}"
            + (" (may raise)" if o.allow_raise else "")
            + ("" if o.verified else " (signature not checked)" if o.verified is None else "")
        )
    a = tot["audit"]
    out.append(
        "  agents' actions since each host's part: "
        + ", ".join(f"{n} {name}" for name, n in a.items())
    )
    dropped = sum(tot["dropped_recent"].values())
    out.append(
        f"  spool: {tot['spool_depth']} points waiting; dropped in the last "
        f"{format_duration(st.thresholds.drops_window_s)}: {dropped}"
        + (
            " (" + ", ".join(f"{n} {r}" for r, n in tot["dropped_recent"].items() if n) + ")"
            if dropped
            else ""
        )
    )
    out.append("")
    rows = [
        [
            "HOST",
            "AGENT",
            "GPU",
            "GPUS",
            "PLAN",
            "LEASE",
            *(h for _, h in AUDIT_COLUMNS),
            "SPOOL",
            "DROPS",
        ]
    ]
    for h in st.hosts:
        plan_id, lease = _plan_cell(h, now)
        rows.append(
            [
                h.host,
                _age(h.agent_age_s, bucketed=not h.silent),
                _age(h.gpu_age_s, bucketed=True),
                str(h.gpus) + (f" ({h.gpus_lost} lost)" if h.gpus_lost else ""),
                plan_id,
                lease,
                *(str(h.audit.get(k, 0)) for k, _ in AUDIT_COLUMNS),
                "-" if h.spool_depth is None else str(h.spool_depth),
                str(sum(h.dropped_recent.values())),
            ]
        )
    out += _table(rows)
    problems = [f for f in st.findings if f.severity != INFO]
    notes = [f for f in st.findings if f.severity == INFO]
    if notes:
        out.append("")
        out += [f"note: {f.host + ': ' if f.host else ''}{f.message}" for f in notes]
    if problems:
        out.append("")
        out.append(f"needs attention (exit {EX_ATTENTION}):")
        out += [
            f"  {f.severity.upper():8} {f.host + ': ' if f.host else ''}{f.message}"
            for f in problems
        ]
    return out


# --- check: the Nagios plugin ---------------------------------------------------------------


# The code ``check`` chose, so that ``dcenergy.cli.main`` can tell a CRITICAL (2) from
# click's usage error (also 2), which a plugin must report as UNKNOWN (3).
check_exit: dict[str, int | None] = {"code": None}


def _exit(code: int) -> NoReturn:
    check_exit["code"] = code
    raise typer.Exit(code)


def check(
    ctx: typer.Context,
    host: HostOpt = None,
    silent: SilentOpt = "2m",
    window: WindowOpt = "1h",
    drops_window: DropsOpt = "15m",
    spool_warn: SpoolWarnOpt = 10_000,
    spool_crit: SpoolCritOpt = 100_000,
    lease_warn: LeaseWarnOpt = "0",
) -> None:
    """Nagios/Icinga plugin on the status: exit 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN.

    Prints one line 'DCENERGY OK - ...|perfdata', then one per finding. UNKNOWN:
    the store is unreachable or empty, an option is bad, anything went wrong.
    """
    from dcenergy.status import NAGIOS_UNKNOWN, nagios, nagios_line

    try:
        cfg = state(ctx).config()
        t = thresholds_from(silent, window, drops_window, spool_warn, spool_crit, lease_warn)
        code, lines = nagios(fleet_status(cfg, t, list(host or [])))
    except DcenergyError as e:
        hint = f" (hint: {e.hint})" if e.hint else ""
        typer.echo(nagios_line(NAGIOS_UNKNOWN, f"{e.message}{hint}"))
        _exit(NAGIOS_UNKNOWN)
    except Exception as e:  # a bug is still an UNKNOWN to the monitoring, never a CRITICAL
        if state(ctx).debug:
            raise
        typer.echo(nagios_line(NAGIOS_UNKNOWN, f"internal error: {type(e).__name__}: {e}"))
        _exit(NAGIOS_UNKNOWN)
    for line in lines:
        typer.echo(line)
    _exit(code)


def register(app: typer.Typer) -> None:
    app.command("status")(status)
    app.command("check")(check)
