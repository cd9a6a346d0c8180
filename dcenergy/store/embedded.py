"""The embedded store: telemetry kept in one SQLite file, the default with no InfluxDB.

It answers the store protocol (:mod:`dcenergy.store.base`) like ``InfluxStore``
and keeps InfluxDB's semantics where readers depend on them: a point is keyed
by (series, time), and writing the same series and time again merges its
fields over the old ones, so retries are idempotent. WAL mode, a busy timeout
and ``synchronous=NORMAL`` let several processes (simulated agents,
``dcenergy recommend``) write and read the same file at once; one lock makes
an instance safe for several threads.

Layout (columnar per measurement, like InfluxDB's own series + field columns)::

    series(id INTEGER PRIMARY KEY, measurement, key UNIQUE, tags JSON)
    m_<measurement>(series_id, time_ns, <one typed column per schema field>, extra JSON,
                    PRIMARY KEY (series_id, time_ns)) WITHOUT ROWID
    points_other(series_id, time_ns, fields JSON, PRIMARY KEY (series_id, time_ns))

* A series (measurement + tags, keyed by the canonical line-protocol series
  key that ``encode_parts`` gives InfluxDB too) is stored once; a point
  carries its integer id, not its tags.
* Each measurement of :data:`dcenergy.schema.MEASUREMENTS` has its own table
  with one column per declared field: ``REAL``, ``INTEGER``, ``TEXT``, or
  ``BOOLEAN`` (0/1). An absent field is NULL, which SQLite stores in 0 bytes,
  and an integral float is stored as a small integer and read back as a float.
  A field the schema does not declare goes to the row's ``extra`` JSON (NULL
  normally); a measurement the schema does not know goes to ``points_other``.
  A field added to the schema later becomes a column on the next open.
* The primary key ``(series_id, time_ns)`` is the only index: every read first
  picks the matching series from the small ``series`` table and then seeks
  each one's time range in that key, and ``prune`` does the same per series,
  so no separate time index (15 bytes a point, measured) is needed.

Size, measured (128 simulated GPUs × 3600 one-second ``gpu`` points from the
agent's own sampler on simulated H100s, every schema field, written through
``write`` in batches of 1,280; file + WAL after a checkpoint, divided by the
points): **140 bytes/point** (64.5 MB for 460,800 points), against 1,365
bytes/point for the previous layout (each point a row of tags JSON, fields
JSON and text series key, with two indexes): 9.7× smaller. Of the 140, the
row's payload is 122 (key 10, record header 28 — a byte per column — and
the values: 8 for each fractional float, 1–6 for an integral one or an int,
16 for ``pci_bus_id``), B-tree slack the rest. ``aggregate`` on that hour
(best of 5, one core of a busy 2-core machine): mean(power_w) by gpu_uuid
(460,800 points → 128 rows) 0.085 s; the same in 60 s buckets (7,808 rows)
0.27-0.41 s; the optimizer's GPU summary (mean power and four ``last`` by
gpu_uuid, host, model) 0.18 s; mean, last(job_id), p95 and median of power_w
by gpu_uuid 0.6-0.85 s. ``newest`` of one series: 0.2 ms.

Types: a value is stored in the column of its field's declared type. An int
for a declared float field is widened to a float (exact up to 2**53; reads
give it back as a float) — line protocol's own spelling of a float without a
decimal point. Any other value of the wrong type for a declared field (a
string ``temp_c``, a float or bool ``mem_used_bytes``, a huge int ``power_w``)
is kept as written in ``extra``: ``read`` returns it, aggregates of that field
do not see it (InfluxDB would have refused the point as a field type
conflict; refusing here would break writers InfluxDB lets through, whose first
write in a shard sets its type). Undeclared fields keep each value's own type.

A file in the previous layout (one ``points`` table) is migrated on open: its
rows are copied into the new tables in one transaction (the same type rules),
the old table dropped, then the file vacuumed to give the space back (best
effort: skipped while another process holds it).

Reads (``aggregate``, ``newest``, ``read``) add to ``self.stats`` (rows handed
back, seconds; bytes stay 0). ``aggregate`` runs in SQL: one GROUP BY over
(series group, bucket) for mean/sum/count/min/max; first/last by SQLite's bare
column of the row holding ``min``/``max(time_ns)`` (over the whole window, one
seek per series from the window's edge); median and percentiles in one window
pass per field (``row_number`` over the sorted values, filtered on the ranks
asked for); only the rows asked for come back to Python.
"""

# SQL is built from quoted identifiers (schema names through _ident) and fixed text;
# every value is a bound parameter.
# ruff: noqa: S608

from __future__ import annotations

import json
import logging
import math
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, cast

from dcenergy.errors import StoreError, StoreUnavailable
from dcenergy.lineprotocol import (
    LineProtocolError,
    WriteOutcome,
    WriteResult,
    decode,
    encode_parts,
)
from dcenergy.schema import MEASUREMENTS, FieldValue, Point
from dcenergy.store.base import Agg, AggregateQuery, AggRow, Fn, Op, ReadStats, sort_rows

log = logging.getLogger(__name__)

BUSY_TIMEOUT_MS = 10_000

GENERIC_TABLE: Final = "points_other"
_RESERVED: Final = frozenset({"series_id", "time_ns", "extra"})

# Column kinds: the declared SQL type of each schema field's column.
_REAL, _INTEGER, _BOOLEAN, _TEXT = "REAL", "INTEGER", "BOOLEAN", "TEXT"
_SQL_TYPE: Final[dict[type, str]] = {float: _REAL, int: _INTEGER, bool: _BOOLEAN, str: _TEXT}
_INFLUX_TYPE: Final[dict[str, str]] = {
    _REAL: "float",
    _INTEGER: "integer",
    _BOOLEAN: "boolean",
    _TEXT: "string",
}

_BASE_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS series (
    id          INTEGER PRIMARY KEY,
    measurement TEXT NOT NULL,
    key         TEXT NOT NULL UNIQUE,
    tags        TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS {GENERIC_TABLE} (
    series_id INTEGER NOT NULL,
    time_ns   INTEGER NOT NULL,
    fields    TEXT    NOT NULL,
    PRIMARY KEY (series_id, time_ns)
) WITHOUT ROWID;
"""

# The series of one aggregate read and their group index, private to this connection.
_AGG_SERIES = """
CREATE TEMP TABLE IF NOT EXISTS agg_series (
    g   INTEGER NOT NULL,
    sid INTEGER NOT NULL,
    PRIMARY KEY (g, sid)
) WITHOUT ROWID
"""

_LEGACY_TABLE = "points"
_EXACT_INT: Final = 2**53  # ints up to this convert to a float and back unchanged

# The aggregates InfluxQL refuses for string and boolean fields (an error there, and here).
_REFUSED: Final[dict[str, frozenset[Fn]]] = {
    _TEXT: frozenset({Fn.MEAN, Fn.SUM, Fn.MEDIAN, Fn.PERCENTILE, Fn.MIN, Fn.MAX}),
    _BOOLEAN: frozenset({Fn.MEAN, Fn.SUM, Fn.MEDIAN, Fn.PERCENTILE}),
}
_EQUALITY: Final = frozenset({Op.EQ, Op.NE})


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _kind_fits(kind: str, v: object) -> bool:
    if kind == _REAL:
        return isinstance(v, float)
    if kind == _INTEGER:
        return isinstance(v, int) and not isinstance(v, bool)
    if kind == _BOOLEAN:
        return isinstance(v, bool)
    return isinstance(v, str)


def _influx_type(v: object) -> str:
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, int):
        return "integer"
    if isinstance(v, float):
        return "float"
    return "string"


def _to_sql(kind: str, v: FieldValue) -> float | int | str:
    if kind == _REAL:
        return float(v)
    if kind in (_INTEGER, _BOOLEAN):
        return int(v)
    return str(v)


def _from_sql(kind: str | None, v: Any) -> FieldValue:
    if kind == _BOOLEAN:
        return bool(v)
    if kind == _REAL:
        return float(v)
    if isinstance(v, bool | int | float | str):
        return v
    return str(v)


def _dumps(d: Mapping[str, FieldValue]) -> str:
    return json.dumps(d, ensure_ascii=False, separators=(",", ":"))


@dataclass(frozen=True, slots=True)
class _Column:
    name: str  # the field's name, which is also the column's name
    kind: str  # _REAL | _INTEGER | _BOOLEAN | _TEXT


class _Table:
    """One measurement's table: its typed columns and the statements that use them."""

    def __init__(self, name: str, columns: Sequence[_Column]) -> None:
        self.name = name
        self.q = _ident(name)
        self.columns = tuple(columns)
        self.index = {c.name: i for i, c in enumerate(self.columns)}
        cols = [_ident(c.name) for c in self.columns]
        self.select = ", ".join([*(f"m.{c}" for c in cols), "m.extra"])
        sets = [f"{c} = coalesce(excluded.{c}, {c})" for c in cols]
        sets.append(
            "extra = CASE WHEN excluded.extra IS NULL THEN extra WHEN extra IS NULL "
            "THEN excluded.extra ELSE json_patch(extra, excluded.extra) END"
        )
        marks = ", ".join("?" * (len(cols) + 3))
        self.upsert = (
            f"INSERT INTO {self.q} (series_id, time_ns, {', '.join([*cols, 'extra'])}) "
            f"VALUES ({marks}) ON CONFLICT (series_id, time_ns) DO UPDATE SET {', '.join(sets)}"
        )

    def fields_of(self, row: Sequence[Any]) -> dict[str, FieldValue]:
        """A point's fields from ``select``'s columns (typed columns, then ``extra``)."""
        out: dict[str, FieldValue] = {}
        for c, v in zip(self.columns, row, strict=False):
            if v is not None:
                out[c.name] = _from_sql(c.kind, v)
        extra = row[len(self.columns)]
        if extra is not None:
            for k, v in json.loads(extra).items():
                out.setdefault(k, v)  # a typed column wins over a legacy mis-typed value
        return out


_UPSERT_GENERIC = f"""
INSERT INTO {GENERIC_TABLE} (series_id, time_ns, fields) VALUES (?, ?, ?)
ON CONFLICT (series_id, time_ns) DO UPDATE SET fields = json_patch(fields, excluded.fields)
"""


class _Refused(Exception):
    """A point this store will not take: what line protocol cannot carry."""


@dataclass(frozen=True, slots=True)
class _Row:
    measurement: str
    key: str
    tags_json: str
    time_ns: int
    values: tuple[Any, ...]  # typed columns + extra (typed table) or (fields JSON,) (generic)


@dataclass(frozen=True, slots=True)
class _Series:
    id: int
    key: str
    tags: dict[str, str]


@dataclass(frozen=True, slots=True)
class _FieldExpr:
    """How to read one field in SQL: a typed column, or a path into JSON."""

    sql: str  # an expression over ``m`` giving the value (NULL when absent)
    type_sql: str  # its JSON type ('integer', 'real', 'text', 'true', 'false'); '' for columns
    json_sql: str  # the same as JSON text (for first/last of JSON fields), or ``sql``
    kind: str | None  # the column's kind; None for a JSON field
    params: Mapping[str, object]


@contextmanager
def _sqlite_errors(path: Path) -> Iterator[None]:
    """Map sqlite3's exceptions: a locked/busy database is worth a retry, the rest is not."""
    try:
        yield
    except sqlite3.OperationalError as e:
        msg = str(e)
        if "locked" in msg or "busy" in msg:
            raise StoreUnavailable(f"embedded store {path}: {msg}") from e
        raise StoreError(f"embedded store {path}: {msg}") from e
    except sqlite3.Error as e:
        raise StoreError(f"embedded store {path}: {e}") from e


class EmbeddedStore:
    """Telemetry in a SQLite file; safe for several threads and processes."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.stats = ReadStats()
        self._lock = threading.Lock()
        self._series_ids: dict[str, int] = {}  # series key -> id (ids are never reused)
        self._series_by_m: dict[str, list[_Series]] = {}
        self._series_max_id = 0
        self._tables: dict[str, _Table] = {}
        with _sqlite_errors(self.path):
            self._db = sqlite3.connect(
                self.path,
                timeout=BUSY_TIMEOUT_MS / 1000,
                isolation_level=None,  # explicit BEGIN IMMEDIATE below
                check_same_thread=False,  # guarded by self._lock
            )
            self._db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            self._db.execute("PRAGMA journal_mode = WAL")
            self._db.execute("PRAGMA synchronous = NORMAL")  # durable against a process crash
            with self._tx() as db:
                for stmt in _BASE_SCHEMA.split(";"):
                    if stmt.strip():
                        db.execute(stmt)
                for m in MEASUREMENTS.values():
                    self._tables[m.name] = self._ensure_table(
                        m.name, [_Column(f.name, _SQL_TYPE[f.kind]) for f in m.fields]
                    )
                migrated = self._migrate_legacy(db)
            self._db.execute(_AGG_SERIES)
        if migrated:
            self._vacuum()

    # --- layout ---------------------------------------------------------------------

    def _ensure_table(self, measurement: str, declared: Sequence[_Column]) -> _Table:
        """Create a measurement's table, add columns the schema gained; return its layout."""
        name = f"m_{measurement}"
        clash = _RESERVED & {c.name for c in declared}
        if clash:
            raise StoreError(f"embedded store: field name {sorted(clash)} of {measurement!r}")
        cols = ", ".join(f"{_ident(c.name)} {c.kind}" for c in declared)
        self._db.execute(
            f"CREATE TABLE IF NOT EXISTS {_ident(name)} (series_id INTEGER NOT NULL, "
            f"time_ns INTEGER NOT NULL, {cols}, extra TEXT, "
            "PRIMARY KEY (series_id, time_ns)) WITHOUT ROWID"
        )
        have = {
            str(r[1]): str(r[2]).upper()
            for r in self._db.execute(f"PRAGMA table_info({_ident(name)})").fetchall()
        }
        for c in declared:
            if c.name not in have:
                self._db.execute(f"ALTER TABLE {_ident(name)} ADD COLUMN {_ident(c.name)} {c.kind}")
                have[c.name] = c.kind
        # The table's own columns, in its order (a field dropped from the schema stays readable).
        kinds = {_REAL, _INTEGER, _BOOLEAN, _TEXT}
        columns = [
            _Column(n, k if k in kinds else _TEXT) for n, k in have.items() if n not in _RESERVED
        ]
        return _Table(name, columns)

    def _migrate_legacy(self, db: sqlite3.Connection) -> bool:
        """Copy a previous-layout ``points`` table into the new tables and drop it."""
        found = db.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (_LEGACY_TABLE,)
        ).fetchone()
        if found is None:
            return False
        started = time.monotonic()
        n = 0
        new: dict[str, int] = {}
        cur = db.execute(f"SELECT measurement, tags, fields, time_ns FROM {_LEGACY_TABLE}")
        while batch := cur.fetchmany(5000):
            rows = []
            for measurement, tags_json, fields_json, t in batch:
                p = Point(str(measurement), json.loads(tags_json), json.loads(fields_json), int(t))
                try:
                    rows.append(self._prepare(p))
                except _Refused as e:  # not writable in any layout: keep the log honest
                    log.warning("embedded store %s: legacy point dropped: %s", self.path, e)
            self._insert(db, rows, new)
            n += len(rows)
        db.execute(f"DROP TABLE {_LEGACY_TABLE}")  # its indexes go with it
        log.info(
            "embedded store %s: migrated %d points to the columnar layout in %.1f s",
            self.path,
            n,
            time.monotonic() - started,
        )
        return True

    def _vacuum(self) -> None:
        """Give the old layout's pages back to the file system (best effort)."""
        try:
            with self._lock:
                self._db.execute("VACUUM")
        except sqlite3.Error as e:
            log.info("embedded store %s: vacuum after migration skipped: %s", self.path, e)

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, taking the write lock up front (no upgrade deadlocks)."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    @contextmanager
    def _snapshot(self) -> Iterator[sqlite3.Connection]:
        """One read transaction: the statements of one read see the same data."""
        self._db.execute("BEGIN")
        try:
            yield self._db
        finally:
            self._db.execute("COMMIT")

    # --- writing --------------------------------------------------------------------

    def _prepare(self, p: Point) -> _Row:
        """Validate one point and lay it out as a row; raise _Refused when it cannot be stored."""
        try:
            key, _, _ = encode_parts(p)  # the same validation and series key as InfluxDB gets
        except LineProtocolError as e:
            raise _Refused(str(e)) from e
        tags_json = _dumps({k: v for k, v in sorted(p.tags.items()) if v})
        table = self._tables.get(p.measurement)
        if table is None:
            return _Row(p.measurement, key, tags_json, p.time_ns, (_dumps(dict(p.fields)),))
        values: list[Any] = [None] * (len(table.columns) + 1)
        extra: dict[str, FieldValue] = {}
        for k, v in p.fields.items():
            i = table.index.get(k)
            if i is None:
                extra[k] = v
                continue
            kind = table.columns[i].kind
            if _kind_fits(kind, v):
                values[i] = _to_sql(kind, v)
            elif kind == _REAL and _kind_fits(_INTEGER, v) and abs(int(v)) <= _EXACT_INT:
                values[i] = float(v)  # an int for a float field: widened, losslessly
            else:
                extra[k] = v  # kept as written; aggregates of the field do not see it
        if extra:
            values[-1] = _dumps(extra)
        return _Row(p.measurement, key, tags_json, p.time_ns, tuple(values))

    def _insert(self, db: sqlite3.Connection, rows: Sequence[_Row], new: dict[str, int]) -> None:
        """Upsert rows inside the caller's transaction; series ids it creates go to ``new``."""
        by_table: dict[str, list[tuple[Any, ...]]] = {}
        for r in rows:
            sid = self._series_ids.get(r.key) or new.get(r.key)
            if sid is None:
                got = db.execute("SELECT id FROM series WHERE key = ?", (r.key,)).fetchone()
                if got is None:
                    cur = db.execute(
                        "INSERT INTO series (measurement, key, tags) VALUES (?, ?, ?)",
                        (r.measurement, r.key, r.tags_json),
                    )
                    sid = int(cur.lastrowid or 0)
                else:
                    sid = int(got[0])
                new[r.key] = sid
            table = r.measurement if r.measurement in self._tables else GENERIC_TABLE
            by_table.setdefault(table, []).append((sid, r.time_ns, *r.values))
        for m, args in by_table.items():
            sql = _UPSERT_GENERIC if m == GENERIC_TABLE else self._tables[m].upsert
            db.executemany(sql, args)

    def _write_rows(self, rows: Sequence[_Row]) -> None:
        if not rows:
            return
        new: dict[str, int] = {}
        with self._lock, _sqlite_errors(self.path):
            with self._tx() as db:
                self._insert(db, rows, new)
            self._series_ids.update(new)  # only once committed: a rollback forgets them

    def write(self, points: Sequence[Point]) -> None:
        """Upsert points in one transaction; an invalid point refuses the whole call."""
        rows = []
        for p in points:
            try:
                rows.append(self._prepare(p))
            except _Refused as e:
                raise StoreError(f"embedded store: point refused: {e}") from e
        self._write_rows(rows)

    def write_lines(self, body: bytes) -> WriteResult:
        """The shipper's entry: store the good lines, report the bad (and refused) as dropped."""
        rows: list[_Row] = []
        bad: list[str] = []
        for line in body.decode("utf-8", errors="replace").split("\n"):
            if not line.strip():
                continue
            try:
                rows.append(self._prepare(decode(line)))
            except (LineProtocolError, _Refused) as e:
                bad.append(str(e))
        try:
            self._write_rows(rows)
        except StoreUnavailable as e:
            return WriteResult(WriteOutcome.UNAVAILABLE, None, str(e))
        except StoreError as e:
            return WriteResult(WriteOutcome.REJECTED, None, str(e))
        if bad:
            msg = f"partial write: {bad[0]} dropped={len(bad)}"
            return WriteResult(WriteOutcome.PARTIAL, None, msg, dropped=len(bad))
        return WriteResult(WriteOutcome.OK)

    # --- reading: series --------------------------------------------------------------

    def _refresh_series(self) -> None:
        """Learn the series other writers (and we) added since the last read."""
        rows = self._db.execute(
            "SELECT id, measurement, key, tags FROM series WHERE id > ? ORDER BY id",
            (self._series_max_id,),
        ).fetchall()
        for sid, measurement, key, tags_json in rows:
            self._series_by_m.setdefault(str(measurement), []).append(
                _Series(int(sid), str(key), json.loads(tags_json))
            )
            self._series_max_id = max(self._series_max_id, int(sid))

    def _matching(
        self, measurement: str, tags: Mapping[str, str], *, empty_is_absent: bool
    ) -> list[_Series]:
        """The series of a measurement whose tags equal ``tags`` (call under the lock)."""
        self._refresh_series()
        want = dict(tags)
        out = []
        for s in self._series_by_m.get(measurement, ()):
            if all(s.tags.get(k, "" if empty_is_absent else None) == v for k, v in want.items()):
                out.append(s)
        return out

    def _from(self, measurement: str) -> tuple[str, _Table | None]:
        t = self._tables.get(measurement)
        return (t.q, t) if t is not None else (GENERIC_TABLE, None)

    # --- reading ----------------------------------------------------------------------

    def read(
        self,
        measurement: str,
        *,
        start_ns: int,
        end_ns: int | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> list[Point]:
        """Points of one measurement in [start_ns, end_ns), tag-filtered, oldest first."""
        t0 = time.perf_counter()
        out: list[Point] = []
        with self._lock, _sqlite_errors(self.path):
            series = self._matching(measurement, tags or {}, empty_is_absent=False)
            if series:
                by_id = {s.id: s for s in series}
                name, table = self._from(measurement)
                cols = table.select if table is not None else "m.fields"
                sql = (
                    f"SELECT m.series_id, m.time_ns, {cols} FROM {name} m WHERE m.series_id "
                    "IN (SELECT value FROM json_each(?)) AND m.time_ns >= ?"
                )
                args: list[object] = [json.dumps(list(by_id)), start_ns]
                if end_ns is not None:
                    sql += " AND m.time_ns < ?"
                    args.append(end_ns)
                rows = self._db.execute(sql, args).fetchall()
                keyed = []
                for r in rows:
                    s = by_id[int(r[0])]
                    fields = table.fields_of(r[2:]) if table is not None else json.loads(r[2])
                    keyed.append(
                        (int(r[1]), s.key, Point(measurement, dict(s.tags), fields, int(r[1])))
                    )
                keyed.sort(key=lambda x: (x[0], x[1]))
                out = [p for _, _, p in keyed]
        self.stats.add(rows=len(out), nbytes=0, seconds=time.perf_counter() - t0)
        return out

    def newest(self, measurement: str, *, tags: Mapping[str, str], start_ns: int) -> Point | None:
        """The newest point at or after ``start_ns`` matching ``tags`` (future ones included).

        One query: per matching series, the newest time through the primary key
        (a seek from its end), then the row of the newest of those.
        """
        t0 = time.perf_counter()
        found: Point | None = None
        with self._lock, _sqlite_errors(self.path):
            series = self._matching(measurement, tags, empty_is_absent=True)
            if series:
                by_id = {s.id: s for s in series}
                name, table = self._from(measurement)
                cols = table.select if table is not None else "m.fields"
                sql = (
                    f"SELECT m.series_id, m.time_ns, {cols} "
                    "FROM (SELECT value AS sid FROM json_each(?)) s "
                    f"CROSS JOIN {name} m ON m.series_id = s.sid AND m.time_ns = "
                    f"(SELECT max(n.time_ns) FROM {name} n "
                    "WHERE n.series_id = s.sid AND n.time_ns >= ?) "
                    "ORDER BY m.time_ns DESC, m.series_id LIMIT 1"
                )
                r = self._db.execute(sql, (json.dumps(list(by_id)), start_ns)).fetchone()
                if r is not None:
                    s = by_id[int(r[0])]
                    fields = table.fields_of(r[2:]) if table is not None else json.loads(r[2])
                    found = Point(measurement, dict(s.tags), fields, int(r[1]))
        self.stats.add(rows=int(found is not None), nbytes=0, seconds=time.perf_counter() - t0)
        return found

    # --- aggregate --------------------------------------------------------------------

    def _field_expr(self, table: _Table | None, field: str, n: int, alias: str = "m") -> _FieldExpr:
        """SQL reading ``field`` of a row ``alias``; ``n`` makes its parameter name unique."""
        if table is not None and field in table.index:
            col = table.columns[table.index[field]]
            sql = f"{alias}.{_ident(field)}"
            return _FieldExpr(sql, "", sql, col.kind, {})
        doc = f"{alias}.extra" if table is not None else f"{alias}.fields"
        if '"' in field or "\\" in field:  # not expressible as a JSON path: look the key up
            each = f"FROM json_each({doc}) j WHERE j.key = :k{n}"
            as_json = (
                "CASE WHEN j.type IN ('true', 'false') THEN j.type ELSE json_quote(j.value) END"
            )
            return _FieldExpr(
                f"(SELECT j.value {each})",
                f"(SELECT j.type {each})",
                f"(SELECT {as_json} {each})",
                None,
                {f"k{n}": field},
            )
        path = {f"k{n}": f'$."{field}"'}
        return _FieldExpr(
            f"({doc} ->> :k{n})", f"json_type({doc}, :k{n})", f"({doc} -> :k{n})", None, path
        )

    def aggregate(self, query: AggregateQuery) -> list[AggRow]:
        """The aggregates computed in SQL; rows sorted by group tags, then bucket time."""
        t0 = time.perf_counter()
        with self._lock, _sqlite_errors(self.path):
            out = _Aggregation(self, query).run()
        self.stats.add(rows=len(out), nbytes=0, seconds=time.perf_counter() - t0)
        return out

    # --- housekeeping ---------------------------------------------------------------

    def prune(self, older_than_ns: int) -> int:
        """Retention: delete points older than ``older_than_ns``; return how many."""
        deleted = 0
        with self._lock, _sqlite_errors(self.path), self._tx() as db:
            for m, t in [*((m, t.q) for m, t in self._tables.items()), (None, GENERIC_TABLE)]:
                ids = (
                    "SELECT id FROM series WHERE measurement = ?"
                    if m is not None
                    else f"SELECT id FROM series WHERE measurement NOT IN "
                    f"({', '.join('?' * len(self._tables))})"
                )
                args = [m] if m is not None else list(self._tables)
                deleted += db.execute(
                    f"DELETE FROM {t} WHERE series_id IN ({ids}) AND time_ns < ?",
                    (*args, older_than_ns),
                ).rowcount
        return deleted

    def count(self, measurement: str | None = None) -> int:
        """Number of points stored (of one measurement)."""
        with self._lock, _sqlite_errors(self.path):
            if measurement is None:
                tables = [t.q for t in self._tables.values()] + [GENERIC_TABLE]
                return sum(
                    int(self._db.execute(f"SELECT count(*) FROM {t}").fetchone()[0]) for t in tables
                )
            table = self._tables.get(measurement)
            if table is not None:
                row = self._db.execute(f"SELECT count(*) FROM {table.q}").fetchone()
            else:
                row = self._db.execute(
                    f"SELECT count(*) FROM {GENERIC_TABLE} WHERE series_id IN "
                    "(SELECT id FROM series WHERE measurement = ?)",
                    (measurement,),
                ).fetchone()
        return int(row[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __repr__(self) -> str:
        return f"EmbeddedStore({str(self.path)!r})"


_RANKED: Final = frozenset({Fn.MEDIAN, Fn.PERCENTILE})
_RANK_LIST_MAX: Final = 64  # distinct ranks a window pass filters on by list


def _ranks(a: Agg, n: int) -> tuple[int, ...]:
    """The 1-based ranks among ``n`` sorted values that ``a`` (median, percentile) reads."""
    if a.q is None:  # median: the middle value, or the two middle ones
        return ((n + 1) // 2,) if n % 2 else (n // 2, n // 2 + 1)
    rank = math.floor(n * a.q / 100.0 + 0.5)  # InfluxQL: element floor(n·q/100 + 0.5) - 1
    return (rank,) if 1 <= rank <= n else ()


_Key = tuple[int, int | None]  # (group index, bucket start or None)


class _Aggregation:
    """One ``aggregate`` call turned into SQL (run under the store's lock).

    The matching series and their group index go to the connection's temporary
    ``agg_series`` table, ordered by group; each statement walks it and seeks
    each series' window in the primary key, so rows arrive grouped by series.
    """

    def __init__(self, store: EmbeddedStore, q: AggregateQuery) -> None:
        self.store = store
        self.q = q
        self.name, self.table = store._from(q.measurement)
        self.params: dict[str, object] = {"start": q.start_ns, "end": q.end_ns}
        self._exprs: dict[tuple[str, str], _FieldExpr] = {}
        self._numbers: dict[str, int] = {}  # field -> the number in its parameter's name
        self.source = ""
        self.values: dict[_Key, dict[str, FieldValue]] = {}
        self.counts: dict[str, dict[_Key, int]] = {}  # field -> values per group and bucket
        for a in q.aggs:
            kind = self.expr(a.field).kind
            if kind is not None and a.fn in _REFUSED.get(kind, ()):
                raise StoreError(
                    f"embedded store: {a.fn.value} of a {_INFLUX_TYPE[kind]} field "
                    f"({a.field!r}) is not supported: {q.describe()}"
                )
        self.where = self._where()
        if q.every_s is not None:
            self.params["e"] = max(1, round(q.every_s * 1e9))
            self.bucket = "(m.time_ns - ((m.time_ns % :e) + :e) % :e)"
            self.group = "s.g, b"
        else:
            self.bucket = "NULL"
            self.group = "s.g"  # the walk's own order: no sort needed

    def expr(self, field: str, alias: str = "m") -> _FieldExpr:
        """How the statements read ``field`` (of row ``m``, or ``o``)."""
        if (field, alias) not in self._exprs:
            n = self._numbers.setdefault(field, len(self._numbers))
            fx = self.store._field_expr(self.table, field, n, alias)
            self._exprs[field, alias] = fx
            self.params.update(fx.params)
        return self._exprs[field, alias]

    def _where(self) -> str | None:
        """Window, field filters, and at least one asked-for field present; None: no point.

        A filter keeps InfluxQL's rules: strings and booleans compare only with
        ``=`` and ``!=`` to a value of their own type, numbers (int or float)
        with any operator to a number; any other comparison matches nothing.
        """
        where = ["m.time_ns >= :start", "m.time_ns < :end"]
        for i, f in enumerate(self.q.where):
            fx = self.expr(f.field)
            v = f.value
            kind = _TEXT if isinstance(v, str) else _BOOLEAN if isinstance(v, bool) else _REAL
            if kind != _REAL and f.op not in _EQUALITY:
                return None
            if fx.kind is not None:
                if (fx.kind == _INTEGER and kind == _REAL) or fx.kind == kind:
                    pass
                else:
                    return None
            else:  # a JSON field: the value's own type decides, point by point
                types = {_TEXT: "'text'", _BOOLEAN: "'true', 'false'", _REAL: "'integer', 'real'"}
                where.append(f"{fx.type_sql} IN ({types[kind]})")
            self.params[f"w{i}"] = int(v) if isinstance(v, bool) else v
            op = "<>" if f.op is Op.NE else f.op.value
            where.append(f"{fx.sql} {op} :w{i}")
        fields = dict.fromkeys(a.field for a in self.q.aggs)
        where.append("(" + " OR ".join(f"{self.expr(f).sql} IS NOT NULL" for f in fields) + ")")
        return " AND ".join(where)

    def put(self, g: int, b: int | None, alias: str, v: FieldValue) -> None:
        self.values.setdefault((g, b), {})[alias] = v

    def run(self) -> list[AggRow]:
        q = self.q
        series = self.store._matching(q.measurement, q.tags, empty_is_absent=True)
        if not series or self.where is None:
            return []
        keys = [tuple(s.tags.get(t, "") for t in q.by) for s in series]
        groups = sorted(set(keys))
        gindex = {k: i for i, k in enumerate(groups)}
        db = self.store._db
        db.execute("DELETE FROM temp.agg_series")
        db.executemany(
            "INSERT INTO temp.agg_series (g, sid) VALUES (?, ?)",
            ((gindex[k], s.id) for k, s in zip(keys, series, strict=True)),
        )
        self.source = (
            f"FROM temp.agg_series s CROSS JOIN {self.name} m ON m.series_id = s.sid "
            f"WHERE {self.where}"
        )
        with self.store._snapshot():
            self._plain(db)
            for a in q.aggs:
                if a.fn in (Fn.MIN, Fn.MAX) and self.expr(a.field).kind is None:
                    self._edge(db, a)  # a JSON field: the bare value keeps its JSON type
                elif a.fn in (Fn.FIRST, Fn.LAST):
                    if q.every_s is None:
                        self._edge_per_series(db, a)
                    else:
                        self._edge(db, a)
            ranked = [a for a in q.aggs if a.fn in _RANKED]
            for field in dict.fromkeys(a.field for a in ranked):
                self._ranked(db, field, [a for a in ranked if a.field == field])
        rows = [
            AggRow(dict(zip(q.by, groups[g], strict=True)), b, v)
            for (g, b), v in self.values.items()
            if v
        ]
        return sort_rows(rows, q.by)

    def _plain(self, db: sqlite3.Connection) -> None:
        """mean, sum, count, min, max in one GROUP BY; also the counts the ranks need."""
        plain = [
            a
            for a in self.q.aggs
            if a.fn in (Fn.MEAN, Fn.SUM, Fn.COUNT)
            or (a.fn in (Fn.MIN, Fn.MAX) and self.expr(a.field).kind is not None)
        ]
        ranked = list(dict.fromkeys(a.field for a in self.q.aggs if a.fn in _RANKED))
        if not plain and not ranked:
            return
        sel = [
            f"{'avg' if a.fn is Fn.MEAN else a.fn.value}({self.expr(a.field).sql})" for a in plain
        ]
        sel += [f"count({self.expr(f).sql})" for f in ranked]
        sql = (
            f"SELECT s.g, {self.bucket} AS b, {', '.join(sel)} {self.source} GROUP BY {self.group}"
        )
        for row in db.execute(sql, self.params):
            g, b = row[0], row[1]
            for a, v in zip(plain, row[2:], strict=False):
                if v is None or (a.fn is Fn.COUNT and v == 0):
                    continue
                if a.fn is Fn.MEAN:
                    value: FieldValue = float(v)
                elif a.fn is Fn.COUNT:
                    value = int(v)
                else:
                    value = _from_sql(self.expr(a.field).kind, v)
                self.put(g, b, a.alias, value)
            for f, n in zip(ranked, row[2 + len(plain) :], strict=True):
                if n:
                    self.counts.setdefault(f, {})[g, b] = int(n)

    def _decode(self, fx: _FieldExpr, v: Any) -> FieldValue:
        return _from_sql(fx.kind, v) if fx.kind is not None else cast(FieldValue, json.loads(v))

    def _edge(self, db: sqlite3.Connection, a: Agg) -> None:
        """first/last per bucket, min/max of a JSON field: one GROUP BY whose bare column
        SQLite takes from the row holding min/max(time_ns), or min/max(value)."""
        fx = self.expr(a.field)
        pick = "min" if a.fn in (Fn.FIRST, Fn.MIN) else "max"
        by = "m.time_ns" if a.fn in (Fn.FIRST, Fn.LAST) else fx.sql
        sql = (
            f"SELECT s.g, {self.bucket} AS b, {pick}({by}), {fx.json_sql} {self.source} "
            f"AND {fx.sql} IS NOT NULL GROUP BY {self.group}"
        )
        for g, b, _t, v in db.execute(sql, self.params):
            if v is not None:
                self.put(g, b, a.alias, self._decode(fx, v))

    def _edge_per_series(self, db: sqlite3.Connection, a: Agg) -> None:
        """first/last over the window: per series a seek from the window's edge, then per group."""
        fx = self.expr(a.field)
        out = self.expr(a.field, "o")
        pick = "min" if a.fn is Fn.FIRST else "max"
        sql = (
            f"SELECT s.g, o.time_ns, {out.json_sql} FROM temp.agg_series s "
            f"CROSS JOIN {self.name} o ON o.series_id = s.sid AND o.time_ns = "
            f"(SELECT {pick}(m.time_ns) FROM {self.name} m WHERE m.series_id = s.sid "
            f"AND {self.where} AND {fx.sql} IS NOT NULL)"
        )
        best: dict[int, tuple[int, Any]] = {}
        for g, t, v in db.execute(sql, self.params):
            old = best.get(g)
            if old is None or (t < old[0] if a.fn is Fn.FIRST else t > old[0]):
                best[g] = (t, v)
        for g, (_t, v) in best.items():
            if v is not None:
                self.put(g, None, a.alias, self._decode(fx, v))

    def _ranked(self, db: sqlite3.Connection, field: str, aggs: Sequence[Agg]) -> None:
        """median and nearest-rank percentiles of one field: one window pass over its values.

        The values of each group and bucket are numbered in order (``row_number``)
        and only the ranks asked for come back. With the counts from ``_plain``
        the ranks wanted are known up front; when they are few (groups of about
        equal size, the usual case) the pass filters on that short list, else it
        counts each partition itself.
        """
        fx = self.expr(field)
        counts = self.counts.get(field, {})
        wanted: dict[_Key, dict[Agg, tuple[int, ...]]] = {}
        for key, n in counts.items():
            wanted[key] = {a: _ranks(a, n) for a in aggs}
        union = {r for w in wanted.values() for ranks in w.values() for r in ranks}
        if not union:
            return
        p = dict(self.params)
        part = f"PARTITION BY s.g, {self.bucket} ORDER BY {fx.sql}"
        inner = f"SELECT s.g AS g, {self.bucket} AS b, {fx.sql} AS x, row_number() OVER w AS rn"
        if len(union) <= _RANK_LIST_MAX:
            p.update({f"r{i}": r for i, r in enumerate(sorted(union))})
            marks = ", ".join(f":r{i}" for i in range(len(union)))
            sql = (
                f"SELECT g, b, rn, x FROM ({inner} {self.source} AND {fx.sql} IS NOT NULL "
                f"WINDOW w AS ({part})) WHERE rn IN ({marks})"
            )
        else:
            conds = ["rn = (n + 1) / 2", "rn = n / 2 + 1"]  # the middle one, or two
            for i, a in enumerate(aggs):
                if a.q is not None:
                    p[f"q{i}"] = float(a.q)
                    conds.append(f"rn = CAST(n * :q{i} / 100.0 + 0.5 AS INTEGER)")
            frame = "ROWS BETWEEN UNBOUNDED PRECEDING AND UNBOUNDED FOLLOWING"
            sql = (
                f"SELECT g, b, rn, x FROM ({inner}, count(*) OVER w AS n {self.source} "
                f"AND {fx.sql} IS NOT NULL WINDOW w AS ({part} {frame})) "
                f"WHERE {' OR '.join(conds)}"
            )
        at: dict[_Key, dict[int, Any]] = {}
        for g, b, rn, x in db.execute(sql, p):
            at.setdefault((g, b), {})[int(rn)] = x
        for key, by_agg in wanted.items():
            got = at.get(key, {})
            for a, ranks in by_agg.items():
                if not ranks or any(r not in got for r in ranks):
                    continue
                if a.fn is Fn.MEDIAN:  # a float; of an even count, the two middles' mean
                    self.put(*key, a.alias, sum(float(got[r]) for r in ranks) / len(ranks))
                else:
                    self.put(*key, a.alias, _from_sql(fx.kind, got[ranks[0]]))
