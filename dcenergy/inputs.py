"""The one way to read a JSON input file (problem, topology, plan) and to write an output file.

``read_json`` refuses, as one ``InputError`` naming the file (exit 65), what
``json.loads`` would either crash on or accept silently: a file that is not
UTF-8, a folder, duplicate keys in an object (the last one would win
unseen), integers longer than ``MAX_INT_DIGITS`` digits, ``NaN`` or
``Infinity`` (not JSON), and nesting deeper than the interpreter can follow.

``check_output`` and ``write_output`` turn a ``-o`` path into a missing
folder, or at a folder, into one ``OutputError`` (exit 73) before any work
is done, and again if writing fails.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from dcenergy.errors import InputError, OutputError

MAX_INT_DIGITS = 30  # far beyond any count, watt or ns timestamp (19 digits)


class _Refused(Exception):
    def __init__(self, field: str, problem: str) -> None:
        super().__init__(problem)
        self.field = field
        self.problem = problem


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _Refused("<json>", f"duplicate key {k!r} in one object (which one is meant?)")
        out[k] = v
    return out


def _int(text: str) -> int:
    digits = len(text.lstrip("-"))
    if digits > MAX_INT_DIGITS:
        raise _Refused("<json>", f"an integer with {digits} digits (at most {MAX_INT_DIGITS})")
    return int(text)


def _constant(name: str) -> Any:
    raise _Refused("<json>", f"{name} is not a JSON number")


def parse_json(text: str, source: str, error: type[InputError] = InputError) -> Any:
    """Decode ``text`` strictly; errors (``error``, an InputError) name ``source`` and where."""
    try:
        return json.loads(text, object_pairs_hook=_pairs, parse_int=_int, parse_constant=_constant)
    except _Refused as e:
        raise error(source, e.field, e.problem) from None
    except json.JSONDecodeError as e:
        raise error(
            source, "<json>", f"invalid JSON at line {e.lineno} column {e.colno}: {e.msg}"
        ) from None
    except RecursionError:
        raise error(source, "<json>", "arrays or objects nested too deeply") from None
    except ValueError as e:  # belt and braces: no traceback for any input
        raise error(source, "<json>", f"cannot be decoded: {e}") from None


def read_text(path: Path, error: type[InputError] = InputError) -> str:
    """A UTF-8 input file's text, or one ``error`` (an InputError) saying why not."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise error(str(path), "<file>", "cannot read: no such file") from None
    except IsADirectoryError:
        raise error(str(path), "<file>", "cannot read: it is a folder, not a file") from None
    except OSError as e:
        raise error(str(path), "<file>", f"cannot read: {e.strerror or e}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(str(path), "<file>", f"not UTF-8 text (byte {e.start}: {e.reason})") from None


def read_json(path: str | Path, error: type[InputError] = InputError) -> Any:
    """Read and strictly decode a JSON input file (see the module docstring)."""
    return parse_json(read_text(Path(path), error), str(path), error)


def check_output(path: Path, option: str = "--output") -> None:
    """Refuse, before any work, an output path whose folder is missing or that is a folder."""
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise OutputError(
            f"cannot write {option} {path}: it is a folder",
            hint=f"pass a file name, e.g. {option} {path / 'plan.json'}",
        )
    if not parent.exists():
        raise OutputError(
            f"cannot write {option} {path}: folder {parent} does not exist",
            hint=f"create it (mkdir -p {parent}) or pass another {option}",
        )
    if not parent.is_dir():
        raise OutputError(f"cannot write {option} {path}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write {option} {path}: folder {parent} is not writable")


def write_output(path: Path, text: str, option: str = "--output") -> None:
    """Write ``text`` to ``path`` (UTF-8); any failure is one OutputError."""
    check_output(path, option)
    try:
        path.write_text(text, encoding="utf-8")
    except OSError as e:
        raise OutputError(f"cannot write {option} {path}: {e.strerror or e}") from None
