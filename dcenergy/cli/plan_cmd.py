"""``dcenergy keys`` and ``dcenergy apply``: signing and publishing plans."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add the plan commands to the root app."""
