"""The ``dcenergy`` command line.

The only part of ``dcenergy/`` that reaches up into ``agent/`` and
``optimizer/``; each command imports what it needs when it runs, so
``dcenergy --help`` stays fast and the optimizer never loads NVML.
A ``DcenergyError`` becomes one message, a hint and its exit code; a
traceback is shown only with ``--debug``.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated

import typer

from dcenergy.cli import agent_cmd, config_cmd, optimize_cmd, optimizer_cmd, plan_cmd, sim_cmd
from dcenergy.cli.context import State
from dcenergy.errors import DcenergyError

app = typer.Typer(
    name="dcenergy",
    help="GPU-fleet telemetry and energy optimization.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.callback()
def _root(
    ctx: typer.Context,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config", "-c", help="TOML config file [default: /etc/dcenergy/dcenergy.toml]"
        ),
    ] = None,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks and debug logs.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log at INFO level.")] = False,
) -> None:
    level = logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ctx.obj = State(config_path=config, debug=debug)


app.add_typer(config_cmd.app, name="config")
app.add_typer(agent_cmd.app, name="agent")
app.add_typer(optimizer_cmd.app, name="optimizer")
optimize_cmd.register(app)
plan_cmd.register(app)
sim_cmd.register(app)


def main(argv: list[str] | None = None) -> int:
    """Console entry point: run the app, turning our errors into one line and an exit code."""
    debug = "--debug" in (argv if argv is not None else sys.argv)
    try:
        app(args=argv, prog_name="dcenergy", standalone_mode=True)
    except SystemExit as e:
        return int(e.code or 0) if not isinstance(e.code, str) else 1
    except DcenergyError as e:
        if debug:
            raise
        typer.echo(f"dcenergy: error: {e.message}", err=True)
        if e.hint:
            typer.echo(f"hint: {e.hint}", err=True)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
    return 0
