"""``dcenergy config``: show and validate the effective configuration."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from dcenergy.cli.context import state

app = typer.Typer(help="Inspect the configuration.", no_args_is_help=True)


@app.command("check")
def check(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of TOML.")] = False,
) -> None:
    """Validate the configuration and print the effective values, secrets redacted."""
    from dcenergy.config import effective

    cfg = state(ctx).config()
    data = effective(cfg)
    if as_json:
        typer.echo(json.dumps({"source": cfg.source, **data}, indent=2))
        return
    typer.echo(f"# effective configuration (source: {cfg.source})")
    for section, values in data.items():
        typer.echo(f"\n[{section}]")
        for k, v in values.items():
            typer.echo(f"{k} = {json.dumps(v)}")
