"""``dcenergy optimize`` (a problem file, no store) and ``dcenergy recommend`` (from telemetry)."""

from __future__ import annotations

import dataclasses
import json
import time
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from dcenergy.cli.context import state
from dcenergy.phases import Phases

if TYPE_CHECKING:
    from optimizer.plan import Plan
    from optimizer.problem import Problem
    from optimizer.topology import Topology


class Method(StrEnum):
    auto = "auto"
    lp = "lp"
    fast = "fast"


class Objective(StrEnum):
    budget = "budget"
    energy = "energy"
    cost = "cost"


def solve(
    problem: Problem,
    method: str,
    ttl_s: float,
    raw: dict[str, Any] | None = None,
    source: str = "<problem>",
    phases: Phases | None = None,
) -> Plan:
    """Capping (and consolidation when the problem has that section) → a plan.

    ``--method fast`` on a problem the fast path cannot solve exactly falls
    back to the LP, with a note on stderr.
    """
    from optimizer.capping import FastPathNotApplicable, solve_capping
    from optimizer.curves import fit_curves
    from optimizer.plan import make_plan

    ph = phases or Phases()
    consolidation = None
    if raw is not None and isinstance(raw.get("consolidation"), dict):
        from optimizer.consolidation import parse_consolidation, solve_consolidation

        with ph.phase("consolidate"):
            cp = parse_consolidation(raw["consolidation"], source, prefix="consolidation")
            consolidation = solve_consolidation(cp).to_json()
    with ph.phase("fit"):
        fits = fit_curves(problem)
    with ph.phase("solve"):
        try:
            result = solve_capping(problem, method, fits=fits)  # type: ignore[arg-type]
        except FastPathNotApplicable as e:
            typer.echo(
                f"note: --method fast does not apply ({e.reason}); solved with the LP", err=True
            )
            result = solve_capping(problem, "lp", fits=fits)
        return make_plan(problem, result, consolidation=consolidation, ttl_s=ttl_s)


def _emit(problem: Problem, plan: Plan, output: Path | None, as_json: bool) -> None:
    from dcenergy.inputs import write_output
    from optimizer.plan import plan_to_json
    from optimizer.report import render_report

    doc = plan_to_json(plan)
    if output is not None:
        write_output(output, json.dumps(doc, indent=2, allow_nan=False) + "\n")
    if as_json:
        typer.echo(json.dumps(doc, indent=2))
    else:
        typer.echo(render_report(problem, plan))
        if output is not None:
            typer.echo(f"\nplan written to {output}")


def _check_feasible(plan: Plan, output: Path | None) -> None:
    """A best-effort plan (a budget cannot be met, or only by slowing jobs past their
    allowed slowdown) exits 3, after it was printed and written."""
    from dcenergy.errors import BestEffortPlan

    if plan.solver.feasible:
        return
    done = f"printed and written to {output}" if output is not None else "printed"
    domains = plan.solver.infeasible_domains
    if domains:
        short = _names([f"{d.id} by {d.shortfall_w:.0f} W" for d in domains])
        raise BestEffortPlan(
            f"no caps meet every budget ({short}): the best-effort plan was {done}",
            hint="raise those budgets or lower their baseline_w; their GPUs sit at the minimum",
        )
    jobs = plan.solver.slowdown_exceeded
    raise BestEffortPlan(
        f"the budgets hold only with {len(jobs)} job(s) slowed past their allowed slowdown "
        f"({_names(list(jobs))}): the best-effort plan was {done}",
        hint="raise the budgets, or allow more slowdown (--allowed-slowdown / allowed_slowdown)",
    )


def optimize(
    problem_file: Annotated[Path, typer.Argument(help="Problem JSON (docs/problem-format.md).")],
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write the plan JSON here.")
    ] = None,
    method: Annotated[Method, typer.Option(help="Solver: exact fast path, LP, or auto.")] = (
        Method.auto
    ),
    ttl: Annotated[float, typer.Option(help="Plan lease in seconds.", min=1)] = 900.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the plan JSON.")] = False,
) -> None:
    """Solve a problem file offline (no store, no GPU) and print the plan report.

    Exits 3 when no caps meet every budget (the best-effort plan is still
    printed and written).
    """
    from dcenergy.errors import ProblemError
    from dcenergy.inputs import check_output, read_json
    from optimizer.problem import parse_problem

    if output is not None:
        check_output(output)
    raw = read_json(problem_file, ProblemError)
    problem = parse_problem(raw, source=str(problem_file))
    plan = solve(problem, method.value, ttl, raw, str(problem_file))
    _emit(problem, plan, output, as_json)
    _check_feasible(plan, output)


def recommend(
    ctx: typer.Context,
    topology: Annotated[
        Path | None,
        typer.Option(help="Topology JSON (docs/topology.md) [default: optimizer.topology]."),
    ] = None,
    budget: Annotated[
        float | None,
        typer.Option(help="Put the whole fleet under one budget (W) instead of a topology."),
    ] = None,
    objective: Annotated[
        Objective | None, typer.Option(help="What to optimize [default: optimizer.objective].")
    ] = None,
    allowed_slowdown: Annotated[
        float | None,
        typer.Option(help="Per-job allowed slowdown in [0, 1) [default from config].", min=0),
    ] = None,
    confidence: Annotated[
        float | None,
        typer.Option(
            help="How sure each job's slowdown floor must be to hold on its true curve, "
            "given the fit's uncertainty [default: optimizer.slowdown_confidence].",
        ),
    ] = None,
    window: Annotated[
        float | None, typer.Option(help="Telemetry window, seconds [default from config].", min=1)
    ] = None,
    method: Annotated[Method, typer.Option(help="Solver: exact fast path, LP, or auto.")] = (
        Method.auto
    ),
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write the plan JSON here.")
    ] = None,
    save_problem: Annotated[
        Path | None, typer.Option(help="Also write the problem built from telemetry here.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the plan JSON.")] = False,
    apply: Annotated[
        bool, typer.Option("--apply", help="Sign the plan and publish it to the agents.")
    ] = False,
    policy: Annotated[
        Path | None,
        typer.Option(
            "--policy",
            help="Per-job policy from the scheduler, and consolidation inputs "
            "(docs/policy.md) [default: optimizer.policy].",
        ),
    ] = None,
) -> None:
    """Recommend power caps from the store's recent telemetry and print the report.

    Exits 3 when no caps meet every budget (the best-effort plan is still
    printed, written and, with --apply, published), 4 when the store holds no
    GPU telemetry for the window (and then creates nothing), 64 for --budget
    with --topology.
    """
    from dcenergy.errors import ConfigError, NoTelemetry, UsageError
    from dcenergy.inputs import check_output, write_output
    from dcenergy.store.configured import open_configured_store_if_exists
    from optimizer.problem import parse_problem
    from optimizer.snapshot import build_problem, objective_doc
    from optimizer.topology import load_topology, single_domain

    cfg = state(ctx).config()
    o = cfg.optimizer
    if budget is not None and topology is not None:
        raise UsageError(
            "--budget and --topology exclude each other: --budget puts the whole fleet "
            "under one budget instead of the topology's domains",
            hint="pass one of them",
        )
    slowdown = o.allowed_slowdown if allowed_slowdown is None else allowed_slowdown
    if not 0 <= slowdown < 1:
        raise ConfigError("--allowed-slowdown", slowdown, "a fraction in [0, 1)")
    if confidence is not None:
        if not 0.5 <= confidence <= 0.999:
            raise ConfigError("--confidence", confidence, "a probability in [0.5, 0.999]")
        o = dataclasses.replace(o, slowdown_confidence=confidence)
    topo: Topology
    if budget is not None:
        if budget <= 0:
            raise ConfigError("--budget", budget, "a power budget in W > 0")
        topo = single_domain(budget)
    else:
        path = topology or Path(o.topology)
        if topology is None and not path.exists():
            raise ConfigError(
                "optimizer.topology",
                str(path),
                "an existing topology file (docs/topology.md), or pass --budget W",
                source=cfg.source_of("optimizer.topology"),
            )
        topo = load_topology(path)
    for out, option in ((output, "--output"), (save_problem, "--save-problem")):
        if out is not None:
            check_output(out, option)
    from dcenergy.cli.slurm_cmd import load_policy_option

    pol = load_policy_option(cfg, policy)
    window_s = o.window_s if window is None else window
    store = open_configured_store_if_exists(cfg)
    if store is None:  # read-only: no state directory, no empty store made
        raise NoTelemetry(
            f"no GPU telemetry: the embedded store {cfg.embedded_store_path} does not exist yet",
            hint="run the agent first (dcenergy agent run --simulate 8), or point "
            "store.influx_url / store.embedded_path at the store that has it",
        )
    phases = Phases()
    resolver = None
    if pol is not None:
        from optimizer.slurm import policy_resolver

        resolver = policy_resolver(pol, slowdown)
    try:
        with phases.phase("read"):
            now_ns = time.time_ns()
            doc = build_problem(
                store,
                topo,
                now_ns=now_ns,
                window_s=window_s,
                objective=objective_doc(o, objective.value if objective else None),
                allowed_slowdown=slowdown,
                policy=resolver,
            )
            if pol is not None and pol.consolidation is not None:
                from optimizer.live_consolidation import build_consolidation

                snap = build_consolidation(
                    store,
                    now_ns=now_ns,
                    window_s=window_s,
                    objective=doc["objective"],
                    policy=pol.consolidation,
                    jobs=resolver,
                )
                doc["consolidation"] = snap.section
                for note in snap.notes:
                    typer.echo(f"note: consolidation: {note}", err=True)
            if resolver is not None and resolver.last_error:
                typer.echo(f"warning: {resolver.last_error}", err=True)
            if budget is None:
                _warn_coverage(topo, {g["host"] for g in doc["gpus"]})
            if save_problem is not None:
                write_output(save_problem, json.dumps(doc, indent=2) + "\n", "--save-problem")
            problem = parse_problem(doc, "<telemetry>")
        plan = solve(problem, method.value, o.plan_ttl_s, doc, "<telemetry>", phases=phases)
        with phases.phase("report"):
            _emit(problem, plan, output, as_json)
        if apply:
            from dcenergy.cli.plan_cmd import publish_plan
            from optimizer.plan import plan_to_json

            with phases.phase("publish"):
                publish_plan(
                    cfg,
                    plan_to_json(plan),
                    store=store,
                    dry_run=False,
                    problem=problem,
                    quiet_stdout=as_json,
                )
        phases.log(store.stats)
    finally:
        store.close()
    _check_feasible(plan, output)


def _names(hosts: list[str], most: int = 5) -> str:
    shown = ", ".join(hosts[:most])
    return shown + (f" and {len(hosts) - most} more" if len(hosts) > most else "")


def _warn_coverage(topo: Topology, telemetry_hosts: set[str]) -> None:
    """One warning line each: topology hosts without telemetry, telemetry hosts not listed."""
    from optimizer.topology import coverage

    unseen, unlisted = coverage(topo, telemetry_hosts)
    if unseen:
        typer.echo(
            f"warning: {len(unseen)} host(s) in the topology sent no GPU telemetry in the "
            f"window: {_names(unseen)}",
            err=True,
        )
    if unlisted:
        where = (
            f"given default_domains [{', '.join(topo.default_domains)}]"
            if topo.default_domains
            else "in no domain: no budget limits them"
        )
        typer.echo(
            f"warning: {len(unlisted)} host(s) in telemetry are not in the topology, "
            f"{where}: {_names(unlisted)}",
            err=True,
        )


def register(app: typer.Typer) -> None:
    """Add the optimizer commands to the root app."""
    app.command("optimize")(optimize)
    app.command("recommend")(recommend)
