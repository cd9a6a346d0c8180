"""EmbeddedStore: InfluxDB's semantics (idempotent overwrite, tag filter) in one SQLite file.

Also its columnar layout, type rules, migration from the previous layout, stats.
"""

from __future__ import annotations

import json
import random
import sqlite3
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dcenergy.errors import StoreError
from dcenergy.lineprotocol import WriteOutcome, encode_many, encode_parts
from dcenergy.schema import GPU, FieldValue, Point
from dcenergy.store import EmbeddedStore, InfluxStore, Store, embedded, open_store
from dcenergy.store.base import Agg, AggregateQuery, Fn
from tests.dcenergy.test_store_aggregate import check, reference

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def store(tmp_path: Path) -> Iterator[EmbeddedStore]:
    s = EmbeddedStore(tmp_path / "state" / "dcenergy.sqlite")
    yield s
    s.close()


def gpu(host: str, idx: int, t: int, power_w: float, **extra: FieldValue) -> Point:
    return Point("gpu", {"host": host, "gpu": str(idx)}, {"power_w": power_w, **extra}, t)


def test_is_a_store(store: EmbeddedStore) -> None:
    assert isinstance(store, Store)


def test_types_round_trip(store: EmbeddedStore) -> None:
    p = gpu("a", 0, 10, 1.0, mem_used_bytes=2**62 + 1, lost=False, job_id='j "1" \\ ☃')
    store.write([p])
    (got,) = store.read("gpu", start_ns=0)
    assert got == p
    assert {k: type(v) for k, v in got.fields.items()} == {
        "power_w": float,
        "mem_used_bytes": int,
        "lost": bool,
        "job_id": str,
    }


def test_same_series_and_time_overwrites_and_merges_fields(store: EmbeddedStore) -> None:
    store.write([gpu("a", 0, 10, 100.0, temp_c=50.0)])
    store.write([gpu("a", 0, 10, 200.0)])  # a retry with a new value
    store.write([gpu("a", 0, 10, 200.0)])  # the same retry again
    assert store.count() == 1
    assert store.read("gpu", start_ns=0) == [gpu("a", 0, 10, 200.0, temp_c=50.0)]


def test_different_series_same_time_are_distinct(store: EmbeddedStore) -> None:
    store.write([gpu("a", 0, 10, 1.0), gpu("a", 1, 10, 2.0), gpu("b", 0, 10, 3.0)])
    assert store.count("gpu") == 3


def test_tag_filter_time_window_and_order(store: EmbeddedStore) -> None:
    pts = [gpu(h, i, t, float(t)) for t in (30, 10, 20) for h in ("a", "b") for i in (0, 1)]
    store.write(pts)
    store.write([Point("host", {"host": "a"}, {"cpu_pct": 5.0}, 15)])
    got = store.read("gpu", start_ns=10, end_ns=30, tags={"host": "a", "gpu": "1"})
    assert got == [gpu("a", 1, 10, 10.0), gpu("a", 1, 20, 20.0)]
    assert len(store.read("gpu", start_ns=0, tags={"host": "b"})) == 6
    assert store.read("gpu", start_ns=0, tags={"host": "nobody"}) == []
    assert [p.time_ns for p in store.read("gpu", start_ns=0)] == sorted(p.time_ns for p in pts)
    assert store.read("host", start_ns=0) == [Point("host", {"host": "a"}, {"cpu_pct": 5.0}, 15)]


def test_empty_tag_values_are_dropped(store: EmbeddedStore) -> None:
    store.write([Point("job", {"host": "a", "job_id": ""}, {"throughput": 1.0}, 1)])
    assert store.read("job", start_ns=0) == [Point("job", {"host": "a"}, {"throughput": 1.0}, 1)]


def test_retention_prune(store: EmbeddedStore) -> None:
    store.write([gpu("a", 0, t, 1.0) for t in range(100)])
    assert store.prune(older_than_ns=60) == 60
    assert [p.time_ns for p in store.read("gpu", start_ns=0)] == list(range(60, 100))
    assert store.prune(older_than_ns=60) == 0


def test_invalid_point_refuses_the_write(store: EmbeddedStore) -> None:
    with pytest.raises(StoreError, match="no fields"):
        store.write([gpu("a", 0, 1, 1.0), Point("gpu", {}, {}, 2)])
    assert store.count() == 0


def test_write_lines_keeps_good_lines_and_counts_bad(store: EmbeddedStore) -> None:
    body = encode_many([gpu("a", 0, 1, 1.0), gpu("a", 0, 2, 2.0)]) + b"\ngpu v=oops 3\n"
    r = store.write_lines(body)
    assert (r.outcome, r.dropped) == (WriteOutcome.PARTIAL, 1)
    assert store.count() == 2
    assert store.write_lines(encode_many([gpu("a", 0, 3, 3.0)])).outcome is WriteOutcome.OK


def test_reopen_keeps_data(tmp_path: Path) -> None:
    path = tmp_path / "e.sqlite"
    s = EmbeddedStore(path)
    s.write([gpu("a", 0, 1, 1.0)])
    s.close()
    s = EmbeddedStore(path)
    assert s.count() == 1
    s.close()


_WRITER = textwrap.dedent(
    """
    import sys
    from dcenergy.schema import Point
    from dcenergy.store import EmbeddedStore
    path, host = sys.argv[1], sys.argv[2]
    s = EmbeddedStore(path)
    for batch in range(40):
        s.write([Point("gpu", {"host": host, "gpu": str(i)}, {"power_w": 1.0}, batch)
                 for i in range(8)])
    s.close()
    """
)


def test_two_processes_write_at_once(tmp_path: Path) -> None:
    path = tmp_path / "shared.sqlite"
    procs = [
        subprocess.Popen([sys.executable, "-c", _WRITER, str(path), host], cwd=REPO)
        for host in ("node-a", "node-b", "node-c")
    ]
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0]
    s = EmbeddedStore(path)
    try:
        assert s.count("gpu") == 3 * 40 * 8
        assert len(s.read("gpu", start_ns=0, tags={"host": "node-b"})) == 40 * 8
    finally:
        s.close()


def test_open_store_picks_the_implementation(tmp_path: Path) -> None:
    s = open_store(None, "db", embedded_path=tmp_path / "x.sqlite")
    assert isinstance(s, EmbeddedStore)
    s.close()
    s = open_store("", "db", embedded_path=tmp_path / "x.sqlite")
    assert isinstance(s, EmbeddedStore)
    s.close()
    s = open_store("http://127.0.0.1:1", "db", embedded_path=tmp_path / "x.sqlite", token="t")
    assert isinstance(s, InfluxStore) and s.database == "db"
    s.close()


def test_every_gpu_field_kind_is_accepted(store: EmbeddedStore) -> None:
    samples: dict[type, FieldValue] = {float: 1.5, int: 3, bool: True, str: "x"}
    p = Point("gpu", {"host": "a"}, {f.name: samples[f.kind] for f in GPU.fields}, 1)
    store.write([p])
    assert store.read("gpu", start_ns=0) == [p]


# --- the columnar layout ----------------------------------------------------------


def _sql(path: Path, q: str, args: tuple[object, ...] = ()) -> list[tuple[Any, ...]]:
    db = sqlite3.connect(path)
    try:
        return db.execute(q, args).fetchall()
    finally:
        db.close()


def test_layout_series_once_fields_in_typed_columns(store: EmbeddedStore) -> None:
    store.write([gpu("a", 0, t, 100.5, mem_used_bytes=7, lost=False) for t in range(3)])
    store.write([gpu("a", 1, 1, 5.0, job_id="j", x_undeclared=1.5)])
    assert _sql(store.path, "SELECT key, tags FROM series ORDER BY key") == [
        ("gpu,gpu=0,host=a", '{"gpu":"0","host":"a"}'),
        ("gpu,gpu=1,host=a", '{"gpu":"1","host":"a"}'),
    ]
    rows = _sql(
        store.path,
        "SELECT typeof(power_w), typeof(mem_used_bytes), lost, typeof(temp_c), job_id, extra "
        "FROM m_gpu ORDER BY series_id, time_ns",
    )
    assert rows[0] == ("real", "integer", 0, "null", None, None)
    assert rows[3] == ("real", "null", None, "null", "j", '{"x_undeclared":1.5}')
    assert _sql(store.path, "SELECT count(*) FROM sqlite_master WHERE name = 'points'") == [(0,)]


def _gpu_sample(rng: random.Random, host: int, idx: int, t: int) -> Point:
    """A schema-true GPU point: every field, integral where NVML's readings are."""
    fields: dict[str, FieldValue] = {}
    for f in GPU.fields:
        if f.kind is float:
            whole = f.name.startswith(("power_limit", "sm_clock", "mem_clock")) or "viol" in f.name
            fields[f.name] = float(rng.choice([200, 700])) if whole else rng.uniform(0, 700)
        elif f.kind is int:
            fields[f.name] = rng.choice([0, 1, 85899345920, rng.randrange(2**35)])
        elif f.kind is bool:
            fields[f.name] = False
        else:
            fields[f.name] = "00000000:18:00.0" if f.name == "pci_bus_id" else f"job-{host}"
    tags = {"host": f"node-{host}", "gpu": str(idx), "gpu_uuid": f"GPU-{host}-{idx}-0000"}
    return Point("gpu", tags, fields, 1_700_000_000_000_000_000 + t * 10**9)


def _file_bytes(path: Path) -> int:
    _sql(path, "PRAGMA wal_checkpoint(TRUNCATE)")
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))


def test_a_point_takes_far_fewer_bytes_than_in_the_old_layout(tmp_path: Path) -> None:
    rng = random.Random(0)
    points = [_gpu_sample(rng, h, i, t) for t in range(150) for h in range(4) for i in range(8)]
    new = EmbeddedStore(tmp_path / "new" / "s.sqlite")
    for k in range(0, len(points), 320):
        new.write(points[k : k + 320])
    new.close()
    old_path = tmp_path / "old.sqlite"
    db = sqlite3.connect(old_path)
    db.executescript(_OLD_SCHEMA)
    db.executemany("INSERT INTO points VALUES (?, ?, ?, ?, ?)", [_old_row(p) for p in points])
    db.commit()
    db.close()
    per_point_new = _file_bytes(new.path) / len(points)
    per_point_old = _file_bytes(old_path) / len(points)
    assert per_point_new * 4 < per_point_old, (per_point_new, per_point_old)
    # every field random here: about 8 bytes a value and a header byte a column (a real
    # sample, integral readings and absent fields, is far smaller; see the module docstring)
    assert per_point_new < 9 * len(GPU.fields), per_point_new


def test_an_int_for_a_float_field_is_widened(store: EmbeddedStore) -> None:
    store.write([Point("gpu", {"host": "a"}, {"power_w": 5, "util_gpu_pct": 0}, 1)])
    assert store.write_lines(b"gpu,host=a power_w=7i 2").ok
    got = store.read("gpu", start_ns=0)
    assert [p.fields for p in got] == [{"power_w": 5.0, "util_gpu_pct": 0.0}, {"power_w": 7.0}]
    assert all(type(v) is float for p in got for v in p.fields.values())
    q = AggregateQuery("gpu", (Agg(Fn.MAX, "power_w"),), 0, 10)
    (row,) = store.aggregate(q)
    assert row.values == {"max_power_w": 7.0} and type(row.values["max_power_w"]) is float


def test_other_wrong_types_are_kept_as_written_and_not_aggregated(store: EmbeddedStore) -> None:
    odd: dict[str, FieldValue] = {
        "temp_c": "hot",  # a string for a float field
        "mem_used_bytes": 1.5,  # a float for an int field
        "lost": 1,  # an int for a bool field
        "pstate": True,  # a bool for an int field
        "job_id": 3,  # an int for a string field
        "energy_j": 2**60 + 1,  # an int a float cannot hold
    }
    store.write([gpu("a", 0, 1, 1.0, **odd), gpu("a", 0, 2, 2.0, temp_c=40.0)])
    got = store.read("gpu", start_ns=0)
    assert got == [gpu("a", 0, 1, 1.0, **odd), gpu("a", 0, 2, 2.0, temp_c=40.0)]
    assert {k: type(v) for k, v in got[0].fields.items()} == {
        "power_w": float,
        **{k: type(v) for k, v in odd.items()},
    }
    assert _sql(store.path, "SELECT temp_c, mem_used_bytes, lost, pstate, job_id FROM m_gpu") == [
        (None, None, None, None, None),
        (40.0, None, None, None, None),
    ]
    q = AggregateQuery(
        "gpu",
        (Agg(Fn.COUNT, "temp_c"), Agg(Fn.MEAN, "temp_c"), Agg(Fn.COUNT, "energy_j")),
        0,
        10,
    )
    assert [r.values for r in store.aggregate(q)] == [{"count_temp_c": 1, "mean_temp_c": 40.0}]


def test_undeclared_fields_and_measurements_round_trip_and_merge(store: EmbeddedStore) -> None:
    extra: dict[str, FieldValue] = {"x_f": 1.0, "x_i": 2**62, "x_b": True, 'x s,="\\y': "☃"}
    store.write([gpu("a", 0, 1, 1.0, **extra)])
    store.write([gpu("a", 0, 1, 2.0, x_i=-1, x_new="n")])
    (p,) = store.read("gpu", start_ns=0)
    assert p == gpu("a", 0, 1, 2.0, **{**extra, "x_i": -1, "x_new": "n"})
    assert {k: type(v) for k, v in p.fields.items() if k.startswith("x")} == {
        "x_f": float,
        "x_i": int,
        "x_b": bool,
        'x s,="\\y': str,
        "x_new": str,
    }
    other = Point("custom", {"k": "v"}, {"a": 1.0, "b": 2}, 5)
    store.write([other, Point("custom", {"k": "v"}, {"b": 3, "c": False}, 5)])
    assert store.read("custom", start_ns=0) == [
        Point("custom", {"k": "v"}, {"a": 1.0, "b": 3, "c": False}, 5)
    ]
    assert store.count("custom") == 1 and store.count() == 2
    q = AggregateQuery("custom", (Agg(Fn.MAX, "b"), Agg(Fn.LAST, "c")), 0, 10)
    assert [r.values for r in store.aggregate(q)] == [{"max_b": 3, "last_c": False}]
    q = AggregateQuery("gpu", (Agg(Fn.LAST, 'x s,="\\y'), Agg(Fn.LAST, "x_b")), 0, 10)
    assert [r.values for r in store.aggregate(q)] == [{'last_x s,="\\y': "☃", "last_x_b": True}]


def test_aggregate_refuses_what_influxql_refuses(store: EmbeddedStore) -> None:
    store.write([gpu("a", 0, 1, 1.0, job_id="j", lost=True)])
    for a in (Agg(Fn.MEAN, "job_id"), Agg(Fn.MAX, "job_id"), Agg(Fn.SUM, "lost")):
        with pytest.raises(StoreError, match="not supported"):
            store.aggregate(AggregateQuery("gpu", (a,), 0, 10))
    q = AggregateQuery("gpu", (Agg(Fn.MAX, "lost"), Agg(Fn.COUNT, "job_id")), 0, 10)
    assert [r.values for r in store.aggregate(q)] == [{"max_lost": True, "count_job_id": 1}]


def test_reads_are_counted_in_stats(store: EmbeddedStore) -> None:
    store.write([gpu("a", 0, t * 10**9, 1.0) for t in range(5)])
    store.read("gpu", start_ns=0)
    store.newest("gpu", tags={"host": "a"}, start_ns=0)
    store.aggregate(
        AggregateQuery("gpu", (Agg(Fn.MEAN, "power_w"),), 0, 10**10, every_s=2, by=("host",))
    )
    st = store.stats
    assert (st.queries, st.rows, st.bytes) == (3, 5 + 1 + 3, 0)
    assert st.seconds > 0


def test_newest_reads_one_row_per_series_through_the_key(store: EmbeddedStore) -> None:
    store.write([gpu(h, i, t, float(t)) for t in range(0, 1000, 10) for h in "ab" for i in (0, 1)])
    assert store.newest("gpu", tags={"host": "b", "gpu": "1"}, start_ns=0) == gpu(
        "b", 1, 990, 990.0
    )
    assert store.newest("gpu", tags={"host": "b"}, start_ns=995) is None
    assert store.newest("gpu", tags={"host": "c"}, start_ns=0) is None
    got = store.newest("gpu", tags={}, start_ns=0)
    assert got is not None and got.time_ns == 990


def test_prune_covers_every_table(store: EmbeddedStore) -> None:
    store.write([gpu("a", 0, t, 1.0) for t in range(10)])
    store.write([Point("custom", {}, {"v": 1.0}, t) for t in range(10)])
    store.write([Point("host", {"host": "a"}, {"cpu_pct": 1.0}, t) for t in range(10)])
    assert store.prune(older_than_ns=4) == 12
    assert store.count() == 18
    assert [p.time_ns for p in store.read("custom", start_ns=0)] == list(range(4, 10))


def test_threads_write_and_read_at_once(store: EmbeddedStore) -> None:
    def work(i: int) -> None:
        for t in range(50):
            store.write([gpu(f"h{i}", 0, t, float(t))])
            store.aggregate(
                AggregateQuery("gpu", (Agg(Fn.COUNT, "power_w"),), 0, 100, by=("host",))
            )

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    q = AggregateQuery("gpu", (Agg(Fn.COUNT, "power_w"),), 0, 100, by=("host",))
    assert [r.values["count_power_w"] for r in store.aggregate(q)] == [50] * 4


def test_a_field_new_to_the_schema_becomes_a_column(tmp_path: Path) -> None:
    path = tmp_path / "old-schema.sqlite"
    EmbeddedStore(path).close()
    _sql(path, 'ALTER TABLE m_host DROP COLUMN "dram_power_w"')  # as a file from before it
    s = EmbeddedStore(path)
    try:
        p = Point("host", {"host": "a"}, {"dram_power_w": 12.5}, 1)
        s.write([p])
        assert s.read("host", start_ns=0) == [p]
        assert _sql(path, "SELECT dram_power_w, extra FROM m_host") == [(12.5, None)]
    finally:
        s.close()


# --- migration from the previous layout -----------------------------------------------

_OLD_SCHEMA = """
CREATE TABLE points (
    series_key  TEXT    NOT NULL,
    time_ns     INTEGER NOT NULL,
    measurement TEXT    NOT NULL,
    tags        TEXT    NOT NULL,
    fields      TEXT    NOT NULL,
    PRIMARY KEY (series_key, time_ns)
) WITHOUT ROWID;
CREATE INDEX points_by_measurement_time ON points (measurement, time_ns);
CREATE INDEX points_by_time ON points (time_ns);
"""


def _old_row(p: Point) -> tuple[str, int, str, str, str]:
    """A point as the previous layout stored it (its own key: encode_parts' series key)."""
    key = encode_parts(p)[0]
    return (key, p.time_ns, p.measurement, json.dumps(dict(p.tags)), json.dumps(dict(p.fields)))


def test_a_file_in_the_old_layout_is_migrated_on_open(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    old_points = [
        gpu("a", 0, 1, 100.0, job_id="j1", mem_used_bytes=2**40, lost=False),
        gpu("a", 0, 2, 110.0, x_undeclared="u"),
        gpu("b", 1, 2, 5.5),
        Point("gpu", {"host": "a", "gpu": "0"}, {"power_w": 120.0, "temp_c": "40"}, 3),
        Point("custom", {"k": "v"}, {"a": 1.0}, 4),
        Point("host", {"host": "a"}, {"cpu_pct": 3.0}, 5),
    ]
    db = sqlite3.connect(path)
    db.executescript(_OLD_SCHEMA)
    db.executemany("INSERT INTO points VALUES (?, ?, ?, ?, ?)", [_old_row(p) for p in old_points])
    db.commit()
    db.close()

    s = EmbeddedStore(path)
    try:
        assert s.count() == len(old_points)
        got = [p for m in ("gpu", "custom", "host") for p in s.read(m, start_ns=0)]
        assert sorted(got, key=lambda p: (p.time_ns, p.series_key())) == sorted(
            old_points, key=lambda p: (p.time_ns, p.series_key())
        )
        # a legacy string temp_c is kept (in extra, read back as written), not aggregated
        (legacy,) = s.read("gpu", start_ns=3, end_ns=4)
        assert legacy.fields == {"power_w": 120.0, "temp_c": "40"}
        q = AggregateQuery("gpu", (Agg(Fn.COUNT, "power_w"), Agg(Fn.COUNT, "temp_c")), 0, 10)
        assert [r.values for r in s.aggregate(q)] == [{"count_power_w": 4}]
        s.write([gpu("a", 0, 9, 1.0)])  # the migrated series keep their ids
        assert s.count("gpu") == 5
        assert len(_sql(path, "SELECT * FROM series")) == 4
    finally:
        s.close()
    names = {r[0] for r in _sql(path, "SELECT name FROM sqlite_master")}
    assert "points" not in names and "points_by_time" not in names
    s = EmbeddedStore(path)  # a second open finds nothing to migrate
    assert s.count() == len(old_points) + 1
    s.close()


@pytest.mark.parametrize("short_list", [True, False], ids=["rank-list", "counted-partitions"])
def test_median_and_percentiles_by_either_window_pass(
    store: EmbeddedStore, monkeypatch: pytest.MonkeyPatch, short_list: bool
) -> None:
    """Both ways of picking ranks (a short list of ranks, or each partition counted)."""
    if not short_list:
        monkeypatch.setattr(embedded, "_RANK_LIST_MAX", 0)
    rng = random.Random(3)
    points = [
        gpu(f"h{h}", i, t * 10**8, rng.choice([rng.uniform(0, 100), 5.0]), mem_used_bytes=t % 7)
        for h in range(3)
        for i in range(2)
        for t in range(rng.randrange(1, 60))
    ]
    store.write(points)
    aggs = (
        Agg(Fn.MEDIAN, "power_w"),
        Agg(Fn.PERCENTILE, "power_w", 90.0),
        Agg(Fn.PERCENTILE, "power_w", 3.0),
        Agg(Fn.MEDIAN, "mem_used_bytes"),
        Agg(Fn.PERCENTILE, "mem_used_bytes", 50.0),
    )
    for by, every_s in (((), None), (("host",), None), (("host", "gpu"), 0.7), ((), 1.3)):
        q = AggregateQuery("gpu", aggs, 0, 6 * 10**9, by=by, every_s=every_s)
        want = reference(points, q)
        assert want
        check(store.aggregate(q), want, q)
