"""InfluxStore's reads at fleet size: streamed chunks, one bounded poll, timeouts that say what.

The aggregate results themselves are checked against raw points in
``test_store_aggregate.py``; here: the wire (what is asked, how the answer is
parsed when a series arrives split over chunks) and the agent's plan poll.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from dcenergy import schema
from dcenergy.errors import StoreError, StoreUnavailable
from dcenergy.publish import fetch_latest_part
from dcenergy.store.base import Agg, AggregateQuery, FieldFilter, Fn, Op
from dcenergy.store.influx import InfluxStore
from tests.influx_server import InfluxServer

S = 1_000_000_000
T0 = 1_700_000_000 * S


class CountingTransport(httpx.BaseTransport):
    """The real network, with every request's query recorded."""

    def __init__(self) -> None:
        self.inner = httpx.HTTPTransport()
        self.queries: list[str] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/query":
            self.queries.append(request.url.params["q"])
        return self.inner.handle_request(request)

    def close(self) -> None:
        self.inner.close()


def _gpu_points(n_gpus: int, n_t: int) -> list[schema.Point]:
    pts = []
    for g in range(n_gpus):
        tags = {"host": f"h{g // 4}", "gpu": str(g % 4), "gpu_uuid": f"GPU-{g}", "model": "H100"}
        for i in range(n_t):
            fields = {"power_w": 100.0 + g + (i % 7), "util_gpu_pct": float(i % 3)}
            pts.append(schema.point(schema.GPU, tags, fields, T0 + i * S))
    return pts


def _query(**kw: Any) -> AggregateQuery:
    base: dict[str, Any] = {
        "measurement": "gpu",
        "aggs": (Agg(Fn.MEAN, "power_w"), Agg(Fn.MAX, "power_w"), Agg(Fn.COUNT, "power_w")),
        "start_ns": T0,
        "end_ns": T0 + 60 * S,
        "by": ("gpu_uuid", "host"),
    }
    base.update(kw)
    return AggregateQuery(**base)


@pytest.mark.influxdb
@pytest.mark.parametrize("every_s", [None, 7.0])
def test_tiny_chunks_split_inside_series_give_the_same_rows(
    influxd: InfluxServer, influx_db: str, every_s: float | None
) -> None:
    InfluxStore(influxd.url, influx_db).write(_gpu_points(6, 40))
    whole = InfluxStore(influxd.url, influx_db, chunk_size=100_000)
    tiny = InfluxStore(influxd.url, influx_db, chunk_size=2)  # every series split many times
    q = _query(every_s=every_s)
    want = whole.aggregate(q)
    assert tiny.aggregate(q) == want
    buckets = 1 if every_s is None else len({(T0 + i * S) // (7 * S) for i in range(40)})
    assert len(want) == 6 * buckets
    assert whole.read("gpu", start_ns=T0) == tiny.read("gpu", start_ns=T0)


def test_a_series_split_over_chunked_documents_parses_as_one() -> None:
    """The exact shape influxd streams with chunked=true: one JSON document per line,
    the series continued in the next document with ``partial`` set."""

    def doc(values: list[list[Any]], partial: bool) -> dict[str, Any]:
        series: dict[str, Any] = {
            "name": "gpu",
            "tags": {"gpu_uuid": "GPU-0"},
            "columns": ["time", "mean_power_w"],
            "values": values,
        }
        if partial:
            series["partial"] = True
        return {"results": [{"statement_id": 0, "series": [series], "partial": partial}]}

    body = "\n".join(json.dumps(d) for d in (doc([[10 * S, 1]], True), doc([[20 * S, 2.5]], False)))
    seen: list[httpx.Request] = []

    def handler(req: httpx.Request) -> httpx.Response:
        seen.append(req)
        return httpx.Response(200, text=body + "\n")

    store = InfluxStore("http://influx.test", "db", transport=httpx.MockTransport(handler))
    rows = store.aggregate(_query(aggs=(Agg(Fn.MEAN, "power_w"),), by=("gpu_uuid",), every_s=10))
    assert [(r.time_ns, r.values) for r in rows] == [
        (10 * S, {"mean_power_w": 1.0}),
        (20 * S, {"mean_power_w": 2.5}),
    ]
    assert type(rows[0].values["mean_power_w"]) is float  # JSON's 1 is the mean's float
    params = seen[0].url.params
    assert params["chunked"] == "true" and int(params["chunk_size"]) > 0
    assert store.stats.queries == 1 and store.stats.rows == 2 and store.stats.bytes > 0


def test_aggregate_influxql_is_the_portable_subset() -> None:
    queries: list[str] = []

    def handler(req: httpx.Request) -> httpx.Response:
        queries.append(req.url.params["q"])
        return httpx.Response(200, text='{"results":[{"statement_id":0}]}\n')

    store = InfluxStore("http://influx.test", "db", transport=httpx.MockTransport(handler))
    q = _query(
        aggs=(Agg(Fn.MEDIAN, "power_w"), Agg(Fn.PERCENTILE, "power_w", 95), Agg(Fn.LAST, "job_id")),
        every_s=15,
        tags={"host": "it's"},
        where=(FieldFilter("util_gpu_pct", Op.LT, 5.0), FieldFilter("lost", Op.NE, True)),
    )
    assert store.aggregate(q) == []
    assert queries == [
        'SELECT median("power_w") AS "median_power_w", percentile("power_w", 95) AS '
        '"p95_power_w", last("job_id") AS "last_job_id" FROM "gpu" WHERE '
        f"time >= {T0} AND time < {T0 + 60 * S} AND \"host\" = 'it\\'s' AND "
        '"util_gpu_pct" < 5.0 AND "lost" != true GROUP BY "gpu_uuid", "host", time(15000ms) '
        "fill(none)"
    ]
    assert "SLIMIT" not in queries[0] and "INTEGRAL" not in queries[0].upper()


def test_a_server_that_is_not_influxdb_is_one_line_with_a_hint() -> None:
    page = "<html>\n<body>\n" + "welcome " * 500 + "\n</body></html>"
    store = InfluxStore(
        "http://influx.test",
        "db",
        transport=httpx.MockTransport(lambda req: httpx.Response(200, text=page)),
    )
    with pytest.raises(StoreError) as e:
        store.aggregate(_query())
    assert "\n" not in e.value.message and len(e.value.message) < 400
    assert e.value.hint is not None and "store.influx_url" in e.value.hint


@pytest.fixture
def hung_server() -> Iterator[str]:
    """A socket that accepts and never answers: a hung store."""
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    conns: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        srv.settimeout(0.1)
        while not stop.is_set():
            try:
                conns.append(srv.accept()[0])
            except TimeoutError:
                continue
            except OSError:
                return

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.getsockname()[1]}"
    stop.set()
    t.join()
    for c in conns:
        c.close()
    srv.close()


def test_a_query_that_times_out_names_the_query_and_the_window(hung_server: str) -> None:
    store = InfluxStore(hung_server, "db", timeout_s=0.3)
    with pytest.raises(StoreUnavailable) as e:
        store.aggregate(_query(end_ns=T0 + 600 * S))
    msg = e.value.message
    assert "timed out" in msg and "'gpu' over 600 s" in msg and "mean(power_w)" in msg
    assert e.value.hint is not None and "store.timeout_s" in e.value.hint


@pytest.mark.influxdb
def test_the_plan_poll_is_one_bounded_query_whatever_the_history(
    influxd: InfluxServer, influx_db: str
) -> None:
    writer = InfluxStore(influxd.url, influx_db)
    history = [
        schema.point(
            schema.PLAN_PART,
            {"host": host},
            {"plan_id": f"p{i}", "seq": i, "payload": f"{host}-{i}", "expires_ns": T0},
            T0 + i * S,
        )
        for i in range(1, 601)
        for host in ("n1", "n2")
    ]
    writer.write(history)
    transport = CountingTransport()
    agent_store = InfluxStore(influxd.url, influx_db, transport=transport)
    assert fetch_latest_part(agent_store, "n1", T0 + 601 * S) == "n1-600"
    assert len(transport.queries) == 1
    (q,) = transport.queries
    assert q.endswith("ORDER BY time DESC LIMIT 1") and "\"host\" = 'n1'" in q
    assert agent_store.stats.rows == 1  # one row crossed the wire, not 600
    # a part older than the lookback is not seen (the agent then keeps its defaults)
    assert fetch_latest_part(agent_store, "n1", T0 + 10_000 * S, lookback_s=60) is None
    assert len(transport.queries) == 2
