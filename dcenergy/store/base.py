"""The store protocol: the one interface every writer and reader of telemetry uses.

Two implementations answer it: ``InfluxStore`` (the v1-compatible HTTP API,
which every InfluxDB speaks) and ``EmbeddedStore`` (SQLite, the default with
no server). Readers never send query strings; they say what they want:

* ``aggregate``: named aggregates of named fields per series (or per group of
  tags), over a window or in time buckets, computed *by the store* (InfluxQL
  on InfluxDB, SQL on SQLite). What crosses the wire grows with groups ×
  buckets, never with raw rows: this is the read the central loop uses.
* ``newest``: the newest point of one series, one small query whatever the
  history (the agent's plan poll).
* ``read``: raw points, for small reads only (one host's audit, tests).

Semantics both stores keep, so a reader never branches on the kind of store
(``tests/dcenergy/test_store_aggregate.py`` checks them against raw points):

* A time bucket is ``[k·every, (k+1)·every)`` aligned to the epoch (InfluxQL's
  default, no offset); buckets with no value of any requested field are left out.
* Aggregates ignore points that lack the field. ``mean`` and ``median`` are
  floats (``median`` of an even count is the mean of the two middle values;
  InfluxDB's median of an int field is a float either way); ``count`` an int;
  ``min``, ``max``, ``first``, ``last`` and ``percentile`` keep the field's
  type. ``percentile(q)`` is InfluxQL's
  nearest rank: the sorted values' element ``floor(n·q/100 + 0.5) - 1``,
  absent when that index falls outside.
* ``first``/``last`` pick by time; ties between series of one group are
  broken arbitrarily (group by every tag that tells series apart to avoid them).
* A group-by tag a series lacks reads as ``""``.
"""

from __future__ import annotations

import decimal
import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from dcenergy.lineprotocol import WriteResult
from dcenergy.schema import FieldValue, Point


def plain_decimal(x: float) -> str:
    """``x`` exactly as Python prints it, without an exponent (InfluxQL refuses ``1e-05``)."""
    text = format(decimal.Decimal(repr(x)), "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


class Fn(enum.StrEnum):
    """An aggregate the store computes. The values are their InfluxQL names."""

    MEAN = "mean"
    SUM = "sum"
    COUNT = "count"
    MIN = "min"
    MAX = "max"
    FIRST = "first"
    LAST = "last"
    MEDIAN = "median"
    PERCENTILE = "percentile"


@dataclass(frozen=True, slots=True)
class Agg:
    """One aggregate of one field; ``q`` (0-100) only for ``percentile``."""

    fn: Fn
    field: str
    q: float | None = None

    def __post_init__(self) -> None:
        if (self.fn is Fn.PERCENTILE) != (self.q is not None):
            raise ValueError("q is given for percentile, and only for percentile")
        if self.q is not None and not 0 < self.q <= 100:
            raise ValueError(f"percentile q must be in (0, 100], not {self.q}")

    @property
    def alias(self) -> str:
        """The key of this aggregate's value in each row: ``mean_power_w``, ``p95_power_w``."""
        if self.fn is Fn.PERCENTILE:
            return f"p{plain_decimal(self.q or 0.0)}_{self.field}".replace(".", "_")
        return f"{self.fn.value}_{self.field}"


class Op(enum.StrEnum):
    LT = "<"
    LE = "<="
    GT = ">"
    GE = ">="
    EQ = "="
    NE = "!="


@dataclass(frozen=True, slots=True)
class FieldFilter:
    """Keep only points whose field compares so; a point without the field is left out."""

    field: str
    op: Op
    value: float | int | bool | str


@dataclass(frozen=True, slots=True)
class AggregateQuery:
    """What an aggregate read asks for; both stores answer it the same way."""

    measurement: str
    aggs: tuple[Agg, ...]
    start_ns: int
    end_ns: int
    by: tuple[str, ...] = ()  # tag names: one row per distinct combination (and bucket)
    every_s: float | None = None  # bucket width; None: one row over the whole window
    tags: Mapping[str, str] = field(default_factory=dict)  # tag equality filter
    where: tuple[FieldFilter, ...] = ()

    def __post_init__(self) -> None:
        if not self.aggs:
            raise ValueError("an aggregate query names at least one aggregate")
        if self.end_ns <= self.start_ns:
            raise ValueError("end_ns must be after start_ns")
        if self.every_s is not None and self.every_s < 1e-3:
            raise ValueError(f"every_s must be at least 1 ms, not {self.every_s}")

    @property
    def window_s(self) -> float:
        return (self.end_ns - self.start_ns) / 1e9

    def describe(self) -> str:
        """A short human description, for errors and logs."""
        what = ", ".join(
            f"{a.fn.value}({a.field}{'' if a.q is None else f', {a.q:g}'})" for a in self.aggs
        )
        text = f"{what} of {self.measurement!r} over {self.window_s:g} s"
        if self.every_s is not None:
            text += f" in {self.every_s:g} s buckets"
        if self.by:
            text += f" by {', '.join(self.by)}"
        return text


@dataclass(frozen=True, slots=True)
class AggRow:
    """One group (and bucket): its group-by tags, bucket start, and the aggregates that exist."""

    tags: Mapping[str, str]
    time_ns: int | None  # bucket start; None for a query without buckets
    values: Mapping[str, FieldValue]  # Agg.alias -> value; an aggregate with no data is absent


@dataclass(slots=True)
class ReadStats:
    """What reading has cost so far: the figures the fleet-scale bench prints."""

    queries: int = 0
    rows: int = 0  # rows (raw points or aggregate rows) handed to the caller
    bytes: int = 0  # response bytes received (InfluxDB) or 0 (embedded)
    seconds: float = 0.0

    def add(self, *, rows: int, nbytes: int, seconds: float) -> None:
        self.queries += 1
        self.rows += rows
        self.bytes += nbytes
        self.seconds += seconds

    def describe(self) -> str:
        return (
            f"queries={self.queries} rows={self.rows} bytes={self.bytes} read_s={self.seconds:.3f}"
        )


@runtime_checkable
class Store(Protocol):
    """The one store interface: the agent's shipper, the reconciler, the optimizer, the CLI."""

    stats: ReadStats

    def write(self, points: Sequence[Point]) -> None:
        """Write points; the same series + time overwrites (idempotent retries).

        Raises ``StoreUnavailable`` when the caller should keep the data and retry,
        ``StoreError`` when the data was refused for good.
        """
        ...

    def write_lines(self, body: bytes) -> WriteResult:
        """Write a line-protocol body (ns precision); every answer is a WriteResult, no raise."""
        ...

    def aggregate(self, query: AggregateQuery) -> list[AggRow]:
        """The store computes the aggregates; rows sorted by group tags, then bucket time."""
        ...

    def newest(self, measurement: str, *, tags: Mapping[str, str], start_ns: int) -> Point | None:
        """The newest point at or after ``start_ns`` matching ``tags`` (future ones included)."""
        ...

    def read(
        self,
        measurement: str,
        *,
        start_ns: int,
        end_ns: int | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> list[Point]:
        """Raw points in [start_ns, end_ns), tag-filtered, oldest first: small reads only."""
        ...

    def close(self) -> None: ...


def sort_rows(rows: list[AggRow], by: Sequence[str]) -> list[AggRow]:
    """The protocol's row order: group tags, then bucket time."""
    rows.sort(
        key=lambda r: (tuple(r.tags.get(t, "") for t in by), -1 if r.time_ns is None else r.time_ns)
    )
    return rows
