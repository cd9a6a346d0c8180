"""The agent's durable, bounded spool: samples wait here until the store has them.

One SQLite file (WAL) in the state directory, owned by one process. Each point
is stored as its line protocol with its series (a ``series`` row holding the
escaped series key) and timestamp; ``UNIQUE(series_id, time_ns)`` makes a
re-put of the same sample an overwrite, so retries never duplicate.
The shipper ``peek``s the oldest rows and ``ack``s them once the store has them.

Bounded by ``max_bytes`` of stored rows (line + a fixed per-row overhead; not
the file size, which SQLite does not shrink): when a ``put`` goes over, the
OLDEST rows are dropped in the same transaction and every dropped point is
counted in a persisted counter, reported as ``dropped_overflow_total``. Depth,
size and counters live in a ``meta`` table updated in the same transactions as
the rows (aggregated per statement: per-row triggers halved put/ack speed), so
they are exact after any crash.

Durability: ``journal_mode=WAL`` with ``synchronous=NORMAL`` makes every
committed transaction durable against a crash of the process (SIGKILL, OOM):
the commit is in the WAL file in the OS page cache before ``put()`` returns.
Only a power loss or kernel crash can lose the last few transactions (FULL
would fsync each commit; not worth it for telemetry).
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from dcenergy.lineprotocol import LineProtocolError, encode_parts
from dcenergy.schema import Point

log = logging.getLogger(__name__)

ROW_OVERHEAD_BYTES = 40  # id, series id, time, size, b-tree cell and index entry, roughly
BUSY_TIMEOUT_MS = 10_000

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS spool (
        id INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused: id order is arrival order
        series_id INTEGER NOT NULL,  -- series.id: a small key, 2-3x faster than the text
        time_ns INTEGER NOT NULL,
        line TEXT NOT NULL,
        size INTEGER NOT NULL,
        UNIQUE (series_id, time_ns)
    )""",
    """CREATE TABLE IF NOT EXISTS series (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        key TEXT NOT NULL UNIQUE  -- escaped measurement + sorted tags
    )""",
    "CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v INTEGER NOT NULL) WITHOUT ROWID",
    """INSERT OR IGNORE INTO meta (k, v) VALUES ('depth', 0), ('bytes', 0),
        ('points_spooled_total', 0), ('dropped_overflow_total', 0),
        ('dropped_invalid_total', 0)""",
)

_INSERT = """INSERT INTO spool (series_id, time_ns, line, size) VALUES (?, ?, ?, ?)
    ON CONFLICT (series_id, time_ns) DO NOTHING"""
_OVERWRITE = "UPDATE spool SET line = ?, size = ? WHERE series_id = ? AND time_ns = ?"
_SERIES_CACHE_MAX = 100_000
_ADD = "UPDATE meta SET v = v + ? WHERE k = ?"


def row_size(line: str) -> int:
    """What one stored point counts against ``max_bytes``."""
    return len(line.encode()) + ROW_OVERHEAD_BYTES


@dataclass(frozen=True, slots=True)
class SpoolCounters:
    """Persisted totals (they survive restarts), named as the ``agent`` measurement's fields."""

    points_spooled_total: int
    dropped_overflow_total: int
    dropped_invalid_total: int  # points that cannot be line protocol (logged once)
    spool_depth: int
    spool_bytes: int


class Spool:
    """Durable FIFO of line-protocol points, bounded by size, oldest dropped first."""

    def __init__(self, path: Path | str, max_bytes: int) -> None:
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, not {max_bytes}")
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()  # the sampler and the shipper run in different threads
        self._warned_invalid = False
        self._series_ids: dict[str, int] = {}  # series key -> series.id; this process owns the file
        self._db = sqlite3.connect(
            self.path,
            timeout=BUSY_TIMEOUT_MS / 1000,
            isolation_level=None,
            check_same_thread=False,
        )
        self._db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        self._db.execute("PRAGMA journal_mode = WAL")
        # WAL + NORMAL: a committed put() survives the process being killed (see module doc).
        self._db.execute("PRAGMA synchronous = NORMAL")
        # Debian builds SQLite with secure_delete on: every ack would zero the freed space
        # (30% of ack time). FAST only clears what is written anyway; spool rows hold no secrets.
        self._db.execute("PRAGMA secure_delete = FAST")
        with self._tx() as db:
            for stmt in _SCHEMA:
                db.execute(stmt)
            self._recount(db)  # exact whatever happened before
            db.execute("DELETE FROM series WHERE id NOT IN (SELECT series_id FROM spool)")

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def _meta(self, db: sqlite3.Connection, key: str) -> int:
        return int(db.execute("SELECT v FROM meta WHERE k = ?", (key,)).fetchone()[0])

    def put(self, points: Iterable[Point]) -> int:
        """Store points in one transaction; return how many were stored.

        A point that cannot be line protocol is skipped and counted in
        ``dropped_invalid_total`` (logged once): one odd job id must not stop
        sampling. When the spool goes over ``max_bytes`` the oldest rows go.
        """
        encoded: list[tuple[str, int, str]] = []
        invalid = 0
        for p in points:
            try:
                key, t, line = encode_parts(p)
            except LineProtocolError as e:
                invalid += 1
                if not self._warned_invalid:
                    self._warned_invalid = True
                    log.warning("spool: dropping a point that is not valid line protocol: %s", e)
                continue
            encoded.append((key, t, line))
        with self._lock, self._tx() as db:
            ids, new_ids = self._ids_for(db, {k for k, _, _ in encoded})
            rows = [(ids[k], t, line, row_size(line)) for k, t, line in encoded]
            inserted = db.executemany(_INSERT, rows).rowcount
            if inserted == len(rows):  # the usual case: all new
                db.execute(_ADD, (inserted, "depth"))
                db.execute(_ADD, (sum(r[3] for r in rows), "bytes"))
            else:  # re-puts (retries): overwrite them, last one wins, and recount
                db.executemany(_OVERWRITE, [(line, size, sid, t) for sid, t, line, size in rows])
                self._recount(db)
            db.execute(_ADD, (len(rows), "points_spooled_total"))
            if invalid:
                db.execute(_ADD, (invalid, "dropped_invalid_total"))
            self._enforce_bound(db)
        self._series_ids.update(new_ids)  # committed: now the cache may learn them
        return len(rows)

    def _ids_for(
        self, db: sqlite3.Connection, keys: set[str]
    ) -> tuple[dict[str, int], dict[str, int]]:
        """(series.id of every key, the ids looked up or added now) in the caller's transaction.

        The cache learns the new ones only after the transaction commits (see ``put``).
        """
        known = self._series_ids
        if len(known) > _SERIES_CACHE_MAX:  # jobs come and go: do not grow forever
            known.clear()
        new: dict[str, int] = {}
        for k in keys:
            if k in known:
                continue
            db.execute("INSERT INTO series (key) VALUES (?) ON CONFLICT (key) DO NOTHING", (k,))
            new[k] = int(db.execute("SELECT id FROM series WHERE key = ?", (k,)).fetchone()[0])
        return (known | new if new else known), new

    def _recount(self, db: sqlite3.Connection) -> None:
        """Set depth and bytes from the rows themselves (on open and after re-puts)."""
        depth, size = db.execute("SELECT count(*), coalesce(sum(size), 0) FROM spool").fetchone()
        db.execute("UPDATE meta SET v = ? WHERE k = 'depth'", (depth,))
        db.execute("UPDATE meta SET v = ? WHERE k = 'bytes'", (size,))

    def _delete(self, db: sqlite3.Connection, where: str, args: tuple[object, ...]) -> int:
        """Delete rows and take them off depth and bytes, in the caller's transaction."""
        sizes = db.execute(f"DELETE FROM spool WHERE {where} RETURNING size", args).fetchall()  # noqa: S608
        if sizes:
            db.execute(_ADD, (-len(sizes), "depth"))
            db.execute(_ADD, (-sum(r[0] for r in sizes), "bytes"))
        return len(sizes)

    def _enforce_bound(self, db: sqlite3.Connection) -> None:
        """Drop the oldest rows until the spool fits; count each one (same transaction)."""
        excess = self._meta(db, "bytes") - self.max_bytes
        if excess <= 0:
            return
        last_id = None
        freed = 0
        for rid, size in db.execute("SELECT id, size FROM spool ORDER BY id"):
            freed += size
            last_id = rid
            if freed >= excess:
                break
        if last_id is None:
            return
        dropped = self._delete(db, "id <= ?", (last_id,))
        db.execute(_ADD, (dropped, "dropped_overflow_total"))
        log.debug("spool over %d bytes: dropped the %d oldest points", self.max_bytes, dropped)

    def peek(self, n: int) -> list[tuple[int, str]]:
        """Up to ``n`` (rowid, line) pairs, oldest first; they stay until ``ack``ed."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, line FROM spool ORDER BY id LIMIT ?", (n,)
            ).fetchall()
        return [(int(r), str(line)) for r, line in rows]

    def ack(self, rowids: Sequence[int]) -> int:
        """Delete rows the store has (or refused for good); return how many were deleted."""
        if not rowids:
            return 0
        with self._lock, self._tx() as db:
            return self._delete(
                db, "id IN (SELECT value FROM json_each(?))", (json.dumps(list(rowids)),)
            )

    def depth(self) -> int:
        """Points waiting."""
        with self._lock:
            return self._meta(self._db, "depth")

    def size_bytes(self) -> int:
        """Bytes of stored rows, the quantity ``max_bytes`` bounds."""
        with self._lock:
            return self._meta(self._db, "bytes")

    def file_bytes(self) -> int:
        """Bytes on disk (database + WAL)."""
        total = 0
        for p in (self.path, self.path.with_name(self.path.name + "-wal")):
            with suppress(FileNotFoundError):
                total += p.stat().st_size
        return total

    def counters(self) -> SpoolCounters:
        with self._lock:
            meta = dict(self._db.execute("SELECT k, v FROM meta").fetchall())
        return SpoolCounters(
            points_spooled_total=int(meta["points_spooled_total"]),
            dropped_overflow_total=int(meta["dropped_overflow_total"]),
            dropped_invalid_total=int(meta["dropped_invalid_total"]),
            spool_depth=int(meta["depth"]),
            spool_bytes=int(meta["bytes"]),
        )

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __repr__(self) -> str:
        return f"Spool({str(self.path)!r}, max_bytes={self.max_bytes})"
