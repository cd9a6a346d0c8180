"""Shared fixtures. The ``influxd`` fixture starts a real InfluxDB for the session.

Without ``influxd`` installed the database tests skip, unless
``DCENERGY_REQUIRE_INFLUXDB=1`` (set in CI), where they fail instead.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator

import pytest

from tests.influx_server import REQUIRE_ENV, InfluxServer, influxd_path

_db_counter = itertools.count()


@pytest.fixture(scope="session")
def influxd() -> Iterator[InfluxServer]:
    """A running influxd shared by the session (one start costs about a second)."""
    binary = influxd_path()
    if binary is None:
        msg = "influxd not installed (apt-get install influxdb)"
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{msg}, and {REQUIRE_ENV}=1")
        pytest.skip(msg)
    server = InfluxServer(binary)
    try:
        server.start()
    except RuntimeError as e:
        server.close()
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(str(e))
        pytest.skip(str(e))
    yield server
    server.close()


@pytest.fixture
def influx_db(influxd: InfluxServer) -> str:
    """A fresh, empty database name on the shared server (created)."""
    name = f"t{os.getpid()}_{next(_db_counter)}"
    influxd.create_database(name)
    return name


@pytest.fixture
def own_influxd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InfluxServer]:
    """A private influxd that a test may stop and restart (outage tests)."""
    binary = influxd_path()
    if binary is None:
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"influxd not installed, and {REQUIRE_ENV}=1")
        pytest.skip("influxd not installed")
    server = InfluxServer(binary, root=tmp_path_factory.mktemp("influxd"))
    server.start()
    yield server
    server.close()
