"""Line protocol: escaping, refusals, and an encode → decode round trip for any point."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dcenergy.lineprotocol import (
    INT64_MAX,
    INT64_MIN,
    LineProtocolError,
    decode,
    encode,
    encode_many,
    encode_parts,
    line_time_ns,
    one_line,
)
from dcenergy.schema import Point


def P(
    m: str = "m",
    tags: dict[str, str] | None = None,
    fields: dict[str, Any] | None = None,
    t: int = 1_700_000_000_000_000_000,
) -> Point:
    return Point(m, dict(tags or {}), dict(fields if fields is not None else {"v": 1.0}), t)


# --- exact encodings -------------------------------------------------------------------


def test_types_are_written_as_influxdb_expects() -> None:
    line = encode(P(fields={"f": 1.5, "i": 3, "b": True, "c": False, "s": "x", "z": 1.0}, t=42))
    assert line == 'm f=1.5,i=3i,b=true,c=false,s="x",z=1.0 42'


def test_tags_are_sorted_and_empty_ones_omitted() -> None:
    line = encode(P(tags={"z": "1", "a": "2", "empty": ""}, t=5))
    assert line == "m,a=2,z=1 v=1.0 5"


def test_special_characters_are_escaped_per_element() -> None:
    p = P(
        m="my meas,x=y",
        tags={"k ey,=": 'v a,l=u"e'},
        fields={"f k,=": 'say "hi" \\ back', "n": 1},
        t=7,
    )
    line = encode(p)
    assert line == (
        'my\\ meas\\,x=y,k\\ ey\\,\\==v\\ a\\,l\\=u"e f\\ k\\,\\=="say \\"hi\\" \\\\ back",n=1i 7'
    )
    assert decode(line) == p


def test_literal_backslash_in_names_is_kept_as_is() -> None:
    p = P(tags={"path": "C:\\dir\\x"})
    line = encode(p)
    assert "path=C:\\dir\\x " in line
    assert decode(line) == p


def test_precision_divides_the_timestamp() -> None:
    assert encode(P(t=1_500_000_123), precision="s").endswith(" 1")
    assert encode(P(t=1_500_000_123), precision="ms").endswith(" 1500")
    assert decode(encode(P(t=3_000_000_000), precision="s"), precision="s").time_ns == 3_000_000_000


def test_encode_many_joins_lines() -> None:
    body = encode_many([P(t=1), P(t=2)])
    assert body == b"m v=1.0 1\nm v=1.0 2"


def test_series_key_is_the_escaped_prefix() -> None:
    key, ts, line = encode_parts(P(tags={"b": "x y", "a": "1"}, t=9))
    assert key == "m,a=1,b=x\\ y"
    assert ts == 9
    assert line.startswith(key + " ")
    assert line_time_ns(line) == 9


def test_unicode_round_trips() -> None:
    p = P(m="mé", tags={"hôst": "☃ snow"}, fields={"s": "日本語 ✓"})
    assert decode(encode(p)) == p


# --- refusals --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("point", "words"),
    [
        (P(fields={}), "no fields"),
        (P(m=""), "empty measurement"),
        (P(m="#x"), "comment"),
        (P(tags={"": "v"}), "empty tag key"),
        (P(fields={"": 1.0}), "empty field key"),
        (P(tags={"time": "v"}), "reserved"),
        (P(fields={"time": 1.0}), "reserved"),
        (P(tags={"t": "a\nb"}), "line break"),
        (P(m="a\rb"), "line break"),
        (P(fields={"s": "two\nlines"}), "one_line"),
        (P(fields={"k\n": 1.0}), "line break"),
        (P(fields={"f": math.nan}), "non-finite"),
        (P(fields={"f": math.inf}), "non-finite"),
        (P(fields={"i": INT64_MAX + 1}), "int64"),
        (P(fields={"i": INT64_MIN - 1}), "int64"),
        (P(tags={"t": "trailing\\"}), "backslash"),
        (P(tags={"t": "a\\,b"}), "backslash"),
        (P(tags={"t": "a\\\\b"}), "backslash"),
        (P(m="a\\ b"), "backslash"),
        (P(fields={"x": [1]}), "unsupported type"),
        (P(t=2**63), "timestamp"),
    ],
)
def test_refuses_what_cannot_be_written(point: Point, words: str) -> None:
    with pytest.raises(LineProtocolError, match=words):
        encode(point)


def test_one_line_makes_free_text_writable() -> None:
    text = one_line("Traceback:\r\n  line 1\n  line 2\r")
    assert "\n" not in text and "\r" not in text
    assert decode(encode(P(fields={"s": text}))).fields["s"] == text


@pytest.mark.parametrize(
    "line",
    ["", "m", "m v=1", "m,t v=1 1", "m v= 1", 'm s="open 1', "m v=abc 1", "m v=1 notatime"],
)
def test_decode_refuses_malformed_lines(line: str) -> None:
    with pytest.raises(LineProtocolError):
        decode(line)


def test_decode_reads_other_spellings() -> None:
    p = decode("m b=T,c=FALSE,u=5u,f=1e+16 10")
    assert p.fields == {"b": True, "c": False, "u": 5, "f": 1e16}


# --- properties ------------------------------------------------------------------------

_plain = st.characters(exclude_categories=["Cs"], exclude_characters="\n\r\\")
# name pieces: ordinary characters, the special ones, and literal backslashes before a letter
_piece = st.one_of(_plain, st.sampled_from([",", " ", "=", '"', "\\a", "\\n", "\\é"]))
_name = st.lists(_piece, min_size=1, max_size=12).map("".join)
_key = _name.filter(lambda s: s != "time")
_measurement = _name.filter(lambda s: not s.startswith("#"))
_field_value = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False),
    st.integers(min_value=INT64_MIN, max_value=INT64_MAX),
    st.booleans(),
    st.text(alphabet=st.characters(exclude_categories=["Cs"], exclude_characters="\n\r")),
)
_points = st.builds(
    Point,
    _measurement,
    st.dictionaries(_key, _name, max_size=4),
    st.dictionaries(_key, _field_value, min_size=1, max_size=5),
    st.integers(min_value=-(2**63) + 2, max_value=2**63 - 2),
)


def _same(a: Point, b: Point) -> None:
    assert a == b
    for k, v in a.fields.items():
        assert type(b.fields[k]) is type(v), k
        if isinstance(v, float):
            assert math.copysign(1, v) == math.copysign(1, float(b.fields[k]))  # -0.0 stays


@settings(max_examples=400)
@given(_points)
def test_round_trip_of_writable_points(p: Point) -> None:
    _same(p, decode(encode(p)))


@settings(max_examples=400)
@given(
    st.text(min_size=1, max_size=10),
    st.text(max_size=10),
    st.text(max_size=10),
)
def test_any_text_round_trips_or_is_refused(name: str, tag_value: str, text: str) -> None:
    """Never a line that reads back different: either an exact round trip or a clear refusal."""
    p = Point(name, {"k": tag_value}, {"s": text, name: 1}, 1)
    try:
        line = encode(p)
    except LineProtocolError:
        return
    expected = Point(name, {"k": tag_value} if tag_value else {}, p.fields, 1)
    _same(expected, decode(line))
