"""``dcenergy optimizer run``: the central optimizer service (systemd runs exactly this).

Every ``optimizer.interval_s`` it reads the store's telemetry and the topology,
solves, signs each host's part with ``optimizer.signing_key`` and publishes it
(``optimizer.service``). ``--once`` does one run and exits: 0 when a plan was
published, 3 when the published plan is best effort (a budget unmet, or jobs
past their allowed slowdown), the error's exit code otherwise. Heavy imports (the solver,
APScheduler, the store) happen inside the command.

The service keeps its last ``seq`` in systemd's ``$STATE_DIRECTORY`` when the
unit sets one (``StateDirectory=dcenergy-optimizer``: the only place its
sandbox may write, even when the shared config file sets ``agent.state_dir``
for the agent), else in the configuration's state directory.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from dcenergy.cli.context import state
from dcenergy.errors import EX_SOFTWARE, ConfigError, DcenergyError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from dcenergy.config import Config

app = typer.Typer(help="The central optimizer service.", no_args_is_help=True)

KEY_HINT = "create the key pair with `dcenergy keys generate` (copy the public key to every agent)"


class RunFailed(DcenergyError):
    """One optimizer run failed for a reason that is not one of ours (a solver bug)."""

    exit_code = EX_SOFTWARE


def _signing_key(cfg: Config) -> Ed25519PrivateKey:
    from dcenergy.plan import load_private_key

    path = Path(cfg.optimizer.signing_key)
    try:
        return load_private_key(path, source=cfg.source_of("optimizer.signing_key"))
    except ConfigError as e:
        if not path.exists():
            e.hint = KEY_HINT
        raise


def _state_dir(cfg: Config) -> Path:
    if env := os.environ.get("STATE_DIRECTORY"):
        return Path(env.split(":")[0])
    return cfg.state_dir


@app.command("run")
def run(
    ctx: typer.Context,
    once: Annotated[
        bool, typer.Option("--once", help="Solve and publish one plan, then exit.")
    ] = False,
    duration: Annotated[
        float | None,
        typer.Option("--duration", min=0.0, metavar="S", help="Stop after S seconds."),
    ] = None,
    topology: Annotated[
        Path | None,
        typer.Option(
            "--topology",
            metavar="PATH",
            help="Topology JSON (docs/topology.md) [default: optimizer.topology].",
        ),
    ] = None,
    policy: Annotated[
        Path | None,
        typer.Option(
            "--policy",
            metavar="PATH",
            help="Per-job policy from the scheduler (docs/policy.md) [default: optimizer.policy].",
        ),
    ] = None,
) -> None:
    """Publish a signed plan now and every optimizer.interval_s until SIGTERM/SIGINT."""
    from dcenergy.store.configured import open_configured_store
    from optimizer.service import OptimizerService

    cfg = state(ctx).config()
    key = _signing_key(cfg)
    topo = topology or Path(cfg.optimizer.topology)
    if not topo.is_file():
        # At start-up a missing topology is a mistake; later it is a counted, failed run.
        raise ConfigError(
            "--topology" if topology is not None else "optimizer.topology",
            str(topo),
            "an existing topology file (docs/topology.md)",
            source=None if topology is not None else cfg.source_of("optimizer.topology"),
        )
    if policy is not None or cfg.optimizer.policy:
        from dcenergy.cli.slurm_cmd import load_policy_option

        load_policy_option(cfg, policy)  # a bad policy stops the start, as a bad topology does
    if "STATE_DIRECTORY" not in os.environ:
        from dcenergy.store.configured import check_state_dir

        check_state_dir(cfg)
    store = open_configured_store(cfg)
    try:
        service = OptimizerService(
            cfg, store, key, topo, state_dir=_state_dir(cfg), policy_path=policy
        )
        if not once:
            raise typer.Exit(service.run(duration_s=duration))
        try:
            plan = service.run_once(raise_errors=True)
        except DcenergyError:
            raise
        except Exception as e:  # a solver bug: one line, its exit code; --debug shows more
            raise RunFailed(f"optimizer run failed: {type(e).__name__}: {e}") from e
        assert plan is not None
        now = plan.created_ns
        typer.echo(
            f"published plan {plan.plan_id}: {len({s.host for s in plan.setpoints})} hosts, "
            f"{len(plan.setpoints)} GPUs, seq {service.last_seq}, {plan.solver.status}, "
            f"predicted {plan.before.fleet_power_w:.0f} W -> {plan.after.fleet_power_w:.0f} W, "
            f"expires in {(plan.expires_ns - now) / 1e9:.0f} s"
            + (
                f" (not sent to {service.stats.reverted_hosts} reverted hosts)"
                if service.stats.reverted_hosts
                else ""
            )
        )
        if not plan.solver.feasible:
            from dcenergy.errors import BestEffortPlan

            raise BestEffortPlan(
                f"plan {plan.plan_id} is best effort ({plan.solver.status}): "
                + (
                    "budgets not met in "
                    + ", ".join(d.id for d in plan.solver.infeasible_domains[:5])
                    if plan.solver.infeasible_domains
                    else f"{len(plan.solver.slowdown_exceeded)} job(s) past their allowed slowdown"
                ),
                hint="it was published; raise the budgets or allow more slowdown",
            )
    finally:
        store.close()
