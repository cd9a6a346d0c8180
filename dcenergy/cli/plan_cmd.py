"""``dcenergy keys`` and ``dcenergy apply``: signing and publishing plans.

``keys generate`` makes the optimizer's Ed25519 key pair (private key 0600,
never readable by others, not even for an instant). ``apply PLAN.json`` signs
each host's part of a plan with ``optimizer.signing_key`` and writes it to the
configured store, where each agent picks up its own part; ``--dry-run`` shows
what would change and writes nothing.
"""

from __future__ import annotations

import json
import time
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

TELEMETRY_LOOKBACK_S = 600.0


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
    kid = generate_keypair(priv, pub, force=force)
    typer.echo(f"private key: {priv} (mode 0600; keep it on the optimizer host only)")
    typer.echo(f"public key:  {pub} (copy to every agent)")
    typer.echo(f"key id:      {kid}")


def _read_plan(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(str(path), "<file>", "no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(str(path), "<file>", f"cannot be read ({e})") from None
    try:
        plan = json.loads(text)
    except ValueError as e:
        raise InputError(str(path), "<file>", f"is not valid JSON ({e})") from None
    if not isinstance(plan, dict):
        raise InputError(str(path), "<root>", "must be a JSON object")
    return plan


def _current_limits(store: Store, host: str, now_ns: int) -> dict[str, float]:
    """The newest ``power_limit_w`` per GPU UUID of ``host`` in recent telemetry."""
    from dcenergy import schema

    start = now_ns - int(TELEMETRY_LOOKBACK_S * 1e9)
    out: dict[str, float] = {}
    for p in store.read(schema.GPU.name, start_ns=start, tags={schema.TAG_HOST: host}):
        w = p.fields.get("power_limit_w")
        uuid = p.tags.get(schema.TAG_GPU_UUID)
        if uuid and isinstance(w, int | float) and not isinstance(w, bool):
            out[uuid] = float(w)  # oldest first, so the newest wins
    return out


def _open_store_for_reading(cfg: Config) -> Store | None:
    """The configured store, or None for an embedded store that does not exist yet
    (a dry run must not create it)."""
    from dcenergy.store.configured import open_configured_store

    if cfg.store.embedded and not cfg.embedded_store_path.exists():
        return None
    return open_configured_store(cfg)


def _print_dry_run(parts: list[PlanPart], store: Store | None, now_ns: int) -> None:
    for part in parts:
        current: dict[str, float] = {}
        if store is not None:
            try:
                current = _current_limits(store, part.host, now_ns)
            except StoreError as e:
                typer.echo(f"warning: no telemetry for {part.host}: {e}", err=True)
        typer.echo(f"{part.host}: {len(part.setpoints)} GPUs, mode {part.mode}")
        for s in part.setpoints:
            now_w = current.get(s.gpu_uuid)
            before = f"{now_w:g} W" if now_w is not None else "unknown"
            planned = f"{s.power_limit_w:g} W" if s.power_limit_w is not None else "unchanged"
            clock = f", SM clock <= {s.sm_clock_max_mhz} MHz" if s.sm_clock_max_mhz else ""
            typer.echo(f"  {s.gpu_uuid}: {before} -> {planned}{clock}")


def publish_plan(
    cfg: Config,
    plan: dict[str, Any],
    *,
    store: Store | None = None,
    dry_run: bool = False,
    source: str = "<plan>",
    now_ns: int | None = None,
    problem: Problem | None = None,
) -> list[SignedPart]:
    """Sign and publish ``plan`` (its JSON dict) to ``store`` or the configured one.

    With ``dry_run`` print per host and GPU what would change and write nothing
    (returns ``[]``). A store passed in stays open; one opened here is closed.
    After the parts, the plan's ``plan``/``plan_domain`` records go to the same
    store (``optimizer.records``); ``problem``, when the caller has it, gives
    them domain budgets and the count of capped GPUs (absent without it). A
    failure to write the records is a warning: the plan itself is published.
    """
    from dcenergy.plan import load_private_key
    from dcenergy.publish import publish, split_plan
    from dcenergy.store.configured import open_configured_store

    now = time.time_ns() if now_ns is None else now_ns
    parts = split_plan(plan, seq_from_ns=now, source=source)
    if parts[0].expires_ns <= now:
        raise InputError(source, "expires_ns", "is in the past: every agent would refuse the plan")
    if dry_run:
        reader = store if store is not None else _open_store_for_reading(cfg)
        try:
            _print_dry_run(parts, reader, now)
        finally:
            if reader is not None and store is None:
                reader.close()
        typer.echo("dry run: nothing was signed or written")
        return []
    key = load_private_key(cfg.optimizer.signing_key)
    target = store if store is not None else open_configured_store(cfg)
    try:
        signed = publish(plan, target, key, now, source=source)
        _write_records(target, plan, now, problem)
    finally:
        if store is None:
            target.close()
    gpus = sum(len(s.part.setpoints) for s in signed)
    first = signed[0].part
    typer.echo(
        f"published plan {first.plan_id}: {len(signed)} hosts, {gpus} GPUs, "
        f"seq {first.seq}, key {first.key_id}, expires in {(first.expires_ns - now) / 1e9:.0f} s"
    )
    return signed


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
) -> None:
    """Sign each host's part of a plan and publish it to the store for the agents."""
    cfg = state(ctx).config()
    publish_plan(cfg, _read_plan(plan_file), dry_run=dry_run, source=str(plan_file))


def register(app: typer.Typer) -> None:
    """Add the plan commands to the root app."""
    app.add_typer(keys_app, name="keys")
    app.command("apply")(apply)
