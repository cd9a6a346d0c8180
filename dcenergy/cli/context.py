"""What the root callback hands every command: config path and debug flag; config loaded once."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import typer

from dcenergy.config import Config, load_config


@dataclass
class State:
    config_path: Path | None
    debug: bool = False
    _config: Config | None = field(default=None, repr=False)

    def config(self) -> Config:
        if self._config is None:
            self._config = load_config(self.config_path)
        return self._config


def state(ctx: typer.Context) -> State:
    obj = ctx.find_root().obj
    if not isinstance(obj, State):  # a command invoked without the root callback (tests)
        obj = State(config_path=None)
        ctx.find_root().obj = obj
    return obj
