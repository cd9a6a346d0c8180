"""``dcenergy agent``: the node agent (foreground daemon, one-shot sample)."""

from __future__ import annotations

import typer

app = typer.Typer(help="Run or probe the node agent.", no_args_is_help=True)
