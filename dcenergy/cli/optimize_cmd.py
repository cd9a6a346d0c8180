"""``dcenergy optimize`` and ``dcenergy recommend``."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add the optimizer commands to the root app."""
