"""The committed dashboards are exactly what ``dashboards/build.py`` generates."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest

from tests.dashboards.grafana import DASHBOARDS, EXPECTED


def _build_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "dcenergy_dashboards_build", DASHBOARDS / "build.py"
    )
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


BUILD = _build_module()


def test_build_is_deterministic() -> None:
    assert BUILD.build_all() == BUILD.build_all()


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_committed_file_equals_a_rebuild(name: str) -> None:
    built: str = BUILD.build_all()[name]
    committed = (DASHBOARDS / name).read_text(encoding="utf-8")
    assert committed == built, f"{name} is stale: run python dashboards/build.py"
    json.loads(committed)


def test_check_mode_spots_a_stale_file(tmp_path: Path) -> None:
    assert BUILD.main(["--out", str(tmp_path)]) == 0
    assert BUILD.main(["--out", str(tmp_path), "--check"]) == 0
    stale = tmp_path / "optimizer.json"
    stale.write_text(stale.read_text(encoding="utf-8").replace("plan_domain", "plan_domains"))
    assert BUILD.main(["--out", str(tmp_path), "--check"]) == 1
