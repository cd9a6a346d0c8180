"""``dcenergy keys`` and ``dcenergy apply``: signing and publishing plans.

``keys generate`` makes the optimizer's Ed25519 key pair (private key 0600,
never readable by others, not even for an instant). ``apply PLAN.json`` signs
each host's part of a plan with ``optimizer.signing_key`` and writes it to the
configured store, where each agent picks up its own part; ``--dry-run`` shows
what would change and writes nothing. ``apply`` refuses (exit 65) a plan for
hosts or GPUs the store's telemetry has not seen in the last hour, or a power
limit outside a GPU's last known limits, unless ``--force``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from dcenergy.cli.context import state
from dcenergy.errors import InputError, StoreError

if TYPE_CHECKING:
    from dcenergy.config import Config
    from dcenergy.plan import PlanPart, SignedPart
    from dcenergy.store.base import Store
    from optimizer.problem import Problem

keys_app = typer.Typer(help="Manage the plan signing keys.", no_args_is_help=True)

FLEET_LOOKBACK_S = 3600.0  # a GPU seen within the last hour is "known", with its last limits
FORCE_HINT = "pass --force to publish anyway (agents still clamp to each GPU's limits)"


@keys_app.command("generate")
def keys_generate(
    ctx: typer.Context,
    private: Annotated[
        Path | None,
        typer.Option("--private", help="Private key file [default: optimizer.signing_key]"),
    ] = None,
    public: Annotated[
        Path | None,
        typer.Option("--public", help="Public key file [default: reconciler.public_key]"),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace existing key files.")] = False,
) -> None:
    """Create an Ed25519 key pair: the private key for the optimizer, the public one for agents."""
    from dcenergy.plan import generate_keypair

    cfg = state(ctx).config()
    priv = private or Path(cfg.optimizer.signing_key)
    pub = public or Path(cfg.reconciler.public_key)
    kid = generate_keypair(
        priv,
        pub,
        force=force,
        private_key_name="--private" if private is not None else "optimizer.signing_key",
        public_key_name="--public" if public is not None else "reconciler.public_key",
    )
    typer.echo(f"private key: {priv} (mode 0600; keep it on the optimizer host only)")
    typer.echo(f"public key:  {pub} (copy to every agent)")
    typer.echo(f"key id:      {kid}")


def _read_plan(path: Path) -> dict[str, Any]:
    from dcenergy.inputs import read_json

    plan = read_json(path)
    if not isinstance(plan, dict):
        raise InputError(str(path), "<root>", "must be a JSON object")
    return plan


@dataclass(frozen=True)
class KnownGpu:
    """A GPU as the store last saw it: its host and last reported limits (None: not reported)."""

    host: str
    min_w: float | None
    max_w: float | None
    limit_w: float | None


def known_gpus(
    store: Store, now_ns: int, lookback_s: float = FLEET_LOOKBACK_S
) -> dict[str, KnownGpu]:
    """Every GPU UUID in the last ``lookback_s`` of telemetry with its last limits.

    One aggregate read (``last`` per GPU and host, computed by the store): what
    crosses the wire grows with GPUs, never with raw rows.
    """
    from dcenergy import schema
    from dcenergy.store.base import Agg, AggregateQuery, Fn

    q = AggregateQuery(
        schema.GPU.name,
        (
            Agg(Fn.LAST, "power_limit_min_w"),
            Agg(Fn.LAST, "power_limit_max_w"),
            Agg(Fn.LAST, "power_limit_w"),
        ),
        now_ns - int(lookback_s * 1e9),
        now_ns + 1,
        by=(schema.TAG_GPU_UUID, schema.TAG_HOST),
    )

    def num(v: object) -> float | None:
        return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None

    out: dict[str, KnownGpu] = {}
    for r in store.aggregate(q):
        uuid = r.tags.get(schema.TAG_GPU_UUID, "")
        if not uuid:
            continue
        out[uuid] = KnownGpu(
            host=r.tags.get(schema.TAG_HOST, ""),
            min_w=num(r.values.get("last_power_limit_min_w")),
            max_w=num(r.values.get("last_power_limit_max_w")),
            limit_w=num(r.values.get("last_power_limit_w")),
        )
    return out


def fleet_problems(plan: dict[str, Any], known: dict[str, KnownGpu]) -> list[tuple[str, str]]:
    """``(field, problem)`` for every setpoint the fleet, as telemetry knows it, cannot take:
    an unknown host, an unknown GPU (or one on another host), a limit outside the GPU's."""
    hosts = {g.host for g in known.values()}
    out: list[tuple[str, str]] = []
    for i, sp in enumerate(plan.get("setpoints") or []):
        where = f"setpoints[{i}]"
        host, gpu, w = sp.get("host"), sp.get("gpu"), sp.get("power_limit_w")
        k = known.get(gpu)
        if host not in hosts:
            out.append((f"{where}.host", f"host {host!r} sent no GPU telemetry in the last hour"))
        elif k is None:
            out.append((f"{where}.gpu", f"GPU {gpu} was not seen on {host} in the last hour"))
        elif k.host != host:
            out.append((f"{where}.host", f"GPU {gpu} is on host {k.host!r}, not {host!r}"))
        elif isinstance(w, int | float) and k.max_w is not None and w > k.max_w + 1e-6:
            out.append(
                (f"{where}.power_limit_w", f"{w:g} W is above GPU {gpu}'s maximum {k.max_w:g} W")
            )
        elif isinstance(w, int | float) and k.min_w is not None and w < k.min_w - 1e-6:
            out.append(
                (f"{where}.power_limit_w", f"{w:g} W is below GPU {gpu}'s minimum {k.min_w:g} W")
            )
    return out


def _refuse(problems: list[tuple[str, str]], source: str) -> None:
    if not problems:
        return
    field, first = problems[0]
    more = f" (and {len(problems) - 1} more setpoints like it)" if len(problems) > 1 else ""
    raise InputError(source, field, first + more, hint=FORCE_HINT)


def _print_dry_run(
    parts: list[PlanPart], known: dict[str, KnownGpu], problems: list[tuple[str, str]]
) -> None:
    for part in parts:
        typer.echo(f"{part.host}: {len(part.setpoints)} GPUs, mode {part.mode}")
        for s in part.setpoints:
            k = known.get(s.gpu_uuid)
            now_w = k.limit_w if k is not None and k.host == part.host else None
            before = f"{now_w:g} W" if now_w is not None else "unknown"
            planned = f"{s.power_limit_w:g} W" if s.power_limit_w is not None else "unchanged"
            clock = f", SM clock <= {s.sm_clock_max_mhz} MHz" if s.sm_clock_max_mhz else ""
            typer.echo(f"  {s.gpu_uuid}: {before} -> {planned}{clock}")
    if problems:
        field, first = problems[0]
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        typer.echo(
            f"warning: apply would refuse this plan without --force: {field}: {first}{more}",
            err=True,
        )


def publish_plan(
    cfg: Config,
    plan: dict[str, Any],
    *,
    store: Store | None = None,
    dry_run: bool = False,
    source: str = "<plan>",
    now_ns: int | None = None,
    problem: Problem | None = None,
    check_fleet: bool = False,
    quiet_stdout: bool = False,
) -> list[SignedPart]:
    """Sign and publish ``plan`` (its JSON dict) to ``store`` or the configured one.

    With ``dry_run`` print per host and GPU what would change and write nothing
    (returns ``[]``). With ``check_fleet`` refuse (``InputError``) setpoints for
    hosts or GPUs telemetry has not seen in the last hour, or outside a GPU's
    last known limits. ``quiet_stdout`` sends the one-line summary to stderr
    (stdout holds a JSON document). A store passed in stays open; one opened
    here is closed.
    After the parts, the plan's ``plan``/``plan_domain`` records go to the same
    store (``optimizer.records``); ``problem``, when the caller has it, gives
    them domain budgets and the count of capped GPUs (absent without it). A
    failure to write the records is a warning: the plan itself is published.
    """
    from dcenergy.plan import load_private_key
    from dcenergy.publish import publish, split_plan
    from dcenergy.store.configured import open_configured_store, open_configured_store_if_exists

    now = time.time_ns() if now_ns is None else now_ns
    parts = split_plan(plan, seq_from_ns=now, source=source)
    if parts[0].expires_ns <= now:
        raise InputError(source, "expires_ns", "is in the past: every agent would refuse the plan")
    if dry_run:
        reader = store if store is not None else open_configured_store_if_exists(cfg)
        known: dict[str, KnownGpu] = {}
        try:
            if reader is not None:
                try:
                    known = known_gpus(reader, now)
                except StoreError as e:
                    typer.echo(f"warning: cannot read the fleet's telemetry: {e}", err=True)
        finally:
            if reader is not None and store is None:
                reader.close()
        _print_dry_run(parts, known, fleet_problems(plan, known) if check_fleet else [])
        typer.echo("dry run: nothing was signed or written")
        return []
    key = load_private_key(cfg.optimizer.signing_key, source=cfg.source_of("optimizer.signing_key"))
    if check_fleet:
        reader = store if store is not None else open_configured_store_if_exists(cfg)
        try:
            _refuse(fleet_problems(plan, known_gpus(reader, now) if reader else {}), source)
        finally:
            if reader is not None and store is None:
                reader.close()
    target = store if store is not None else open_configured_store(cfg)
    try:
        _warn_reverted(target, parts, now)
        signed = publish(plan, target, key, now, source=source)
        _write_records(target, plan, now, problem)
    finally:
        if store is None:
            target.close()
    gpus = sum(len(s.part.setpoints) for s in signed)
    first = signed[0].part
    typer.echo(
        f"published plan {first.plan_id}: {len(signed)} hosts, {gpus} GPUs, "
        f"seq {first.seq}, key {first.key_id}, expires in {(first.expires_ns - now) / 1e9:.0f} s",
        err=quiet_stdout,
    )
    return signed


def _warn_reverted(store: Store, parts: list[PlanPart], now_ns: int) -> None:
    """A plan published by hand replaces a live revert (dcenergy revert): say so."""
    from dcenergy.publish import newest_parts

    try:
        newest = newest_parts(store, now_ns)
    except StoreError:
        return  # the publish itself will report the store
    hosts = sorted(
        p.host
        for p in parts
        if (n := newest.get(p.host)) is not None and n.revert and n.expires_ns > now_ns
    )
    if hosts:
        typer.echo(
            f"warning: this plan ends the revert of {', '.join(hosts)} (dcenergy revert)",
            err=True,
        )


def _write_records(
    store: Store, plan: dict[str, Any], now_ns: int, problem: Problem | None
) -> None:
    """The dashboards' ``plan``/``plan_domain`` points for a published plan; warns on failure."""
    from optimizer.records import plan_points

    try:
        store.write(plan_points(plan, now_ns, problem=problem))
    except StoreError as e:
        typer.echo(f"warning: plan published, but its records were not written: {e}", err=True)


def apply(
    ctx: typer.Context,
    plan_file: Annotated[Path, typer.Argument(metavar="PLAN.json", help="Plan to publish.")],
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Show what would change; write nothing.")
    ] = False,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Publish even setpoints for hosts or GPUs not in the last hour of telemetry, "
            "or outside a GPU's last known limits.",
        ),
    ] = False,
) -> None:
    """Sign each host's part of a plan and publish it to the store for the agents.

    Refuses (exit 65) a plan for hosts or GPUs the store has not seen in the
    last hour, or a limit outside a GPU's last known limits, unless --force.
    """
    cfg = state(ctx).config()
    publish_plan(
        cfg,
        _read_plan(plan_file),
        dry_run=dry_run,
        source=str(plan_file),
        check_fleet=not force,
    )


def register(app: typer.Typer) -> None:
    """Add the plan commands to the root app."""
    app.add_typer(keys_app, name="keys")
    app.command("apply")(apply)
