"""The ``dcenergy`` command line.

The only part of ``dcenergy/`` that reaches up into ``agent/`` and
``optimizer/``; each command imports what it needs when it runs, so
``dcenergy --help`` stays fast and the optimizer never loads NVML.
A ``DcenergyError`` becomes one message, a hint and its exit code; a
traceback is shown only with ``--debug``, and so is any other exception's
(one line and exit 70 without it). ``--config``, ``--debug`` and
``--verbose`` work before or after the subcommand (``dcenergy recommend
--debug``): ``main`` moves them to the front. Exit codes: ``EXIT_CODES`` in
``dcenergy/errors.py`` and the README.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
import typer.main

from dcenergy.cli import (
    agent_cmd,
    budget_cmd,
    config_cmd,
    optimize_cmd,
    optimizer_cmd,
    plan_cmd,
    revert_cmd,
    sim_cmd,
    slurm_cmd,
    status_cmd,
)
from dcenergy.cli.context import State
from dcenergy.errors import EX_INTERRUPTED, EX_SOFTWARE, EXIT_CODES, DcenergyError

EPILOG = "Exit codes: " + "; ".join(f"{code} {what}" for code, what in EXIT_CODES.items()) + "."

app = typer.Typer(
    name="dcenergy",
    help="GPU-fleet telemetry and energy optimization.",
    epilog=EPILOG,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("dcenergy")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"dcenergy {_version()}")
        raise typer.Exit()


def _log_level(debug: bool, verbose: bool) -> int:
    return logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING


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
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    level = _log_level(debug, verbose)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ctx.obj = State(config_path=config, debug=debug)


GLOBAL_FLAGS = frozenset({"--debug", "--verbose", "-v"})
GLOBAL_VALUED = frozenset({"--config", "-c"})


def _global_token(tok: str) -> int:
    """0: not a global option; 1: a flag or ``--config=PATH``; 2: an option and its value."""
    if tok in GLOBAL_FLAGS or tok.startswith("--config="):
        return 1
    if tok in GLOBAL_VALUED:
        return 2
    return 0


def hoist_global_options(args: list[str], root: Any) -> list[str]:
    """Move ``--config``/``-c``, ``--debug`` and ``--verbose``/``-v`` found after a
    subcommand to the front, where the root callback reads them.

    The walk follows the command tree (``root``, a click group), so an option's
    value that happens to read ``-v`` is left where it is, and nothing after
    ``--`` is touched.
    """
    front: list[str] = []
    rest: list[str] = []
    cmd = root
    i = 0
    while i < len(args):
        tok = args[i]
        if tok == "--":
            rest.extend(args[i:])
            break
        if cmd is not root and (n := _global_token(tok)):
            front.extend(args[i : i + n])
            i += n
            continue
        rest.append(tok)
        i += 1
        if tok.startswith("-") and "=" not in tok:
            param = next((p for p in cmd.params if tok in getattr(p, "opts", ())), None)
            takes_value = param is not None and not (
                getattr(param, "is_flag", False) or getattr(param, "count", False)
            )
            if takes_value or (cmd is root and _global_token(tok) == 2):
                rest.extend(args[i : i + 1])
                i += 1
        elif not tok.startswith("-"):
            sub = getattr(cmd, "commands", {}).get(tok)
            if sub is not None:
                cmd = sub
    return front + rest


app.add_typer(config_cmd.app, name="config")
app.add_typer(agent_cmd.app, name="agent")
app.add_typer(optimizer_cmd.app, name="optimizer")
optimize_cmd.register(app)
plan_cmd.register(app)
sim_cmd.register(app)
status_cmd.register(app)
revert_cmd.register(app)
budget_cmd.register(app)
slurm_cmd.register(app)


def _is_check(args: list[str]) -> bool:
    """Whether the command line runs ``dcenergy check`` (Nagios' exit codes)."""
    rest = iter(args)
    for tok in rest:
        if _global_token(tok) == 2:
            next(rest, None)
        elif not tok.startswith("-"):
            return tok == "check"
    return False


def main(argv: list[str] | None = None) -> int:
    """Console entry point: run the app, turning our errors into one line and an exit code."""
    args = list(argv if argv is not None else sys.argv[1:])
    debug = "--debug" in args
    status_cmd.check_exit["code"] = None
    try:
        command = typer.main.get_command(app)
        command.main(
            args=hoist_global_options(args, command), prog_name="dcenergy", standalone_mode=True
        )
    except SystemExit as e:
        code = int(e.code or 0) if not isinstance(e.code, str) else 1
        # click's usage error (exit 2) would read as CRITICAL to a monitoring system
        if code == 2 and status_cmd.check_exit["code"] != 2 and _is_check(args):
            typer.echo("DCENERGY UNKNOWN - bad command line (see dcenergy check --help)")
            return 3
        return code
    except DcenergyError as e:
        if debug:
            raise
        typer.echo(f"dcenergy: error: {e.message}", err=True)
        if e.hint:
            typer.echo(f"hint: {e.hint}", err=True)
        return e.exit_code
    except KeyboardInterrupt:
        return EX_INTERRUPTED
    except Exception as e:  # a bug: one line here, the traceback with --debug
        if debug:
            raise
        text = " ".join(str(e).split())[:300]
        typer.echo(f"dcenergy: internal error: {type(e).__name__}: {text}", err=True)
        typer.echo("hint: run again with --debug for the traceback, and report it", err=True)
        return EX_SOFTWARE
    return 0
