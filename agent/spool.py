"""The agent's durable, bounded spool: samples wait here until the store has them.

One SQLite file (WAL) in the state directory, owned by one process. Each point
is stored as its line protocol with its series (a ``series`` row holding the
escaped series key) and timestamp; ``UNIQUE(series_id, time_ns)`` makes a
re-put of the same sample an overwrite, so retries never duplicate.
The shipper ``peek``s the oldest rows and ``ack``s them once the store has them.

**Bounded on disk.** ``max_bytes`` bounds the files, not only the rows: the
database, its WAL and ``-shm``, the ledger and the disk-full reserve together
stay within ``max_bytes + SPOOL_OVERHEAD_BYTES`` (640 KiB; a transaction over
128 KiB, such as one put of thousands of points, may add its size). The WAL is
checkpointed every ``wal_budget`` bytes (1/16 of the bound, 64 KiB to 4 MiB)
and cut back to that size (``journal_size_limit``); the database's pages in
use are kept within ``max_bytes`` less the WAL budget (plus 64 KiB of schema
pages), and a file grown under a larger bound is compacted on open. When a
``put`` goes over either bound, the OLDEST rows are dropped in the same
transaction and every dropped point is counted in a persisted counter,
reported as ``dropped_overflow_total``. Depth, size and counters live in a
``meta`` table updated in the same transactions as the rows (aggregated per
statement: per-row triggers halved put/ack speed), so they are exact after any
crash.

**Durability.** ``journal_mode=WAL`` with ``synchronous=NORMAL`` makes every
committed transaction durable against a crash of the process (SIGKILL, OOM):
the commit is in the WAL file in the OS page cache before ``put()`` returns.
Only a power loss or kernel crash can lose the last few transactions (FULL
would fsync each commit; not worth it for telemetry).

**A damaged spool heals, and says what it lost.** On open (and when a
statement reports corruption later), a spool that fails ``PRAGMA quick_check``
or that SQLite cannot open as a database is moved aside
(``spool.sqlite.corrupt-<UTC time>``, with its ``-wal``, byte for byte as
found; the newest ``KEEP_DAMAGED`` are kept for inspection) and every row that
can still be read is copied, under its old id, into a fresh spool: through
SQLite by rowid ranges halved around each error (a file whose first page is
damaged is read through a rebuilt one: a spool's first page is its schema),
then page by page for the rows under a damaged interior page that SQLite
cannot reach. Every point that could not be is counted in
``dropped_corrupt_total`` and logged once. A row whose line is damaged while
the pages around it are sound (not UTF-8, not ending in its own timestamp) is
dropped and counted when ``peek`` meets it, never shipped.

Losses SQLite cannot see — garbage in the WAL makes it drop every later commit
as if it had never happened, consistently — are found by the *ledger*: a 1 KiB
side file rewritten in place (no allocation, so it works on a full disk)
around every commit with the id range and the number of rows the spool holds
(before and after the commit in flight, so a crash between the two writes is
never mistaken for a loss) and every counter. On open, rows the ledger says
were committed but that are not there are counted as ``dropped_corrupt_total``;
rows a lost transaction had removed come back below the ledger's lowest id and
are deleted again. Counts can come out short, never double: the transaction
in flight at a crash cannot be told from one never committed (its ``put()``
never returned), and a row acked out of order that comes back masks a lost one.

**A full disk** (``SQLITE_FULL``, ``ENOSPC``) never raises out of ``put``:
the points are dropped, counted in ``dropped_disk_full_total`` (kept in
memory and in the ledger until a commit can persist it), logged once per
episode, and sampling goes on. Deleting shipped rows must work on a full disk
(a delete writes WAL frames): the spool keeps a ``RESERVE_BYTES`` reserve file
next to it, released when an ``ack`` (or opening, which writes the ``-shm``)
meets a full disk; the delete is then retried in small transactions,
checkpointing between them so the WAL reuses its space, and rows that still
cannot be deleted stay (sent again: the store keeps one copy). The reserve is
made again once there is room.
"""

from __future__ import annotations

import errno
import json
import logging
import mmap
import os
import re
import shutil
import sqlite3
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from dcenergy.lineprotocol import LineProtocolError, encode_parts
from dcenergy.logonce import LogOnce
from dcenergy.schema import Point

log = logging.getLogger(__name__)

# Measured, with the b-tree fill: about 50 B for a 30-byte line and 140 B for a
# 600-byte GPU line (id, series id, time, size, cell, index entry, leaf slack).
ROW_OVERHEAD_BYTES = 100
BUSY_TIMEOUT_MS = 10_000
PAGE_SIZE = 4096
WAL_MIN_BYTES = 64 * 1024
WAL_MAX_BYTES = 4 * 1024 * 1024
DB_FIXED_BYTES = 16 * PAGE_SIZE  # schema, meta, series and sequence pages
SHM_BYTES = 32 * 1024  # the WAL index of a WAL under 4,000 frames
LEDGER_BYTES = 1024
RESERVE_BYTES = 256 * 1024
# What the files may hold beyond max_bytes: schema pages (64 KiB), -shm (32), ledger (1),
# reserve (256), WAL frame headers (24 at most) and one transaction of up to 128 KiB
# in the database and again in the WAL before its checkpoint (256): 633 KiB.
SPOOL_OVERHEAD_BYTES = 640 * 1024
KEEP_DAMAGED = 3  # damaged spools kept for inspection (the oldest beyond go)
SALVAGE_RANGE = 4096  # ids read per query while salvaging
SALVAGE_TX_ROWS = 2000  # salvaged rows per statement (one transaction: the heal is atomic)
ACK_CHUNK_ON_FULL_DISK = 64  # rows per delete on a full disk: a few WAL pages each
RESERVE_RETRY_S = 60.0

COUNTER_KEYS = (
    "points_spooled_total",
    "dropped_overflow_total",
    "dropped_invalid_total",
    "dropped_corrupt_total",
    "dropped_disk_full_total",
)

_SCHEMA = (  # the CREATE texts are also the template of a rebuilt first page: keep them
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
    """INSERT OR IGNORE INTO meta (k, v) VALUES ('dropped_corrupt_total', 0),
        ('dropped_disk_full_total', 0)""",
)

_INSERT = """INSERT INTO spool (series_id, time_ns, line, size) VALUES (?, ?, ?, ?)
    ON CONFLICT (series_id, time_ns) DO NOTHING"""
_INSERT_WITH_ID = """INSERT INTO spool (id, series_id, time_ns, line, size)
    VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING"""
_OVERWRITE = "UPDATE spool SET line = ?, size = ? WHERE series_id = ? AND time_ns = ?"
_SERIES_CACHE_MAX = 100_000
_ADD = "UPDATE meta SET v = v + ? WHERE k = ?"

_T = TypeVar("_T")
State = tuple[int, int, int]  # (lowest id, highest id, rows): what the spool holds


def row_size(line: str) -> int:
    """What one stored point counts against ``max_bytes``."""
    return len(line.encode()) + ROW_OVERHEAD_BYTES


def wal_budget_bytes(max_bytes: int) -> int:
    """WAL size at which the spool checkpoints (and to which it cuts the WAL back)."""
    pages = min(max(max_bytes // 16, WAL_MIN_BYTES), WAL_MAX_BYTES) // PAGE_SIZE
    return pages * PAGE_SIZE


def is_disk_full(err: BaseException) -> bool:
    if isinstance(err, sqlite3.Error):
        return getattr(err, "sqlite_errorname", "") == "SQLITE_FULL" or "disk is full" in str(err)
    return isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT)


def is_corrupt(err: BaseException) -> bool:
    """SQLITE_CORRUPT or SQLITE_NOTADB (not: busy, locked, full, permissions, I/O)."""
    if not isinstance(err, sqlite3.DatabaseError):
        return False
    name = str(getattr(err, "sqlite_errorname", ""))
    if name.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB")):
        return True
    text = str(err)
    return "malformed" in text or "not a database" in text


@dataclass(frozen=True, slots=True)
class SpoolCounters:
    """Persisted totals (they survive restarts), named as the ``agent`` measurement's fields."""

    points_spooled_total: int
    dropped_overflow_total: int
    dropped_invalid_total: int  # points that cannot be line protocol (logged once)
    spool_depth: int
    spool_bytes: int
    dropped_corrupt_total: int = 0  # committed points a damaged spool could not give back
    dropped_disk_full_total: int = 0  # points that found no room on disk
    spool_file_bytes: int = 0  # database, WAL, -shm, ledger and reserve on disk


class _Damaged(Exception):
    """quick_check found a problem (its first message)."""


class _Ledger:
    """A fixed-size side file rewritten in place: what the spool held, and its counters.

    ``c`` is the state after the last commit, ``p`` the state the transaction in
    flight will leave (written before its COMMIT), ``t`` the counter totals
    (including the disk-full drops no commit could persist yet).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def read(self) -> dict[str, object] | None:
        try:
            raw = self.path.read_bytes()
        except OSError:
            return None
        try:
            crc, body = raw[:8].decode("ascii"), raw[8:].rstrip(b" \n\x00")
            if int(crc, 16) != zlib.crc32(body):
                return None
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            return None
        return data if isinstance(data, dict) and data.get("v") == 1 else None

    def open(self) -> bool:
        """Open (and size) the file; False when it cannot be kept (logged by the caller)."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError:
            return False
        try:
            if os.fstat(fd).st_size < LEDGER_BYTES:
                os.pwrite(fd, b" " * LEDGER_BYTES, 0)  # allocate now: later writes need no room
        except OSError:
            os.close(fd)
            return False
        self._fd = fd
        return True

    def write(self, committed: State | None, pending: State | None, totals: dict[str, int]) -> None:
        if self._fd is None:
            return
        body = json.dumps({"v": 1, "c": committed, "p": pending, "t": totals}).encode()
        rec = f"{zlib.crc32(body):08x}".encode() + body
        if len(rec) >= LEDGER_BYTES:
            return  # cannot happen with five counters; never write a torn record
        try:
            os.pwrite(self._fd, rec + b" " * (LEDGER_BYTES - 1 - len(rec)) + b"\n", 0)
        except OSError as e:
            # A stale ledger could count acked rows as lost: better none at all.
            log.warning("spool: cannot write the ledger %s (%s): dropping it", self.path, e)
            self.close()
            with suppress(OSError):
                self.path.unlink()

    def close(self) -> None:
        if self._fd is not None:
            with suppress(OSError):
                os.close(self._fd)
            self._fd = None


def missing_rows(prior: dict[str, object] | None, count_in: Callable[[int, int], int]) -> int:
    """Rows the ledger says were committed that are not there (0 without a ledger).

    The smaller figure over the committed and the pending state: the database is
    in one of them after any crash, so only a loss makes both come out short.
    """
    if prior is None:
        return 0
    figures = []
    for key in ("c", "p"):
        st = prior.get(key)
        if not (isinstance(st, list) and len(st) == 3 and all(isinstance(x, int) for x in st)):
            continue
        lo, hi, depth = st
        figures.append(depth - count_in(lo, hi) if depth > 0 else 0)
    return max(0, min(figures)) if figures else 0


def _ledger_totals(prior: dict[str, object] | None) -> dict[str, int]:
    t = prior.get("t") if prior else None
    if not isinstance(t, dict):
        return {}
    return {k: int(v) for k, v in t.items() if k in COUNTER_KEYS and isinstance(v, int)}


@dataclass
class _Salvage:
    rows: list[tuple[int, str, int, str]]  # (old id, series key, time, line), by id
    totals: dict[str, int]
    depth: int | None  # what the damaged spool's meta said it held, if readable
    unreadable: int  # rows read whose line was damaged (and no good copy found)


class Spool:
    """Durable FIFO of line-protocol points, bounded by size on disk, oldest dropped first."""

    def __init__(self, path: Path | str, max_bytes: int) -> None:
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, not {max_bytes}")
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.wal_budget = wal_budget_bytes(max_bytes)
        self.db_budget = max(max_bytes - self.wal_budget, 0) + DB_FIXED_BYTES
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()  # the sampler and the shipper run in different threads
        self._warned_invalid = False
        self._series_ids: dict[str, int] = {}  # series key -> series.id; this process owns the file
        self._ledger = _Ledger(self.path.with_name(self.path.name + ".ledger"))
        self._reserve = self.path.with_name(self.path.name + ".reserve")
        self._reserve_retry_at = float("-inf")
        self._unpersisted: dict[str, int] = {}  # counted while no commit could persist them
        self._totals: dict[str, int] = {}
        self._committed: State | None = None
        self._disk_full_since: int | None = None  # disk-full drops when the episode began
        self._log_once = LogOnce(log)
        self._db = self._open()

    # --- opening and healing ----------------------------------------------------------------
    def _connect(self, path: Path) -> sqlite3.Connection:
        db = sqlite3.connect(
            path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None, check_same_thread=False
        )
        try:
            db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            db.execute(f"PRAGMA page_size = {PAGE_SIZE}")  # a new file only
            db.execute("PRAGMA journal_mode = WAL")
            # WAL + NORMAL: a committed put() survives the process being killed (module doc).
            db.execute("PRAGMA synchronous = NORMAL")
            # Debian builds SQLite with secure_delete on: every ack would zero the freed space
            # (30% of ack time). FAST only clears what is written anyway; rows hold no secrets.
            db.execute("PRAGMA secure_delete = FAST")
            db.execute(f"PRAGMA wal_autocheckpoint = {self.wal_budget // PAGE_SIZE}")
            db.execute(f"PRAGMA journal_size_limit = {self.wal_budget}")
        except BaseException:
            db.close()
            raise
        return db

    def _open(self, damaged: str | None = None) -> sqlite3.Connection:
        """Open the spool, healing it when damaged; counters merged with the ledger's."""
        prior = self._ledger.read()
        self._ledger.close()
        existed = self.path.exists()
        if _free_bytes(self.path.parent) < RESERVE_BYTES and self._release_reserve():
            # Opening writes too (-shm, WAL): on a full disk the reserve makes the room.
            log.warning(
                "spool: the disk of %s is full: released the %d KiB reserve to open the spool",
                self.path.parent,
                RESERVE_BYTES // 1024,
            )
        db: sqlite3.Connection | None = None
        lost = 0
        if damaged is None:
            try:
                db = self._connect(self.path)
                problem = db.execute("PRAGMA quick_check(1)").fetchone()[0]
                if problem != "ok":
                    raise _Damaged(problem)
                has_rows = db.execute("SELECT 1 FROM sqlite_schema WHERE name = 'spool'").fetchone()
                lost = missing_rows(prior, self._counter(db) if has_rows else lambda a, b: 0)
            except (sqlite3.DatabaseError, _Damaged) as e:
                if db is not None:
                    with suppress(sqlite3.Error):
                        db.close()
                    db = None
                if isinstance(e, sqlite3.DatabaseError) and not is_corrupt(e):
                    raise  # busy, locked, permissions, full: not ours to move aside
                damaged = str(e)
        salvage: _Salvage | None = None
        if damaged is not None:
            salvage = self._move_aside_and_salvage(damaged, prior)
            db = self._connect(self.path)
        elif lost:
            if existed:
                self._keep_wal_for_inspection()
            why = "the spool file was missing" if not existed else "its WAL was damaged"
            log.error(
                "spool %s: %d points committed before the last stop are gone (%s); "
                "counted in dropped_corrupt_total",
                self.path,
                lost,
                why,
            )
        assert db is not None
        self._db = db
        self._series_ids = {}
        if not self._ledger.open():
            log.warning(
                "spool: cannot keep the ledger %s: points lost to a damaged WAL would go uncounted",
                self._ledger.path,
            )
        with self._tx() as tx:
            for stmt in _SCHEMA:
                tx.execute(stmt)
            if salvage is not None:
                lost = self._restore(tx, salvage, prior)
            merged = _ledger_totals(prior)
            if salvage is not None:
                for k, v in salvage.totals.items():
                    merged[k] = max(merged.get(k, 0), v)
            for k, v in merged.items():  # counters never go back, whichever copy survived
                tx.execute("UPDATE meta SET v = max(v, ?) WHERE k = ?", (v, k))
            if lost:
                tx.execute(_ADD, (lost, "dropped_corrupt_total"))
            back = self._delete_resurrected(tx, prior)
            if back:
                log.warning(
                    "spool %s: %d points already shipped or dropped came back with a damaged "
                    "WAL: deleted again",
                    self.path,
                    back,
                )
            self._recount(tx)  # exact whatever happened before
            tx.execute("DELETE FROM series WHERE id NOT IN (SELECT series_id FROM spool)")
            self._enforce_bound(tx)
            self._committed = self._state(tx)
            self._totals = self._read_totals(tx)
        self._ledger.write(self._committed, None, self._ledger_view())
        self._compact_if_oversized()
        self._ensure_reserve()
        return db

    def _delete_resurrected(self, db: sqlite3.Connection, prior: dict[str, object] | None) -> int:
        """Delete rows below the ledger's lowest id: a lost transaction had removed them.

        In the committed state and in the pending one every id below its lowest was
        gone (shipped, or dropped and counted), so such a row is one that a damaged
        WAL brought back; shipping it again is harmless, dropping it twice is not.
        """
        floors = []
        for key in ("c", "p"):
            st = prior.get(key) if prior else None
            if isinstance(st, list) and len(st) == 3 and all(isinstance(x, int) for x in st):
                if st[2] <= 0:
                    return 0  # an empty state says nothing about ids
                floors.append(st[0])
        if not floors:
            return 0
        return self._delete(db, "id < ?", (min(floors),))

    @staticmethod
    def _counter(db: sqlite3.Connection) -> Callable[[int, int], int]:
        def count(lo: int, hi: int) -> int:
            q = "SELECT count(*) FROM spool WHERE id BETWEEN ? AND ?"
            return int(db.execute(q, (lo, hi)).fetchone()[0])

        return count

    def _aside_name(self) -> Path:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        for n in range(1000):
            suffix = "" if n == 0 else f".{n}"
            cand = self.path.with_name(f"{self.path.name}.corrupt-{stamp}{suffix}")
            if not cand.exists():
                return cand
        raise RuntimeError("too many damaged spools this second")  # pragma: no cover

    def _move_aside_and_salvage(self, why: str, prior: dict[str, object] | None) -> _Salvage:
        aside = self._aside_name()
        for suffix in ("", "-wal", "-shm"):
            src = self.path.with_name(self.path.name + suffix)
            if src.exists():
                os.replace(src, aside.with_name(aside.name + suffix))
        log.error("spool %s is damaged (%s): moved aside to %s, salvaging", self.path, why, aside)
        salvage = salvage_rows(aside, prior)
        self._prune_damaged()
        return salvage

    def _restore(self, db: sqlite3.Connection, s: _Salvage, prior: dict[str, object] | None) -> int:
        """Put salvaged rows back under their old ids; return the points lost for good."""
        ids, _new = self._ids_for(db, {key for _, key, _, _ in s.rows})
        rows = [(rid, ids[key], t, line, row_size(line)) for rid, key, t, line in s.rows]
        kept = 0
        for i in range(0, len(rows), SALVAGE_TX_ROWS):
            kept += db.executemany(_INSERT_WITH_ID, rows[i : i + SALVAGE_TX_ROWS]).rowcount
        self._series_ids = {}  # learnt inside this transaction: forget (put() relearns)
        if prior is not None:
            lost = missing_rows(prior, self._counter(db))
        elif s.depth is not None:
            lost = max(s.unreadable, s.depth - kept)
        else:
            lost = s.unreadable
        log.error(
            "spool %s: salvaged %d points from the damaged spool; %d could not be read "
            "(counted in dropped_corrupt_total)%s",
            self.path,
            kept,
            lost,
            "" if prior is not None or s.depth is not None else "; how many it held is unknown",
        )
        return lost

    def _keep_wal_for_inspection(self) -> None:
        wal = self.path.with_name(self.path.name + "-wal")
        if wal.exists():
            dest = self._aside_name()
            with suppress(OSError):
                shutil.copyfile(wal, dest.with_name(dest.name + "-wal"))
                log.error("spool: kept the damaged WAL as %s-wal", dest)
            self._prune_damaged()

    def _prune_damaged(self) -> None:
        """Keep the newest ``KEEP_DAMAGED`` damaged spools (a failing disk must not fill up)."""
        sets = sorted(
            {
                p.name.removesuffix("-wal").removesuffix("-shm")
                for p in self.path.parent.glob(f"{self.path.name}.corrupt-*")
            }
        )
        for name in sets[:-KEEP_DAMAGED]:
            for suffix in ("", "-wal", "-shm"):
                with suppress(OSError):
                    (self.path.parent / (name + suffix)).unlink()
            log.warning("spool: removed the oldest damaged spool kept, %s", name)

    def _compact_if_oversized(self) -> None:
        """A file grown under a larger bound shrinks back (VACUUM), best effort."""
        try:
            size = self.path.stat().st_size
        except OSError:
            return
        if size <= self.db_budget + self.wal_budget + SPOOL_OVERHEAD_BYTES // 2:
            return
        try:
            self._db.execute("VACUUM")
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error as e:
            log.warning("spool: cannot compact %s (%d bytes): %s", self.path, size, e)

    # --- transactions -------------------------------------------------------------------------
    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                with suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
            raise

    def _write(self, body: Callable[[sqlite3.Connection], _T]) -> _T:
        """``body`` in one transaction, the ledger written around the commit (module doc)."""
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            out = body(db)
            for k, v in self._unpersisted.items():
                if v:
                    db.execute(_ADD, (v, k))
            nxt = self._state(db)
            totals = self._read_totals(db)
            self._ledger.write(self._committed, nxt, self._ledger_view())
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                with suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
            raise
        self._unpersisted = {}
        self._committed, self._totals = nxt, totals
        self._ledger.write(nxt, None, self._ledger_view())
        return out

    def _guarded(self, op: Callable[[], _T]) -> _T:
        """Run ``op``; a spool found damaged meanwhile heals (moved aside, salvaged) and reruns."""
        try:
            return op()
        except sqlite3.DatabaseError as e:
            if not is_corrupt(e):
                raise
            with suppress(sqlite3.Error):
                self._db.close()
            self._db = self._open(damaged=str(e))
            return op()

    def _state(self, db: sqlite3.Connection) -> State:
        lo, hi = db.execute("SELECT min(id), max(id) FROM spool").fetchone()
        return (int(lo or 0), int(hi or 0), self._meta(db, "depth"))

    def _read_totals(self, db: sqlite3.Connection) -> dict[str, int]:
        rows = db.execute(
            f"SELECT k, v FROM meta WHERE k IN ({','.join('?' * len(COUNTER_KEYS))})",  # noqa: S608
            COUNTER_KEYS,
        ).fetchall()
        return {str(k): int(v) for k, v in rows}

    def _ledger_view(self) -> dict[str, int]:
        return {k: self._totals.get(k, 0) + self._unpersisted.get(k, 0) for k in COUNTER_KEYS}

    def _meta(self, db: sqlite3.Connection, key: str) -> int:
        return int(db.execute("SELECT v FROM meta WHERE k = ?", (key,)).fetchone()[0])

    # --- put ----------------------------------------------------------------------------------
    def put(self, points: Iterable[Point]) -> int:
        """Store points in one transaction; return how many were stored.

        A point that cannot be line protocol is skipped and counted in
        ``dropped_invalid_total`` (logged once): one odd job id must not stop
        sampling. When the spool goes over its bound the oldest rows go. On a
        full disk nothing is stored, the points are counted in
        ``dropped_disk_full_total`` and 0 is returned.
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
        with self._lock:
            try:
                stored = self._guarded(lambda: self._put_once(encoded, invalid))
            except sqlite3.DatabaseError as e:
                if not is_disk_full(e):
                    raise
                self._checkpoint("RESTART")  # the WAL may start over in the room it has
                try:
                    stored = self._put_once(encoded, invalid)
                except sqlite3.DatabaseError as e2:
                    if not is_disk_full(e2):
                        raise
                    self._dropped_for_disk_full(len(encoded), invalid, e2)
                    return 0
            if (
                self._disk_full_since is not None and _free_bytes(self.path.parent) >= RESERVE_BYTES
            ):  # real room again, not only pages the spool had freed
                log.warning(
                    "spool: disk space is back; %d points were dropped while the disk was "
                    "full (dropped_disk_full_total)",
                    self._ledger_view()["dropped_disk_full_total"] - self._disk_full_since,
                )
                self._disk_full_since = None
            self._ensure_reserve()
        return stored

    def _put_once(self, encoded: list[tuple[str, int, str]], invalid: int) -> int:
        new_ids: dict[str, int] = {}

        def body(db: sqlite3.Connection) -> int:
            ids, learnt = self._ids_for(db, {k for k, _, _ in encoded})
            new_ids.update(learnt)
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
            return len(rows)

        stored = self._write(body)
        self._series_ids.update(new_ids)  # committed: now the cache may learn them
        return stored

    def _dropped_for_disk_full(self, points: int, invalid: int, err: BaseException) -> None:
        u = self._unpersisted
        u["dropped_disk_full_total"] = u.get("dropped_disk_full_total", 0) + points
        if invalid:
            u["dropped_invalid_total"] = u.get("dropped_invalid_total", 0) + invalid
        if self._disk_full_since is None:
            self._disk_full_since = self._ledger_view()["dropped_disk_full_total"] - points
            log.warning(
                "spool: the disk of %s is full (%s): dropping samples until there is room, "
                "counted in dropped_disk_full_total; shipping goes on",
                self.path.parent,
                err,
            )
        self._ledger.write(self._committed, None, self._ledger_view())

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

    def _drop_oldest(self, db: sqlite3.Connection, nbytes: int) -> int:
        """Delete the oldest rows whose sizes add up to ``nbytes`` (at least one row)."""
        last_id = None
        freed = 0
        for rid, size in db.execute("SELECT id, size FROM spool ORDER BY id"):
            freed += size
            last_id = rid
            if freed >= nbytes:
                break
        return 0 if last_id is None else self._delete(db, "id <= ?", (last_id,))

    def _db_used_bytes(self, db: sqlite3.Connection) -> int:
        pages = db.execute("PRAGMA page_count").fetchone()[0]
        free = db.execute("PRAGMA freelist_count").fetchone()[0]
        return int(pages - free) * PAGE_SIZE

    def _enforce_bound(self, db: sqlite3.Connection) -> None:
        """Drop the oldest rows until rows and pages fit; count each one (same transaction)."""
        dropped = 0
        excess = self._meta(db, "bytes") - self.max_bytes
        if excess > 0:
            dropped += self._drop_oldest(db, excess)
        for _ in range(16):  # pages are freed when emptied: a few rounds at most
            over = self._db_used_bytes(db) - self.db_budget
            if over <= 0:
                break
            n = self._drop_oldest(db, over)
            if not n:
                break
            dropped += n
        if dropped:
            db.execute(_ADD, (dropped, "dropped_overflow_total"))
            log.debug("spool over its bound: dropped the %d oldest points", dropped)

    # --- peek and ack -------------------------------------------------------------------------
    def peek(self, n: int) -> list[tuple[int, str]]:
        """Up to ``n`` (rowid, line) pairs, oldest first; they stay until ``ack``ed.

        A row whose line is damaged (not UTF-8, or not ending in its own timestamp:
        garbage that SQLite's structure checks cannot see) is deleted and counted in
        ``dropped_corrupt_total``, never handed to the shipper.
        """
        q = "SELECT id, time_ns, CAST(line AS BLOB) FROM spool ORDER BY id LIMIT ?"
        out: list[tuple[int, str]] = []
        damaged: list[int] = []
        with self._lock:
            rows = self._guarded(lambda: self._db.execute(q, (n,)).fetchall())
            for rid, t, raw in rows:
                line = _intact(raw, t)
                if line is None:
                    damaged.append(int(rid))
                else:
                    out.append((int(rid), line))
            if damaged:
                self._drop_damaged(damaged)
        return out

    def _drop_damaged(self, ids: list[int]) -> None:
        def body(db: sqlite3.Connection) -> int:
            n = self._delete(db, "id IN (SELECT value FROM json_each(?))", (json.dumps(ids),))
            db.execute(_ADD, (n, "dropped_corrupt_total"))
            return n

        try:
            n = self._write(body)
        except sqlite3.DatabaseError as e:
            if not is_disk_full(e):
                raise
            return  # still there; the next peek tries again
        self._log_once(
            "damaged rows",
            logging.ERROR,
            "spool %s: %d points had damaged lines (first id %d): dropped, counted in "
            "dropped_corrupt_total",
            self.path,
            n,
            ids[0],
        )

    def ack(self, rowids: Sequence[int]) -> int:
        """Delete rows the store has (or refused for good); return how many were deleted.

        Works on a full disk: the reserve is released and the rows are deleted in
        small transactions, the WAL checkpointed between them to reuse its room.
        """
        if not rowids:
            return 0
        ids = list(rowids)
        with self._lock:
            try:
                return self._guarded(lambda: self._ack_once(ids))
            except sqlite3.DatabaseError as e:
                if not is_disk_full(e):
                    raise
            self._checkpoint("RESTART")
            try:
                return self._ack_once(ids)
            except sqlite3.DatabaseError as e:
                if not is_disk_full(e):
                    raise
            if self._release_reserve():
                log.warning(
                    "spool: the disk of %s is full: released the %d KiB reserve so that "
                    "shipped points can be deleted",
                    self.path.parent,
                    RESERVE_BYTES // 1024,
                )
            deleted = 0
            for i in range(0, len(ids), ACK_CHUNK_ON_FULL_DISK):
                try:
                    deleted += self._ack_once(ids[i : i + ACK_CHUNK_ON_FULL_DISK])
                except sqlite3.DatabaseError as e:
                    if not is_disk_full(e):
                        raise
                    # Still there, so sent again later: the store keeps one copy (same
                    # series and time). Nothing is lost; a later ack deletes them.
                    self._log_once(
                        "ack on a full disk",
                        logging.WARNING,
                        "spool: the disk of %s is full: %d shipped points cannot be deleted "
                        "yet and will be sent again",
                        self.path.parent,
                        len(ids) - deleted,
                    )
                    return deleted
                self._checkpoint("RESTART")
            self._log_once.forget("ack on a full disk")
            return deleted

    def _ack_once(self, ids: list[int]) -> int:
        return self._write(
            lambda db: self._delete(
                db, "id IN (SELECT value FROM json_each(?))", (json.dumps(ids),)
            )
        )

    def _checkpoint(self, mode: str) -> None:
        with suppress(sqlite3.Error):
            self._db.execute(f"PRAGMA wal_checkpoint({mode})")

    # --- the disk-full reserve ----------------------------------------------------------------
    def _ensure_reserve(self) -> None:
        """Make the reserve file when it is missing (at most once a minute after a failure)."""
        if self._reserve.exists() or time.monotonic() < self._reserve_retry_at:
            return
        try:
            fd = os.open(self._reserve, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return
        except OSError:
            self._reserve_retry_at = time.monotonic() + RESERVE_RETRY_S
            return
        try:
            try:
                os.posix_fallocate(fd, 0, RESERVE_BYTES)
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                os.pwrite(fd, b"\0" * RESERVE_BYTES, 0)
        except OSError:
            os.close(fd)
            with suppress(OSError):
                self._reserve.unlink()
            self._reserve_retry_at = time.monotonic() + RESERVE_RETRY_S
            return
        os.close(fd)

    def _release_reserve(self) -> bool:
        try:
            self._reserve.unlink()
        except OSError:
            return False
        self._reserve_retry_at = time.monotonic() + RESERVE_RETRY_S
        return True

    # --- figures ------------------------------------------------------------------------------
    def depth(self) -> int:
        """Points waiting."""
        with self._lock:
            return self._meta(self._db, "depth")

    def size_bytes(self) -> int:
        """Bytes of stored rows (lines + per-row overhead), bounded by ``max_bytes``."""
        with self._lock:
            return self._meta(self._db, "bytes")

    def file_bytes(self) -> int:
        """Bytes on disk: database, WAL, -shm, ledger and reserve (see SPOOL_OVERHEAD_BYTES)."""
        total = 0
        for suffix in ("", "-wal", "-shm", ".ledger", ".reserve"):
            with suppress(FileNotFoundError):
                total += self.path.with_name(self.path.name + suffix).stat().st_size
        return total

    def counters(self) -> SpoolCounters:
        with self._lock:
            meta = dict(self._db.execute("SELECT k, v FROM meta").fetchall())
            extra = dict(self._unpersisted)
        c = {k: int(meta.get(k, 0)) + extra.get(k, 0) for k in COUNTER_KEYS}
        return SpoolCounters(
            points_spooled_total=c["points_spooled_total"],
            dropped_overflow_total=c["dropped_overflow_total"],
            dropped_invalid_total=c["dropped_invalid_total"],
            spool_depth=int(meta["depth"]),
            spool_bytes=int(meta["bytes"]),
            dropped_corrupt_total=c["dropped_corrupt_total"],
            dropped_disk_full_total=c["dropped_disk_full_total"],
            spool_file_bytes=self.file_bytes(),
        )

    def close(self) -> None:
        with self._lock:
            self._db.close()
            self._ledger.close()

    def __repr__(self) -> str:
        return f"Spool({str(self.path)!r}, max_bytes={self.max_bytes})"


def _free_bytes(folder: Path) -> int:
    try:
        st = os.statvfs(folder)
    except OSError:
        return 1 << 62
    return st.f_bavail * st.f_frsize


def _intact(raw: object, time_ns: object) -> str | None:
    """The stored line if it is UTF-8, one line, and ends in its own timestamp."""
    if not isinstance(raw, bytes):
        return None
    try:
        line = raw.decode()
    except UnicodeDecodeError:
        return None
    if "\n" in line or not line.endswith(f" {time_ns}"):
        return None
    return line


# --- salvage ------------------------------------------------------------------------------------
def salvage_rows(aside: Path, prior: dict[str, object] | None) -> _Salvage:
    """Every row of a damaged spool that can still be read, and what its meta said.

    Read-only (the file stays as it was found). First through SQLite, by rowid
    ranges halved around each error (a file SQLite will not open as a database,
    its first page damaged, is read through a copy in memory whose first page is
    rebuilt from the spool's own schema; the WAL is then not read); then page by
    page, for the rows under a damaged interior page that SQLite cannot reach:
    every table leaf page whose cells have the spool's shape. A row is taken
    only if its line parses and carries its own timestamp, and only at or above
    the lowest id the spool still held (older ones were shipped or dropped).
    """
    db = _open_readonly(aside)
    if db is None:
        db = _open_with_rebuilt_first_page(aside)
    bad: set[int] = set()  # ids whose line is damaged
    if db is None:
        salvage = _Salvage([], {}, None, 0)
        los, his = _ledger_bounds(prior)
        floor, ceiling = (min(los) if los else 1), (max(his) if his else None)
    else:
        try:
            salvage, floor, ceiling = _read_all(db, prior, bad)
        finally:
            db.close()
    have = {rid for rid, _, _, _ in salvage.rows}
    for rid, (t, line) in _scan_leaf_pages(aside).items():
        if rid in have or rid < floor or (ceiling is not None and rid > ceiling):
            continue
        row = _salvaged_row(rid, t, line)
        if row is None:
            bad.add(rid)
            continue
        salvage.rows.append(row)
        have.add(rid)
    salvage.rows.sort()
    salvage.unreadable = len(bad - have)
    return salvage


_SERIES_KEY = re.compile(r"(?:[^ \\]|\\.)+")  # up to the first unescaped space


def _salvaged_row(rid: int, time_ns: object, line: object) -> tuple[int, str, int, str] | None:
    """(id, series key, time, line) of a row whose line is whole: one line, ending in its time.

    Cheap on purpose (a full parse costs 100x as much on a 256 MB spool): garbage
    inside a field value is left for the store to refuse, and counted there.
    """
    if not isinstance(line, str) or not isinstance(time_ns, int) or "\n" in line:
        return None
    ts = f" {time_ns}"
    if not line.endswith(ts):
        return None
    m = _SERIES_KEY.match(line)
    if m is None or line[m.end() : m.end() + 1] != " " or m.end() + 2 + len(ts) > len(line):
        return None
    return rid, m.group(0), time_ns, line


def _varint(buf: bytes | mmap.mmap, pos: int) -> tuple[int, int]:
    v = 0
    for i in range(8):
        b = buf[pos + i]
        v = (v << 7) | (b & 0x7F)
        if not b & 0x80:
            return v, pos + i + 1
    return (v << 8) | buf[pos + 8], pos + 9


_INT_SIZES = {1: 1, 2: 2, 3: 3, 4: 4, 5: 6, 6: 8}


def _record(payload: bytes) -> list[object] | None:
    """A record's values (ints, text), or None when it is not a valid one."""
    hlen, pos = _varint(payload, 0)
    if not 0 < hlen <= len(payload):
        return None
    types = []
    while pos < hlen:
        t, pos = _varint(payload, pos)
        types.append(t)
    out: list[object] = []
    body = hlen
    for t in types:
        if t == 0:
            out.append(None)
        elif t in _INT_SIZES:
            n = _INT_SIZES[t]
            out.append(int.from_bytes(payload[body : body + n], "big", signed=True))
            body += n
        elif t in (8, 9):
            out.append(t - 8)
        elif t >= 13 and t % 2:
            n = (t - 13) // 2
            try:
                out.append(payload[body : body + n].decode())
            except UnicodeDecodeError:
                return None
            body += n
        else:
            return None  # floats and blobs: not a spool row
        if body > len(payload):
            return None
    return out


def _scan_leaf_pages(path: Path) -> dict[int, tuple[int, str]]:
    """id -> (time_ns, line) of every cell shaped like a spool row, on any table leaf page."""
    found: dict[int, tuple[int, str]] = {}
    try:
        with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            max_local = PAGE_SIZE - 35  # larger payloads spill to overflow pages: not read
            for off in range(0, len(buf) - PAGE_SIZE + 1, PAGE_SIZE):
                hdr = off + (100 if off == 0 else 0)
                if buf[hdr] != 0x0D:  # not a table leaf
                    continue
                ncells = int.from_bytes(buf[hdr + 3 : hdr + 5], "big")
                for i in range(min(ncells, PAGE_SIZE // 4)):
                    ptr = hdr + 8 + 2 * i
                    cell = off + int.from_bytes(buf[ptr : ptr + 2], "big")
                    if not hdr + 8 <= cell < off + PAGE_SIZE - 4:
                        continue
                    try:
                        size, pos = _varint(buf, cell)
                        rid, pos = _varint(buf, pos)
                        if size > max_local or pos + size > off + PAGE_SIZE:
                            continue
                        rec = _record(bytes(buf[pos : pos + size]))
                    except IndexError:
                        continue
                    if (
                        rec is not None
                        and len(rec) == 5
                        and rec[0] is None
                        and isinstance(rec[1], int)
                        and isinstance(rec[2], int)
                        and isinstance(rec[3], str)
                        and isinstance(rec[4], int)
                    ):
                        found.setdefault(rid, (rec[2], rec[3]))
    except (OSError, ValueError):
        return found
    return found


def _open_readonly(path: Path) -> sqlite3.Connection | None:
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    except sqlite3.Error:
        return None
    try:
        db.execute("SELECT id, line FROM spool LIMIT 0").fetchall()
    except sqlite3.Error:
        db.close()
        return None
    return db


def _template_first_page() -> bytes:
    mem = sqlite3.connect(":memory:", isolation_level=None)
    try:
        mem.execute(f"PRAGMA page_size = {PAGE_SIZE}")
        for stmt in _SCHEMA[:3]:
            mem.execute(stmt)
        return bytes(mem.serialize()[:PAGE_SIZE])
    finally:
        mem.close()


def _open_with_rebuilt_first_page(path: Path) -> sqlite3.Connection | None:
    """The damaged file in memory, its first page replaced by a fresh spool's.

    A spool's first page is its schema; the CREATE statements and their order fix
    every root page, so a fresh spool's first page fits. Its header gets the
    damaged file's page count and no freelist (free pages are not read anyway).
    """
    try:
        data = bytearray(path.read_bytes())
    except OSError:
        return None
    if len(data) < 2 * PAGE_SIZE:
        return None
    data = data[: len(data) // PAGE_SIZE * PAGE_SIZE]
    page1 = bytearray(_template_first_page())
    page1[18:20] = b"\x01\x01"  # rollback journal: the image has no WAL
    page1[24:28] = (1).to_bytes(4, "big")  # change counter ...
    page1[92:96] = (1).to_bytes(4, "big")  # ... equal to version-valid-for: page count valid
    page1[28:32] = (len(data) // PAGE_SIZE).to_bytes(4, "big")
    page1[32:40] = bytes(8)  # no freelist
    data[:PAGE_SIZE] = page1
    db = sqlite3.connect(":memory:")
    try:
        db.deserialize(bytes(data))
        db.execute("SELECT id, line FROM spool LIMIT 0").fetchall()
    except sqlite3.Error:
        db.close()
        return None
    log.warning("spool: %s had a damaged first page; reading it through a rebuilt one", path)
    return db


def _try(db: sqlite3.Connection, q: str) -> list[tuple[object, ...]]:
    try:
        return [tuple(r) for r in db.execute(q).fetchall()]
    except sqlite3.Error:
        return []


def _ledger_bounds(prior: dict[str, object] | None) -> tuple[list[int], list[int]]:
    """The lowest and highest ids of the ledger's states that held rows."""
    los: list[int] = []
    his: list[int] = []
    for key in ("c", "p"):
        st = prior.get(key) if prior else None
        ok = isinstance(st, list) and len(st) == 3 and all(isinstance(x, int) for x in st)
        if ok and isinstance(st, list) and st[2] > 0:
            los.append(st[0])
            his.append(st[1])
    return los, his


def _read_all(
    db: sqlite3.Connection, prior: dict[str, object] | None, bad: set[int]
) -> tuple[_Salvage, int, int | None]:
    """Rows read through SQLite; the lowest id still live and the highest id, if known.

    The lowest live id: the ledger's; else the table's own min(id); else, with no
    ledger and a damaged table, the highest id less the depth the meta recorded
    (ids are given in arrival order and the oldest go first).
    """
    totals: dict[str, int] = {}
    depth: int | None = None
    for k, v in _try(db, "SELECT k, v FROM meta"):
        if isinstance(k, str) and isinstance(v, int):
            if k in COUNTER_KEYS:
                totals[k] = v
            elif k == "depth":
                depth = v
    ledger_los, his = _ledger_bounds(prior)
    table_lo: int | None = None
    for lo, hi in _try(db, "SELECT min(id), max(id) FROM spool"):
        if isinstance(lo, int) and isinstance(hi, int):
            table_lo = lo
            his.append(hi)
    for (seq,) in _try(db, "SELECT seq FROM sqlite_sequence WHERE name = 'spool'"):
        if isinstance(seq, int):
            his.append(seq)
    if ledger_los:
        floor = min(ledger_los)
    elif table_lo is not None:
        floor = table_lo
    elif depth is not None and his:
        floor = max(1, max(his) - depth + 1)
    else:
        floor = 1
    los = [*ledger_los, *([table_lo] if table_lo is not None else []), floor]
    rows: list[tuple[int, str, int, str]] = []

    def read(a: int, b: int) -> None:
        try:
            got = db.execute(
                "SELECT id, time_ns, line FROM spool WHERE id BETWEEN ? AND ? ORDER BY id", (a, b)
            ).fetchall()
        except sqlite3.Error:
            if a == b:
                return  # an unreadable id (or none ever there): the ledger tells
            mid = (a + b) // 2
            read(a, mid)
            read(mid + 1, b)
            return
        for rid, t, line in got:
            row = _salvaged_row(int(rid), t, line)
            if row is None:
                bad.add(int(rid))
            else:
                rows.append(row)

    if his:
        lo = max(1, min(los) if los else 1)
        hi = max(his)
        for start in range(lo, hi + 1, SALVAGE_RANGE):
            read(start, min(start + SALVAGE_RANGE - 1, hi))
    return _Salvage(rows, totals, depth, 0), floor, (max(his) if his else None)
