"""``dcenergy simulate`` and ``dcenergy demo``: a simulated fleet, closed loop, measured savings."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add the simulation commands to the root app."""
