"""``dcenergy consolidate`` and ``dcenergy job-energy``: acting through Slurm.

``consolidate`` builds the consolidation section from the store's recent
telemetry and the policy file's ``consolidation`` inputs
(``optimizer/live_consolidation.py``), solves it, prints the moves and the
nodes to free, and the Slurm actions that follow: drain each node the plan
frees (``scontrol update nodename=… state=drain reason="dcenergy: …"``: its
running jobs finish, no new ones start), resume each node dcenergy drained
that the plan no longer frees. A dry run by default; ``--apply`` acts and
writes one ``audit`` point per action (action ``drain``/``resume``, or
``error``). Powering the drained nodes off is Slurm's own power saving
(``SuspendProgram``, ``docs/slurm.md``).

``job-energy JOB`` sums the job's GPU energy from the energy counters in the
store (``optimizer/job_energy.py``) over its time range from Slurm and writes
it into the job's ``AdminComment`` (``dcenergy:gpu_kwh=…,gpus=…``); the epilog
``deploy/slurm/epilog.sh`` calls it.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from dcenergy.cli.context import state
from dcenergy.errors import EX_UNAVAILABLE, ConfigError, DcenergyError

if TYPE_CHECKING:
    from dcenergy.config import Config
    from optimizer.policy import Policy


class ActionsFailed(DcenergyError):
    """Some Slurm action was refused (exit 69); the others were done and audited."""

    exit_code = EX_UNAVAILABLE


def load_policy_option(cfg: Config, path: Path | None) -> Policy | None:
    """``--policy PATH``, else ``optimizer.policy`` (empty: no policy)."""
    from optimizer.policy import load_policy

    if path is not None:
        return load_policy(path)
    configured = cfg.optimizer.policy
    if not configured:
        return None
    if not Path(configured).is_file():
        raise ConfigError(
            "optimizer.policy",
            configured,
            "an existing policy file (docs/policy.md), or empty for none",
            source=cfg.source_of("optimizer.policy"),
        )
    return load_policy(configured)


def consolidate(
    ctx: typer.Context,
    policy: Annotated[
        Path | None,
        typer.Option(
            "--policy", help="Policy JSON with a consolidation section [default: optimizer.policy]."
        ),
    ] = None,
    window: Annotated[
        float | None,
        typer.Option(help="Telemetry window, seconds [default: optimizer.window_s].", min=1),
    ] = None,
    apply: Annotated[
        bool, typer.Option("--apply", help="Drain and resume nodes through Slurm (audited).")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Plan consolidation from telemetry; drain the nodes it frees (dry run without --apply).

    Resumes nodes dcenergy drained earlier that the new plan needs. Exits 4
    without telemetry, 69 when Slurm refused an action.
    """
    from dcenergy.errors import NoTelemetry
    from dcenergy.store.configured import open_configured_store, open_configured_store_if_exists
    from optimizer.consolidation import parse_consolidation, solve_consolidation
    from optimizer.live_consolidation import build_consolidation
    from optimizer.report import _consolidation
    from optimizer.slurm import (
        SlurmClient,
        apply_node_actions,
        audit_points,
        plan_node_actions,
        policy_resolver,
    )
    from optimizer.snapshot import objective_doc

    cfg = state(ctx).config()
    o = cfg.optimizer
    pol = load_policy_option(cfg, policy)
    if pol is None or pol.consolidation is None:
        raise ConfigError(
            "--policy" if policy is not None else "optimizer.policy",
            str(policy or o.policy or ""),
            "a policy file with a 'consolidation' section (docs/policy.md)",
            source=None if policy is not None else cfg.source_of("optimizer.policy"),
        )
    window_s = o.window_s if window is None else window
    store = open_configured_store(cfg) if apply else open_configured_store_if_exists(cfg)
    if store is None:
        raise NoTelemetry(
            f"no GPU telemetry: the embedded store {cfg.embedded_store_path} does not exist yet",
            hint="point store.influx_url / store.embedded_path at the store the agents write",
        )
    now = time.time_ns()
    try:
        resolver = policy_resolver(pol, o.allowed_slowdown)
        snap = build_consolidation(
            store,
            now_ns=now,
            window_s=window_s,
            objective=objective_doc(o),
            policy=pol.consolidation,
            jobs=resolver,
        )
        cp = parse_consolidation(snap.section, "<telemetry>", prefix="consolidation")
        result = solve_consolidation(cp, time_limit_s=pol.consolidation.time_limit_s).to_json()
        plan_id = f"consolidation-{now}"
        client = SlurmClient(pol.slurm)
        actions = plan_node_actions(
            list(result.get("nodes_freed") or []), client.nodes(), pol.consolidation.drain_reason
        )
        outcomes = apply_node_actions(client, actions) if apply else []
        if outcomes:
            store.write(audit_points(outcomes, plan_id, now))
    finally:
        store.close()
    for note in [*snap.notes, *([resolver.last_error] if resolver.last_error else [])]:
        typer.echo(f"note: {note}", err=True)
    failed = [x for x in outcomes if not x.done]
    if as_json:
        doc: dict[str, Any] = {
            "plan_id": plan_id,
            "applied": apply,
            "consolidation": result,
            "actions": [
                {
                    "node": a.node,
                    "action": a.action,
                    "reason": a.reason,
                    **_outcome(a, outcomes, apply),
                }
                for a in actions
            ],
        }
        typer.echo(json.dumps(doc, indent=2))
    else:
        typer.echo("\n".join(_consolidation(result)))
        typer.echo("")
        verb = "" if apply else "would "
        for a in actions:
            if a.action == "skip":
                typer.echo(f"  {a.node}: nothing to do ({a.reason})")
                continue
            state_txt = _outcome(a, outcomes, apply)
            err = f" -- FAILED: {state_txt['error']}" if state_txt.get("error") else ""
            typer.echo(f"  {verb}{a.action} {a.node} ({a.reason}){err}")
        if not actions:
            typer.echo("  no node to drain or resume")
        if not apply and any(a.action != "skip" for a in actions):
            typer.echo("\ndry run: pass --apply to act through Slurm")
    if failed:
        raise ActionsFailed(
            f"Slurm refused {len(failed)} action(s): "
            + "; ".join(f"{x.action.action} {x.action.node}: {x.error}" for x in failed[:3]),
            hint="the others were done; each is in the audit measurement",
        )


def _outcome(a: Any, outcomes: list[Any], applied: bool) -> dict[str, Any]:
    if not applied or a.action == "skip":
        return {}
    for x in outcomes:
        if x.action is a:
            return {"done": x.done, **({"error": x.error} if x.error else {})}
    return {}


def job_energy(
    ctx: typer.Context,
    job_id: Annotated[
        str | None, typer.Argument(help="Slurm job id [default: $SLURM_JOB_ID].")
    ] = None,
    write: Annotated[
        bool,
        typer.Option("--write/--no-write", help="Write the figure into the job's AdminComment."),
    ] = True,
    policy: Annotated[
        Path | None,
        typer.Option(
            "--policy", help="Policy JSON (its slurm section) [default: optimizer.policy]."
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """The job's GPU energy (kWh, from the GPUs' energy counters) into its AdminComment.

    The time range comes from Slurm (the job's start, and its end, or now while it
    runs); the GPUs from the job telemetry. Exits 4 when the store has no
    telemetry of the job, 69 when Slurm cannot be asked or refuses the comment.
    """
    from dcenergy.errors import NoTelemetry, UsageError
    from dcenergy.store.configured import open_configured_store_if_exists
    from optimizer.job_energy import job_energy as compute
    from optimizer.slurm import SlurmClient, SlurmError

    cfg = state(ctx).config()
    job = job_id or os.environ.get("SLURM_JOB_ID", "")
    if not job:
        raise UsageError(
            "no job id: pass one, or run inside a Slurm job or epilog",
            hint="dcenergy job-energy 1234",
        )
    pol = load_policy_option(cfg, policy)
    client = SlurmClient(pol.slurm if pol is not None else None)
    info = client.job(job)
    if info.start_time is None:
        raise SlurmError(f"job {job} has not started ({info.state or 'no state'}): no energy yet")
    now_s = time.time()
    end_s = info.end_time if info.end_time is not None and info.end_time <= now_s else now_s
    start_ns, end_ns = int(info.start_time * 1e9), int(end_s * 1e9) + 1_000_000_000
    store = open_configured_store_if_exists(cfg)
    if store is None:
        raise NoTelemetry(
            f"no telemetry: the embedded store {cfg.embedded_store_path} does not exist"
        )
    try:
        result = compute(store, job, start_ns, max(end_ns, start_ns + 1))
    finally:
        store.close()
    comment = result.admin_comment(info.admin_comment)
    # the figure first: an epilog's log keeps it even when Slurm refuses the comment
    how, error = "", None
    if write:
        try:
            how = client.set_admin_comment(job, comment)
        except SlurmError as e:
            error = e
    if as_json:
        doc = {**result.to_json(), "admin_comment": comment, "written": how or None}
        if error is not None:
            doc["write_error"] = error.message
        typer.echo(json.dumps(doc, indent=2))
    else:
        patched = sum(g.patched for g in result.gpus)
        typer.echo(
            f"job {job}: {result.kwh:.4f} kWh of GPU energy on {len(result.gpus)} GPU(s) "
            f"({(end_ns - start_ns) / 1e9:.0f} s)"
            + (f"; {patched} bucket(s) of a restarted counter from mean power" if patched else "")
        )
        if result.no_counter:
            typer.echo(
                f"  GPUs without an energy counter (left out): {', '.join(result.no_counter)}"
            )
        if how:
            typer.echo(f"  AdminComment: {comment} (through {how})")
    if error is not None:
        raise error


def register(app: typer.Typer) -> None:
    app.command("consolidate")(consolidate)
    app.command("job-energy")(job_energy)
