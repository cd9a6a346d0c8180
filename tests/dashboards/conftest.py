"""Fixtures of the dashboard tests: the committed dashboards, and an influxd seeded with a fleet."""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from dcenergy.lineprotocol import encode_many
from tests.dashboards.grafana import Json, all_dashboards
from tests.dashboards.telemetry import fleet_points
from tests.influx_server import InfluxServer

_seeded_counter = itertools.count()


@pytest.fixture(scope="session")
def dashboards() -> dict[str, Json]:
    return all_dashboards()


@dataclass(frozen=True, slots=True)
class Seeded:
    server: InfluxServer
    db: str

    def query(self, q: str) -> Json:
        """The statement's result (``series``, or ``error``) for one query."""
        r = httpx.get(
            f"{self.server.url}/query", params={"db": self.db, "q": q, "epoch": "ms"}, timeout=30
        )
        assert r.status_code == 200, f"{r.status_code} {r.text} for {q}"
        results = r.json()["results"]
        assert len(results) == 1, q
        out: Json = results[0]
        return out


@pytest.fixture(scope="module")
def seeded(influxd: InfluxServer) -> Iterator[Seeded]:
    """A database holding fifty minutes of fleet telemetry ending now (shared by a module)."""
    db = f"dash{os.getpid()}_{next(_seeded_counter)}"
    influxd.create_database(db)
    body = encode_many(fleet_points(time.time_ns() - 1_000_000_000))
    r = httpx.post(
        f"{influxd.url}/write", params={"db": db, "precision": "ns"}, content=body, timeout=60
    )
    assert r.status_code == 204, r.text
    yield Seeded(influxd, db)
    influxd.query(f'DROP DATABASE "{db}"')
