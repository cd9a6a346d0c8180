"""InfluxStore against a real influxd (round trips) and a fake transport (the HTTP contract)."""

from __future__ import annotations

import gzip
import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from dcenergy.errors import StoreError, StoreUnavailable
from dcenergy.lineprotocol import WriteOutcome, decode, encode
from dcenergy.schema import AGENT, GPU, HOST, JOB, FieldValue, Measurement, Point
from dcenergy.store.influx import InfluxStore, partial_dropped, quote_ident, quote_string
from tests.influx_server import InfluxServer

T0 = 1_700_000_000_000_000_000

# values chosen to catch what JSON and line protocol lose: an integral float (1.0 comes
# back as JSON 1), an int above 2**53, shortest-repr floats, quotes and backslashes in text
_SAMPLES: dict[type, list[FieldValue]] = {
    float: [1.0, 0.1, 123456.789012345, 1e-300, -2.5e17, 0.0],
    int: [2**62 + 1, -7, 0, 1],
    bool: [True, False],
    str: ['say "hi" \\ C:\\x, a=b', "日本語 ✓", "plain"],
}


def _all_fields(m: Measurement, seed: int) -> dict[str, FieldValue]:
    return {
        f.name: _SAMPLES[f.kind][(seed + i) % len(_SAMPLES[f.kind])] for i, f in enumerate(m.fields)
    }


def _assert_same_points(got: list[Point], want: list[Point]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g == w
        for k, v in w.fields.items():
            assert type(g.fields[k]) is type(v), (w.measurement, k, g.fields[k], v)


@pytest.mark.influxdb
@pytest.mark.parametrize("m", [GPU, HOST, JOB, AGENT], ids=lambda m: m.name)
def test_every_field_kind_round_trips_through_influxd(
    influxd: InfluxServer, influx_db: str, m: Measurement
) -> None:
    tags = {t: f"{t}-1" for t in m.tags}
    points = [Point(m.name, tags, _all_fields(m, seed), T0 + seed) for seed in range(6)]
    store = InfluxStore(influxd.url, influx_db)
    try:
        store.write(points)
        got = store.read(m.name, start_ns=T0, end_ns=T0 + 100)
    finally:
        store.close()
    _assert_same_points(got, points)


TRICKY_TAGS = [
    "with space",
    "comma,here",
    "equals=here",
    'double "quotes"',
    "single 'quote'",
    "back\\slash",
    "C:\\dir\\file",
    "ünïcödé ☃ 日本",
    " lead and trail ",
    "all, of= it\\x ' \"",
]


@pytest.mark.influxdb
def test_tricky_tag_values_read_back_equal_and_filter(
    influxd: InfluxServer, influx_db: str
) -> None:
    points = [
        Point("gpu", {"host": v, "model": f"m {i}"}, {"power_w": float(i)}, T0 + i)
        for i, v in enumerate(TRICKY_TAGS)
    ]
    store = InfluxStore(influxd.url, influx_db)
    try:
        store.write(points)
        assert store.read("gpu", start_ns=T0) == points
        for p in points:  # the InfluxQL string literal must match exactly that tag value
            assert store.read("gpu", start_ns=T0, tags={"host": p.tags["host"]}) == [p]
    finally:
        store.close()


@pytest.mark.influxdb
def test_tricky_measurement_and_keys(influxd: InfluxServer, influx_db: str) -> None:
    p = Point('odd meas,"x"', {'tag key=,"': "v"}, {'field key=, "q"': 1.5, "s": "x"}, T0)
    store = InfluxStore(influxd.url, influx_db)
    try:
        store.write([p])
        assert store.read(p.measurement, start_ns=T0) == [p]
    finally:
        store.close()


@pytest.mark.influxdb
def test_read_window_is_half_open_and_oldest_first(influxd: InfluxServer, influx_db: str) -> None:
    store = InfluxStore(influxd.url, influx_db)
    pts = [
        Point("host", {"host": h}, {"cpu_pct": 1.0}, T0 + t)
        for t, h in [(5, "b"), (1, "a"), (9, "a")]
    ]
    try:
        store.write(pts)
        got = store.read("host", start_ns=T0 + 1, end_ns=T0 + 9)
        assert [p.time_ns - T0 for p in got] == [1, 5]
        assert store.read("nothing_here", start_ns=0) == []
    finally:
        store.close()


@pytest.mark.influxdb
def test_same_series_and_time_overwrites(influxd: InfluxServer, influx_db: str) -> None:
    store = InfluxStore(influxd.url, influx_db)
    try:
        store.write([Point("host", {"host": "a"}, {"cpu_pct": 1.0}, T0)])
        store.write([Point("host", {"host": "a"}, {"cpu_pct": 2.0}, T0)])
        assert store.read("host", start_ns=T0) == [
            Point("host", {"host": "a"}, {"cpu_pct": 2.0}, T0)
        ]
    finally:
        store.close()


@pytest.mark.influxdb
def test_missing_database_is_a_clear_error_or_created(influxd: InfluxServer) -> None:
    name = "never_created_db"
    store = InfluxStore(influxd.url, name)
    try:
        r = store.write_lines(b"m v=1 1")
        assert r.outcome is WriteOutcome.NO_DATABASE
        assert name in r.message and "create_database" in r.message
        with pytest.raises(StoreError, match=name):
            store.write([Point("m", {}, {"v": 1.0}, 1)])
        with pytest.raises(StoreError, match=name):
            store.read("m", start_ns=0)
    finally:
        store.close()
    store = InfluxStore(influxd.url, "created_on_demand", create_database=True)
    try:
        assert store.write_lines(b"m v=1 1").outcome is WriteOutcome.OK
        assert store.read("m", start_ns=0) == [Point("m", {}, {"v": 1.0}, 1)]
    finally:
        store.close()


@pytest.mark.influxdb
def test_real_partial_writes_report_dropped_counts(influxd: InfluxServer, influx_db: str) -> None:
    store = InfluxStore(influxd.url, influx_db)
    try:
        assert store.write_lines(b"m v=1 1").ok
        r = store.write_lines(b"m v=2i 2\nm v=3i 3\nm v=4 4")  # type conflict on two lines
        assert (r.outcome, r.dropped) == (WriteOutcome.PARTIAL, 2)
        r = store.write_lines(b"m v=5 5\nm v=oops 6")  # 1.x writes the parseable line
        assert (r.outcome, r.dropped) == (WriteOutcome.PARTIAL, 1)
        assert [p.time_ns for p in store.read("m", start_ns=0)] == [1, 4, 5]
        with pytest.raises(StoreError, match="dropped 1 of 2"):
            store.write([Point("m", {}, {"v": 6.0}, 7), Point("m", {}, {"v": True}, 8)])
    finally:
        store.close()


def test_unreachable_server_is_unavailable() -> None:
    from tests.influx_server import free_port

    store = InfluxStore(f"http://127.0.0.1:{free_port()}", "db", timeout_s=2)
    try:
        r = store.write_lines(b"m v=1 1")
        assert r.outcome is WriteOutcome.UNAVAILABLE and "cannot reach" in r.message
        with pytest.raises(StoreUnavailable):
            store.write([Point("m", {}, {"v": 1.0}, 1)])
        with pytest.raises(StoreUnavailable):
            store.read("m", start_ns=0)
        assert store.ping() is False
    finally:
        store.close()


# --- the HTTP contract, with a fake transport ------------------------------------------


def _store(handler: Callable[[httpx.Request], httpx.Response], **kw: Any) -> InfluxStore:
    return InfluxStore(
        "http://influx.test:8086", "tele", transport=httpx.MockTransport(handler), **kw
    )


def test_write_is_gzipped_line_protocol_with_token_auth() -> None:
    seen: list[httpx.Request] = []

    def handler(req: httpx.Request) -> httpx.Response:
        seen.append(req)
        return httpx.Response(204)

    p = Point("gpu", {"host": "h 1"}, {"power_w": 250.5}, T0)
    store = _store(handler, token="s3cret")
    store.write([p, p])
    (req,) = seen
    assert req.url.path == "/write"
    assert dict(req.url.params) == {"db": "tele", "precision": "ns"}
    assert req.headers["Content-Encoding"] == "gzip"
    assert req.headers["Authorization"] == "Token s3cret"
    lines = gzip.decompress(req.content).decode().split("\n")
    assert [decode(x) for x in lines] == [p, p]


def test_basic_auth_when_user_and_password() -> None:
    seen: list[httpx.Request] = []

    def handler(req: httpx.Request) -> httpx.Response:
        seen.append(req)
        return httpx.Response(204)

    _store(handler, username="u", password="p").write_lines(b"m v=1 1")
    assert seen[0].headers["Authorization"].startswith("Basic ")


@pytest.mark.parametrize(
    ("status", "body", "headers", "outcome"),
    [
        (204, "", {}, WriteOutcome.OK),
        (400, '{"error":"partial write: x dropped=3"}', {}, WriteOutcome.PARTIAL),
        (400, '{"error":"unable to parse: bad timestamp"}', {}, WriteOutcome.REJECTED),
        (401, '{"error":"authorization failed"}', {}, WriteOutcome.UNAUTHORIZED),
        (403, '{"message":"insufficient permissions"}', {}, WriteOutcome.UNAUTHORIZED),
        (404, '{"error":"database not found: \\"tele\\""}', {}, WriteOutcome.NO_DATABASE),
        (413, '{"error":"Request Entity Too Large"}', {}, WriteOutcome.TOO_LARGE),
        (422, '{"message":"points beyond retention"}', {}, WriteOutcome.REJECTED),
        (429, "", {"Retry-After": "7"}, WriteOutcome.THROTTLED),
        (503, "busy", {"Retry-After": "2.5"}, WriteOutcome.THROTTLED),
        (500, '{"error":"engine: timeout"}', {}, WriteOutcome.UNAVAILABLE),
        (502, "<html>bad gateway</html>", {}, WriteOutcome.UNAVAILABLE),
    ],
)
def test_statuses_map_to_outcomes(
    status: int, body: str, headers: dict[str, str], outcome: WriteOutcome
) -> None:
    store = _store(lambda req: httpx.Response(status, text=body, headers=headers))
    r = store.write_lines(b"m v=1 1")
    assert r.outcome is outcome
    assert r.status == status
    if status == 400 and outcome is WriteOutcome.PARTIAL:
        assert r.dropped == 3
    if status in (429, 503):
        assert r.retry_after_s == float(headers["Retry-After"])
    if status == 422:
        assert r.message == "points beyond retention"


def test_retry_after_as_http_date() -> None:
    store = _store(
        lambda req: httpx.Response(429, headers={"Retry-After": "Wed, 21 Oct 2099 07:28:00 GMT"})
    )
    r = store.write_lines(b"m v=1 1")
    assert r.retry_after_s is not None and r.retry_after_s > 3600


@pytest.mark.parametrize(
    "exc",
    [httpx.ConnectError("refused"), httpx.ReadTimeout("slow"), httpx.RemoteProtocolError("eof")],
)
def test_transport_errors_are_unavailable(exc: Exception) -> None:
    def handler(req: httpx.Request) -> httpx.Response:
        raise exc

    store = _store(handler)
    assert store.write_lines(b"m v=1 1").outcome is WriteOutcome.UNAVAILABLE
    with pytest.raises(StoreUnavailable) as info:
        store.read("m", start_ns=0)
    assert info.value.__cause__ is exc


def test_write_splits_on_413() -> None:
    sizes: list[int] = []

    def handler(req: httpx.Request) -> httpx.Response:
        n = len(gzip.decompress(req.content).split(b"\n"))
        sizes.append(n)
        return httpx.Response(413 if n > 3 else 204)

    _store(handler).write([Point("m", {}, {"v": 1.0}, t) for t in range(10)])
    assert sum(n for n in sizes if n <= 3) == 10


def test_read_quotes_identifiers_and_literals() -> None:
    queries: list[str] = []

    def handler(req: httpx.Request) -> httpx.Response:
        q = req.url.params["q"]
        queries.append(q)
        series: list[dict[str, Any]]
        if q.startswith("SHOW FIELD KEYS"):
            values = [["v", "float"], ["n", "integer"]]
            series = [{"name": "m", "columns": ["fieldKey", "fieldType"], "values": values}]
        else:
            series = [
                {
                    "name": 'we"ird',
                    "tags": {"k": "it's", "empty": ""},
                    "columns": ["time", "v", "n"],
                    "values": [[5, 2, None], [3, 1.5, 7]],
                }
            ]
        return httpx.Response(
            200, text=json.dumps({"results": [{"statement_id": 0, "series": series}]})
        )

    got = _store(handler).read('we"ird', start_ns=1, end_ns=10, tags={"k": "it's", "b\\s": "x\\y"})
    assert queries[1] == (
        'SELECT * FROM "we\\"ird" WHERE time >= 1 AND time < 10 AND "k" = \'it\\\'s\' '
        "AND \"b\\\\s\" = 'x\\\\y' GROUP BY *"
    )
    assert got == [
        Point('we"ird', {"k": "it's"}, {"v": 1.5, "n": 7}, 3),
        Point('we"ird', {"k": "it's"}, {"v": 2.0}, 5),
    ]
    assert type(got[1].fields["v"]) is float


def test_quoting_helpers() -> None:
    assert quote_ident('a"b\\c') == '"a\\"b\\\\c"'
    assert quote_string("it's \\") == "'it\\'s \\\\'"


def test_partial_dropped_parsing() -> None:
    assert partial_dropped("partial write: field type conflict: ... dropped=4") == 4
    assert (
        partial_dropped("partial write: unable to parse 'a': x\nunable to parse 'b': y dropped=0")
        == 2
    )
    assert partial_dropped("partial write: points beyond retention policy") is None


def test_encode_is_what_goes_on_the_wire() -> None:
    seen: list[bytes] = []

    def handler(req: httpx.Request) -> httpx.Response:
        seen.append(gzip.decompress(req.content))
        return httpx.Response(204)

    p = Point("m", {"t": "a b"}, {"s": 'q"'}, 1)
    _store(handler).write([p])
    assert seen == [encode(p).encode()]
