"""The store protocol's reads checked against raw points, for both stores.

A small pure-Python reference computes every aggregate from the points as
``dcenergy/store/base.py`` defines it (buckets aligned to the epoch, nearest-rank
percentile, median of an even count the mean of the two middle values, first
and last by time, types kept, a missing group-by tag read as ""), and each test
runs on the embedded store and on a real influxd.

Field filters follow InfluxQL as a real influxd 1.6 answers them: a string or a
boolean compares only with ``=`` and ``!=`` to a value of its own type, a
number with any operator to a number (int or float); any other comparison
matches no point.
"""

from __future__ import annotations

import itertools
import math
import operator
import os
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dcenergy.schema import FieldValue, Point
from dcenergy.store import EmbeddedStore, InfluxStore, Store
from dcenergy.store.base import Agg, AggregateQuery, AggRow, FieldFilter, Fn, Op, sort_rows

T0 = 1_700_000_000_000_000_000
STEP = 500_000_000  # points lie on a 0.5 s grid, so series often share a time

_counter = itertools.count()

# --- stores -------------------------------------------------------------------------

StoreFactory = Callable[[], Store]


@pytest.fixture(params=["embedded", pytest.param("influx", marks=pytest.mark.influxdb)])
def new_store(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[StoreFactory]:
    """Makes a fresh, empty store of one kind per call (one per hypothesis example)."""
    made: list[Store] = []
    if request.param == "influx":
        server = request.getfixturevalue("influxd")
        names: list[str] = []

        def make() -> Store:
            name = f"agg{os.getpid()}_{next(_counter)}"
            server.create_database(name)
            names.append(name)
            s = InfluxStore(server.url, name)
            made.append(s)
            return s

        yield make
        for s in made:
            s.close()
        for name in names:
            server.query(f'DROP DATABASE "{name}"')
    else:
        root: Path = tmp_path_factory.mktemp("aggregate")

        def make() -> Store:
            s = EmbeddedStore(root / f"{next(_counter)}.sqlite")
            made.append(s)
            return s

        yield make
        for s in made:
            s.close()


# --- the reference ------------------------------------------------------------------


@dataclass(frozen=True)
class Exact:
    value: FieldValue


@dataclass(frozen=True)
class Close:
    value: float


@dataclass(frozen=True)
class OneOf:
    """first/last: ties between series of one group are broken arbitrarily."""

    values: tuple[FieldValue, ...]


Expect = Exact | Close | OneOf

_OPS: dict[Op, Callable[[Any, Any], bool]] = {
    Op.LT: operator.lt,
    Op.LE: operator.le,
    Op.GT: operator.gt,
    Op.GE: operator.ge,
    Op.EQ: operator.eq,
    Op.NE: operator.ne,
}


def _kind(v: FieldValue) -> str:
    return "str" if isinstance(v, str) else "bool" if isinstance(v, bool) else "number"


def passes(fields: Mapping[str, FieldValue], f: FieldFilter) -> bool:
    if f.field not in fields:
        return False
    v = fields[f.field]
    if _kind(v) != _kind(f.value):
        return False
    if _kind(v) != "number" and f.op not in (Op.EQ, Op.NE):
        return False
    return _OPS[f.op](v, f.value)


def reference_agg(a: Agg, vals: Sequence[tuple[int, FieldValue]]) -> Expect | None:
    """One aggregate of one group's (time, value) pairs, as base.py defines it."""
    xs = [v for _, v in vals]
    n = len(xs)
    if a.fn is Fn.COUNT:
        return Exact(n)
    if a.fn is Fn.MEAN:
        return Close(math.fsum(float(x) for x in xs) / n)
    if a.fn is Fn.SUM:
        if all(isinstance(x, int) for x in xs):
            return Exact(sum(int(x) for x in xs))
        return Close(math.fsum(float(x) for x in xs))
    if a.fn is Fn.MIN:
        return Exact(min(xs))
    if a.fn is Fn.MAX:
        return Exact(max(xs))
    if a.fn in (Fn.FIRST, Fn.LAST):
        edge = min(t for t, _ in vals) if a.fn is Fn.FIRST else max(t for t, _ in vals)
        return OneOf(tuple(v for t, v in vals if t == edge))
    s = sorted(xs)
    if a.fn is Fn.MEDIAN:  # always a float (InfluxDB's median of ints is one)
        if n % 2:
            return Close(float(s[n // 2]))
        return Close((float(s[n // 2 - 1]) + float(s[n // 2])) / 2)
    assert a.q is not None
    i = math.floor(n * a.q / 100 + 0.5) - 1
    return Exact(s[i]) if 0 <= i < n else None


@dataclass(frozen=True)
class Want:
    tags: dict[str, str]
    time_ns: int | None
    values: dict[str, Expect]


def reference(points: Sequence[Point], q: AggregateQuery) -> list[Want]:
    groups: dict[tuple[tuple[str, ...], int | None], list[tuple[int, Mapping[str, FieldValue]]]]
    groups = {}
    every_ns = None if q.every_s is None else round(q.every_s * 1e9)
    for p in points:
        if p.measurement != q.measurement or not q.start_ns <= p.time_ns < q.end_ns:
            continue
        if any(p.tags.get(k, "") != v for k, v in q.tags.items()):
            continue
        if not all(passes(p.fields, f) for f in q.where):
            continue
        key = tuple(p.tags.get(t, "") for t in q.by)
        bucket = None if every_ns is None else p.time_ns - p.time_ns % every_ns
        groups.setdefault((key, bucket), []).append((p.time_ns, p.fields))
    rows = []
    for (key, bucket), pts in groups.items():
        values: dict[str, Expect] = {}
        for a in q.aggs:
            vals = [(t, f[a.field]) for t, f in pts if a.field in f]
            if vals and (e := reference_agg(a, vals)) is not None:
                values[a.alias] = e
        if values:
            rows.append(Want(dict(zip(q.by, key, strict=True)), bucket, values))
    ordered = sort_rows([AggRow(w.tags, w.time_ns, {}) for w in rows], q.by)
    index = {(tuple(w.tags.items()), w.time_ns): w for w in rows}
    return [index[(tuple(r.tags.items()), r.time_ns)] for r in ordered]


def _same(got: FieldValue, want: Expect) -> bool:
    if isinstance(want, Close):
        return type(got) is float and math.isclose(got, want.value, rel_tol=1e-9, abs_tol=1e-12)
    if isinstance(want, OneOf):
        return any(type(got) is type(v) and got == v for v in want.values)
    return type(got) is type(want.value) and got == want.value


def check(got: list[AggRow], want: list[Want], q: AggregateQuery) -> None:
    where = q.describe()
    assert [(dict(r.tags), r.time_ns) for r in got] == [(w.tags, w.time_ns) for w in want], where
    for r, w in zip(got, want, strict=True):
        assert set(r.values) == set(w.values), (where, r, w)
        for alias, expect in w.values.items():
            assert _same(r.values[alias], expect), (
                where,
                r.tags,
                r.time_ns,
                alias,
                r.values,
                expect,
            )


# --- random data and queries -----------------------------------------------------------

# power_w, mem_used_bytes, job_id and lost are declared on ``gpu`` (typed columns in the
# embedded store); x_extra is not (its JSON), and ``custom_m`` is no schema measurement.
FIELD_KINDS: dict[str, type] = {
    "power_w": float,
    "mem_used_bytes": int,
    "job_id": str,
    "lost": bool,
    "x_extra": float,
}
SERIES_TAGS: list[dict[str, str]] = [
    {"host": "a", "gpu": "0"},
    {"host": "a", "gpu": "1"},
    {"host": "b", "gpu": "0"},
    {"host": "b"},
    {"gpu": "1"},
    {},
]
_FLOATS = st.floats(0, 1000, allow_nan=False, allow_infinity=False, allow_subnormal=False)
VALUES: dict[type, st.SearchStrategy[Any]] = {
    float: _FLOATS | st.integers(0, 20).map(float),  # repeated values: ties in the ranks
    int: st.integers(-(10**6), 10**12) | st.integers(0, 5),
    str: st.sampled_from(["", "j1", "j2", 'a b,c="d"']),
    bool: st.booleans(),
}
FNS: dict[type, list[Fn]] = {
    float: list(Fn),
    int: list(Fn),
    str: [Fn.COUNT, Fn.FIRST, Fn.LAST],
    bool: [Fn.COUNT, Fn.FIRST, Fn.LAST, Fn.MIN, Fn.MAX],
}
FILTERS = [
    FieldFilter("power_w", Op.LT, 500.0),
    FieldFilter("power_w", Op.GE, 250.5),
    FieldFilter("power_w", Op.EQ, 7),  # an int against a float field
    FieldFilter("power_w", Op.NE, "x"),  # a string against a number: nothing
    FieldFilter("mem_used_bytes", Op.GT, 0),
    FieldFilter("mem_used_bytes", Op.LE, 1.5),  # a float against an int field
    FieldFilter("job_id", Op.EQ, "j1"),
    FieldFilter("job_id", Op.NE, "j1"),
    FieldFilter("job_id", Op.GT, "a"),  # strings do not order in InfluxQL: nothing
    FieldFilter("lost", Op.EQ, True),
    FieldFilter("lost", Op.NE, True),
    FieldFilter("x_extra", Op.LT, 300.0),
]


@st.composite
def fields(draw: st.DrawFn) -> dict[str, FieldValue]:
    names = draw(st.lists(st.sampled_from(sorted(FIELD_KINDS)), min_size=1, unique=True))
    return {n: draw(VALUES[FIELD_KINDS[n]]) for n in names}


@st.composite
def datasets(draw: st.DrawFn) -> list[Point]:
    """Points of one measurement: one per (series, time), several series per time."""
    measurement = draw(st.sampled_from(["gpu", "custom_m"]))
    raw = draw(
        st.lists(
            st.tuples(st.integers(0, len(SERIES_TAGS) - 1), st.integers(0, 40), fields()),
            max_size=80,
        )
    )
    merged: dict[tuple[int, int], dict[str, FieldValue]] = {}
    for s, t, f in raw:  # the same series and time merge, as both stores do
        merged.setdefault((s, t), {}).update(f)
    return [
        Point(measurement, dict(SERIES_TAGS[s]), f, T0 + t * STEP) for (s, t), f in merged.items()
    ]


_QS = (50.0, 95.0, 99.0, 100.0, 1.0, 25.0, 12.5, 33.3)
ALL_AGGS = [
    Agg(fn, name, q)
    for name, kind in FIELD_KINDS.items()
    for fn in FNS[kind]
    for q in (_QS if fn is Fn.PERCENTILE else (None,))
]


@st.composite
def aggs(draw: st.DrawFn) -> Agg:
    if draw(st.integers(0, 9)):
        return draw(st.sampled_from(ALL_AGGS))
    name = draw(st.sampled_from(["power_w", "mem_used_bytes", "x_extra"]))
    return Agg(Fn.PERCENTILE, name, draw(st.floats(0, 100, exclude_min=True, allow_nan=False)))


@st.composite
def queries(draw: st.DrawFn, measurement: str) -> AggregateQuery:
    """Half the time the whole data, no filter; else a random window, tag and field filters."""
    narrow = draw(st.booleans())
    start, end = -STEP, 41 * STEP
    tags: dict[str, str] = {}
    where: tuple[FieldFilter, ...] = ()
    if narrow:
        start = draw(st.integers(-4, 40)) * STEP - draw(st.sampled_from([0, 0, 1]))
        end = start + draw(st.integers(1, 46)) * STEP + draw(st.sampled_from([0, 0, 1]))
        tags = draw(st.sampled_from([{}, {"host": "a"}, {"gpu": "1"}, {"gpu": ""}, {"host": "b"}]))
        where = tuple(draw(st.lists(st.sampled_from(FILTERS), max_size=2, unique=True)))
    return AggregateQuery(
        measurement,
        tuple(draw(st.lists(aggs(), min_size=1, max_size=4, unique_by=lambda a: a.alias))),
        T0 + start,
        T0 + end,
        by=draw(st.sampled_from([(), ("host",), ("gpu",), ("host", "gpu"), ("gpu", "host")])),
        every_s=draw(st.sampled_from([None, None, 0.5, 1.0, 2.5, 7.0, 60.0])),
        tags=tags,
        where=where,
    )


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_aggregates_match_the_reference(new_store: StoreFactory, data: st.DataObject) -> None:
    points = data.draw(datasets(), label="points")
    store = new_store()
    if points:
        store.write(points)
    measurement = points[0].measurement if points else "gpu"
    for _ in range(5):
        q = data.draw(queries(measurement), label="query")
        check(store.aggregate(q), reference(points, q), q)


def _random_value(rng: random.Random, kind: type) -> FieldValue:
    if kind is float:
        return rng.choice([rng.uniform(0, 1000), float(rng.randint(0, 9))])
    if kind is int:
        return rng.randint(-(10**6), 10**12)
    if kind is str:
        return rng.choice(["", "j1", "j2"])
    return rng.random() < 0.5


@pytest.mark.parametrize("seed", [1, 2])
def test_every_aggregate_on_dense_random_data(new_store: StoreFactory, seed: int) -> None:
    """Every aggregate of every field at once, on many points per group and bucket."""
    rng = random.Random(seed)
    measurement = "gpu" if seed % 2 else "custom_m"
    points = []
    for si, tags in enumerate(SERIES_TAGS):
        for t in range(0, 400, 1 + si % 3):
            f = {n: _random_value(rng, k) for n, k in FIELD_KINDS.items() if rng.random() < 0.8}
            if f:
                points.append(Point(measurement, dict(tags), f, T0 + t * STEP))
    store = new_store()
    store.write(points)
    every_aggs = (
        *ALL_AGGS,
        Agg(Fn.PERCENTILE, "power_w", 37.77),
        Agg(Fn.PERCENTILE, "x_extra", 0.1),
    )
    for by, every_s, where in [
        ((), None, ()),
        (("host", "gpu"), None, ()),
        (("gpu",), 7.0, ()),
        (("host",), 2.5, (FieldFilter("power_w", Op.LT, 500.0),)),
        ((), 60.0, (FieldFilter("job_id", Op.NE, "j1"),)),
    ]:
        q = AggregateQuery(
            points[0].measurement,
            every_aggs,
            T0 - 3 * STEP,
            T0 + 390 * STEP + 1,
            by=by,
            every_s=every_s,
            where=where,
        )
        want = reference(points, q)
        assert want
        check(store.aggregate(q), want, q)


# --- named cases ---------------------------------------------------------------------


def gpu(host: str, idx: int, t_s: float, **fields: FieldValue) -> Point:
    return Point("gpu", {"host": host, "gpu": str(idx)}, fields, T0 + round(t_s * 1e9))


def _run(store: Store, points: list[Point], q: AggregateQuery) -> list[AggRow]:
    store.write(points)
    got = store.aggregate(q)
    check(got, reference(points, q), q)
    return got


def test_buckets_are_aligned_to_the_epoch(new_store: StoreFactory) -> None:
    # T0 is a multiple of 10 s but not of 7 s: the first bucket starts before the window.
    pts = [gpu("a", 0, t, power_w=float(t)) for t in range(0, 30, 2)]
    q = AggregateQuery(
        "gpu",
        (Agg(Fn.MEAN, "power_w"), Agg(Fn.COUNT, "power_w"), Agg(Fn.LAST, "power_w")),
        T0,
        T0 + 30 * 10**9,
        every_s=7,
    )
    got = _run(new_store(), pts, q)
    e = 7 * 10**9
    assert [r.time_ns for r in got] == [T0 - T0 % e + k * e for k in range(5)]
    assert got[0].time_ns is not None and got[0].time_ns < T0


def test_bucket_width_is_not_rounded_to_milliseconds(new_store: StoreFactory) -> None:
    # 1.5 ms buckets, points every 0.5 ms: three per bucket (a 2 ms bucket would hold four)
    pts = [gpu("a", 0, k * 0.0005, power_w=float(k)) for k in range(12)]
    q = AggregateQuery(
        "gpu", (Agg(Fn.COUNT, "power_w"),), T0 - 3 * 10**6, T0 + 6 * 10**6, every_s=0.0015
    )
    got = _run(new_store(), pts, q)
    assert all(r.time_ns is not None and r.time_ns % 1_500_000 == 0 for r in got)


def test_tag_filter_and_group_by_a_tag_some_series_lack(new_store: StoreFactory) -> None:
    pts = [
        gpu("a", 0, 1, power_w=100.0),
        gpu("a", 1, 1, power_w=200.0),
        gpu("b", 0, 1, power_w=300.0),
        Point("gpu", {"host": "a"}, {"power_w": 50.0}, T0 + 10**9),
    ]
    q = AggregateQuery(
        "gpu", (Agg(Fn.SUM, "power_w"),), T0, T0 + 10 * 10**9, by=("gpu",), tags={"host": "a"}
    )
    got = _run(new_store(), pts, q)
    assert [(dict(r.tags), r.values["sum_power_w"]) for r in got] == [
        ({"gpu": ""}, 50.0),
        ({"gpu": "0"}, 100.0),
        ({"gpu": "1"}, 200.0),
    ]


def test_field_filter_idle_median(new_store: StoreFactory) -> None:
    """The optimizer's idle query: median power while util_gpu_pct < 5."""
    pts = [gpu("a", 0, t, power_w=60.0 + t, util_gpu_pct=0.0 if t < 6 else 90.0) for t in range(10)]
    q = AggregateQuery(
        "gpu",
        (Agg(Fn.MEDIAN, "power_w"), Agg(Fn.PERCENTILE, "power_w", 50.0)),
        T0,
        T0 + 10 * 10**9,
        by=("host", "gpu"),
        where=(FieldFilter("util_gpu_pct", Op.LT, 5),),
    )
    (row,) = _run(new_store(), pts, q)
    assert row.values == {"median_power_w": 62.5, "p50_power_w": 62.0}


def test_last_of_a_string_field_and_count_of_an_int_field(new_store: StoreFactory) -> None:
    pts = [
        gpu("a", 0, 1, job_id="j1", mem_used_bytes=2**40),
        gpu("a", 0, 2, job_id="j2"),
        gpu("a", 0, 3, mem_used_bytes=5),
        gpu("a", 0, 4, power_w=1.0),
    ]
    q = AggregateQuery(
        "gpu",
        (
            Agg(Fn.LAST, "job_id"),
            Agg(Fn.FIRST, "job_id"),
            Agg(Fn.COUNT, "mem_used_bytes"),
            Agg(Fn.MAX, "mem_used_bytes"),
        ),
        T0,
        T0 + 10 * 10**9,
    )
    (row,) = _run(new_store(), pts, q)
    assert row.time_ns is None
    assert row.values == {
        "last_job_id": "j2",
        "first_job_id": "j1",
        "count_mem_used_bytes": 2,
        "max_mem_used_bytes": 2**40,
    }
    assert type(row.values["max_mem_used_bytes"]) is int


def test_a_window_with_nothing_is_empty(new_store: StoreFactory) -> None:
    store = new_store()
    store.write([gpu("a", 0, 1, power_w=1.0)])
    q = AggregateQuery("gpu", (Agg(Fn.MEAN, "power_w"),), T0 + 2 * 10**9, T0 + 3 * 10**9)
    assert store.aggregate(q) == []
    q = AggregateQuery("gpu", (Agg(Fn.MEAN, "temp_c"),), T0, T0 + 3 * 10**9)
    assert store.aggregate(q) == []  # points, but none with the field
    q = AggregateQuery("nothing_here", (Agg(Fn.MEAN, "power_w"),), T0, T0 + 3 * 10**9)
    assert store.aggregate(q) == []


def test_percentile_index_falls_outside_for_small_q(new_store: StoreFactory) -> None:
    # floor(n·q/100 + 0.5) - 1 = floor(0.4999998) - 1 = -1 for one value: no p49.99996
    pts = [gpu("a", 0, 1, power_w=5.0, mem_used_bytes=3)]
    q = AggregateQuery(
        "gpu",
        (Agg(Fn.PERCENTILE, "power_w", 49.99996), Agg(Fn.PERCENTILE, "mem_used_bytes", 50.0)),
        T0,
        T0 + 10**9 + 1,
    )
    (row,) = _run(new_store(), pts, q)
    assert row.values == {"p50_mem_used_bytes": 3}


def test_a_lone_percentile_by_a_tag_keeps_every_group(new_store: StoreFactory) -> None:
    # p25 of one value is absent (index -1) for host "" and "b"; host "a" and "c" have one.
    pts = [
        Point("gpu", {}, {"power_w": 1.0}, T0),
        gpu("a", 0, 0, power_w=2.0),
        gpu("a", 0, 1, power_w=3.0),
        gpu("b", 0, 0, power_w=4.0),
        gpu("c", 0, 0, power_w=5.0),
        gpu("c", 0, 1, power_w=6.0),
    ]
    q = AggregateQuery(
        "gpu", (Agg(Fn.PERCENTILE, "power_w", 25.0),), T0, T0 + 10 * 10**9, by=("host",)
    )
    got = _run(new_store(), pts, q)
    assert [(r.tags["host"], r.values["p25_power_w"]) for r in got] == [("a", 2.0), ("c", 5.0)]


def test_newest_point_of_a_series(new_store: StoreFactory) -> None:
    store = new_store()
    future = T0 + 3600 * 10**9
    part = Point("plan_part", {"host": "a"}, {"seq": 3, "plan_id": "p3"}, future)
    store.write(
        [
            Point("plan_part", {"host": "a"}, {"seq": 1, "plan_id": "p1"}, T0),
            part,
            Point("plan_part", {"host": "b"}, {"seq": 9, "plan_id": "p9"}, future + 1),
        ]
    )
    assert store.newest("plan_part", tags={"host": "a"}, start_ns=T0) == part
    assert store.newest("plan_part", tags={"host": "a"}, start_ns=future + 1) is None
    assert store.newest("plan_part", tags={"host": "c"}, start_ns=0) is None
    newest = store.newest("plan_part", tags={}, start_ns=0)
    assert newest is not None and newest.fields["seq"] == 9
