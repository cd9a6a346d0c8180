"""Durations and points in time as people type them on the command line.

* a duration: ``90s``, ``15m``, ``2h``, ``1h30m``, ``1d``, or plain seconds (``600``);
* a point in time (``--until``): a duration from now (``2h``, ``+2h``) or an
  ISO 8601 date and time (``2026-07-01T18:00``, ``2026-07-01 18:00:00Z``,
  ``2026-07-01T18:00+02:00``); without a UTC offset it is local time.

A bad value is a ``ConfigError`` naming the option (exit 78).
"""

from __future__ import annotations

import math
import re
from datetime import datetime

from dcenergy.errors import ConfigError

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_PART = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
DURATION_HELP = "a duration such as 90s, 15m, 2h, 1h30m or 1d"


def parse_duration_s(text: str, option: str) -> float:
    """Seconds in ``text`` (``1h30m``, ``90s``, ``600``); ConfigError naming ``option``."""
    t = text.strip().lower()
    try:
        value = float(t)
    except ValueError:
        pos, value = 0, 0.0
        for m in _PART.finditer(t):
            if m.start() != pos:
                break
            value += float(m.group(1)) * _UNITS[m.group(2)]
            pos = m.end()
        if pos != len(t) or not t:
            raise ConfigError(option, text, DURATION_HELP) from None
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(option, text, DURATION_HELP + " (more than zero)")
    return value


def parse_until_ns(text: str, now_ns: int, option: str = "--until") -> int:
    """The time ``text`` names, in ns since the epoch: a duration from now or ISO 8601."""
    t = text.strip()
    if t[:1] == "+" or re.fullmatch(r"[\d.]+[smhd]?(?:[\d.]+[smhd])*", t.lower()):
        return now_ns + int(parse_duration_s(t.lstrip("+"), option) * 1e9)
    try:
        when = datetime.fromisoformat(t.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise ConfigError(
            option, text, f"{DURATION_HELP} from now, or an ISO 8601 time (2026-07-01T18:00)"
        ) from None
    if when.tzinfo is None:
        when = when.astimezone()  # local time, as people read clocks
    return round(when.timestamp() * 1e9)


def format_duration(seconds: float) -> str:
    """``42`` -> ``42s``, ``725`` -> ``12m05s``, ``900`` -> ``15m``, ``18100`` -> ``5h01m``,
    ``273600`` -> ``3d04h`` (rounded down to the unit shown)."""
    sign = "-" if seconds < 0 else ""
    s = round(abs(seconds))
    if s < 120:
        return f"{sign}{s}s"
    if s < 7200:
        return f"{sign}{s // 60}m" + (f"{s % 60:02d}s" if s % 60 else "")
    if s < 172_800:
        return f"{sign}{s // 3600}h" + (f"{s % 3600 // 60:02d}m" if s % 3600 // 60 else "")
    return f"{sign}{s // 86400}d" + (f"{s % 86400 // 3600:02d}h" if s % 86400 // 3600 else "")
