"""InfluxDB over the v1-compatible HTTP API: line protocol to ``/write``, InfluxQL to ``/query``.

The v1 API is the one every InfluxDB speaks (1.x natively, 2.x through DBRP,
3 Core natively), so this is the only client. ``write_lines`` turns each HTTP
answer into a :class:`~dcenergy.lineprotocol.WriteResult` the shipper can act
on; ``write``/``read`` raise the product's ``StoreError``/``StoreUnavailable``.
Every httpx exception is translated in one place, :func:`_http_errors`.
"""

from __future__ import annotations

import email.utils
import gzip
import json
import re
import ssl
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import httpx

from dcenergy.errors import StoreError, StoreUnavailable
from dcenergy.lineprotocol import (
    MAX_TIME_NS,
    WriteOutcome,
    WriteResult,
    encode_many,
    one_line,
)
from dcenergy.schema import MEASUREMENTS, FieldValue, Point
from dcenergy.store.base import (
    Agg,
    AggregateQuery,
    AggRow,
    FieldFilter,
    Fn,
    ReadStats,
    plain_decimal,
    sort_rows,
)

GZIP_LEVEL = 1  # level 1 gets most of the size win for a fraction of the CPU of level 6
# Rows per streamed document: big enough that JSON framing is noise, small enough
# that one document of a raw read stays a few MB.
DEFAULT_CHUNK_SIZE = 10_000

_INFLUX_TYPE = {float: "float", int: "integer", bool: "boolean", str: "string"}

_DROPPED = re.compile(r"dropped=(\d+)")
_UNPARSEABLE = "unable to parse"


@contextmanager
def _http_errors(what: str, url: str) -> Iterator[None]:
    """Map httpx's exceptions to the product's: the one place that knows httpx's tree."""
    try:
        yield
    except httpx.TimeoutException as e:
        raise StoreUnavailable(
            f"{what}: {url} timed out ({type(e).__name__})",
            hint="raise store.timeout_s, or read a shorter window (optimizer.window_s, --window)",
        ) from e
    except httpx.TransportError as e:  # connect/read/write/protocol/proxy errors, TLS
        raise StoreUnavailable(f"{what}: cannot reach {url}: {e or type(e).__name__}") from e
    except httpx.HTTPError as e:  # e.g. a malformed URL: retrying will not help
        raise StoreError(f"{what}: {url}: {e}") from e


def quote_ident(name: str) -> str:
    """An InfluxQL double-quoted identifier."""
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def quote_string(value: str) -> str:
    """An InfluxQL single-quoted string literal."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


_TITLE = re.compile(r"<title[^>]*>(.*?)</title>", re.IGNORECASE | re.DOTALL)
_SERVER_MESSAGE_MAX = 300


def _server_message(r: httpx.Response) -> str:
    """The server's error text on one line: the JSON ``error`` (v1), ``message`` (v2), or
    the body; an HTML page (a proxy, a web server that is not InfluxDB) becomes its title."""
    try:
        body = r.json()
    except ValueError:
        text = r.text.strip()
        if "html" in r.headers.get("content-type", "").lower() or text[:1] == "<":
            m = _TITLE.search(text[:4096])
            title = " ".join(m.group(1).split())[:80] if m else ""
            named = f" titled {title!r}" if title else ""
            return f"an HTML page{named}, not an InfluxDB answer (is store.influx_url right?)"
        return one_line(text)[:_SERVER_MESSAGE_MAX] or r.reason_phrase
    if isinstance(body, dict):
        for k in ("error", "message"):
            if isinstance(body.get(k), str):
                return one_line(str(body[k]))  # whole: a partial write ends in dropped=N
    return one_line(r.text.strip())[:_SERVER_MESSAGE_MAX]


def _retry_after_s(r: httpx.Response, now_s: float) -> float | None:
    """Retry-After as seconds (delta-seconds or an HTTP date), None when absent or unreadable."""
    raw = r.headers.get("Retry-After")
    if raw is None:
        return None
    raw = raw.strip()
    try:
        return max(0.0, float(raw))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - now_s)


def partial_dropped(message: str) -> int | None:
    """Points a 400 partial write dropped: v1's ``dropped=N`` plus each unparseable line.

    InfluxDB 1.x writes the lines it could parse and reports the rest as
    ``unable to parse '...'`` (with ``dropped=0``); type conflicts and the like
    count in ``dropped=N``. None when the message gives no count (2.x).
    """
    m = _DROPPED.search(message)
    unparseable = message.count(_UNPARSEABLE)
    if m is None and unparseable == 0:
        return None
    return (int(m.group(1)) if m else 0) + unparseable


def _literal(v: float | int | bool | str) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return quote_string(v)
    return repr(v)


def _where(
    start_ns: int, end_ns: int, tags: Mapping[str, str], fields: Sequence[FieldFilter]
) -> str:
    """A WHERE clause; every name and value in it goes through quote_ident/quote_string."""
    parts = [f"time >= {int(start_ns)}", f"time < {int(end_ns)}"]
    parts += [f"{quote_ident(k)} = {quote_string(v)}" for k, v in tags.items()]
    parts += [f"{quote_ident(f.field)} {f.op.value} {_literal(f.value)}" for f in fields]
    return " AND ".join(parts)


def _influx_fn(a: Agg) -> str:
    if a.fn is Fn.PERCENTILE:
        return f"percentile({quote_ident(a.field)}, {plain_decimal(a.q or 0.0)})"
    return f"{a.fn.value}({quote_ident(a.field)})"


def _duration(every_s: float) -> str:
    """A GROUP BY time() width InfluxQL reads exactly: whole ms where it is, else ns."""
    ms = every_s * 1000
    return f"{round(ms)}ms" if abs(ms - round(ms)) < 1e-9 else f"{round(every_s * 1e9)}ns"


# influxd 1.x drops every later group when a SELECT of percentile() alone finds no
# element at the rank in one group; a count() beside it keeps every group (null there).
_KEEP_GROUPS = "__dcenergy_n"


def _result_kind(a: Agg, field_kind: str | None) -> str | None:
    """The type an aggregate's value has (JSON loses float-vs-int): see the protocol docstring."""
    if a.fn is Fn.COUNT:
        return "integer"
    if a.fn in (Fn.MEAN, Fn.MEDIAN):
        return "float"
    return field_kind


def _coerce(kind: str | None, v: Any) -> FieldValue:
    """JSON loses float-vs-int (1.0 arrives as 1); the field's declared type restores it."""
    if kind == "float":
        return float(v)
    if kind == "integer":
        return int(v)
    if kind == "boolean":
        return bool(v)
    if kind == "string":
        return str(v)
    if isinstance(v, bool | int | float | str):
        return v
    return str(v)


class InfluxStore:
    """The telemetry store on an InfluxDB server (v1 HTTP API)."""

    def __init__(
        self,
        url: str,
        database: str,
        *,
        token: str | None = None,
        username: str | None = None,
        password: str | None = None,
        ca_file: str | None = None,
        verify_tls: bool = True,
        timeout_s: float = 10,
        create_database: bool = False,
        transport: httpx.BaseTransport | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> None:
        self.url = url.rstrip("/")
        self.chunk_size = chunk_size
        self.stats = ReadStats()
        self._server_types: dict[str, dict[str, str]] = {}
        self.database = database
        self.create_database = create_database
        headers = {"User-Agent": "dcenergy"}
        auth: httpx.Auth | None = None
        if token:  # a token wins over user/password
            headers["Authorization"] = f"Token {token}"
        elif username:
            auth = httpx.BasicAuth(username, password or "")
        verify: ssl.SSLContext | bool = verify_tls
        if ca_file and verify_tls:
            verify = ssl.create_default_context(cafile=ca_file)
        self._client = httpx.Client(
            base_url=self.url,
            headers=headers,
            auth=auth,
            verify=verify,
            timeout=timeout_s,
            transport=transport,
        )

    # --- writing ------------------------------------------------------------------

    def write_lines(self, body: bytes) -> WriteResult:
        """POST one gzip'd body to ``/write``; every answer becomes a WriteResult (no raise)."""
        result = self._post_write(gzip.compress(body, compresslevel=GZIP_LEVEL))
        if result.outcome is WriteOutcome.NO_DATABASE and self.create_database:
            try:
                self._create_database()
            except StoreError as e:
                return WriteResult(WriteOutcome.NO_DATABASE, result.status, str(e))
            result = self._post_write(gzip.compress(body, compresslevel=GZIP_LEVEL))
        return result

    def _post_write(self, gz_body: bytes) -> WriteResult:
        try:
            with _http_errors("write", self.url):
                r = self._client.post(
                    "/write",
                    params={"db": self.database, "precision": "ns"},
                    content=gz_body,
                    headers={"Content-Encoding": "gzip", "Content-Type": "text/plain"},
                )
        except StoreUnavailable as e:
            return WriteResult(WriteOutcome.UNAVAILABLE, None, str(e))
        except StoreError as e:
            return WriteResult(WriteOutcome.REJECTED, None, str(e))
        return self._classify(r)

    def _classify(self, r: httpx.Response) -> WriteResult:
        s = r.status_code
        if 200 <= s < 300:
            if s != 204 and "html" in r.headers.get("content-type", "").lower():
                # InfluxDB answers a write with 204 and no body: a web page here is another
                # server (wrong URL, a login proxy), and nothing was stored. Keep the data.
                return WriteResult(
                    WriteOutcome.UNAVAILABLE,
                    s,
                    f"{self.url} answered {s} with {_server_message(r)}: nothing was stored",
                )
            return WriteResult(WriteOutcome.OK, s)
        msg = _server_message(r)
        if s == 400 and "partial write" in msg:
            return WriteResult(WriteOutcome.PARTIAL, s, msg, dropped=partial_dropped(msg))
        if s in (401, 403):
            return WriteResult(
                WriteOutcome.UNAUTHORIZED,
                s,
                f"InfluxDB at {self.url} refused our credentials ({s}): {msg}",
            )
        if s == 404:
            return WriteResult(
                WriteOutcome.NO_DATABASE,
                s,
                f"database {self.database!r} not found on {self.url} ({msg}): create it "
                f"(CREATE DATABASE {quote_ident(self.database)}, or a bucket with a DBRP "
                "mapping on 2.x) or set store.create_database = true",
            )
        if s == 413:
            return WriteResult(WriteOutcome.TOO_LARGE, s, msg)
        if s in (429, 503):
            return WriteResult(
                WriteOutcome.THROTTLED, s, msg, retry_after_s=_retry_after_s(r, time.time())
            )
        if 400 <= s < 500:
            return WriteResult(WriteOutcome.REJECTED, s, msg)
        return WriteResult(WriteOutcome.UNAVAILABLE, s, f"{self.url} answered {s}: {msg}")

    def write(self, points: Sequence[Point]) -> None:
        """Write points (split on 413); raise StoreUnavailable to retry, StoreError if refused."""
        if points:
            self._write_points(points)

    def _write_points(self, points: Sequence[Point]) -> None:
        r = self.write_lines(encode_many(points))
        o = r.outcome
        if o is WriteOutcome.OK:
            return
        if o is WriteOutcome.TOO_LARGE and len(points) > 1:
            mid = len(points) // 2
            self._write_points(points[:mid])
            self._write_points(points[mid:])
            return
        if o in (WriteOutcome.UNAVAILABLE, WriteOutcome.THROTTLED):
            raise StoreUnavailable(r.message or f"{self.url} is unavailable ({r.status})")
        if o is WriteOutcome.PARTIAL:
            raise StoreError(
                f"InfluxDB dropped {r.dropped if r.dropped is not None else 'some'} of "
                f"{len(points)} points: {r.message}"
            )
        hint = None
        if o is WriteOutcome.UNAUTHORIZED:
            hint = "check store.token_file, or store.username and store.password_file"
        raise StoreError(r.message or f"write refused ({r.status})", hint=hint)

    def _create_database(self) -> None:
        self._query(f"CREATE DATABASE {quote_ident(self.database)}", with_db=False)

    # --- reading ------------------------------------------------------------------
    #
    # Every read is one InfluxQL statement sent with ``chunked=true``: the server
    # streams the answer as newline-separated JSON documents of at most
    # ``chunk_size`` rows, so memory stays bounded whatever the window, and a
    # series may arrive split over several documents (``"partial": true``).
    # InfluxQL used here is the subset InfluxDB 1.x, 2.x (v1 /query with DBRP) and
    # 3 Core all document: SELECT with MEAN, SUM, COUNT, MIN, MAX, FIRST, LAST,
    # MEDIAN, PERCENTILE; WHERE on time, tags and fields; GROUP BY tags and
    # time(...) with fill(none); ORDER BY time DESC; LIMIT. No SLIMIT/SOFFSET
    # (3 Core does not support them), no INTEGRAL (3 Core lacks it).

    def _stream(self, q: str, *, what: str, with_db: bool = True) -> Iterator[dict[str, Any]]:
        """The series pieces of one statement's answer, as the server streams them."""
        params = {"q": q, "epoch": "ns", "chunked": "true", "chunk_size": str(self.chunk_size)}
        if with_db:
            params["db"] = self.database
        t0 = time.perf_counter()
        rows = 0
        chars = 0
        with (
            _http_errors(what, self.url),
            self._client.stream("POST", "/query", params=params) as r,
        ):
            if r.status_code >= 400:
                r.read()
                self._raise_status(r, what)
            try:
                for line in r.iter_lines():
                    chars += len(line) + 1
                    if not line.strip():
                        continue
                    try:
                        doc = json.loads(line)
                    except ValueError as e:
                        raise StoreError(
                            f"{what}: {self.url} sent no JSON: {one_line(line)[:200]}",
                            hint="is store.influx_url an InfluxDB (v1 /query API)?",
                        ) from e
                    for series in self._series_of(doc):
                        rows += len(series.get("values") or ())
                        yield series
            finally:
                # on the wire (compressed, when the server compresses), else as decoded
                nbytes = r.num_bytes_downloaded or chars
                self.stats.add(rows=rows, nbytes=nbytes, seconds=time.perf_counter() - t0)

    def _series_of(self, doc: Any) -> list[dict[str, Any]]:
        if not isinstance(doc, dict):
            raise StoreError(f"{self.url} answered a query with {type(doc).__name__}, not JSON")
        results = doc.get("results") or [{}]
        res = results[0] if isinstance(results, list) and results else {}
        err = res.get("error") or doc.get("error")
        if err:
            if "database not found" in str(err):
                raise StoreError(
                    f"database {self.database!r} not found on {self.url}",
                    hint=f"create it: CREATE DATABASE {quote_ident(self.database)}",
                )
            raise StoreError(f"InfluxDB refused the query: {err}")
        series: list[dict[str, Any]] = res.get("series") or []
        return series

    def _raise_status(self, r: httpx.Response, what: str) -> None:
        msg = one_line(_server_message(r))[:300]
        if r.status_code >= 500:
            raise StoreUnavailable(f"{what}: {self.url} answered {r.status_code}: {msg}")
        if r.status_code in (401, 403):
            raise StoreError(
                f"InfluxDB at {self.url} refused our credentials: {msg}",
                hint="check store.token_file, or store.username and store.password_file",
            )
        raise StoreError(f"{what} failed ({r.status_code}): {msg}")

    def _query(self, q: str, *, with_db: bool = True) -> list[dict[str, Any]]:
        """Run one small InfluxQL statement (SHOW, CREATE) and return its series."""
        return list(self._stream(q, what=f"query {q!r}", with_db=with_db))

    def field_types(self, measurement: str) -> dict[str, str]:
        """Field name → InfluxDB type (float, integer, string, boolean), as the server has them."""
        out: dict[str, str] = {}
        for s in self._query(f"SHOW FIELD KEYS FROM {quote_ident(measurement)}"):
            for name, kind in s.get("values") or []:
                out.setdefault(str(name), str(kind))
        self._server_types[measurement] = out
        return out

    def _types(self, measurement: str, fields: Iterable[str] = ()) -> dict[str, str]:
        """Field types from the schema; the server is asked only for fields it does not declare.

        JSON loses float-vs-int, so every value is typed from here. The server's
        answer is kept for the store's life (a field's type never changes in InfluxDB).
        """
        known = MEASUREMENTS.get(measurement)
        types = {} if known is None else {f.name: _INFLUX_TYPE[f.kind] for f in known.fields}
        missing = [f for f in fields if f not in types]
        if known is None or missing:
            server = self._server_types.get(measurement)
            if server is None or any(f not in server for f in missing):
                server = self.field_types(measurement)
            types = {**server, **types}
        return types

    def _points(
        self, q: str, measurement: str, types: dict[str, str], what: str
    ) -> Iterator[Point]:
        for s in self._stream(q, what=what):
            s_tags = {k: v for k, v in (s.get("tags") or {}).items() if v}
            cols: list[str] = s["columns"]
            if any(c not in types for c in cols[1:]):  # a field the schema does not declare
                types.update(self._types(measurement, cols[1:]))
            for row in s.get("values") or []:
                fields = {
                    c: _coerce(types.get(c), v)
                    for c, v in zip(cols[1:], row[1:], strict=True)
                    if v is not None
                }
                if fields:
                    yield Point(measurement, dict(s_tags), fields, int(row[0]))

    def read(
        self,
        measurement: str,
        *,
        start_ns: int,
        end_ns: int | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> list[Point]:
        """Raw points of one measurement in [start_ns, end_ns), tag-filtered, oldest first."""
        types = self._types(measurement)
        if not types:
            return []
        end = MAX_TIME_NS if end_ns is None else end_ns
        where = _where(start_ns, end, tags or {}, ())
        q = f"SELECT * FROM {quote_ident(measurement)} WHERE {where} GROUP BY *"  # noqa: S608
        what = f"raw read of {measurement!r} over {(end - start_ns) / 1e9:g} s"
        points = list(self._points(q, measurement, types, what))
        points.sort(key=lambda p: p.time_ns)
        return points

    def newest(self, measurement: str, *, tags: Mapping[str, str], start_ns: int) -> Point | None:
        """The newest matching point: ``ORDER BY time DESC LIMIT 1`` per series, one query."""
        types = self._types(measurement)
        if not types:
            return None
        where = _where(start_ns, MAX_TIME_NS, tags, ())
        q = (
            f"SELECT * FROM {quote_ident(measurement)} WHERE {where} "  # noqa: S608
            "GROUP BY * ORDER BY time DESC LIMIT 1"
        )
        what = f"newest {measurement!r} of {dict(tags)}"
        best: Point | None = None
        for p in self._points(q, measurement, types, what):
            if best is None or p.time_ns > best.time_ns:
                best = p
        return best

    def aggregate(self, query: AggregateQuery) -> list[AggRow]:
        """The server computes the aggregates; one statement, streamed in chunks."""
        types = self._types(query.measurement, {a.field for a in query.aggs})
        select = ", ".join(f"{_influx_fn(a)} AS {quote_ident(a.alias)}" for a in query.aggs)
        if all(a.fn is Fn.PERCENTILE for a in query.aggs):
            select += f", count({quote_ident(query.aggs[0].field)}) AS {quote_ident(_KEEP_GROUPS)}"
        where = _where(query.start_ns, query.end_ns, query.tags, query.where)
        group = [quote_ident(t) for t in query.by]
        if query.every_s is not None:
            group.append(f"time({_duration(query.every_s)})")
        q = f"SELECT {select} FROM {quote_ident(query.measurement)} WHERE {where}"  # noqa: S608
        if group:
            q += f" GROUP BY {', '.join(group)}"
        if query.every_s is not None:
            q += " fill(none)"
        kinds = {a.alias: _result_kind(a, types.get(a.field)) for a in query.aggs}
        rows: list[AggRow] = []
        for s in self._stream(q, what=f"query {query.describe()}"):
            s_tags = s.get("tags") or {}
            tags = {t: str(s_tags.get(t) or "") for t in query.by}
            cols: list[str] = s["columns"]
            for row in s.get("values") or []:
                values = {
                    c: _coerce(kinds.get(c), v)
                    for c, v in zip(cols[1:], row[1:], strict=True)
                    if v is not None and c != _KEEP_GROUPS
                }
                if values:
                    t = int(row[0]) if query.every_s is not None else None
                    rows.append(AggRow(tags, t, values))
        return sort_rows(rows, query.by)

    def ping(self) -> bool:
        """True when the server answers ``/ping``."""
        try:
            with _http_errors("ping", self.url):
                return self._client.get("/ping").status_code == 204
        except StoreError:
            return False

    def close(self) -> None:
        self._client.close()

    def __repr__(self) -> str:
        return f"InfluxStore({self.url!r}, {self.database!r})"
