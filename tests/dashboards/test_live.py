"""Every panel's every query, and every variable's, answers from a real influxd seeded with a fleet.

Variables are filled in as Grafana's InfluxDB datasource does: ``$timeFilter``
becomes ``time > now() - 1h``, ``$__interval`` ``10s``, a regex variable ``.*``
(All), a constant its value.
"""

from __future__ import annotations

import pytest

from tests.dashboards import influxql
from tests.dashboards.conftest import Seeded
from tests.dashboards.grafana import (
    Json,
    Target,
    all_dashboards,
    live_values,
    substitute,
    targets,
    variable_queries,
)
from tests.dashboards.telemetry import HOSTS

pytestmark = pytest.mark.influxdb

ALL = all_dashboards()
TARGETS = targets(ALL)
VAR_QUERIES = variable_queries(ALL)


def _series(result: Json, q: str) -> list[Json]:
    assert "error" not in result, f"{result['error']} in {q}"
    series: list[Json] = result.get("series", [])
    assert series, f"no series for {q}"
    return series


@pytest.mark.parametrize("t", TARGETS, ids=[t.id for t in TARGETS])
def test_target_answers_with_its_columns(seeded: Seeded, t: Target) -> None:
    q = substitute(t.query, live_values(ALL[t.dashboard]))
    series = _series(seeded.query(q), q)
    expected = influxql.columns(t.query)
    grouped = set(influxql.parse(t.query).group_tags)
    for s in series:
        assert s["columns"] == expected, q
        assert set(s.get("tags", {})) == grouped, q
        assert s["values"], q
    for i, col in enumerate(expected[1:], start=1):
        column = [row[i] for s in series for row in s["values"]]
        assert any(v is not None for v in column), f"column {col!r} only null in {q}"


@pytest.mark.parametrize("name,var", VAR_QUERIES, ids=[f"{n}:{v['name']}" for n, v in VAR_QUERIES])
def test_variable_query_lists_values(seeded: Seeded, name: str, var: Json) -> None:
    q = substitute(var["query"], live_values(ALL[name]))
    series = _series(seeded.query(q), q)
    values = [row[1] for s in series for row in s["values"]]
    assert values and all(values), q


def test_host_variable_lists_the_fleet(seeded: Seeded) -> None:
    q = ALL["fleet-energy.json"]["templating"]["list"][0]["query"]
    assert sorted(row[1] for row in _series(seeded.query(q), q)[0]["values"]) == sorted(HOSTS)


HOST_GROUPED = [t for t in TARGETS if "host" in influxql.parse(t.query).group_tags]


@pytest.mark.parametrize("t", HOST_GROUPED, ids=[t.id for t in HOST_GROUPED])
def test_choosing_a_host_shows_only_that_host(seeded: Seeded, t: Target) -> None:
    answered: list[str] = []
    for host in HOSTS:
        q = substitute(t.query, {**live_values(ALL[t.dashboard]), "host": host})
        result = seeded.query(q)
        assert "error" not in result, q
        hosts = {s["tags"]["host"] for s in result.get("series", [])}
        assert hosts <= {host}, q
        answered += hosts
    assert answered, f"no host answers {t.query}"


def _stat(seeded: Seeded, dashboard: str, title: str, ref: str = "A") -> Json:
    (t,) = [x for x in TARGETS if x.dashboard == dashboard and x.id.endswith(f":{title}:{ref}")]
    q = substitute(t.query, live_values(ALL[dashboard]))
    series = _series(seeded.query(q), q)
    assert len(series) == 1
    return dict(zip(series[0]["columns"], series[0]["values"][0], strict=True))


def test_gpu_states_count_the_seeded_fleet(seeded: Seeded) -> None:
    """Seeded: 9 busy and 3 idle GPUs (one lost), 2 capped, 3 throttled (2 power, 1 thermal)."""
    title = "GPUs by state (latest sample)"
    counts = {
        k: v
        for ref in "ABCD"
        for k, v in _stat(seeded, "fleet-energy.json", title, ref).items()
        if k != "time"
    }
    assert counts == {"busy": 9, "idle": 3, "capped": 2, "throttled": 3}


def test_cost_and_co2_follow_energy_and_the_constants(seeded: Seeded) -> None:
    kwh = _stat(seeded, "fleet-energy.json", "GPU energy today")["energy_kwh"]
    cost = _stat(seeded, "fleet-energy.json", "Energy cost today")["cost"]
    co2 = _stat(seeded, "fleet-energy.json", "CO2 today")["co2_kg"]
    # about 5.9 kW for 50 minutes (the seeded range; the live filter is the last hour)
    assert 3.5 < kwh < 6.5
    assert cost == pytest.approx(kwh * 0.15)
    assert co2 == pytest.approx(kwh * 400 / 1000)


def test_energy_agrees_with_the_gpus_energy_counters(seeded: Seeded) -> None:
    """The dashboards integrate power_w; NVML's own energy counter must tell the same story."""
    kwh = _stat(seeded, "fleet-energy.json", "GPU energy today")["energy_kwh"]
    q = (
        'SELECT sum("e") / 3600000 AS "kwh" FROM (SELECT spread("energy_j") AS "e" FROM "gpu" '
        'WHERE time > now() - 1h GROUP BY "gpu_uuid")'
    )
    counter_kwh = _series(seeded.query(q), q)[0]["values"][0][1]
    assert kwh == pytest.approx(counter_kwh, rel=0.05)
    hourly = next(x for x in TARGETS if x.id.endswith(":GPU energy per hour:A"))
    hq = substitute(hourly.query, live_values(ALL["fleet-energy.json"]))
    per_hour = [row[1] for s in _series(seeded.query(hq), hq) for row in s["values"]]
    assert sum(v for v in per_hour if v is not None) == pytest.approx(kwh)


def test_dropped_points_by_reason(seeded: Seeded) -> None:
    dropped = _stat(seeded, "agent-health.json", "Points dropped in range")
    assert dropped["overflow"] == 70 and dropped["rejected"] == 3 and dropped["partial"] == 2


def test_fleet_budget_line_is_the_outermost_domains(seeded: Seeded) -> None:
    """Seeded: the facility (12 kW) holds every GPU; the per-domain panel shows measured power."""
    (fleet,) = [
        x for x in TARGETS if x.id.endswith(":Fleet GPU power vs budget:B")
    ]  # the budget/plan target
    q = substitute(fleet.query, live_values(ALL["fleet-energy.json"]))
    rows = [r for s in _series(seeded.query(q), q) for r in s["values"] if r[1] is not None]
    assert rows and all(r[1] == 12_000.0 for r in rows)
    (per,) = [x for x in TARGETS if x.id.endswith(":Per-domain power vs budget:A")]
    q = substitute(per.query, live_values(ALL["fleet-energy.json"]))
    for s in _series(seeded.query(q), q):
        col = s["columns"].index("measured_w")
        assert any(r[col] is not None and r[col] > 900.0 for r in s["values"]), s["tags"]
