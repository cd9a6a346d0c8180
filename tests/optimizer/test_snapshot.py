"""Telemetry window → problem document (optimizer/snapshot.py) on a store the test fills."""

from __future__ import annotations

from pathlib import Path

import pytest

from dcenergy import schema
from dcenergy.store.embedded import EmbeddedStore
from optimizer.problem import parse_problem
from optimizer.snapshot import EmptyWindow, bucket_s, build_problem
from optimizer.topology import single_domain

S = 1_000_000_000
NOW = 10_000 * S


def gpu(
    host: str, uuid: str, t: int, *, power: float, util: float, job: str = "", lost: bool = False
) -> schema.Point:
    tags = {"host": host, "gpu": uuid[-1], "gpu_uuid": uuid, "model": "NVIDIA H100 80GB HBM3"}
    if lost:
        return schema.point(schema.GPU, tags, {"lost": True}, t)
    fields = {
        "power_w": power,
        "util_gpu_pct": util,
        "power_limit_w": 700.0,
        "power_limit_min_w": 200.0,
        "power_limit_max_w": 700.0,
        "power_limit_default_w": 700.0,
        "job_id": job,
    }
    return schema.point(schema.GPU, tags, fields, t)


def job(
    host: str, job_id: str, uuids: str, t: int, *, cap: float, thr: float, power: float
) -> schema.Point:
    fields = {
        "throughput": thr,
        "throughput_unit": "samples",
        "power_limit_w": cap,
        "power_w": power,
        "gpu_uuids": uuids,
        "gpu_count": len(uuids.split(",")),
    }
    return schema.point(schema.JOB, {"host": host, "job_id": job_id}, fields, t)


@pytest.fixture
def store(tmp_path: Path) -> EmbeddedStore:
    s = EmbeddedStore(tmp_path / "s.sqlite")
    pts = []
    for i in range(10):
        t = NOW - (60 - i) * S
        cap = 700.0 if i < 5 else 500.0
        pts += [
            gpu("a", "GPU-a0", t, power=650, util=95, job="j1"),
            gpu("b", "GPU-b0", t, power=640, util=95, job="j1"),
            gpu("b", "GPU-b1", t, power=60 + i, util=0),
            gpu("b", "GPU-b2", t, power=0, util=0, lost=True),
            # one job on two hosts: each host reports its share
            job("a", "j1", "GPU-a0", t, cap=cap, thr=100.0 if cap == 700 else 90.0, power=650),
            job("b", "j1", "GPU-b0", t, cap=cap, thr=100.0 if cap == 700 else 90.0, power=640),
        ]
    s.write(pts)
    return s


def doc(store: EmbeddedStore) -> dict:  # type: ignore[type-arg]
    return build_problem(
        store,
        single_domain(5000),
        now_ns=NOW,
        window_s=600,
        objective={"kind": "budget"},
        allowed_slowdown=0.1,
    )


def test_gpus_from_the_window_lost_ones_left_out(store: EmbeddedStore) -> None:
    d = doc(store)
    assert [g["id"] for g in d["gpus"]] == ["GPU-a0", "GPU-b0", "GPU-b1"]
    b1 = d["gpus"][2]
    assert b1["idle_w"] == pytest.approx(64.5)  # median of its idle samples
    assert d["gpus"][0]["idle_w"] == 70.0  # no idle sample: the H100 family figure
    assert all(g["domains"] == ["fleet"] for g in d["gpus"])
    parse_problem(d)  # the document is a valid problem


def test_a_job_on_two_hosts_is_one_job_with_summed_throughput_per_cap(
    store: EmbeddedStore,
) -> None:
    (j1,) = doc(store)["jobs"]
    assert j1["gpus"] == ["GPU-a0", "GPU-b0"]
    assert j1["synchronous"] is True
    assert [(s["cap_w"], s["throughput"]) for s in j1["samples"]] == [
        (500.0, 180.0),
        (700.0, 200.0),
    ]


def test_an_empty_window_says_so(tmp_path: Path) -> None:
    with pytest.raises(EmptyWindow, match="no GPU telemetry"):
        doc(EmbeddedStore(tmp_path / "empty.sqlite"))


def test_a_cap_with_many_readings_gives_replicate_samples_in_time_order(tmp_path: Path) -> None:
    """Consecutive runs of readings at one cap become separate samples, so the
    fit sees their spread as pure error (one mean per cap would hide it).

    The store answers time-bucketed means (15 s buckets for a 600 s window);
    runs are made of whole buckets with about equal numbers of readings.
    """
    s = EmbeddedStore(tmp_path / "r.sqlite")
    every = int(bucket_s(600) * S)
    base = (NOW - 590 * S) // every * every + every  # the first whole bucket in the window
    pts = []
    for i in range(13):  # 13 buckets of one reading at 500 W: runs of 4, 5, 4
        t = base + i * every
        pts += [
            gpu("a", "GPU-a0", t, power=500, util=95, job="j1"),
            job("a", "j1", "GPU-a0", t, cap=500.0, thr=float(i), power=499.0),
        ]
    for i in range(3):  # too few at 700 W for more than one
        t = base + (13 + i) * every
        pts.append(job("a", "j1", "GPU-a0", t, cap=700.0, thr=20.0 + i, power=650.0))
    s.write(pts)
    (j1,) = doc(s)["jobs"]
    assert [(x["cap_w"], x["throughput"]) for x in j1["samples"]] == [
        (500.0, 1.5),  # mean of 0..3
        (500.0, 6.0),  # 4..8
        (500.0, 10.5),  # 9..12
        (700.0, 21.0),
    ]


def test_a_bucket_whose_cap_moved_is_left_out(tmp_path: Path) -> None:
    """Readings of a bucket in which the reconciler moved the cap mix two caps."""
    s = EmbeddedStore(tmp_path / "m.sqlite")
    every = int(bucket_s(600) * S)
    base = (NOW - 590 * S) // every * every + every
    pts = [gpu("a", "GPU-a0", base, power=500, util=95, job="j1")]
    for i in range(12):  # one bucket at 700 W, one mixed (700 then 400), one at 400 W
        cap = 700.0 if i < 6 else 400.0
        t = base + i * every // 4
        pts.append(job("a", "j1", "GPU-a0", t, cap=cap, thr=cap / 10, power=cap - 10))
    s.write(pts)
    (j1,) = doc(s)["jobs"]
    assert [(x["cap_w"], x["throughput"]) for x in j1["samples"]] == [(400.0, 40.0), (700.0, 70.0)]
