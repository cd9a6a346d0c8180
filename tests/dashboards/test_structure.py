"""The committed dashboards hold together, and every query names only what dcenergy.schema has."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest

from dcenergy import schema
from tests.dashboards import influxql
from tests.dashboards.grafana import (
    DASHBOARDS,
    DS_UID,
    EXPECTED,
    Json,
    Target,
    all_dashboards,
    panels,
    targets,
    undefined_variables,
    variable_queries,
    variables,
)

ALL = all_dashboards()
TARGETS = targets(ALL)
VAR_QUERIES = variable_queries(ALL)
UNIT_FREE_KINDS = {"row", "table", "state-timeline"}


def test_the_four_dashboards_are_there_with_their_uids() -> None:
    found = {p.name for p in DASHBOARDS.glob("*.json")}
    assert found == set(EXPECTED)
    for name, uid in EXPECTED.items():
        dash = json.loads((DASHBOARDS / name).read_text(encoding="utf-8"))
        assert dash["uid"] == uid
        assert dash["schemaVersion"] >= 39
        assert dash.get("id") is None, "a provisioned dashboard carries no database id"
        assert dash["title"].startswith("dcenergy / ")


def test_uids_are_unique_across_dashboards() -> None:
    uids = [d["uid"] for d in ALL.values()]
    assert len(uids) == len(set(uids))


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_panel_ids_are_unique_within_a_dashboard(name: str) -> None:
    ids = [p["id"] for p in panels(ALL[name])]
    assert all(isinstance(i, int) for i in ids)
    assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_panels_do_not_overlap_and_fit_the_grid(name: str) -> None:
    cells: dict[tuple[int, int], str] = {}
    for p in panels(ALL[name]):
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = p["title"]


def _datasource_refs(node: object) -> list[object]:
    """Every ``datasource`` value anywhere in a JSON tree."""
    out: list[object] = []
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "datasource":
                out.append(v)
            out += _datasource_refs(v)
    elif isinstance(node, list):
        for v in node:
            out += _datasource_refs(v)
    return out


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_datasource_is_the_provisioned_one(name: str) -> None:
    dash = ALL[name]
    defined = {v["name"] for v in variables(dash).values() if v["type"] == "datasource"}
    for ref in _datasource_refs({k: v for k, v in dash.items() if k != "annotations"}):
        assert isinstance(ref, dict), ref
        uid = ref["uid"]
        if isinstance(uid, str) and uid.startswith("$"):
            assert uid.strip("${}") in defined, ref
        else:
            assert ref == {"type": "influxdb", "uid": DS_UID}


def test_the_provisioned_datasource_has_that_uid() -> None:
    text = (DASHBOARDS / "provisioning" / "datasources" / "dcenergy.yaml").read_text()
    assert re.search(rf"^\s+uid:\s*{re.escape(DS_UID)}\s*$", text, re.MULTILINE)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_variable_a_query_uses_is_defined(name: str) -> None:
    assert undefined_variables(ALL[name]) == []


def test_an_undefined_variable_is_caught() -> None:
    dash = json.loads(json.dumps(ALL["node-gpu.json"]))
    dash["templating"]["list"] = [v for v in dash["templating"]["list"] if v["name"] != "gpu"]
    assert undefined_variables(dash) == ["gpu"]


@pytest.mark.parametrize("t", TARGETS, ids=[t.id for t in TARGETS])
def test_target_is_raw_influxql_on_the_schema(t: Target) -> None:
    assert t.target["rawQuery"] is True
    assert t.target["resultFormat"] in ("time_series", "table")
    assert "$timeFilter" in t.query
    assert influxql.check_query(t.query) == []
    influxql.columns(t.query)  # every column is predictable


@pytest.mark.parametrize("t", TARGETS, ids=[t.id for t in TARGETS])
def test_alias_names_only_grouped_tags(t: Target) -> None:
    alias = t.target.get("alias", "")
    grouped = set(influxql.parse(t.query).group_tags)
    for tag in re.findall(r"\$tag_(\w+)", alias):
        assert tag in grouped, f"alias {alias!r} uses $tag_{tag}, query groups by {grouped}"


@pytest.mark.parametrize("name,var", VAR_QUERIES, ids=[f"{n}:{v['name']}" for n, v in VAR_QUERIES])
def test_variable_query_names_a_schema_tag(name: str, var: Json) -> None:
    assert var["datasource"] == {"type": "influxdb", "uid": DS_UID}
    assert influxql.check_variable_query(var["query"]) == []
    assert var["allValue"] == ".*", "All must become a regex that matches everything"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_constants_are_numbers(name: str) -> None:
    for v in variables(ALL[name]).values():
        if v["type"] == "constant":
            float(v["query"])


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_panels_have_units_thresholds_and_descriptions(name: str) -> None:
    for p in panels(ALL[name]):
        if p["type"] == "row":
            continue
        assert p["description"], p["title"]
        defaults = p["fieldConfig"]["defaults"]
        steps = defaults["thresholds"]["steps"]
        assert steps and steps[0]["value"] is None, p["title"]
        if p["type"] not in UNIT_FREE_KINDS:
            assert defaults.get("unit"), p["title"]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_transformations_name_columns_the_queries_give(name: str) -> None:
    for p in panels(ALL[name]):
        names: set[str] = {"Time"}
        for t in p.get("targets", []):
            names |= set(influxql.columns(t["query"])) | {t.get("alias", "")}
        for tr in p.get("transformations", []):
            opts = tr["options"]
            if tr["id"] == "calculateField":
                assert {opts["binary"]["left"], opts["binary"]["right"]} <= names, p["title"]
                names.add(opts["alias"])
            elif tr["id"] == "sortBy":
                assert {s["field"] for s in opts["sort"]} <= names, p["title"]
            elif tr["id"] == "organize":
                assert set(opts["excludeByName"]) <= names, p["title"]


# --- the checker can fail: broken queries, and a schema change ------------------------
GOOD = (
    'SELECT mean("power_w") AS "p" FROM "gpu" WHERE $timeFilter AND "host" =~ /^$host$/ '
    'GROUP BY time($__interval), "gpu_uuid" fill(none)'
)
BROKEN = {
    "unknown measurement": (GOOD.replace('"gpu"', '"gpus"'), "'gpus' is not in"),
    "unknown field": (GOOD.replace('"power_w"', '"power_watts"'), "'power_watts'"),
    "another measurement's field": (GOOD.replace('"power_w"', '"spool_depth"'), "'spool_depth'"),
    "field in GROUP BY": (
        GOOD.replace('"gpu_uuid"', '"job_id"'),
        "GROUP BY 'job_id' is not a tag (a field)",
    ),
    "mean of a string": (GOOD.replace('"power_w"', '"job_id"'), "mean() of string field 'job_id'"),
    "no $timeFilter": (GOOD.replace("$timeFilter AND ", ""), "no $timeFilter"),
    "no host filter": (GOOD.replace(' AND "host" =~ /^$host$/', ""), '"host" =~ /^$host$/'),
    "unanchored regex": (GOOD.replace("/^$host$/", "/$host/"), "not of the form"),
    "no alias": (GOOD.replace(' AS "p"', ""), "without AS alias"),
    "unknown name in a subquery": (
        f'SELECT sum("q") AS "s" FROM ({GOOD}) WHERE $timeFilter GROUP BY time($__interval)',
        "selects 'q'",
    ),
    "grouping by a tag the subquery dropped": (
        f'SELECT sum("p") AS "s" FROM ({GOOD}) GROUP BY "host"',
        "GROUP BY 'host' is not a tag",
    ),
    "unreadable": ("SELECT FROM", "cannot parse"),
    "integral() (not in InfluxDB 3)": (
        GOOD.replace('mean("power_w")', 'integral("power_w", 1h)'),
        "integral is not available in InfluxDB 3",
    ),
}


def test_the_good_example_passes() -> None:
    assert influxql.check_query(GOOD) == []
    assert influxql.columns(GOOD) == ["time", "p"]


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_checker_rejects(case: str) -> None:
    query, expected = BROKEN[case]
    problems = influxql.check_query(query)
    assert any(expected in p for p in problems), problems


@pytest.mark.parametrize(
    "query,expected",
    [
        ('SHOW TAG VALUES FROM "gpus" WITH KEY = "host"', "not in dcenergy.schema"),
        ('SHOW TAG VALUES FROM "gpu" WITH KEY = "job_id"', "not a tag"),
        ('SHOW TAG VALUES FROM "plan" WITH KEY = "objective" WHERE "host" =~ /^$host$/', "'host'"),
    ],
)
def test_variable_checker_rejects(query: str, expected: str) -> None:
    assert any(expected in p for p in influxql.check_variable_query(query))


def _all_problems() -> list[str]:
    out = [p for t in TARGETS for p in influxql.check_query(t.query)]
    out += [p for _, v in VAR_QUERIES for p in influxql.check_variable_query(v["query"])]
    return out


def test_renaming_a_field_in_the_schema_breaks_the_dashboards(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert _all_problems() == []
    gpu = schema.MEASUREMENTS["gpu"]
    renamed = tuple(
        dataclasses.replace(f, name="board_power_w") if f.name == "power_w" else f
        for f in gpu.fields
    )
    monkeypatch.setitem(
        schema.MEASUREMENTS, "gpu", schema.Measurement(gpu.name, gpu.tags, renamed, gpu.help)
    )
    assert any("'power_w'" in p for p in _all_problems())


def test_dropping_a_tag_from_the_schema_breaks_the_dashboards(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pd = schema.MEASUREMENTS["plan_domain"]
    monkeypatch.setitem(
        schema.MEASUREMENTS,
        "plan_domain",
        schema.Measurement(pd.name, (), pd.fields, pd.help),
    )
    assert any("'domain'" in p for p in _all_problems())
