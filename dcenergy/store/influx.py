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
import re
import ssl
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import httpx

from dcenergy.errors import StoreError, StoreUnavailable
from dcenergy.lineprotocol import (
    MAX_TIME_NS,
    WriteOutcome,
    WriteResult,
    encode_many,
)
from dcenergy.schema import FieldValue, Point

GZIP_LEVEL = 1  # level 1 gets most of the size win for a fraction of the CPU of level 6

_DROPPED = re.compile(r"dropped=(\d+)")
_UNPARSEABLE = "unable to parse"


@contextmanager
def _http_errors(what: str, url: str) -> Iterator[None]:
    """Map httpx's exceptions to the product's: the one place that knows httpx's tree."""
    try:
        yield
    except httpx.TimeoutException as e:
        raise StoreUnavailable(f"{what}: {url} timed out ({type(e).__name__})") from e
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


def _server_message(r: httpx.Response) -> str:
    """The server's error text: the JSON ``error`` (v1), ``message`` (v2), or the raw body."""
    try:
        body = r.json()
    except ValueError:
        return r.text.strip()[:500] or r.reason_phrase
    if isinstance(body, dict):
        for k in ("error", "message"):
            if isinstance(body.get(k), str):
                return str(body[k])
    return r.text.strip()[:500]


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
    ) -> None:
        self.url = url.rstrip("/")
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

    def _query(self, q: str, *, with_db: bool = True) -> list[dict[str, Any]]:
        """Run one InfluxQL statement; return its series; raise StoreError on its error."""
        params = {"q": q, "epoch": "ns"}
        if with_db:
            params["db"] = self.database
        with _http_errors("query", self.url):
            r = self._client.post("/query", params=params)
        if r.status_code >= 500:
            raise StoreUnavailable(f"{self.url} answered {r.status_code}: {_server_message(r)}")
        if r.status_code in (401, 403):
            raise StoreError(
                f"InfluxDB at {self.url} refused our credentials: {_server_message(r)}",
                hint="check store.token_file, or store.username and store.password_file",
            )
        if r.status_code >= 400:
            raise StoreError(f"query {q!r} failed ({r.status_code}): {_server_message(r)}")
        try:
            body = r.json()
        except ValueError as e:
            raise StoreError(f"query {q!r}: {self.url} sent no JSON") from e
        results = body.get("results") or [{}]
        res = results[0]
        err = res.get("error") or body.get("error")
        if err:
            if "database not found" in str(err):
                raise StoreError(
                    f"database {self.database!r} not found on {self.url}",
                    hint=f"create it: CREATE DATABASE {quote_ident(self.database)}",
                )
            raise StoreError(f"query {q!r} failed: {err}")
        series: list[dict[str, Any]] = res.get("series") or []
        return series

    def field_types(self, measurement: str) -> dict[str, str]:
        """Field name → InfluxDB type (float, integer, string, boolean) of a measurement."""
        out: dict[str, str] = {}
        for s in self._query(f"SHOW FIELD KEYS FROM {quote_ident(measurement)}"):
            for name, kind in s.get("values") or []:
                out.setdefault(str(name), str(kind))
        return out

    def read(
        self,
        measurement: str,
        *,
        start_ns: int,
        end_ns: int | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> list[Point]:
        """Points of one measurement in [start_ns, end_ns), tag-filtered, oldest first."""
        types = self.field_types(measurement)
        if not types:
            return []
        end = MAX_TIME_NS if end_ns is None else end_ns
        where = [f"time >= {int(start_ns)}", f"time < {int(end)}"]
        where += [f"{quote_ident(k)} = {quote_string(v)}" for k, v in (tags or {}).items()]
        # every name and value in it went through quote_ident/quote_string
        q = f"SELECT * FROM {quote_ident(measurement)} WHERE {' AND '.join(where)} GROUP BY *"  # noqa: S608
        points: list[Point] = []
        for s in self._query(q):
            s_tags = {k: v for k, v in (s.get("tags") or {}).items() if v}
            cols: list[str] = s["columns"]
            for row in s.get("values") or []:
                fields = {
                    c: _coerce(types.get(c), v)
                    for c, v in zip(cols[1:], row[1:], strict=True)
                    if v is not None
                }
                if fields:
                    points.append(Point(str(s["name"]), dict(s_tags), fields, int(row[0])))
        points.sort(key=lambda p: p.time_ns)
        return points

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
