"""InfluxDB line protocol: encode points, parse lines, and the result of writing a body.

Every InfluxDB (1.x, 2.x through DBRP, 3 Core) accepts line protocol on the v1
``/write`` endpoint, so this one module is the wire format of the agent's spool,
of the shipper and of both stores.

Escaping, as the servers parse it (checked against a real influxd 1.6):

* measurement: ``,`` and space are escaped with a backslash;
* tag keys, tag values, field keys: ``,``, ``=`` and space are escaped;
* string field values are double-quoted; ``"`` and ``\\`` are escaped;
* a backslash in a name or tag value is literal. Servers disagree about a
  backslash that precedes a special character, another backslash, or the end
  of the name (1.x keeps ``\\\\`` as two characters, 2.x reads it as one, and a
  trailing backslash is unparseable), so such names are refused rather than
  written ambiguously.

Refused with ``LineProtocolError`` (a ``ValueError``; a bug in the caller's data,
never a store outage):

* a point with no fields; an empty measurement, tag key or field key;
* a newline or carriage return anywhere: line protocol has no escape for it
  (the docs: "does not support the newline character in tag values or field
  values"). Callers with free text (error messages) pass it through
  :func:`one_line` first;
* non-finite floats, integers outside int64, ``time`` as a tag or field key
  (InfluxDB drops those points), a measurement starting with ``#`` (a comment).

Empty tag values are omitted: InfluxDB rejects them, and an absent tag is what a
reader sees for an empty one anyway. Tags are written sorted by key, so the text
before the first unescaped space is the canonical series key.
"""

from __future__ import annotations

import enum
import functools
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Final, Protocol

from dcenergy.schema import FieldValue, Point

INT64_MIN: Final = -(2**63)
INT64_MAX: Final = 2**63 - 1
MIN_TIME_NS: Final = INT64_MIN + 2  # InfluxDB's models.MinNanoTime
MAX_TIME_NS: Final = INT64_MAX - 1  # InfluxDB's models.MaxNanoTime

PRECISION_DIVISOR: Final[dict[str, int]] = {
    "ns": 1,
    "u": 1_000,
    "us": 1_000,
    "ms": 1_000_000,
    "s": 1_000_000_000,
}


class LineProtocolError(ValueError):
    """A point or line that cannot be written (or read) as line protocol."""


# --- encoding -----------------------------------------------------------------------

_MEASUREMENT_SPECIAL: Final = frozenset(", ")
_KEY_SPECIAL: Final = frozenset(", =")
_NEEDS_WORK = re.compile(r"[, =\\\n\r]")
_NEEDS_WORK_MEASUREMENT = re.compile(r"[, \\\n\r#]")
_NEEDS_WORK_STRING = re.compile(r'["\\\n\r]')
_NEWLINE = re.compile(r"[\n\r]")


def one_line(text: str) -> str:
    """Replace line breaks in free text (error messages) so it can be a string field."""
    return _NEWLINE.sub(" ", text.replace("\r\n", " "))


def _escape_name(s: str, special: frozenset[str], what: str) -> str:
    """Escape a measurement, key or tag value; refuse what no server reads back the same."""
    if not s:
        raise LineProtocolError(f"empty {what}")
    if _NEWLINE.search(s):
        raise LineProtocolError(
            f"{what} {s!r} contains a line break (not allowed in line protocol)"
        )
    out: list[str] = []
    n = len(s)
    for i, c in enumerate(s):
        if c == "\\":
            nxt = s[i + 1] if i + 1 < n else ""
            if nxt in ("", "\\") or nxt in special:
                raise LineProtocolError(
                    f"{what} {s!r} has a backslash before {nxt or 'its end'!r}, which "
                    "InfluxDB versions read differently"
                )
            out.append(c)
        elif c in special:
            out.append("\\" + c)
        else:
            out.append(c)
    return "".join(out)


def _measurement(s: str) -> str:
    if s.startswith("#"):
        raise LineProtocolError(f"measurement {s!r} starts with '#' (a comment line)")
    if not _NEEDS_WORK_MEASUREMENT.search(s) and s:
        return s
    return _escape_name(s, _MEASUREMENT_SPECIAL, "measurement")


def _key(s: str, what: str) -> str:
    if s == "time":
        raise LineProtocolError(f"{what} 'time' is reserved (InfluxDB drops the point)")
    if s and not _NEEDS_WORK.search(s):
        return s
    return _escape_name(s, _KEY_SPECIAL, what)


def _tag_value(s: str) -> str:
    if not _NEEDS_WORK.search(s):
        return s
    return _escape_name(s, _KEY_SPECIAL, "tag value")


def _field_value(k: str, v: FieldValue) -> str:
    # bool before int: bool is a subclass of int.
    if v is True:
        return "true"
    if v is False:
        return "false"
    if isinstance(v, int):
        if not INT64_MIN <= v <= INT64_MAX:
            raise LineProtocolError(f"field {k!r}: integer {v} outside int64")
        return f"{v}i"
    if isinstance(v, float):
        if not math.isfinite(v):
            raise LineProtocolError(f"field {k!r}: non-finite float {v!r}")
        return repr(v)  # shortest text that parses back to the same double
    if isinstance(v, str):
        if not _NEEDS_WORK_STRING.search(v):
            return f'"{v}"'
        if _NEWLINE.search(v):
            raise LineProtocolError(
                f"field {k!r}: string contains a line break (use lineprotocol.one_line())"
            )
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    raise LineProtocolError(f"field {k!r}: unsupported type {type(v).__name__}")


MAX_NAME_BYTES: Final = 253  # a host name (DNS) or an id: far below InfluxDB's 64 KiB key limit


def name_problem(
    value: str, what: str = "tag value", max_bytes: int = MAX_NAME_BYTES
) -> str | None:
    """Why ``value`` cannot be written as a tag value (a host name, an id), or None.

    For checks at the edge (configuration, input files), so that a bad name is
    an error naming it there instead of a refused point later.
    """
    if not value:
        return f"empty {what}"
    if len(value.encode("utf-8", "surrogatepass")) > max_bytes:
        return f"{what} longer than {max_bytes} bytes"
    try:
        _escape_name(value, _KEY_SPECIAL, what)
    except LineProtocolError as e:
        return str(e)
    return None


def string_field_problem(value: str, what: str = "string", max_bytes: int = 1024) -> str | None:
    """Why ``value`` cannot be a string field value (a plan id), or None."""
    if _NEWLINE.search(value):
        return f"{what} {value!r} contains a line break (not allowed in line protocol)"
    if len(value.encode("utf-8", "surrogatepass")) > max_bytes:
        return f"{what} longer than {max_bytes} bytes"
    return None


def series_prefix(measurement: str, tags: Mapping[str, str]) -> str:
    """Escaped ``measurement,k=v,...`` with tags sorted and empty values omitted: the series key."""
    return _series_prefix(measurement, tuple(sorted(tags.items())))


# Pure functions of a few hundred distinct inputs per agent (series, field names): caching
# them doubles encode speed. Errors are not cached, so a bad name raises every time.
@functools.lru_cache(maxsize=16384)
def _series_prefix(measurement: str, tags: tuple[tuple[str, str], ...]) -> str:
    parts = [_measurement(measurement)]
    for k, v in tags:
        if v == "":
            continue
        parts.append(f"{_key(k, 'tag key')}={_tag_value(v)}")
    return ",".join(parts)


@functools.lru_cache(maxsize=4096)
def _field_key(k: str) -> str:
    return _key(k, "field key")


def _fields(fields: Mapping[str, FieldValue]) -> str:
    out: list[str] = []
    for k, v in fields.items():
        if isinstance(v, float):  # the common case first
            if v - v != 0.0:  # inf - inf and nan - nan are nan
                raise LineProtocolError(f"field {k!r}: non-finite float {v!r}")
            out.append(f"{_field_key(k)}={v!r}")  # repr: shortest text that reads back equal
        else:
            out.append(f"{_field_key(k)}={_field_value(k, v)}")
    return ",".join(out)


def encode_parts(point: Point, precision: str = "ns") -> tuple[str, int, str]:
    """``(series_key, timestamp, line)``: the spool keys rows by the first two."""
    try:
        div = PRECISION_DIVISOR[precision]
    except KeyError:
        raise LineProtocolError(f"unknown precision {precision!r}") from None
    if not point.fields:
        raise LineProtocolError(f"point of {point.measurement!r} has no fields (at least one)")
    t = point.time_ns
    if type(t) is not int or not MIN_TIME_NS <= t <= MAX_TIME_NS:
        raise LineProtocolError(f"point of {point.measurement!r}: bad timestamp {t!r}")
    key = series_prefix(point.measurement, point.tags)
    ts = t // div
    return key, ts, f"{key} {_fields(point.fields)} {ts}"


def encode(point: Point, precision: str = "ns") -> str:
    """One line (no trailing newline) for one point."""
    return encode_parts(point, precision)[2]


def encode_many(points: Iterable[Point], precision: str = "ns") -> bytes:
    """A write body: one line per point, UTF-8, newline-separated."""
    return "\n".join(encode(p, precision) for p in points).encode()


# --- decoding -----------------------------------------------------------------------


def _scan_name(line: str, i: int, stops: str, special: frozenset[str]) -> tuple[str, int]:
    """Read an escaped name from ``i`` up to an unescaped char in ``stops``."""
    out: list[str] = []
    n = len(line)
    while i < n:
        c = line[i]
        if c == "\\" and i + 1 < n and line[i + 1] in special:
            out.append(line[i + 1])
            i += 2
            continue
        if c in stops:
            break
        out.append(c)
        i += 1
    return "".join(out), i


def _parse_field_value(raw: str, key: str, line: str) -> FieldValue:
    if raw in ("t", "T", "true", "True", "TRUE"):
        return True
    if raw in ("f", "F", "false", "False", "FALSE"):
        return False
    try:
        if raw.endswith(("i", "u")):
            return int(raw[:-1])
        return float(raw)
    except ValueError:
        raise LineProtocolError(f"field {key!r}: bad value {raw!r} in {line!r}") from None


def decode(line: str, precision: str = "ns") -> Point:
    """Parse one line back into a Point (tags as a dict, time in ns).

    The inverse of :func:`encode`; it also reads ``u`` integers and the
    boolean spellings InfluxDB accepts. A line without a timestamp is refused:
    every point we write carries its own client-side time.
    """
    mult = PRECISION_DIVISOR.get(precision)
    if mult is None:
        raise LineProtocolError(f"unknown precision {precision!r}")
    n = len(line)
    measurement, i = _scan_name(line, 0, ", ", _MEASUREMENT_SPECIAL)
    if not measurement:
        raise LineProtocolError(f"no measurement in {line!r}")
    tags: dict[str, str] = {}
    while i < n and line[i] == ",":
        k, i = _scan_name(line, i + 1, "=, ", _KEY_SPECIAL)
        if i >= n or line[i] != "=" or not k:
            raise LineProtocolError(f"bad tag in {line!r}")
        v, i = _scan_name(line, i + 1, ", ", _KEY_SPECIAL)
        if not v:
            raise LineProtocolError(f"empty tag value for {k!r} in {line!r}")
        tags[k] = v
    if i >= n or line[i] != " ":
        raise LineProtocolError(f"no field set in {line!r}")
    i += 1
    fields: dict[str, FieldValue] = {}
    while True:
        k, i = _scan_name(line, i, "=, ", _KEY_SPECIAL)
        if i >= n or line[i] != "=" or not k:
            raise LineProtocolError(f"bad field in {line!r}")
        i += 1
        if i < n and line[i] == '"':
            i += 1
            buf: list[str] = []
            while True:
                if i >= n:
                    raise LineProtocolError(f"unterminated string field {k!r} in {line!r}")
                c = line[i]
                if c == "\\" and i + 1 < n and line[i + 1] in '"\\':
                    buf.append(line[i + 1])
                    i += 2
                elif c == '"':
                    i += 1
                    break
                else:
                    buf.append(c)
                    i += 1
            fields[k] = "".join(buf)
        else:
            j = i
            while j < n and line[j] not in ", ":
                j += 1
            fields[k] = _parse_field_value(line[i:j], k, line)
            i = j
        if i < n and line[i] == ",":
            i += 1
            continue
        break
    if i >= n or line[i] != " ":
        raise LineProtocolError(f"no timestamp in {line!r}")
    ts = line[i + 1 :].strip()
    try:
        t = int(ts)
    except ValueError:
        raise LineProtocolError(f"bad timestamp {ts!r} in {line!r}") from None
    return Point(measurement, tags, fields, t * mult)


def line_time_ns(line: str) -> int:
    """The timestamp of one of our lines (always its last token, in ns) without a full parse."""
    return int(line.rsplit(" ", 1)[1])


# --- the result of writing a body: shared by both stores and the shipper -----------


class WriteOutcome(enum.Enum):
    """What a write of a line-protocol body came to; the shipper acts on this alone."""

    OK = "ok"  # 2xx: all points stored
    PARTIAL = "partial"  # 400 partial write: some points stored, ``dropped`` were not
    TOO_LARGE = "too_large"  # 413: split the body and retry
    THROTTLED = "throttled"  # 429/503: wait ``retry_after_s`` (if given), keep the data
    UNAVAILABLE = "unavailable"  # 5xx, connection error, timeout: back off, keep the data
    UNAUTHORIZED = "unauthorized"  # 401/403: keep the data, back off, tell the operator
    NO_DATABASE = "no_database"  # 404: database missing and not created
    REJECTED = "rejected"  # other 4xx: the body will never be accepted


@dataclass(frozen=True, slots=True)
class WriteResult:
    outcome: WriteOutcome
    status: int | None = None  # HTTP status; None for transport errors and the embedded store
    message: str = ""  # the server's own words, for the log
    dropped: int | None = None  # PARTIAL: points dropped, when the server said how many
    retry_after_s: float | None = None  # THROTTLED: the server's Retry-After, when sent

    @property
    def ok(self) -> bool:
        return self.outcome is WriteOutcome.OK


class LineSink(Protocol):
    """Something that takes a line-protocol body: InfluxStore, EmbeddedStore."""

    def write_lines(self, body: bytes) -> WriteResult:
        """Write newline-separated lines (ns precision); never raises for a store outage."""
        ...
