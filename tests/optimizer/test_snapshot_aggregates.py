"""The snapshot from store aggregates equals the snapshot from raw points, on the demo fleet.

The demo's simulated fleet (4 nodes × 8 GPUs, real agent code) runs 5 minutes
at default caps and 5 at 70 % of max; both stores then answer the same
window. The reference (``raw_snapshot.py``) reads every raw row, as the
product did before it read aggregates. Stated tolerances:

* GPUs: the same set; limits exact; mean power within 1e-9 relative; idle
  power exact (the same median).
* Jobs: the same caps; per cap the reading-weighted throughput within 1 %
  and the draw within 2 % (the aggregate reader leaves out the one bucket
  per job where the cap changed mid-bucket); the same number of replicate
  samples per cap.
* Noise (``test_the_fits_see_the_same_noise``, jobs with 3 % reading noise at
  1 s, since the simulated workloads have none): the replicates' pooled
  pure-error SD within a factor 1.25 of the reference's (about three
  standard errors at its 80 degrees of freedom): the fits' noise estimate
  does not get worse.
"""

from __future__ import annotations

import math
import random
import statistics
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.simfleet import SimFleet
from dcenergy import schema
from dcenergy.store.base import Store
from dcenergy.store.embedded import EmbeddedStore
from dcenergy.store.influx import InfluxStore
from optimizer.snapshot import build_problem
from optimizer.topology import single_domain
from tests.influx_server import InfluxServer
from tests.optimizer import raw_snapshot

WINDOW_S = 600.0
S = 1_000_000_000


@pytest.fixture(params=["embedded", "influxdb"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Store, int]]:
    s = _open(request.param, request, tmp_path)
    with SimFleet(4, 8, store=s, state_root=tmp_path / "agents", seed=3, step_s=5.0) as fleet:
        fleet.run(WINDOW_S / 2)
        fleet.set_power_limits(0.7)
        fleet.run(WINDOW_S / 2)
        assert fleet.flush() == 0
        yield s, fleet.now_ns
    s.close()


def _open(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    if kind == "embedded":
        return EmbeddedStore(tmp_path / "store.sqlite")
    server: InfluxServer = request.getfixturevalue("influxd")
    return InfluxStore(server.url, request.getfixturevalue("influx_db"))


def _pooled_ss(samples: dict[float, list[float]]) -> tuple[float, int]:
    ss, df = 0.0, 0
    for vals in samples.values():
        if len(vals) > 1:
            m = statistics.fmean(vals)
            ss += sum((v - m) ** 2 for v in vals)
            df += len(vals) - 1
    return ss, df


def test_aggregates_reproduce_the_raw_snapshot(store: tuple[Store, int]) -> None:
    s, now_ns = store
    doc = build_problem(
        s,
        single_domain(100_000),
        now_ns=now_ns,
        window_s=WINDOW_S,
        objective={"kind": "budget"},
        allowed_slowdown=0.1,
    )
    start, end = now_ns - int(WINDOW_S * 1e9), now_ns + 1
    raw_gpus = raw_snapshot.gpu_summaries(s, start, end)
    assert [g["id"] for g in doc["gpus"]] == sorted(raw_gpus)
    for g in doc["gpus"]:
        want = raw_gpus[g["id"]]
        assert (g["host"], g["min_w"], g["max_w"], g["default_w"]) == (
            want["host"],
            want["min_w"],
            want["max_w"],
            want["default_w"],
        )
        assert g["current_w"] == pytest.approx(want["current_w"], rel=1e-9, abs=0.006)
        if want["idle_w"] is not None:
            assert g["idle_w"] == pytest.approx(min(want["idle_w"], want["max_w"]), rel=1e-12)

    raw_jobs = raw_snapshot.job_samples(s, start, end)
    jobs = {j["id"]: j for j in doc["jobs"]}
    assert set(jobs) == {j for j, v in raw_jobs.items() if v}
    for job_id, j in jobs.items():
        ours: dict[float, list[dict[str, float]]] = defaultdict(list)
        ref: dict[float, list[dict[str, float]]] = defaultdict(list)
        for x in j["samples"]:
            ours[x["cap_w"]].append(x)
        for x in raw_jobs[job_id]:
            ref[x["cap_w"]].append(x)
        assert sorted(ours) == sorted(ref), job_id
        for cap, runs in ours.items():
            want_thr = sum(r["throughput"] * r["readings"] for r in ref[cap]) / sum(
                r["readings"] for r in ref[cap]
            )
            got_thr = statistics.fmean(r["throughput"] for r in runs)
            assert got_thr == pytest.approx(want_thr, rel=0.01), (job_id, cap)
            assert max(r["power_w"] for r in runs) == pytest.approx(
                max(r["power_w"] for r in ref[cap]), rel=0.02
            ), (job_id, cap)
            assert len(runs) == len(ref[cap]), (job_id, cap)


@pytest.mark.parametrize("kind", ["embedded", "influxdb"])
def test_the_fits_see_the_same_noise(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    rng = random.Random(7)
    s = _open(kind, request, tmp_path)
    t0 = 1_700_000_003 * S  # not on a bucket boundary
    pts = []
    for k in range(20):
        hosts = ["a", "b"] if k % 4 == 0 else ["a"]  # some jobs span two hosts
        for i in range(600):
            cap = 700.0 if i < 300 else 450.0
            rate = (100.0 if cap == 700 else 85.0) * (1 + 0.03 * rng.gauss(0, 1))
            for h in hosts:
                fields = {
                    "throughput": rate / len(hosts),
                    "throughput_unit": "samples",
                    "power_limit_w": cap,
                    "power_w": min(cap, 650.0) * (1 + 0.01 * rng.gauss(0, 1)),
                    "gpu_uuids": f"GPU-{k}-{h}",
                }
                pts.append(
                    schema.point(schema.JOB, {"host": h, "job_id": f"j{k}"}, fields, t0 + i * S)
                )
    s.write(pts)
    now = t0 + 600 * S
    ours = _job_runs(_problem_jobs(s, now))
    ref = {
        j: {c: [x["throughput"] for x in v if x["cap_w"] == c] for c in {x["cap_w"] for x in v}}
        for j, v in raw_snapshot.job_samples(s, now - int(WINDOW_S * 1e9), now + 1).items()
    }
    ss_agg, df_agg = _sum_ss(ours)
    ss_raw, df_raw = _sum_ss(ref)
    assert df_agg == df_raw == 20 * 2 * 2
    ratio = math.sqrt(ss_agg / df_agg) / math.sqrt(ss_raw / df_raw)
    print(f"pure-error SD, aggregates / raw: {ratio:.3f}")
    assert 1 / 1.25 <= ratio <= 1.25, ratio
    for j, caps in ours.items():  # means per cap within their standard error
        for c, vals in caps.items():
            assert statistics.fmean(vals) == pytest.approx(statistics.fmean(ref[j][c]), rel=0.005)
    s.close()


def _problem_jobs(s: Store, now_ns: int) -> list[dict[str, Any]]:
    gpu_pts = [
        schema.point(
            schema.GPU,
            {"host": "a", "gpu": "0", "gpu_uuid": f"GPU-{k}-{h}", "model": "H100"},
            {
                "power_w": 600.0,
                "power_limit_min_w": 200.0,
                "power_limit_max_w": 700.0,
                "power_limit_default_w": 700.0,
            },
            now_ns - S,
        )
        for k in range(20)
        for h in ("a", "b")
    ]
    s.write(gpu_pts)
    doc = build_problem(
        s,
        single_domain(100_000),
        now_ns=now_ns,
        window_s=WINDOW_S,
        objective={"kind": "budget"},
        allowed_slowdown=0.1,
    )
    jobs: list[dict[str, Any]] = doc["jobs"]
    return jobs


def _job_runs(jobs: list[dict[str, Any]]) -> dict[str, dict[float, list[float]]]:
    out: dict[str, dict[float, list[float]]] = {}
    for j in jobs:
        caps: dict[float, list[float]] = defaultdict(list)
        for x in j["samples"]:
            caps[x["cap_w"]].append(x["throughput"])
        out[j["id"]] = dict(caps)
    return out


def _sum_ss(jobs: dict[str, dict[float, list[float]]]) -> tuple[float, int]:
    ss, df = 0.0, 0
    for caps in jobs.values():
        a, b = _pooled_ss(caps)
        ss, df = ss + a, df + b
    return ss, df
