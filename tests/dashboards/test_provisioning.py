"""The provisioning files Grafana reads, and the docs that describe every panel."""

from __future__ import annotations

from typing import Any

import pytest

from tests.dashboards.grafana import DOCS, DS_UID, EXPECTED, PROVISIONING, all_dashboards, panels

yaml = pytest.importorskip("yaml")


def _load(rel: str) -> Any:
    return yaml.safe_load((PROVISIONING / rel).read_text(encoding="utf-8"))


def test_datasource_is_influxql_with_a_token_header_from_the_environment() -> None:
    doc = _load("datasources/dcenergy.yaml")
    assert doc["apiVersion"] == 1
    (ds,) = doc["datasources"]
    assert ds["uid"] == DS_UID
    assert ds["type"] == "influxdb"
    assert ds["access"] == "proxy"
    assert ds["url"] == "${DCENERGY_INFLUX_URL}"
    assert ds["jsonData"]["version"] == "InfluxQL"
    assert ds["jsonData"]["dbName"] == ds["database"] == "${DCENERGY_INFLUX_DB}"
    assert ds["jsonData"]["httpHeaderName1"] == "Authorization"
    assert ds["secureJsonData"]["httpHeaderValue1"] == "Token ${DCENERGY_INFLUX_TOKEN}"
    assert "httpHeaderValue1" not in ds["jsonData"], "a secret outside secureJsonData"


def test_dashboard_provider_reads_files() -> None:
    doc = _load("dashboards/dcenergy.yaml")
    assert doc["apiVersion"] == 1
    (p,) = doc["providers"]
    assert p["type"] == "file"
    assert p["options"]["path"].startswith("/")
    assert p["allowUiUpdates"] is False


def test_docs_describe_every_dashboard_and_panel() -> None:
    text = DOCS.read_text(encoding="utf-8")
    for name, dash in all_dashboards().items():
        assert name in text and dash["uid"] in text and dash["title"] in text
        for p in panels(dash):
            assert f"**{p['title']}**" in text or f"### {p['title']}" in text, p["title"]
    assert set(EXPECTED) <= {w.strip("`") for w in text.split()}
    for var in ("DCENERGY_INFLUX_URL", "DCENERGY_INFLUX_DB", "DCENERGY_INFLUX_TOKEN", "DBRP"):
        assert var in text
