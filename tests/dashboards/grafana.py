"""Reading the committed dashboards: panels, targets, variables, and filling variables in."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.dashboards.influxql import BUILTIN_VARS

Json = dict[str, Any]

ROOT = Path(__file__).resolve().parents[2]
DASHBOARDS = ROOT / "dashboards"
PROVISIONING = DASHBOARDS / "provisioning"
DOCS = ROOT / "docs" / "dashboards.md"
DS_UID = "dcenergy-influxdb"
EXPECTED = {
    "fleet-energy.json": "dcenergy-fleet",
    "node-gpu.json": "dcenergy-node",
    "optimizer.json": "dcenergy-optimizer",
    "agent-health.json": "dcenergy-agent",
}
# What a live test puts in place of Grafana's own variables.
LIVE_TIME_FILTER = "time > now() - 1h"
LIVE_INTERVAL = "10s"


def load(name: str) -> Json:
    out: Json = json.loads((DASHBOARDS / name).read_text(encoding="utf-8"))
    return out


def all_dashboards() -> dict[str, Json]:
    return {name: load(name) for name in EXPECTED}


def panels(dash: Json) -> Iterator[Json]:
    """Every panel, rows and the panels inside collapsed rows included."""
    for p in dash.get("panels", []):
        yield p
        yield from p.get("panels", [])


def variables(dash: Json) -> dict[str, Json]:
    return {v["name"]: v for v in dash.get("templating", {}).get("list", [])}


@dataclass(frozen=True, slots=True)
class Target:
    dashboard: str
    panel: Json
    target: Json

    @property
    def query(self) -> str:
        return str(self.target["query"])

    @property
    def id(self) -> str:
        return f"{self.dashboard}:{self.panel['title']}:{self.target['refId']}"


def targets(dashboards: Mapping[str, Json]) -> list[Target]:
    return [
        Target(name, p, t)
        for name, dash in dashboards.items()
        for p in panels(dash)
        for t in p.get("targets", [])
    ]


def variable_queries(dashboards: Mapping[str, Json]) -> list[tuple[str, Json]]:
    return [
        (name, v)
        for name, dash in dashboards.items()
        for v in variables(dash).values()
        if v["type"] == "query"
    ]


def live_values(dash: Json) -> dict[str, str]:
    """Each variable's value for a live run: regex variables match all, constants are theirs."""
    out = {"timeFilter": LIVE_TIME_FILTER, "__interval": LIVE_INTERVAL}
    for name, v in variables(dash).items():
        out[name] = str(v["query"]) if v["type"] == "constant" else ".*"
    return out


def substitute(query: str, values: Mapping[str, str]) -> str:
    """Fill Grafana variables in as its InfluxDB datasource does (an unknown one raises)."""

    def one(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2) or m.group(3)
        if name not in values:
            raise KeyError(f"no value for ${name} in {query!r}")
        return values[name]

    return re.sub(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)\]\]", one, query)


def undefined_variables(dash: Json) -> list[str]:
    """Variables a dashboard's queries use but neither it nor Grafana defines."""
    from tests.dashboards.influxql import variables_in

    defined = set(variables(dash)) | BUILTIN_VARS
    texts = [str(t["query"]) for p in panels(dash) for t in p.get("targets", [])]
    texts += [str(v["query"]) for v in variables(dash).values() if v["type"] == "query"]
    return sorted({v for q in texts for v in variables_in(q)} - defined)
