"""The embedded store: telemetry kept in one SQLite file, the default with no InfluxDB.

It answers the same calls as ``InfluxStore`` and keeps InfluxDB's semantics
where readers depend on them: a point is keyed by (series, time), and writing
the same series and time again merges its fields over the old ones, so retries
are idempotent. WAL mode and a busy timeout let several processes (simulated
agents, ``dcenergy recommend``) write and read the same file at once.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

from dcenergy.errors import StoreError, StoreUnavailable
from dcenergy.lineprotocol import (
    LineProtocolError,
    WriteOutcome,
    WriteResult,
    decode,
    encode_parts,
)
from dcenergy.schema import Point

BUSY_TIMEOUT_MS = 10_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS points (
    series_key  TEXT    NOT NULL,
    time_ns     INTEGER NOT NULL,
    measurement TEXT    NOT NULL,
    tags        TEXT    NOT NULL,
    fields      TEXT    NOT NULL,
    PRIMARY KEY (series_key, time_ns)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS points_by_measurement_time ON points (measurement, time_ns);
CREATE INDEX IF NOT EXISTS points_by_time ON points (time_ns);
"""

# json_patch merges the new fields over the old ones, as InfluxDB does for one series+time.
_UPSERT = """
INSERT INTO points (series_key, time_ns, measurement, tags, fields) VALUES (?, ?, ?, ?, ?)
ON CONFLICT (series_key, time_ns) DO UPDATE SET fields = json_patch(fields, excluded.fields)
"""


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
        self._lock = threading.Lock()
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
            with self._tx():
                for stmt in _SCHEMA.split(";"):
                    if stmt.strip():
                        self._db.execute(stmt)

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

    def write(self, points: Sequence[Point]) -> None:
        """Upsert points in one transaction; an invalid point refuses the whole call."""
        rows = []
        for p in points:
            try:
                key, _, _ = encode_parts(p)  # the same validation and series key as InfluxDB gets
            except LineProtocolError as e:
                raise StoreError(f"embedded store: point refused: {e}") from e
            rows.append(
                (
                    key,
                    p.time_ns,
                    p.measurement,
                    json.dumps({k: v for k, v in p.tags.items() if v}, ensure_ascii=False),
                    json.dumps(dict(p.fields), ensure_ascii=False),
                )
            )
        if not rows:
            return
        with self._lock, _sqlite_errors(self.path), self._tx() as db:
            db.executemany(_UPSERT, rows)

    def write_lines(self, body: bytes) -> WriteResult:
        """The shipper's entry: parse lines, store the good ones, report the bad as dropped."""
        points: list[Point] = []
        bad: list[str] = []
        for line in body.decode("utf-8", errors="replace").split("\n"):
            if not line.strip():
                continue
            try:
                points.append(decode(line))
            except LineProtocolError as e:
                bad.append(str(e))
        try:
            self.write(points)
        except StoreUnavailable as e:
            return WriteResult(WriteOutcome.UNAVAILABLE, None, str(e))
        except StoreError as e:
            return WriteResult(WriteOutcome.REJECTED, None, str(e))
        if bad:
            msg = f"partial write: {bad[0]} dropped={len(bad)}"
            return WriteResult(WriteOutcome.PARTIAL, None, msg, dropped=len(bad))
        return WriteResult(WriteOutcome.OK)

    def read(
        self,
        measurement: str,
        *,
        start_ns: int,
        end_ns: int | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> list[Point]:
        """Points of one measurement in [start_ns, end_ns), tag-filtered, oldest first."""
        sql = "SELECT tags, fields, time_ns FROM points WHERE measurement = ? AND time_ns >= ?"
        args: list[object] = [measurement, start_ns]
        if end_ns is not None:
            sql += " AND time_ns < ?"
            args.append(end_ns)
        sql += " ORDER BY time_ns, series_key"
        want = dict(tags or {})
        out: list[Point] = []
        with self._lock, _sqlite_errors(self.path):
            rows = self._db.execute(sql, args).fetchall()
        for tags_json, fields_json, t in rows:
            p_tags: dict[str, str] = json.loads(tags_json)
            if any(p_tags.get(k) != v for k, v in want.items()):
                continue
            out.append(Point(measurement, p_tags, json.loads(fields_json), int(t)))
        return out

    def prune(self, older_than_ns: int) -> int:
        """Retention: delete points older than ``older_than_ns``; return how many."""
        with self._lock, _sqlite_errors(self.path), self._tx() as db:
            return db.execute("DELETE FROM points WHERE time_ns < ?", (older_than_ns,)).rowcount

    def count(self, measurement: str | None = None) -> int:
        """Number of points stored (of one measurement)."""
        with self._lock, _sqlite_errors(self.path):
            if measurement is None:
                row = self._db.execute("SELECT count(*) FROM points").fetchone()
            else:
                row = self._db.execute(
                    "SELECT count(*) FROM points WHERE measurement = ?", (measurement,)
                ).fetchone()
        return int(row[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __repr__(self) -> str:
        return f"EmbeddedStore({str(self.path)!r})"
