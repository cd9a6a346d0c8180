"""EmbeddedStore: InfluxDB's semantics (idempotent overwrite, tag filter) in one SQLite file."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from dcenergy.errors import StoreError
from dcenergy.lineprotocol import WriteOutcome, encode_many
from dcenergy.schema import GPU, FieldValue, Point
from dcenergy.store import EmbeddedStore, InfluxStore, Store, open_store

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
