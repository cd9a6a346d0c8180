"""Build the dcenergy Grafana dashboards (InfluxQL) into ``dashboards/*.json``, deterministically.

    python dashboards/build.py          # (re)write the four dashboards and the alert rules
    python dashboards/build.py --check  # exit 1 when a committed file differs from a rebuild

The alert rules (``provisioning/alerting/dcenergy.yaml``, Grafana unified
alerting, file provisioning ``apiVersion: 1``) are built here too, from the
same query builders as the panels; their queries have no dashboard variables
(alerting has none) and group by the tags an alert is about (host, GPU, domain).

The JSON files are committed (Grafana's file provider reads them as they are);
``tests/dashboards`` checks that a rebuild equals them, that every query names
only measurements, fields and tags that ``dcenergy.schema`` declares, and runs
every query against a real influxd seeded with telemetry.

Query conventions (the tests enforce them):

* raw InfluxQL (``rawQuery: true``), every ``SELECT`` that reads a measurement
  restricts ``$timeFilter``, and one on a measurement with a ``host`` tag filters
  ``"host" =~ /^$host$/`` (multi-value and All variables become a regex);
* identifiers are double-quoted; every computed column has an ``AS`` alias, so
  column names (and legends) do not depend on the function used;
* ``GROUP BY`` only names tags (a field there silently groups by an empty tag).
"""

# S608: the strings built here are static InfluxQL templates for Grafana, never fed input.
# ruff: noqa: S608

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

Json = dict[str, Any]

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run as a script from a checkout: dcenergy importable

from dcenergy.schema import AUDIT_ACTIONS  # noqa: E402 (after the path)

DS_UID = "dcenergy-influxdb"
DS: Json = {"type": "influxdb", "uid": DS_UID}
SCHEMA_VERSION = 39
TAGS = ["dcenergy"]

# --- filters ---------------------------------------------------------------
T = "$timeFilter"
HOST = '"host" =~ /^$host$/'
F_HOST = f"{T} AND {HOST}"
F_GPU = f'{F_HOST} AND "model" =~ /^$model$/'
F_NODE = f'{F_GPU} AND "gpu" =~ /^$gpu$/'
F_JOB = f'{F_HOST} AND "job_id" =~ /^$job$/'
F_DOMAIN = f'{T} AND "domain" =~ /^$domain$/'
F_AUDIT = f'{F_HOST} AND "action" =~ /^$action$/'
BY_TIME = "GROUP BY time($__interval)"

# NVML clocks-event reasons that mean the GPU runs slower than asked:
# SW power cap 0x4 | HW slowdown 0x8 | SW thermal 0x20 | HW thermal 0x40 | HW power brake 0x80.
THROTTLE_MASK = 0x4 | 0x8 | 0x20 | 0x40 | 0x80
THROTTLE_BITS: tuple[tuple[str, int], ...] = (
    ("sw_power_cap", 0x4),
    ("hw_slowdown", 0x8),
    ("sw_thermal", 0x20),
    ("hw_thermal", 0x40),
    ("hw_power_brake", 0x80),
)

_ACTION_COLOR = {
    "applied": "green",
    "clamped": "yellow",
    "refused": "red",
    "restored": "blue",
    "reverted": "purple",
    "error": "dark-red",
    "thermal": "orange",
    "drift": "light-yellow",
    "probe": "light-blue",
}
# Every action the reconciler writes (dcenergy.schema.AUDIT_ACTIONS); a new one without a
# colour here stops the build (KeyError) instead of showing up uncoloured.
ACTION_COLORS = {a: _ACTION_COLOR[a] for a in AUDIT_ACTIONS}
# The agent's drop counters: dropped_<reason>_total (dcenergy.schema.AGENT).
DROP_REASONS = ("overflow", "rejected", "partial", "corrupt", "disk_full")


# --- query fragments shared by several panels ------------------------------
def fleet_gpu_power(where: str = F_GPU) -> str:
    """Summed GPU power per interval: mean per GPU first, so sample counts do not skew it."""
    return (
        'SELECT sum("p") AS "power_w" FROM ('
        f'SELECT mean("power_w") AS "p" FROM "gpu" WHERE {where} '
        f'{BY_TIME}, "gpu_uuid" fill(none)'
        f") WHERE {T} {BY_TIME} fill(none)"
    )


# Energy is the integral of power, taken as a sum of per-minute means: W x 1 min / 60 000
# = kWh. InfluxQL's integral() would do, but InfluxDB 3 does not implement it. Minutes with
# no sample (agent down) count nothing rather than being interpolated across.
W_MINUTES_PER_KWH = 60_000


def energy_kwh(scale: str = "", alias: str = "energy_kwh", group: str = "") -> str:
    """Energy of the selected GPUs over the range (or per ``group`` bucket), in kWh."""
    outer = f" WHERE {T} {group} fill(none)" if group else ""
    return (
        f'SELECT sum("w") / {W_MINUTES_PER_KWH}{scale} AS "{alias}" FROM ('
        f'SELECT mean("power_w") AS "w" FROM "gpu" WHERE {F_GPU} '
        f'GROUP BY time(1m), "gpu_uuid" fill(none)){outer}'
    )


def savings_kwh() -> str:
    """Energy the plans in force over the range predict they save, and what it is worth."""
    return (
        f'SELECT sum("s") / {W_MINUTES_PER_KWH} AS "saved_kwh", '
        f'sum("s") / {W_MINUTES_PER_KWH} * $price_per_kwh AS "saved_cost" FROM ('
        f'SELECT last("savings_w") AS "s" FROM "plan" WHERE {T} GROUP BY time(1m) fill(previous))'
    )


def gpu_state_count(state: str, inner: str, cond: str, over_time: bool) -> str:
    """How many GPUs are in a state: a per-GPU value, then a count of those meeting ``cond``."""
    if over_time:
        return (
            f'SELECT count("v") AS "{state}" FROM ('
            f'SELECT {inner} AS "v" FROM "gpu" WHERE {F_GPU} {BY_TIME}, "gpu_uuid" fill(none)'
            f') WHERE {T} AND "v" {cond} {BY_TIME} fill(0)'
        )
    return (
        f'SELECT count("v") AS "{state}" FROM ('
        f'SELECT {inner} AS "v" FROM "gpu" WHERE {F_GPU} GROUP BY "gpu_uuid"'
        f') WHERE "v" {cond}'
    )


def gpu_states(over_time: bool) -> list[Json]:
    agg = "mean" if over_time else "last"
    spec = (
        ("busy", f'{agg}("util_gpu_pct")', ">= $idle_util_pct"),
        ("idle", f'{agg}("util_gpu_pct")', "< $idle_util_pct"),
        ("capped", f'{agg}("power_limit_default_w") - {agg}("power_limit_w")', "> 0"),
        ("throttled", f'last("throttle_reasons") & {THROTTLE_MASK}', "> 0"),
    )
    return [
        target(gpu_state_count(state, inner, cond, over_time), alias=state)
        for state, inner, cond in spec
    ]


def audit_count(where: str, group: str, alias: str = "actions") -> str:
    """Setpoint actions (every audit point has a ``plan_id``, '' when none) per group."""
    return f'SELECT count("plan_id") AS "{alias}" FROM "audit" WHERE {where} {group}'


def counter_rise(field: str, alias: str, where: str, group: str) -> str:
    """Growth of an agent counter per interval (a restart's reset is not counted as growth)."""
    return (
        f'SELECT non_negative_difference(max("{field}")) AS "{alias}" '
        f'FROM "agent" WHERE {where} {group}'
    )


# --- JSON building blocks ----------------------------------------------------
def target(query: str, alias: str = "", fmt: str = "time_series") -> Json:
    t: Json = {
        "datasource": DS,
        "rawQuery": True,
        "query": query,
        "resultFormat": fmt,
    }
    if alias:
        t["alias"] = alias
    return t


def thresholds(*steps: tuple[str, float | None]) -> Json:
    return {
        "mode": "absolute",
        "steps": [{"color": c, "value": v} for c, v in steps],
    }


OK = thresholds(("green", None))


def by_name(name: str, **props: Any) -> Json:
    return {
        "matcher": {"id": "byName", "options": name},
        "properties": [{"id": k, "value": v} for k, v in props.items()],
    }


def by_regex(pattern: str, **props: Any) -> Json:
    return {
        "matcher": {"id": "byRegexp", "options": pattern},
        "properties": [{"id": k, "value": v} for k, v in props.items()],
    }


def dashed(pattern: str, color: str | None = None) -> Json:
    props: dict[str, Any] = {"custom.lineStyle": {"fill": "dash", "dash": [10, 10]}}
    if color:
        props["color"] = {"mode": "fixed", "fixedColor": color}
    return by_regex(pattern, **props)


def panel(
    kind: str,
    title: str,
    targets: Sequence[Json],
    *,
    unit: str = "short",
    description: str = "",
    th: Json = OK,
    minimum: float | None = None,
    maximum: float | None = None,
    decimals: int | None = None,
    overrides: Sequence[Json] = (),
    options: Json | None = None,
    custom: Json | None = None,
    mappings: Sequence[Json] = (),
    transformations: Sequence[Json] = (),
    time_from: str | None = None,
    no_value: str | None = None,
) -> Json:
    defaults: Json = {"unit": unit, "thresholds": th, "mappings": list(mappings)}
    if kind in ("timeseries", "barchart"):
        defaults["color"] = {"mode": "palette-classic"}
    else:
        defaults["color"] = {"mode": "thresholds"}
    if minimum is not None:
        defaults["min"] = minimum
    if maximum is not None:
        defaults["max"] = maximum
    if decimals is not None:
        defaults["decimals"] = decimals
    if no_value is not None:
        defaults["noValue"] = no_value
    defaults["custom"] = {**_default_custom(kind), **(custom or {})}
    refs = "ABCDEFGHIJ"
    p: Json = {
        "type": kind,
        "title": title,
        "description": description,
        "datasource": DS,
        "fieldConfig": {"defaults": defaults, "overrides": list(overrides)},
        "options": {**_default_options(kind), **(options or {})},
        "targets": [{"refId": refs[i], **t} for i, t in enumerate(targets)],
    }
    if transformations:
        p["transformations"] = list(transformations)
    if time_from:
        p["timeFrom"] = time_from
    return p


def _default_custom(kind: str) -> Json:
    if kind == "timeseries":
        return {
            "drawStyle": "line",
            "lineWidth": 1,
            "fillOpacity": 10,
            "showPoints": "never",
            "spanNulls": False,
            "stacking": {"mode": "none", "group": "A"},
            "thresholdsStyle": {"mode": "off"},
        }
    if kind == "table":
        return {"align": "auto", "cellOptions": {"type": "auto"}, "filterable": False}
    if kind == "state-timeline":
        return {"fillOpacity": 80, "lineWidth": 0}
    return {}


def _default_options(kind: str) -> Json:
    reduce_last = {"calcs": ["lastNotNull"], "fields": "", "values": False}
    if kind == "timeseries":
        return {
            "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
            "tooltip": {"mode": "multi", "sort": "desc"},
        }
    if kind == "stat":
        return {
            "reduceOptions": reduce_last,
            "colorMode": "value",
            "graphMode": "none",
            "justifyMode": "auto",
            "orientation": "auto",
            "textMode": "value_and_name",
        }
    if kind == "bargauge":
        return {
            "reduceOptions": reduce_last,
            "displayMode": "gradient",
            "orientation": "horizontal",
            "showUnfilled": True,
            "valueMode": "color",
        }
    if kind == "table":
        return {"showHeader": True, "cellHeight": "sm", "footer": {"show": False}}
    if kind == "state-timeline":
        return {
            "mergeValues": True,
            "showValue": "never",
            "rowHeight": 0.8,
            "alignValue": "left",
            "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
            "tooltip": {"mode": "single", "sort": "none"},
        }
    return {}


def bars(stacked: bool = True) -> Json:
    return {
        "drawStyle": "bars",
        "fillOpacity": 80,
        "stacking": {"mode": "normal" if stacked else "none", "group": "A"},
    }


def sort_limit(field: str, limit: int) -> list[Json]:
    return [
        {"id": "sortBy", "options": {"sort": [{"field": field, "desc": True}]}},
        {"id": "limit", "options": {"limitField": limit}},
    ]


# --- template variables ----------------------------------------------------
def query_var(name: str, label: str, query: str, *, multi: bool = True) -> Json:
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DS,
        "query": query,
        "definition": query,
        "refresh": 1,
        "regex": "",
        "sort": 1,
        "multi": multi,
        "includeAll": True,
        "allValue": ".*",
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "options": [],
        "hide": 0,
    }


def constant_var(name: str, label: str, value: str, description: str) -> Json:
    return {
        "name": name,
        "label": label,
        "description": description,
        "type": "constant",
        "query": value,
        "current": {"text": value, "value": value},
        "options": [{"selected": True, "text": value, "value": value}],
        "hide": 2,
    }


V_HOST = query_var("host", "Host", 'SHOW TAG VALUES FROM "gpu" WITH KEY = "host"')
V_MODEL = query_var(
    "model", "GPU model", f'SHOW TAG VALUES FROM "gpu" WITH KEY = "model" WHERE {HOST}'
)
V_GPU = query_var("gpu", "GPU index", f'SHOW TAG VALUES FROM "gpu" WITH KEY = "gpu" WHERE {HOST}')
V_JOB = query_var("job", "Job", f'SHOW TAG VALUES FROM "job" WITH KEY = "job_id" WHERE {HOST}')
V_DOMAIN = query_var(
    "domain", "Power domain", 'SHOW TAG VALUES FROM "plan_domain" WITH KEY = "domain"'
)
V_ACTION = query_var("action", "Audit action", 'SHOW TAG VALUES FROM "audit" WITH KEY = "action"')
V_PRICE = constant_var(
    "price_per_kwh", "Price per kWh", "0.15", "Electricity price per kWh, in your currency."
)
V_CARBON = constant_var(
    "carbon_g_per_kwh",
    "Carbon intensity (g CO2/kWh)",
    "400",
    "Grid carbon intensity in grams of CO2 per kWh.",
)
V_IDLE = constant_var(
    "idle_util_pct",
    "Idle below (SM %)",
    "5",
    "A GPU whose SM utilization is below this share is counted idle, otherwise busy.",
)


# --- layout ------------------------------------------------------------------
class Board:
    """Places panels left to right in 24-column rows and numbers them."""

    def __init__(self, uid: str, title: str, description: str, variables: Sequence[Json]) -> None:
        self.uid = uid
        self.title = title
        self.description = description
        self.variables = list(variables)
        self.panels: list[Json] = []
        self._next_id = 1
        self._x = 0
        self._y = 0
        self._row_h = 0

    def _id(self) -> int:
        i = self._next_id
        self._next_id += 1
        return i

    def row(self, title: str) -> None:
        self._newline()
        self.panels.append(
            {
                "type": "row",
                "title": title,
                "id": self._id(),
                "collapsed": False,
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": self._y},
                "panels": [],
            }
        )
        self._y += 1

    def add(self, p: Json, w: int, h: int = 8) -> None:
        if self._x + w > 24:
            self._newline()
        self.panels.append(
            {"id": self._id(), "gridPos": {"h": h, "w": w, "x": self._x, "y": self._y}, **p}
        )
        self._x += w
        self._row_h = max(self._row_h, h)

    def _newline(self) -> None:
        if self._x:
            self._y += self._row_h
        self._x = 0
        self._row_h = 0

    def json(self) -> Json:
        return {
            "uid": self.uid,
            "title": self.title,
            "description": self.description,
            "tags": TAGS,
            "editable": True,
            "graphTooltip": 1,
            "timezone": "browser",
            "fiscalYearStartMonth": 0,
            "liveNow": False,
            "refresh": "1m",
            "schemaVersion": SCHEMA_VERSION,
            "version": 1,
            "time": {"from": "now-6h", "to": "now"},
            "timepicker": {},
            "annotations": {
                "list": [
                    {
                        "builtIn": 1,
                        "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                        "enable": True,
                        "hide": True,
                        "iconColor": "rgba(0, 211, 255, 1)",
                        "name": "Annotations & Alerts",
                        "type": "dashboard",
                    }
                ]
            },
            "links": [
                {
                    "title": "dcenergy",
                    "type": "dashboards",
                    "tags": TAGS,
                    "asDropdown": True,
                    "includeVars": True,
                    "keepTime": True,
                    "icon": "external link",
                    "targetBlank": False,
                    "tooltip": "",
                    "url": "",
                }
            ],
            "templating": {"list": self.variables},
            "panels": self.panels,
        }


# --- 1. fleet energy ---------------------------------------------------------
def fleet() -> Board:
    b = Board(
        "dcenergy-fleet",
        "dcenergy / Fleet energy",
        "Fleet GPU power against the power budgets, energy, cost and CO2, efficiency, "
        "the biggest consumers, GPU states and the savings of the optimizer's plans.",
        [V_HOST, V_MODEL, V_DOMAIN, V_JOB, V_PRICE, V_CARBON, V_IDLE],
    )
    b.row("Power and budget")
    b.add(
        panel(
            "stat",
            "Fleet GPU power",
            [target(fleet_gpu_power(), alias="GPU power")],
            unit="watt",
            description="Sum over the selected GPUs of their mean board power in the last "
            "interval.",
            options={"graphMode": "area", "textMode": "value"},
        ),
        w=4,
    )
    b.add(
        panel(
            "stat",
            "Host CPU + DRAM power",
            [
                target(
                    'SELECT sum("c") AS "cpu_power_w", sum("d") AS "dram_power_w" FROM ('
                    'SELECT mean("cpu_power_w") AS "c", mean("dram_power_w") AS "d" '
                    f'FROM "host" WHERE {F_HOST} {BY_TIME}, "host" fill(none)'
                    f") WHERE {T} {BY_TIME} fill(none)"
                )
            ],
            unit="watt",
            description="CPU package and DRAM power from RAPL, summed over the selected hosts "
            "(hosts whose kernel hides RAPL do not report it).",
            options={"graphMode": "area"},
        ),
        w=4,
    )
    b.add(
        panel(
            "timeseries",
            "Fleet GPU power vs budget",
            [
                target(fleet_gpu_power(), alias="measured GPU power"),
                target(
                    'SELECT max("b") AS "budget_w", max("pl") AS "planned_w" FROM ('
                    'SELECT last("budget_w") AS "b", last("planned_w") AS "pl" '
                    f'FROM "plan_domain" WHERE "outermost" = true AND {T} {BY_TIME}, "domain" '
                    f"fill(previous)) WHERE {T} {BY_TIME} fill(previous)",
                    alias="top domain $col",
                ),
            ],
            unit="watt",
            description="Measured GPU power of the selected hosts against the budget and the "
            "plan of the outermost power domain (one that holds every GPU; with several, "
            "such as two fleet-wide feeds, the largest). The planned figure includes non-GPU "
            "baseline load.",
            minimum=0,
            overrides=[dashed(".*budget_w", "red"), dashed(".*planned_w", "orange")],
        ),
        w=16,
    )
    b.add(
        panel(
            "timeseries",
            "Per-domain power vs budget",
            [
                target(
                    'SELECT last("budget_w") AS "budget_w", last("measured_w") AS "measured_w", '
                    'last("before_w") AS "before_w", last("planned_w") AS "planned_w" '
                    f'FROM "plan_domain" WHERE {F_DOMAIN} {BY_TIME}, "domain" fill(previous)',
                    alias="$tag_domain $col",
                )
            ],
            unit="watt",
            description="For each selected domain, at each solve: its budget, its measured "
            "power over the window the optimizer read (GPU draw plus non-GPU baseline), the "
            "predicted power with no change and the predicted power under the plan (from "
            "plan_domain).",
            minimum=0,
            overrides=[dashed(".*budget_w")],
        ),
        w=16,
        h=9,
    )
    b.add(
        panel(
            "bargauge",
            "Domain load vs budget (latest plan)",
            [
                target(
                    'SELECT last("planned_w") / last("budget_w") * 100 AS "load_pct" '
                    f'FROM "plan_domain" WHERE {F_DOMAIN} GROUP BY "domain"',
                    alias="$tag_domain",
                )
            ],
            unit="percent",
            description="Planned power of each domain as a share of its budget; above 100 % "
            "the plan could not meet the budget.",
            th=thresholds(("green", None), ("orange", 90), ("red", 100)),
            minimum=0,
            maximum=120,
        ),
        w=8,
        h=9,
    )

    b.row("Energy, cost and CO2 (today so far)")
    today = "now/d"
    b.add(
        panel(
            "stat",
            "GPU energy today",
            [target(energy_kwh())],
            unit="kwatth",
            description="Energy of the selected GPUs since midnight: their power integrated "
            "minute by minute.",
            time_from=today,
            decimals=1,
            options={"textMode": "value"},
        ),
        w=6,
        h=5,
    )
    b.add(
        panel(
            "stat",
            "Energy cost today",
            [target(energy_kwh(" * $price_per_kwh", "cost"))],
            unit="none",
            description="GPU energy today times the dashboard constant price_per_kwh (edit it "
            "in the dashboard settings; the figure is in that price's currency).",
            time_from=today,
            decimals=2,
            options={"textMode": "value"},
        ),
        w=6,
        h=5,
    )
    b.add(
        panel(
            "stat",
            "CO2 today",
            [target(energy_kwh(" * $carbon_g_per_kwh / 1000", "co2_kg"))],
            unit="masskg",
            description="GPU energy today times the dashboard constant carbon_g_per_kwh.",
            time_from=today,
            decimals=1,
            options={"textMode": "value"},
        ),
        w=6,
        h=5,
    )
    b.add(
        panel(
            "timeseries",
            "GPU energy per hour",
            [target(energy_kwh(group="GROUP BY time(1h)"), alias="energy")],
            unit="kwatth",
            description="Energy used by the selected GPUs in each hour of the range.",
            custom=bars(stacked=False),
        ),
        w=6,
        h=5,
    )

    b.row("Efficiency")
    b.add(
        panel(
            "timeseries",
            "Work per joule by job",
            [
                target(
                    'SELECT mean("throughput") / mean("power_w") AS "work_per_j" FROM "job" '
                    f'WHERE {F_JOB} {BY_TIME}, "job_id", "host" fill(none)',
                    alias="$tag_job_id @ $tag_host",
                )
            ],
            unit="suffix: unit/J",
            description="Job throughput divided by the power of its GPUs: units of work (see "
            "the table for each job's unit) per joule. Compare a job with itself over time; "
            "units differ between jobs.",
            minimum=0,
        ),
        w=12,
    )
    b.add(
        panel(
            "table",
            "Job efficiency",
            [
                target(
                    'SELECT mean("throughput") AS "throughput", last("throughput_unit") AS "unit", '
                    'mean("power_w") AS "power_w", '
                    'mean("throughput") / mean("power_w") AS "work_per_j", '
                    'last("gpu_count") AS "gpus", last("throughput_source") AS "source" '
                    f'FROM "job" WHERE {F_JOB} GROUP BY "job_id", "host"',
                    fmt="table",
                )
            ],
            description="Mean throughput, power and work per joule of each job over the range.",
            overrides=[
                by_name("power_w", unit="watt"),
                by_name("work_per_j", unit="suffix: unit/J", decimals=3),
                by_name("Time", **{"custom.hidden": True}),
            ],
            options={"sortBy": [{"displayName": "power_w", "desc": True}]},
        ),
        w=12,
    )

    b.row("Biggest consumers")
    node_link = {
        "title": "Node and GPU dashboard",
        "url": "/d/dcenergy-node/?var-host=${__data.fields.host}&${__url_time_range}",
    }
    b.add(
        panel(
            "table",
            "Top hosts by GPU power",
            [
                target(
                    'SELECT sum("p") AS "power_w" FROM ('
                    f'SELECT mean("power_w") AS "p" FROM "gpu" WHERE {F_GPU} '
                    'GROUP BY "host", "gpu_uuid") GROUP BY "host"',
                    fmt="table",
                )
            ],
            description="Mean GPU power of each host over the range (its GPUs summed), "
            "largest first. Click a host for its node dashboard.",
            overrides=[
                by_name(
                    "power_w",
                    unit="watt",
                    **{"custom.cellOptions": {"type": "gauge", "mode": "gradient"}},
                ),
                by_name("host", links=[node_link]),
                by_name("Time", **{"custom.hidden": True}),
            ],
            transformations=sort_limit("power_w", 10),
        ),
        w=10,
        h=9,
    )
    b.add(
        panel(
            "table",
            "Top GPUs by power",
            [
                target(
                    'SELECT mean("power_w") AS "power_w", mean("util_gpu_pct") AS "util_gpu_pct", '
                    'last("job_id") AS "job_id" '
                    f'FROM "gpu" WHERE {F_GPU} GROUP BY "host", "gpu", "model"',
                    fmt="table",
                )
            ],
            description="Mean power and SM utilization of each GPU over the range, with the "
            "job it ran last.",
            overrides=[
                by_name(
                    "power_w",
                    unit="watt",
                    **{"custom.cellOptions": {"type": "gauge", "mode": "gradient"}},
                ),
                by_name("util_gpu_pct", unit="percent", decimals=0),
                by_name("host", links=[node_link]),
                by_name("Time", **{"custom.hidden": True}),
            ],
            transformations=sort_limit("power_w", 15),
        ),
        w=14,
        h=9,
    )

    b.row("GPU states")
    b.add(
        panel(
            "stat",
            "GPUs by state (latest sample)",
            gpu_states(over_time=False),
            description="Busy: SM utilization at or above $idle_util_pct %; idle: below it. "
            "Capped: power limit below the GPU's default. Throttled: a clocks-event reason "
            "other than idle or sync boost is active (SW/HW power cap, HW slowdown, thermal, "
            "power brake). Capped and throttled overlap busy and idle.",
            no_value="0",
            options={"colorMode": "background", "textMode": "value_and_name"},
            overrides=[
                by_name("idle", color={"mode": "fixed", "fixedColor": "blue"}),
                by_name("capped", color={"mode": "fixed", "fixedColor": "yellow"}),
                by_name("throttled", color={"mode": "fixed", "fixedColor": "red"}),
            ],
        ),
        w=8,
    )
    b.add(
        panel(
            "timeseries",
            "GPUs by state over time",
            gpu_states(over_time=True),
            description="The same states per interval (busy/idle by the mean utilization in "
            "the interval, capped by the mean limits, throttled by the last reasons).",
            minimum=0,
            decimals=0,
            overrides=[
                by_name("busy", color={"mode": "fixed", "fixedColor": "green"}),
                by_name("idle", color={"mode": "fixed", "fixedColor": "blue"}),
                by_name("capped", color={"mode": "fixed", "fixedColor": "yellow"}),
                by_name("throttled", color={"mode": "fixed", "fixedColor": "red"}),
            ],
        ),
        w=16,
    )

    b.row("Savings against the uncapped baseline")
    b.add(
        panel(
            "stat",
            "Predicted savings (latest plan)",
            [target(f'SELECT last("savings_w") AS "savings_w" FROM "plan" WHERE {T}')],
            unit="watt",
            description="Power the latest plan predicts it saves against running every GPU "
            "at its default limit.",
            options={"textMode": "value"},
        ),
        w=4,
    )
    b.add(
        panel(
            "stat",
            "Predicted energy saved in range",
            [target(savings_kwh())],
            unit="kwatth",
            description="The predicted savings of the plan in force, minute by minute, summed "
            "over the range, and their value at price_per_kwh (in the price's currency).",
            overrides=[by_name("saved_cost", unit="none", decimals=2)],
        ),
        w=4,
    )
    b.add(
        panel(
            "timeseries",
            "Baseline vs planned vs measured GPU power",
            [
                target(
                    'SELECT last("power_before_w") AS "baseline_w", '
                    'last("power_after_w") AS "planned_w", last("savings_w") AS "savings_w" '
                    f'FROM "plan" WHERE {T} {BY_TIME} fill(previous)',
                    alias="$col",
                ),
                target(fleet_gpu_power(), alias="measured_w"),
            ],
            unit="watt",
            description="The plans' predicted fleet GPU power with no caps (baseline) and "
            "under the plan, with their difference (savings), against the measured power. "
            "Select All hosts: plans cover the whole fleet.",
            minimum=0,
            overrides=[dashed("baseline_w", "red"), dashed("planned_w", "orange")],
        ),
        w=16,
    )
    return b


# --- 2. node and GPU -----------------------------------------------------------
def node() -> Board:
    b = Board(
        "dcenergy-node",
        "dcenergy / Node and GPU",
        "One node's GPUs: power against the requested and enforced limits, temperatures, "
        "memory, utilization, clocks, throttle reasons, the jobs and their throughput, and "
        "the host.",
        [V_HOST, V_MODEL, V_GPU, V_JOB],
    )
    per_gpu = f'{BY_TIME}, "host", "gpu" fill(none)'
    gpu_alias = "$tag_host/$tag_gpu $col"
    b.row("Power")
    b.add(
        panel(
            "timeseries",
            "Power vs requested and enforced limit",
            [
                target(
                    'SELECT mean("power_w") AS "power_w", '
                    'mean("power_limit_w") AS "requested_limit_w", '
                    'mean("power_limit_enforced_w") AS "enforced_limit_w", '
                    'mean("power_limit_default_w") AS "default_limit_w" '
                    f'FROM "gpu" WHERE {F_NODE} {per_gpu}',
                    alias=gpu_alias,
                )
            ],
            unit="watt",
            description="Board power of each GPU, the limit requested (by the plan or the "
            "operator), the limit the driver enforces (all constraints) and the default.",
            minimum=0,
            overrides=[dashed(".*limit_w")],
        ),
        w=16,
        h=9,
    )
    b.add(
        panel(
            "bargauge",
            "Power now",
            [
                target(
                    f'SELECT last("power_w") AS "power_w" FROM "gpu" WHERE {F_NODE} '
                    'GROUP BY "host", "gpu"',
                    alias="$tag_host/$tag_gpu",
                )
            ],
            unit="watt",
            description="Latest board power of each GPU.",
            th=thresholds(("green", None), ("orange", 500), ("red", 650)),
            minimum=0,
            maximum=700,
        ),
        w=8,
        h=9,
    )
    b.add(
        panel(
            "timeseries",
            "Energy per interval",
            [
                target(
                    'SELECT non_negative_difference(max("energy_j")) / 3600000 AS "energy_kwh" '
                    f'FROM "gpu" WHERE {F_NODE} {per_gpu}',
                    alias="$tag_host/$tag_gpu",
                )
            ],
            unit="kwatth",
            description="Growth of each GPU's reset-corrected energy counter per interval.",
            custom=bars(),
        ),
        w=12,
    )
    b.add(
        panel(
            "stat",
            "GPUs lost",
            [
                target(
                    'SELECT count("lost") AS "lost" FROM "gpu" '
                    f'WHERE {F_NODE} AND "lost" = true GROUP BY "host", "gpu"',
                    alias="$tag_host/$tag_gpu",
                )
            ],
            description="Samples in the range where a GPU had fallen off the bus, per GPU.",
            th=thresholds(("green", None), ("red", 1)),
            no_value="0",
            options={
                "colorMode": "background",
                "reduceOptions": {"calcs": ["sum"], "fields": "", "values": False},
            },
        ),
        w=4,
    )
    b.add(
        panel(
            "timeseries",
            "Throttled time share",
            [
                target(
                    'SELECT non_negative_derivative(max("power_violation_s"), 1s) AS "power", '
                    'non_negative_derivative(max("thermal_violation_s"), 1s) AS "thermal" '
                    f'FROM "gpu" WHERE {F_NODE} {per_gpu}',
                    alias=gpu_alias,
                )
            ],
            unit="percentunit",
            description="Share of time each GPU was held back by its power limit or by "
            "temperature (growth of the NVML violation counters).",
            minimum=0,
            maximum=1,
            th=thresholds(("green", None), ("orange", 0.1), ("red", 0.5)),
        ),
        w=8,
    )

    b.row("Thermals and throttling")
    b.add(
        panel(
            "timeseries",
            "Temperatures",
            [
                target(
                    'SELECT mean("temp_c") AS "core", mean("mem_temp_c") AS "memory" '
                    f'FROM "gpu" WHERE {F_NODE} {per_gpu}',
                    alias=gpu_alias,
                )
            ],
            unit="celsius",
            description="GPU core and memory (HBM) temperature.",
            th=thresholds(("green", None), ("orange", 83), ("red", 90)),
            custom={"thresholdsStyle": {"mode": "line+area"}},
        ),
        w=12,
    )
    b.add(
        panel(
            "state-timeline",
            "Throttle reasons",
            [
                target(
                    "SELECT "
                    + ", ".join(
                        f'(last("throttle_reasons") & {bit}) / {bit} AS "{name}"'
                        for name, bit in THROTTLE_BITS
                    )
                    + f' FROM "gpu" WHERE {F_NODE} {per_gpu}',
                    alias=gpu_alias,
                )
            ],
            description="Which NVML clocks-event reasons are active on each GPU: software "
            "power cap, hardware slowdown, software and hardware thermal slowdown, power "
            "brake.",
            mappings=[
                {
                    "type": "value",
                    "options": {
                        "0": {"text": "no", "color": "green", "index": 0},
                        "1": {"text": "active", "color": "red", "index": 1},
                    },
                }
            ],
            th=thresholds(("green", None), ("red", 1)),
        ),
        w=12,
    )

    b.row("Memory, utilization and clocks")
    b.add(
        panel(
            "timeseries",
            "GPU memory",
            [
                target(
                    'SELECT mean("mem_used_bytes") AS "used", mean("mem_total_bytes") AS "total" '
                    f'FROM "gpu" WHERE {F_NODE} {per_gpu}',
                    alias=gpu_alias,
                )
            ],
            unit="bytes",
            description="Device memory used and total.",
            minimum=0,
            overrides=[dashed(".*total")],
        ),
        w=12,
    )
    b.add(
        panel(
            "timeseries",
            "GPU memory used",
            [
                target(
                    'SELECT mean("mem_used_bytes") / mean("mem_total_bytes") * 100 '
                    'AS "mem_used_pct" '
                    f'FROM "gpu" WHERE {F_NODE} {per_gpu}',
                    alias="$tag_host/$tag_gpu",
                )
            ],
            unit="percent",
            description="Device memory used as a share of the total.",
            minimum=0,
            maximum=100,
            th=thresholds(("green", None), ("orange", 90), ("red", 97)),
        ),
        w=12,
    )
    b.add(
        panel(
            "timeseries",
            "Utilization",
            [
                target(
                    'SELECT mean("util_gpu_pct") AS "sm", mean("util_mem_pct") AS "memory" '
                    f'FROM "gpu" WHERE {F_NODE} {per_gpu}',
                    alias=gpu_alias,
                )
            ],
            unit="percent",
            description="SM busy share and memory-controller busy share.",
            minimum=0,
            maximum=100,
        ),
        w=12,
    )
    b.add(
        panel(
            "timeseries",
            "Clocks",
            [
                target(
                    'SELECT mean("sm_clock_mhz") AS "sm", mean("mem_clock_mhz") AS "memory" '
                    f'FROM "gpu" WHERE {F_NODE} {per_gpu}',
                    alias=gpu_alias,
                )
            ],
            unit="rotmhz",
            description="Current SM and memory clocks.",
            minimum=0,
        ),
        w=12,
    )
    b.add(
        panel(
            "timeseries",
            "Profiling activity (GPM)",
            [
                target(
                    'SELECT mean("sm_active_pct") AS "sm", mean("tensor_active_pct") AS "tensor", '
                    'mean("dram_active_pct") AS "dram" '
                    f'FROM "gpu" WHERE {F_NODE} {per_gpu}',
                    alias=gpu_alias,
                )
            ],
            unit="percent",
            description="GPM metrics (Hopper and newer): SMs busy, tensor pipes busy, DRAM "
            "bandwidth used over its peak. A busy DRAM with idle SMs is memory-bound work.",
            minimum=0,
            maximum=100,
        ),
        w=24,
    )

    b.row("Health")
    b.add(
        panel(
            "state-timeline",
            "GPU health",
            [
                target(
                    'SELECT last("unhealthy") AS "unhealthy" '
                    f'FROM "gpu_health" WHERE {F_NODE} {per_gpu}',
                    alias="$tag_host/$tag_gpu",
                )
            ],
            description="The agent's verdict: unhealthy while uncorrected ECC errors were "
            "seen since driver load, a page retirement or row remap waits for a reset, a row "
            "remap failed, or an XID no application explains arrived. The optimizer leaves an "
            "unhealthy GPU at its default cap.",
            mappings=[
                {
                    "type": "value",
                    "options": {
                        "0": {"text": "healthy", "color": "green", "index": 0},
                        "1": {"text": "unhealthy", "color": "red", "index": 1},
                    },
                }
            ],
            th=thresholds(("green", None), ("red", 1)),
        ),
        w=12,
    )
    b.add(
        panel(
            "timeseries",
            "XID events",
            [
                target(
                    'SELECT sum("xid_events") AS "xid", sum("xid_critical_events") AS "critical" '
                    f'FROM "gpu_health" WHERE {F_NODE} {per_gpu}',
                    alias=gpu_alias,
                )
            ],
            description="XID errors the driver reported, and those no application explains "
            "(not 13, 31, 43 or 45).",
            minimum=0,
            custom=bars(stacked=False),
        ),
        w=12,
    )
    b.add(
        panel(
            "timeseries",
            "ECC errors",
            [
                target(
                    'SELECT max("ecc_uncorrected_volatile") AS "uncorrected", '
                    'max("ecc_corrected_volatile") AS "corrected" '
                    f'FROM "gpu_health" WHERE {F_NODE} {per_gpu}',
                    alias=gpu_alias,
                )
            ],
            description="ECC errors since the driver loaded: corrected ones are harmless in "
            "small numbers; any uncorrected one makes the GPU unhealthy until a reset.",
            minimum=0,
            th=thresholds(("green", None), ("red", 1)),
        ),
        w=12,
    )
    b.add(
        panel(
            "timeseries",
            "Row remapping and link errors",
            [
                target(
                    'SELECT last("remap_pending") AS "remap_pending", '
                    'last("remap_failure") AS "remap_failure", '
                    'max("pcie_replay_total") AS "pcie_replays", '
                    'max("nvlink_replay_errors_total") AS "nvlink_replays" '
                    f'FROM "gpu_health" WHERE {F_NODE} {per_gpu}',
                    alias=gpu_alias,
                )
            ],
            description="A row remap pending (needs a GPU reset) or failed (needs service), "
            "and the PCIe and NVLink replay counters (retries of a noisy link).",
            minimum=0,
        ),
        w=12,
    )

    b.row("Jobs")
    b.add(
        panel(
            "table",
            "GPUs and their jobs",
            [
                target(
                    'SELECT last("job_id") AS "job_id", last("power_w") AS "power_w", '
                    'last("power_limit_w") AS "power_limit_w", '
                    'last("util_gpu_pct") AS "util_gpu_pct", last("temp_c") AS "temp_c", '
                    'last("pstate") AS "pstate", last("mig_mode") AS "mig_mode", '
                    'last("pci_bus_id") AS "pci_bus_id" '
                    f'FROM "gpu" WHERE {F_NODE} GROUP BY "host", "gpu", "model", "gpu_uuid"',
                    fmt="table",
                )
            ],
            description="Latest values of each GPU and the job running on it (empty when idle).",
            overrides=[
                by_name("power_w", unit="watt"),
                by_name("power_limit_w", unit="watt"),
                by_name("util_gpu_pct", unit="percent"),
                by_name("temp_c", unit="celsius"),
                by_name("Time", **{"custom.hidden": True}),
            ],
        ),
        w=24,
        h=8,
    )
    b.add(
        panel(
            "timeseries",
            "Job throughput",
            [
                target(
                    'SELECT mean("throughput") AS "throughput" FROM "job" '
                    f'WHERE {F_JOB} {BY_TIME}, "job_id", "host" fill(none)',
                    alias="$tag_job_id @ $tag_host",
                )
            ],
            unit="short",
            description="Work rate of each job on this node (its unit is in the jobs table).",
            minimum=0,
        ),
        w=12,
    )
    b.add(
        panel(
            "timeseries",
            "Job power and limit",
            [
                target(
                    'SELECT mean("power_w") AS "power_w", mean("power_limit_w") AS "limit_w" '
                    f'FROM "job" WHERE {F_JOB} {BY_TIME}, "job_id", "host" fill(none)',
                    alias="$tag_job_id @ $tag_host $col",
                )
            ],
            unit="watt",
            description="Summed power of each job's GPUs on this node and their mean limit.",
            minimum=0,
            overrides=[dashed(".*limit_w")],
        ),
        w=12,
    )
    b.add(
        panel(
            "table",
            "Jobs",
            [
                target(
                    'SELECT last("throughput") AS "throughput", last("throughput_unit") AS "unit", '
                    'last("throughput_source") AS "source", last("sm_util_pct") AS "sm_util_pct", '
                    'last("gpu_count") AS "gpus", last("gpu_uuids") AS "gpu_uuids" '
                    f'FROM "job" WHERE {F_JOB} GROUP BY "host", "job_id"',
                    fmt="table",
                )
            ],
            description="Latest report of each job: throughput and its unit and source "
            "(report, prometheus or the SM-utilization proxy), and its GPUs.",
            overrides=[
                by_name("sm_util_pct", unit="percent"),
                by_name("Time", **{"custom.hidden": True}),
            ],
        ),
        w=24,
        h=6,
    )

    b.row("Host")
    b.add(
        panel(
            "timeseries",
            "CPU and memory",
            [
                target(
                    'SELECT mean("cpu_pct") AS "cpu", '
                    'mean("mem_used_bytes") / mean("mem_total_bytes") * 100 AS "memory" '
                    f'FROM "host" WHERE {F_HOST} {BY_TIME}, "host" fill(none)',
                    alias="$tag_host $col",
                )
            ],
            unit="percent",
            description="CPU busy share across all cores and host memory used.",
            minimum=0,
            maximum=100,
        ),
        w=8,
    )
    b.add(
        panel(
            "timeseries",
            "Load average",
            [
                target(
                    'SELECT mean("load1") AS "load1", mean("load5") AS "load5", '
                    'mean("load15") AS "load15" '
                    f'FROM "host" WHERE {F_HOST} {BY_TIME}, "host" fill(none)',
                    alias="$tag_host $col",
                )
            ],
            description="1, 5 and 15 minute load averages.",
            minimum=0,
        ),
        w=8,
    )
    b.add(
        panel(
            "timeseries",
            "CPU and DRAM power (RAPL)",
            [
                target(
                    'SELECT mean("cpu_power_w") AS "cpu", mean("dram_power_w") AS "dram" '
                    f'FROM "host" WHERE {F_HOST} {BY_TIME}, "host" fill(none)',
                    alias="$tag_host $col",
                )
            ],
            unit="watt",
            description="CPU package and DRAM power from RAPL (absent where unreadable).",
            minimum=0,
        ),
        w=8,
    )
    return b


# --- 3. optimizer --------------------------------------------------------------
def optimizer() -> Board:
    b = Board(
        "dcenergy-optimizer",
        "dcenergy / Optimizer",
        "The optimizer's plans over time, predicted against measured savings, shadow prices "
        "per power domain, and what the agents did with the setpoints (audit).",
        [V_HOST, V_DOMAIN, V_ACTION, V_PRICE],
    )
    b.row("Plans")
    b.add(
        panel(
            "stat",
            "Latest plan",
            [
                target(
                    'SELECT last("plan_id") AS "plan_id", last("status") AS "status", '
                    'last("gpus_capped") AS "gpus_capped", last("solve_s") AS "solve_s" '
                    f'FROM "plan" WHERE {T}'
                )
            ],
            description="Id and solver status of the newest plan, GPUs it caps below their "
            "default, and the solver's wall time.",
            options={
                "reduceOptions": {"calcs": ["lastNotNull"], "fields": "/.*/", "values": False},
                "textMode": "value_and_name",
            },
            overrides=[by_name("solve_s", unit="s")],
        ),
        w=10,
        h=5,
    )
    b.add(
        panel(
            "timeseries",
            "Solve time and GPUs capped",
            [
                target(
                    'SELECT last("solve_s") AS "solve_s", last("gpus_capped") AS "gpus_capped" '
                    f'FROM "plan" WHERE {T} {BY_TIME} fill(none)',
                    alias="$col",
                )
            ],
            unit="s",
            description="Per plan: solver wall time (left axis) and GPUs capped (right).",
            custom={"drawStyle": "points", "pointSize": 6, "showPoints": "always"},
            overrides=[by_name("gpus_capped", unit="short", **{"custom.axisPlacement": "right"})],
            th=thresholds(("green", None), ("orange", 10), ("red", 60)),
        ),
        w=14,
        h=5,
    )
    b.add(
        panel(
            "table",
            "Plans",
            [
                target(
                    'SELECT "plan_id", "objective", "status", "solve_s", "power_before_w", '
                    '"power_after_w", "savings_w", "throughput_before", "throughput_after", '
                    f'"gpus_capped" FROM "plan" WHERE {T} ORDER BY time DESC LIMIT 100',
                    fmt="table",
                )
            ],
            description="Every plan published in the range, newest first.",
            overrides=[
                by_regex("power_.*|savings_w", unit="watt"),
                by_name("solve_s", unit="s"),
            ],
        ),
        w=24,
        h=8,
    )

    b.row("Predicted vs measured")
    b.add(
        panel(
            "timeseries",
            "Predicted vs measured savings",
            [
                target(
                    f'SELECT last("savings_w") AS "predicted" FROM "plan" WHERE {T} '
                    f"{BY_TIME} fill(previous)",
                    alias="predicted_savings_w",
                ),
                target(
                    f'SELECT last("power_before_w") AS "baseline" FROM "plan" WHERE {T} '
                    f"{BY_TIME} fill(previous)",
                    alias="baseline_w",
                ),
                target(fleet_gpu_power(f"{F_HOST}"), alias="measured_w"),
            ],
            unit="watt",
            description="Predicted savings of the plan in force against the measured ones: "
            "the plan's uncapped baseline minus the measured fleet GPU power (a Grafana "
            "transformation; select All hosts).",
            transformations=[
                {"id": "joinByField", "options": {"byField": "Time", "mode": "outer"}},
                {
                    "id": "calculateField",
                    "options": {
                        "mode": "binary",
                        "binary": {"left": "baseline_w", "operator": "-", "right": "measured_w"},
                        "alias": "measured_savings_w",
                        "replaceFields": False,
                    },
                },
                {
                    "id": "organize",
                    "options": {"excludeByName": {"baseline_w": True, "measured_w": True}},
                },
            ],
        ),
        w=12,
        h=9,
    )
    b.add(
        panel(
            "timeseries",
            "Predicted power before vs after",
            [
                target(
                    'SELECT last("power_before_w") AS "before", last("power_after_w") AS "after" '
                    f'FROM "plan" WHERE {T} {BY_TIME} fill(previous)',
                    alias="predicted $col",
                ),
                target(fleet_gpu_power(f"{F_HOST}"), alias="measured"),
            ],
            unit="watt",
            description="Fleet GPU power the plans predict with no change and under the "
            "plan, against the measured power.",
            minimum=0,
            overrides=[dashed("predicted before", "red")],
        ),
        w=12,
        h=9,
    )
    b.add(
        panel(
            "stat",
            "Predicted energy and cost saved in range",
            [target(savings_kwh())],
            unit="kwatth",
            description="The predicted savings of the plan in force, minute by minute, summed "
            "over the range, and their value at price_per_kwh.",
            overrides=[by_name("saved_cost", unit="none", decimals=2)],
        ),
        w=6,
        h=5,
    )

    b.row("Power domains")
    b.add(
        panel(
            "timeseries",
            "Shadow price per domain",
            [
                target(
                    'SELECT last("shadow_price_per_kw") AS "shadow_price" FROM "plan_domain" '
                    f'WHERE {F_DOMAIN} {BY_TIME}, "domain" fill(previous)',
                    alias="$tag_domain",
                )
            ],
            unit="suffix: /kW",
            description="The LP's dual value of each domain's budget: throughput one more kW "
            "there would buy. Zero where the budget does not bind.",
            minimum=0,
        ),
        w=12,
    )
    b.add(
        panel(
            "table",
            "Domains (latest plan)",
            [
                target(
                    'SELECT last("plan_id") AS "plan_id", last("budget_w") AS "budget_w", '
                    'last("before_w") AS "before_w", last("planned_w") AS "planned_w", '
                    'last("shadow_price_per_kw") AS "shadow_price_per_kw" '
                    f'FROM "plan_domain" WHERE {F_DOMAIN} GROUP BY "domain"',
                    fmt="table",
                )
            ],
            description="Budget, predicted power before and under the plan, and shadow "
            "price of each domain in the newest plan.",
            overrides=[
                by_regex(".*_w", unit="watt"),
                by_name(
                    "shadow_price_per_kw",
                    unit="suffix: /kW",
                    **{"custom.cellOptions": {"type": "color-background"}},
                    thresholds=thresholds(("transparent", None), ("orange", 0.000001)),
                ),
                by_name("Time", **{"custom.hidden": True}),
            ],
            options={"sortBy": [{"displayName": "shadow_price_per_kw", "desc": True}]},
        ),
        w=12,
    )
    b.add(
        panel(
            "table",
            "Budget overrides",
            [
                target(
                    'SELECT last("watts") AS "watts", last("expires_ns") / 1000000 AS "expires", '
                    'last("allow_raise") AS "allow_raise", last("cleared") AS "cleared" '
                    f'FROM "budget_override" WHERE {F_DOMAIN} GROUP BY "domain"',
                    fmt="table",
                )
            ],
            description="The newest budget override of each domain set in the range "
            "(dcenergy budget set, demand response): the budget the optimizer uses until it "
            "expires, never above the topology's own unless allow_raise; cleared: ended "
            "early (dcenergy budget clear). The domain's budget in the plans above is the "
            "one in force.",
            overrides=[
                by_name("watts", unit="watt"),
                by_name("expires", unit="dateTimeFromNow"),
                by_name("Time", **{"custom.hidden": True}),
            ],
        ),
        w=24,
        h=5,
    )

    b.row("Setpoint audit")
    b.add(
        panel(
            "stat",
            "Actions in range",
            [target(audit_count(F_AUDIT, 'GROUP BY "action"'), alias="$tag_action")],
            description="Setpoint actions the agents reported: applied, clamped to the "
            "hardware's range, refused (unsigned, badly signed or expired plan), restored "
            "to the default (lease lapsed), reverted (dcenergy revert), error, thermal "
            "guard, drift (the enforced limit is not the one set).",
            options={"colorMode": "background"},
            overrides=[
                by_name(a, color={"mode": "fixed", "fixedColor": c})
                for a, c in ACTION_COLORS.items()
            ],
        ),
        w=8,
    )
    b.add(
        panel(
            "timeseries",
            "Actions over time",
            [target(audit_count(F_AUDIT, f'{BY_TIME}, "action" fill(none)'), alias="$tag_action")],
            description="Setpoint actions per interval, by action.",
            custom=bars(),
            overrides=[
                by_name(a, color={"mode": "fixed", "fixedColor": c})
                for a, c in ACTION_COLORS.items()
            ],
        ),
        w=16,
    )
    b.add(
        panel(
            "timeseries",
            "Requested vs applied vs enforced limit",
            [
                target(
                    'SELECT mean("requested_w") AS "requested", mean("applied_w") AS "applied", '
                    'mean("enforced_w") AS "enforced" '
                    f'FROM "audit" WHERE {F_AUDIT} {BY_TIME}, "host", "gpu_uuid" fill(none)',
                    alias="$tag_host/$tag_gpu_uuid $col",
                )
            ],
            unit="watt",
            description="For each setpoint: the limit the plan asked for, the one the agent "
            "set after clamping, and the one read back from the GPU. A gap between requested "
            "and applied is a clamp; between applied and enforced, another constraint.",
            custom={"drawStyle": "points", "pointSize": 5, "showPoints": "always"},
        ),
        w=12,
        h=9,
    )
    b.add(
        panel(
            "table",
            "Audit log",
            [
                target(
                    'SELECT "host", "gpu_uuid", "action", "reason", "plan_id", "seq", '
                    '"requested_w", "applied_w", "enforced_w", "sm_clock_max_mhz" '
                    f'FROM "audit" WHERE {F_AUDIT} ORDER BY time DESC LIMIT 200',
                    fmt="table",
                )
            ],
            description="The newest setpoint actions with their reasons.",
            overrides=[
                by_regex(".*_w", unit="watt"),
                by_name("sm_clock_max_mhz", unit="rotmhz"),
                by_name(
                    "action",
                    **{"custom.cellOptions": {"type": "color-text"}},
                    mappings=[
                        {
                            "type": "value",
                            "options": {
                                a: {"color": c, "index": i}
                                for i, (a, c) in enumerate(ACTION_COLORS.items())
                            },
                        }
                    ],
                ),
            ],
        ),
        w=12,
        h=9,
    )
    b.add(
        panel(
            "table",
            "Plan parts per host",
            [
                target(
                    'SELECT last("plan_id") AS "plan_id", last("seq") AS "seq", '
                    'last("expires_ns") / 1000000 AS "expires", last("revert") AS "revert" '
                    f'FROM "plan_part" WHERE {F_HOST} GROUP BY "host"',
                    fmt="table",
                )
            ],
            description="The newest signed part of a plan the optimizer wrote for each host, "
            "and when it expires (after which the agent restores the defaults); revert: an "
            "emergency revert (dcenergy revert) holds the host's GPUs at their saved limits "
            "until then, and the optimizer skips the host.",
            overrides=[
                by_name("expires", unit="dateTimeFromNow"),
                by_name("Time", **{"custom.hidden": True}),
            ],
        ),
        w=24,
        h=6,
    )
    return b


# --- 4. agent health -----------------------------------------------------------
def agent_health() -> Board:
    b = Board(
        "dcenergy-agent",
        "dcenergy / Agent health",
        "The node agents reporting on themselves: liveness, spool, drops, errors, shipping "
        "latency and sampling.",
        [V_HOST],
    )
    per_host = f'{BY_TIME}, "host" fill(none)'
    b.row("Liveness")
    b.add(
        panel(
            "stat",
            "Agents reporting (last 2 min)",
            [
                target(
                    'SELECT count("s") AS "agents" FROM ('
                    f'SELECT last("samples_total") AS "s" FROM "agent" WHERE {F_HOST} '
                    'AND time > now() - 2m GROUP BY "host")'
                )
            ],
            description="Agents that reported in the last two minutes.",
            no_value="0",
            options={"textMode": "value"},
        ),
        w=4,
        h=5,
    )
    b.add(
        panel(
            "stat",
            "Agents seen in range",
            [
                target(
                    'SELECT count("s") AS "agents" FROM ('
                    f'SELECT last("samples_total") AS "s" FROM "agent" WHERE {F_HOST} '
                    'GROUP BY "host")'
                )
            ],
            description="Agents that reported at least once in the range; more than are "
            "reporting now means some went silent.",
            no_value="0",
            options={"textMode": "value"},
        ),
        w=4,
        h=5,
    )
    b.add(
        panel(
            "table",
            "Last sample per host",
            [
                target(
                    'SELECT last("samples_total") AS "samples_total" FROM "agent" '
                    f'WHERE {F_HOST} GROUP BY "host"',
                    fmt="table",
                )
            ],
            description="When each agent last reported (the Time column, shown as an age).",
            overrides=[by_name("Time", unit="dateTimeFromNow", displayName="last sample")],
            options={"sortBy": [{"displayName": "last sample", "desc": False}]},
        ),
        w=8,
        h=5,
    )
    b.add(
        panel(
            "table",
            "Last GPU sample per host",
            [
                target(
                    'SELECT last("power_w") AS "power_w" FROM "gpu" '
                    f'WHERE {F_HOST} GROUP BY "host"',
                    fmt="table",
                )
            ],
            description="When GPU telemetry of each host last reached the database.",
            overrides=[
                by_name("Time", unit="dateTimeFromNow", displayName="last GPU sample"),
                by_name("power_w", unit="watt", **{"custom.hidden": True}),
            ],
        ),
        w=8,
        h=5,
    )

    b.row("Spool and shipping")
    b.add(
        panel(
            "timeseries",
            "Spool depth",
            [
                target(
                    f'SELECT last("spool_depth") AS "spool_depth" FROM "agent" WHERE {F_HOST} '
                    f"{per_host}",
                    alias="$tag_host",
                )
            ],
            description="Points waiting in each agent's spool; a growing spool means the "
            "database is unreachable or too slow.",
            minimum=0,
            th=thresholds(("green", None), ("orange", 10000), ("red", 100000)),
            custom={"thresholdsStyle": {"mode": "line"}},
        ),
        w=8,
    )
    b.add(
        panel(
            "timeseries",
            "Spool size on disk",
            [
                target(
                    f'SELECT last("spool_bytes") AS "spool_bytes" FROM "agent" WHERE {F_HOST} '
                    f"{per_host}",
                    alias="$tag_host",
                )
            ],
            unit="bytes",
            description="Size of each agent's SQLite spool.",
            minimum=0,
        ),
        w=8,
    )
    b.add(
        panel(
            "timeseries",
            "Shipping latency",
            [
                target(
                    'SELECT max("ship_latency_s") AS "max", mean("ship_latency_s") AS "mean" '
                    f'FROM "agent" WHERE {F_HOST} {per_host}',
                    alias="$tag_host $col",
                )
            ],
            unit="s",
            description="Age of the oldest point in each shipped batch: how far the "
            "database lags behind the GPUs.",
            minimum=0,
            th=thresholds(("green", None), ("orange", 60), ("red", 300)),
            custom={"thresholdsStyle": {"mode": "line"}},
        ),
        w=8,
    )
    b.add(
        panel(
            "timeseries",
            "Points spooled vs shipped",
            [
                target(
                    'SELECT non_negative_derivative(max("points_spooled_total"), 1s) AS "spooled", '
                    'non_negative_derivative(max("points_shipped_total"), 1s) AS "shipped" '
                    f'FROM "agent" WHERE {F_HOST} {per_host}',
                    alias="$tag_host $col",
                )
            ],
            unit="cps",
            description="Points written to the spool and accepted by the store, per second.",
            minimum=0,
        ),
        w=12,
    )
    b.add(
        panel(
            "timeseries",
            "Sampling cycle duration",
            [
                target(
                    f'SELECT mean("cycle_s") AS "cycle_s" FROM "agent" WHERE {F_HOST} {per_host}',
                    alias="$tag_host cycle",
                )
            ],
            unit="s",
            description="Duration of the sampling cycle; it should stay well below the "
            "sampling period.",
            minimum=0,
            th=thresholds(("green", None), ("orange", 1), ("red", 5)),
        ),
        w=12,
    )

    b.row("Drops and errors")
    b.add(
        panel(
            "stat",
            "Points dropped in range",
            [
                target(
                    "SELECT "
                    + ", ".join(f'sum("{r}") AS "{r}"' for r in DROP_REASONS)
                    + " FROM (SELECT "
                    + ", ".join(f'spread("dropped_{r}_total") AS "{r}"' for r in DROP_REASONS)
                    + f' FROM "agent" WHERE {F_HOST} GROUP BY "host")'
                )
            ],
            description="Points lost, by reason: spool full (oldest dropped first), rejected "
            "by the store (4xx), dropped by a partial write, lost in a damaged spool "
            "(corrupt), no room on the state disk (disk_full).",
            th=thresholds(("green", None), ("red", 1)),
            options={"colorMode": "background"},
        ),
        w=6,
    )
    b.add(
        panel(
            "timeseries",
            "Drops by reason",
            [
                target(
                    "SELECT "
                    + ", ".join(
                        f'non_negative_difference(max("dropped_{r}_total")) AS "{r}"'
                        for r in DROP_REASONS
                    )
                    + f' FROM "agent" WHERE {F_HOST} {per_host}',
                    alias="$tag_host $col",
                )
            ],
            description="Points dropped per interval, by host and reason.",
            custom=bars(),
        ),
        w=9,
    )
    b.add(
        panel(
            "timeseries",
            "Errors",
            [target(counter_rise("errors_total", "errors", F_HOST, per_host), alias="$tag_host")],
            description="Errors met per interval (device, store, collector).",
            custom=bars(),
        ),
        w=9,
    )
    b.add(
        panel(
            "table",
            "Last error per host",
            [
                target(
                    'SELECT last("last_error") AS "last_error", '
                    'last("errors_total") AS "errors_total" '
                    f'FROM "agent" WHERE {F_HOST} GROUP BY "host"',
                    fmt="table",
                )
            ],
            description="The last error message each agent reported (empty when none).",
            overrides=[by_name("Time", **{"custom.hidden": True})],
        ),
        w=24,
        h=6,
    )
    return b


# --- 5. alert rules (Grafana unified alerting) ---------------------------------
ALERTS_FILE = "provisioning/alerting/dcenergy.yaml"
ALERT_FOLDER = "dcenergy"
ALERT_INTERVAL = "1m"
RULE_UID_PREFIX = "dcenergy-"
SILENT_BUCKETS = 3  # 1-minute buckets, the current one included: silent for 2 to 3 minutes


def agent_samples_recently() -> str:
    """Per host and minute, the mean count of agent points over the last three minutes.

    ``fill(0)`` gives every host seen in the rule's range a row per minute up to now,
    so a silent host reads 0 instead of vanishing (an alert needs a series to fire on);
    the moving average's last value is 0 once no point came in the last 2-3 minutes.
    """
    return (
        f'SELECT moving_average(count("samples_total"), {SILENT_BUCKETS}) AS "samples" '
        f'FROM "agent" WHERE {T} GROUP BY time(1m), "host" fill(0)'
    )


def rising(field: str, alias: str) -> str:
    """How much an agent counter rose over the rule's range, per host."""
    return (
        f'SELECT sum("d") AS "{alias}" FROM ('
        + counter_rise(field, "d", T, 'GROUP BY time(1m), "host"')
        + ') GROUP BY "host"'
    )


def plans_with_status(pattern: str, alias: str) -> str:
    return f'SELECT count("status") AS "{alias}" FROM "plan" WHERE {T} AND "status" =~ /{pattern}/'


def alert(
    uid: str,
    title: str,
    query: str,
    *,
    range_s: int,
    op: str,
    value: float,
    for_: str,
    severity: str,
    summary: str,
    description: str,
    no_data: str = "OK",
) -> Json:
    """One rule: A (the InfluxQL query), B (each series' last value), C (B ``op`` value)."""
    return {
        "uid": RULE_UID_PREFIX + uid,
        "title": title,
        "condition": "C",
        "data": [
            {
                "refId": "A",
                "relativeTimeRange": {"from": range_s, "to": 0},
                "datasourceUid": DS_UID,
                "model": {
                    "refId": "A",
                    "datasource": DS,
                    "rawQuery": True,
                    "query": query,
                    "resultFormat": "time_series",
                    "intervalMs": 60000,
                    "maxDataPoints": 43200,
                },
            },
            {
                "refId": "B",
                "datasourceUid": "__expr__",
                "model": {
                    "refId": "B",
                    "datasource": {"type": "__expr__", "uid": "__expr__"},
                    "type": "reduce",
                    "expression": "A",
                    "reducer": "last",
                    "settings": {"mode": "dropNN"},
                },
            },
            {
                "refId": "C",
                "datasourceUid": "__expr__",
                "model": {
                    "refId": "C",
                    "datasource": {"type": "__expr__", "uid": "__expr__"},
                    "type": "threshold",
                    "expression": "B",
                    "conditions": [{"evaluator": {"type": op, "params": [value]}}],
                },
            },
        ],
        "noDataState": no_data,
        "execErrState": "Error",
        "for": for_,
        "annotations": {"summary": summary, "description": description},
        "labels": {"severity": severity, "service": "dcenergy"},
        "isPaused": False,
    }


def alert_rules() -> Json:
    """The alert rules provisioning document: one group per concern, evaluated every minute."""
    actions = 'AND "action" = '
    power = [
        alert(
            "domain-over-budget",
            "Power domain over its budget",
            f'SELECT last("measured_w") - last("budget_w") AS "over_w" FROM "plan_domain" '
            f'WHERE {T} GROUP BY "domain"',
            range_s=900,
            op="gt",
            value=0,
            for_="10m",
            severity="critical",
            summary="Domain {{ $labels.domain }} draws {{ $values.B }} W over its budget",
            description="The domain's measured power (GPU draw plus its non-GPU baseline, over "
            "the optimizer's window) has been above its budget (override included) for 10 "
            "minutes: the plan cannot hold it, or agents do not apply it.",
        ),
        alert(
            "plan-infeasible",
            "Plan is best effort: a budget cannot be met",
            plans_with_status("^best-effort", "plans"),
            range_s=900,
            op="gt",
            value=0,
            for_="0s",
            severity="warning",
            summary="The optimizer could not meet every budget",
            description="A plan of the last 15 minutes is best effort (solver status "
            "best-effort): even at their lowest caps the GPUs exceed a budget.",
        ),
        alert(
            "jobs-past-allowance",
            "Jobs slowed past their allowed slowdown",
            plans_with_status("floors", "plans"),
            range_s=900,
            op="gt",
            value=0,
            for_="0s",
            severity="warning",
            summary="A plan slows jobs past their allowed slowdown",
            description="A plan of the last 15 minutes relaxed (or ignored) the jobs' "
            "slowdown floors to meet a budget: some jobs run slower than they are allowed.",
        ),
    ]
    agents = [
        alert(
            "agent-silent",
            "Agent silent",
            agent_samples_recently(),
            range_s=3600,
            op="lt",
            value=0.01,
            for_="0s",
            severity="critical",
            summary="Agent on {{ $labels.host }} silent for 2 minutes",
            description="No agent sample from the host for 2 to 3 minutes (it reported within "
            "the last hour; after an hour of silence the alert resolves, dcenergy status "
            "and check still report the host): the agent, the node or its path to the "
            "store is down.",
            no_data="Alerting",
        ),
        *[
            alert(
                f"drops-{r.replace('_', '-')}",
                f"Points dropped ({r.replace('_', ' ')})",
                rising(f"dropped_{r}_total", "dropped"),
                range_s=900,
                op="gt",
                value=0,
                for_="0s",
                severity="critical",
                summary=f"{{{{ $labels.host }}}} dropped {{{{ $values.B }}}} points ({r})",
                description=f"The agent's dropped_{r}_total rose in the last 15 minutes: "
                "telemetry was lost (see Agent health, Drops and errors).",
            )
            for r in DROP_REASONS
        ],
        alert(
            "agent-errors",
            "Agent errors (store writes, devices, collectors)",
            rising("errors_total", "errors"),
            range_s=900,
            op="gt",
            value=0,
            for_="5m",
            severity="warning",
            summary="{{ $labels.host }}: {{ $values.B }} agent errors in 15 minutes",
            description="The agent keeps meeting errors (errors_total rising for 5 minutes); "
            "its last_error (Agent health, Last error per host) says which, often a store "
            "that refuses writes.",
        ),
        alert(
            "gpu-lost",
            "GPU lost",
            'SELECT count("lost") AS "lost" FROM "gpu" '
            f'WHERE {T} AND "lost" = true GROUP BY "host", "gpu_uuid"',
            range_s=300,
            op="gt",
            value=0,
            for_="0s",
            severity="warning",
            summary="GPU {{ $labels.gpu_uuid }} on {{ $labels.host }} is lost",
            description="The GPU fell off the bus (NVML reports it lost): it needs a reset "
            "or the node a reboot.",
        ),
    ]
    setpoints = [
        alert(
            "part-refused",
            "Plan part refused",
            audit_count(f"{T} {actions}'refused'", 'GROUP BY "host"', "refused"),
            range_s=600,
            op="gt",
            value=0,
            for_="0s",
            severity="critical",
            summary="{{ $labels.host }} refused a plan part",
            description="The agent refused a part (unsigned, badly signed, other key, expired, "
            "replayed, unknown GPU): see the Audit log for the reason.",
        ),
        alert(
            "lease-lapsed",
            "Lease lapsed: GPUs restored",
            audit_count(f"{T} {actions}'restored'", 'GROUP BY "host"', "restored"),
            range_s=600,
            op="gt",
            value=0,
            for_="0s",
            severity="warning",
            summary="{{ $labels.host }} restored {{ $values.B }} GPUs to their saved limits",
            description="The agent restored GPUs: its plan lease lapsed (the optimizer is down "
            "or its parts are refused) or the GPUs left the plan.",
        ),
        alert(
            "thermal-guard",
            "Thermal guard active",
            audit_count(f"{T} {actions}'thermal'", 'GROUP BY "host"', "thermal"),
            range_s=600,
            op="gt",
            value=0,
            for_="0s",
            severity="warning",
            summary="Thermal guard capped GPUs on {{ $labels.host }}",
            description="A GPU reached reconciler.thermal_limit_c and the agent lowered its cap "
            "whatever the plan says.",
        ),
    ]
    return {
        "apiVersion": 1,
        "groups": [
            {
                "orgId": 1,
                "name": name,
                "folder": ALERT_FOLDER,
                "interval": ALERT_INTERVAL,
                "rules": rules,
            }
            for name, rules in (
                ("dcenergy-power", power),
                ("dcenergy-agents", agents),
                ("dcenergy-setpoints", setpoints),
            )
        ],
    }


def to_yaml(value: Any, indent: int = 0) -> str:
    """Deterministic block YAML for JSON-like data; every string double-quoted (JSON escapes
    are YAML's), so no value is ever read as another type."""
    pad = " " * indent

    def scalar(v: Any) -> str:
        if v is None:
            return "null"
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return json.dumps(v)
        return json.dumps(str(v), ensure_ascii=False)

    if isinstance(value, dict):
        if not value:
            return pad + "{}\n"
        out = []
        for k, v in value.items():
            if isinstance(v, dict | list) and v:
                out.append(f"{pad}{k}:\n{to_yaml(v, indent + 2)}")
            else:
                empty = "[]" if isinstance(v, list) else "{}"
                out.append(f"{pad}{k}: {empty if isinstance(v, dict | list) else scalar(v)}\n")
        return "".join(out)
    if isinstance(value, list):
        out = []
        for v in value:
            if isinstance(v, dict | list) and v:
                body = to_yaml(v, indent + 2)
                out.append(f"{pad}- {body[indent + 2 :]}")
            else:
                out.append(f"{pad}- {scalar(v)}\n")
        return "".join(out)
    return pad + scalar(value) + "\n"


def alerts_yaml() -> str:
    head = (
        "# Generated by dashboards/build.py from the dashboards' query builders: do not edit.\n"
        "# Grafana unified alerting, file provisioning (docs/dashboards.md, Alerts).\n"
    )
    return head + to_yaml(alert_rules())


# --- entry point ---------------------------------------------------------------
BOARDS = {
    "fleet-energy.json": fleet,
    "node-gpu.json": node,
    "optimizer.json": optimizer,
    "agent-health.json": agent_health,
}


def build_all() -> dict[str, str]:
    """File name (relative to dashboards/) -> text: every dashboard's JSON, the alert rules."""
    out = {
        name: json.dumps(make().json(), indent=2, ensure_ascii=False) + "\n"
        for name, make in BOARDS.items()
    }
    out[ALERTS_FILE] = alerts_yaml()
    return out


def main(argv: Iterable[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--check", action="store_true", help="fail if a committed file differs")
    ap.add_argument("--out", type=Path, default=HERE, help="folder to write (default: here)")
    args = ap.parse_args(list(argv) if argv is not None else None)
    stale = []
    for name, text in build_all().items():
        path = args.out / name
        current = path.read_text(encoding="utf-8") if path.exists() else None
        if current == text:
            continue
        if args.check:
            stale.append(name)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path}")
    if stale:
        print(f"stale: {', '.join(stale)}; run python dashboards/build.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
