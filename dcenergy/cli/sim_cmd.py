"""``dcenergy simulate`` and ``dcenergy demo``: a simulated fleet, closed loop, measured savings."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Annotated

import typer

from dcenergy.cli.context import state

NodesOpt = Annotated[int, typer.Option("--nodes", min=1, help="Simulated nodes (node-1..N).")]
GpusOpt = Annotated[int, typer.Option("--gpus", min=1, help="GPUs per node.")]
StepOpt = Annotated[
    float, typer.Option("--step", min=0.1, help="Sampling interval, virtual seconds.")
]
SeedOpt = Annotated[int, typer.Option("--seed", help="Chip-to-chip variation and GPU UUIDs.")]
StateDirOpt = Annotated[
    Path | None,
    typer.Option("--state-dir", help="Keep the agents' state here [default: a temporary dir]."),
]


def _err(msg: str) -> None:
    typer.echo(msg, err=True)


def simulate(
    ctx: typer.Context,
    nodes: NodesOpt = 4,
    gpus: GpusOpt = 8,
    duration: Annotated[
        float, typer.Option("--duration", min=1, help="Virtual seconds to simulate.")
    ] = 600.0,
    speed: Annotated[
        float,
        typer.Option(
            "--speed",
            min=0,
            help="Virtual seconds per wall second (1: real time, as a plan's clock expects); "
            "0: as fast as possible, the data ending now.",
        ),
    ] = 0.0,
    step: StepOpt = 5.0,
    seed: SeedOpt = 0,
    state_dir: StateDirOpt = None,
) -> None:
    """Run a simulated fleet of agents into the configured store (embedded or InfluxDB).

    Point Grafana at the store to watch it; exits 69 when points could not be
    written to the store. With ``reconciler.public_key`` present
    the simulated agents also apply plans published by ``dcenergy recommend --apply``
    (use ``--speed 1`` so the plan's clock and the fleet's agree).
    """
    from agent.simfleet import SimFleet
    from dcenergy.plan import load_public_key
    from dcenergy.store.configured import open_configured_store

    cfg = state(ctx).config()
    pub_path = Path(cfg.reconciler.public_key)
    public_key = (
        load_public_key(pub_path, source=cfg.source_of("reconciler.public_key"))
        if cfg.reconciler.enabled and pub_path.exists()
        else None
    )
    root = state_dir or Path(tempfile.mkdtemp(prefix="dcenergy-simulate-"))
    store = open_configured_store(cfg)
    # With speed s the run takes duration/s wall seconds; start so that it ends at "now".
    wall_s = duration / speed if speed > 0 else 0.0
    start_ns = time.time_ns() - int((duration - wall_s) * 1e9)
    _err(f"simulating {nodes} nodes × {gpus} GPUs for {duration:g} virtual s into {store!r}")
    if public_key is None:
        _err(f"no public key at {pub_path}: agents will not apply plans")
    t0 = time.monotonic()
    next_report = [0.0]

    def on_progress(done_s: float, total_s: float) -> None:
        if speed > 0:  # pace: virtual time runs at `speed` × wall time
            ahead = t0 + done_s / speed - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)
        if done_s >= next_report[0] or done_s >= total_s:
            next_report[0] = done_s + max(60.0, total_s / 10)
            _err(f"  {done_s:6.0f}/{total_s:.0f} virtual s, {time.monotonic() - t0:6.1f} s wall")

    try:
        with SimFleet(
            nodes,
            gpus,
            store=store,
            state_root=root / "agents",
            public_key=public_key,
            reconciler_config=cfg.reconciler,
            seed=seed,
            step_s=step,
            ship_interval_s=cfg.agent.ship_interval_s,
            start_ns=start_ns,
        ) as fleet:
            fleet.run(duration, on_progress)
            left = fleet.flush()
            for job in fleet.jobs:
                typer.echo(
                    f"{job.job_id:10} {job.kind:10} {len(job.gpus)} GPU  "
                    f"{job.last_rate:10,.1f} {job.unit}/s"
                )
            typer.echo(
                f"done: {len(fleet.hosts)} host(s), {len(fleet.gpus())} GPU(s), "
                f"{len(fleet.jobs)} job(s); {left} points left in the spools"
            )
        if left:
            from dcenergy.errors import StoreUnavailable

            kept = (
                f"they stay in the spools under {root / 'agents'}"
                if state_dir is not None
                else "they were discarded with the temporary spools"
            )
            raise StoreUnavailable(
                f"{left} simulated points could not be written to {store!r}: {kept}",
                hint="check that the store is reachable (dcenergy config check --connect)",
            )
    finally:
        store.close()
        if state_dir is None:
            shutil.rmtree(root, ignore_errors=True)


def demo(
    ctx: typer.Context,
    nodes: NodesOpt = 4,
    gpus: GpusOpt = 8,
    phase: Annotated[
        float,
        typer.Option("--phase", min=30, help="Virtual seconds before and after the plan."),
    ] = 600.0,
    probe: Annotated[
        float, typer.Option("--probe", min=0, help="Virtual seconds of cap probing (0: none).")
    ] = 300.0,
    step: StepOpt = 5.0,
    seed: SeedOpt = 0,
    facility_share: Annotated[
        float,
        typer.Option(
            "--budget-share", min=0.3, max=1.0, help="Facility budget / uncapped GPU draw."
        ),
    ] = 0.75,
    state_dir: StateDirOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """The whole loop on a simulated fleet: telemetry → plan → signed → applied → measured.

    Needs no GPU and no server (embedded store in a temporary directory). Prints
    the MEASURED before/after: power against budgets, per-job throughput,
    energy per unit of work, savings per day, and what the agents applied.
    """
    from dcenergy.cli.demo import DemoOptions, render, run_demo

    cfg = state(ctx).config()
    opts = DemoOptions(
        nodes=nodes,
        gpus=gpus,
        probe_s=probe,
        before_s=phase,
        after_s=phase,
        step_s=step,
        seed=seed,
        facility_share=facility_share,
        rack_share=min(1.0, facility_share + 0.05),
    )
    root = state_dir or Path(tempfile.mkdtemp(prefix="dcenergy-demo-"))
    try:
        report = run_demo(cfg, opts, root, progress=_err)
    finally:
        if state_dir is None:
            shutil.rmtree(root, ignore_errors=True)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
    else:
        typer.echo(render(report))


def register(app: typer.Typer) -> None:
    """Add the simulation commands to the root app."""
    app.command("simulate")(simulate)
    app.command("demo")(demo)
