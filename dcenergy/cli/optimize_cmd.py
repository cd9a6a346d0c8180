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
    """Capping (and consolidation when the problem has that section) → a plan."""
    from optimizer.capping import solve_capping
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
        result = solve_capping(problem, method, fits=fits)  # type: ignore[arg-type]
        return make_plan(problem, result, consolidation=consolidation, ttl_s=ttl_s)


def _emit(problem: Problem, plan: Plan, output: Path | None, as_json: bool) -> None:
    from optimizer.plan import dump_plan, plan_to_json
    from optimizer.report import render_report

    if output is not None:
        dump_plan(plan, output)
    if as_json:
        typer.echo(json.dumps(plan_to_json(plan), indent=2))
    else:
        typer.echo(render_report(problem, plan))
        if output is not None:
            typer.echo(f"\nplan written to {output}")


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
    """Solve a problem file offline (no store, no GPU) and print the plan report."""
    from optimizer.problem import load_problem

    problem = load_problem(problem_file)
    raw = json.loads(problem_file.read_text())
    _emit(problem, solve(problem, method.value, ttl, raw, str(problem_file)), output, as_json)


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
) -> None:
    """Recommend power caps from the store's recent telemetry and print the report."""
    from dcenergy.errors import ConfigError
    from dcenergy.store.configured import open_configured_store
    from optimizer.problem import parse_problem
    from optimizer.snapshot import build_problem, objective_doc
    from optimizer.topology import load_topology, single_domain

    cfg = state(ctx).config()
    o = cfg.optimizer
    slowdown = o.allowed_slowdown if allowed_slowdown is None else allowed_slowdown
    if not 0 <= slowdown < 1:
        raise ConfigError("--allowed-slowdown", slowdown, "a fraction in [0, 1)")
    if confidence is not None:
        if not 0.5 <= confidence <= 0.999:
            raise ConfigError("--confidence", confidence, "a probability in [0.5, 0.999]")
        o = dataclasses.replace(o, slowdown_confidence=confidence)
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
            )
        topo = load_topology(path)
    store = open_configured_store(cfg)
    phases = Phases()
    try:
        with phases.phase("read"):
            doc = build_problem(
                store,
                topo,
                now_ns=time.time_ns(),
                window_s=o.window_s if window is None else window,
                objective=objective_doc(o, objective.value if objective else None),
                allowed_slowdown=slowdown,
            )
            if save_problem is not None:
                save_problem.write_text(json.dumps(doc, indent=2) + "\n")
            problem = parse_problem(doc, "<telemetry>")
        plan = solve(problem, method.value, o.plan_ttl_s, phases=phases)
        with phases.phase("report"):
            _emit(problem, plan, output, as_json)
        if apply:
            from dcenergy.cli.plan_cmd import publish_plan
            from optimizer.plan import plan_to_json

            with phases.phase("publish"):
                publish_plan(cfg, plan_to_json(plan), store=store, dry_run=False, problem=problem)
        phases.log(store.stats)
    finally:
        store.close()


def register(app: typer.Typer) -> None:
    """Add the optimizer commands to the root app."""
    app.command("optimize")(optimize)
    app.command("recommend")(recommend)
