"""``dcenergy agent``: the node agent (foreground daemon, one-shot sample).

Heavy imports (NVML, APScheduler, the store) happen inside the commands, so
``dcenergy --help`` stays fast.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Annotated

import typer

from dcenergy.cli.context import state
from dcenergy.errors import DeviceError

if TYPE_CHECKING:
    from agent.devices.base import DeviceBackend
    from dcenergy.config import Config
    from dcenergy.schema import Point

app = typer.Typer(help="Run or probe the node agent.", no_args_is_help=True)

SIMULATE_HINT = "use --simulate N to try it without a GPU"
PRIME_S = 0.2

SimulateOpt = Annotated[
    int,
    typer.Option(
        "--simulate",
        min=0,
        metavar="N",
        help="Use N simulated GPUs instead of NVML (0: as configured).",
    ),
]


def _with_simulate(cfg: Config, simulate: int) -> Config:
    if simulate <= 0:
        return cfg
    return replace(cfg, agent=replace(cfg.agent, simulate=simulate, backend="simulated"))


def _hint_simulate(cfg: Config, e: DeviceError) -> None:
    """An NVML failure gets a pointer at the simulator (the one way to try it without a GPU)."""
    if not cfg.agent.simulate and cfg.agent.backend == "nvml" and e.hint is None:
        e.hint = SIMULATE_HINT


def _open_backend(cfg: Config) -> DeviceBackend:
    from agent.daemon import open_agent_backend

    try:
        return open_agent_backend(cfg)
    except DeviceError as e:
        _hint_simulate(cfg, e)
        raise


@app.command("run")
def run(
    ctx: typer.Context,
    simulate: SimulateOpt = 0,
    duration: Annotated[
        float | None,
        typer.Option("--duration", min=0.0, metavar="S", help="Stop after S seconds."),
    ] = None,
) -> None:
    """Run the agent in the foreground until SIGTERM/SIGINT (systemd runs exactly this)."""
    from agent.daemon import AgentDaemon
    from dcenergy.store.configured import check_state_dir

    cfg = _with_simulate(state(ctx).config(), simulate)
    check_state_dir(cfg)
    metrics_log = logging.getLogger("agent.metrics")  # its address is news even without -v
    metrics_log.setLevel(min(metrics_log.getEffectiveLevel(), logging.INFO))
    try:
        code = AgentDaemon(cfg).run(duration_s=duration)
    except DeviceError as e:  # NVML could not start: nothing was sampled
        _hint_simulate(cfg, e)
        raise
    raise typer.Exit(code)


@app.command("once")
def once(
    ctx: typer.Context,
    simulate: SimulateOpt = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the points as JSON.")] = False,
    line_protocol: Annotated[
        bool, typer.Option("--line-protocol", help="Print the points as InfluxDB line protocol.")
    ] = False,
) -> None:
    """Take one sample of every GPU, the host and its jobs, and print it (nothing is stored)."""
    if as_json and line_protocol:
        raise typer.BadParameter("--json and --line-protocol exclude each other")
    from agent.host import HostCollector
    from agent.jobs import JobResolver
    from agent.rapl import RaplReader
    from agent.sampler import Sampler

    cfg = _with_simulate(state(ctx).config(), simulate)
    backend = _open_backend(cfg)
    try:
        host = HostCollector(rapl=RaplReader())
        # CPU share and RAPL power are rates: prime them, so the one sample has them.
        host.sample(time.time())
        time.sleep(PRIME_S)
        sampler = Sampler(backend, cfg.host, host, JobResolver(), None)
        points = sampler.sample()
    finally:
        backend.close()
    if as_json:
        typer.echo(json.dumps([_point_dict(p) for p in points], indent=2))
    elif line_protocol:
        from dcenergy.lineprotocol import encode_many

        typer.echo(encode_many(points).decode(), nl=False)
    else:
        typer.echo(format_table(points))


def _point_dict(p: Point) -> dict[str, object]:
    return {
        "measurement": p.measurement,
        "tags": dict(p.tags),
        "fields": dict(p.fields),
        "time_ns": p.time_ns,
    }


def _fmt(v: object, spec: str = "") -> str:
    if v is None:
        return "-"
    if isinstance(v, float | int) and not isinstance(v, bool):
        return format(v, spec)
    return str(v)


def format_table(points: list[Point]) -> str:
    """A readable table of the GPU points and a line for the host."""
    head = ("GPU", "MODEL", "POWER W", "LIMIT W", "TEMP C", "UTIL %", "MEM GiB", "SM MHz",
            "MEM MHz", "JOB")  # fmt: skip
    rows: list[tuple[str, ...]] = [head]
    gpus = [p for p in points if p.measurement == "gpu"]
    for p in sorted(gpus, key=lambda p: int(p.tags["gpu"])):
        f = p.fields
        used, total = f.get("mem_used_bytes"), f.get("mem_total_bytes")
        mem = (
            f"{float(used) / 2**30:.1f}/{float(total) / 2**30:.0f}"
            if isinstance(used, int) and isinstance(total, int)
            else "-"
        )
        rows.append(
            (
                p.tags["gpu"],
                p.tags["model"] + (" (LOST)" if f.get("lost") else ""),
                _fmt(f.get("power_w"), ".1f"),
                _fmt(f.get("power_limit_w"), ".0f"),
                _fmt(f.get("temp_c"), ".0f"),
                _fmt(f.get("util_gpu_pct"), ".0f"),
                mem,
                _fmt(f.get("sm_clock_mhz"), ".0f"),
                _fmt(f.get("mem_clock_mhz"), ".0f"),
                str(f.get("job_id") or "-"),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    if not gpus:
        lines.append("(no GPUs)")
    for p in points:
        if p.measurement == "host":
            f = p.fields
            lines.append(
                f"\nhost {p.tags['host']}: cpu {_fmt(f.get('cpu_pct'), '.0f')} %, "
                f"load {_fmt(f.get('load1'), '.2f')}, "
                f"cpu power {_fmt(f.get('cpu_power_w'), '.0f')} W"
            )
    return "\n".join(lines)
