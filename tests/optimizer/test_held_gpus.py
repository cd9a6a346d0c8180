"""Unhealthy and shared GPUs keep their default cap; a job's GPM activity reaches the problem.

Hand-solved: two GPUs in one rack, throughput linear in the cap (1 unit/W on
[100, 300] W), so where the watts go is plain arithmetic.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from dcenergy import schema
from dcenergy.errors import ProblemError
from dcenergy.store.embedded import EmbeddedStore
from optimizer.capping import solve_capping
from optimizer.plan import make_plan
from optimizer.problem import Activity, parse_problem, problem_to_json
from optimizer.report import render_report
from optimizer.snapshot import build_problem
from optimizer.topology import single_domain

S = 1_000_000_000
NOW = 10_000 * S


def _gpu(i: int, **kw: Any) -> dict[str, Any]:
    d = {
        "id": f"g{i}",
        "host": "n1",
        "model": "H100",
        "min_w": 100,
        "max_w": 300,
        "default_w": 300,
        "idle_w": 40,
        "domains": ["rack"],
    }
    d.update(kw)
    return d


def _job(jid: str, gpus: list[str], **kw: Any) -> dict[str, Any]:
    j = {
        "id": jid,
        "gpus": gpus,
        "allowed_slowdown": 0.9,
        "samples": [{"cap_w": c, "throughput": float(c)} for c in (100, 200, 300)],
    }
    j.update(kw)
    return j


def _problem(budget: float, gpus: list[dict[str, Any]], jobs: list[dict[str, Any]]) -> Any:
    return parse_problem(
        {
            "version": 1,
            "domains": [{"id": "rack", "budget_w": budget}],
            "gpus": gpus,
            "jobs": jobs,
            "objective": {"kind": "budget"},
        }
    )


# -- the problem format ------------------------------------------------------------------
def test_held_shared_and_activity_round_trip() -> None:
    p = _problem(
        600,
        [_gpu(0, held=["row remap pending"]), _gpu(1, shared_by=["a", "b"])],
        [_job("a", ["g0"], activity={"dram_active": 0.6, "sm_active": 0.3})],
    )
    assert p.gpu("g0").held == ("row remap pending",) and p.gpu("g0").pinned
    assert p.gpu("g1").shared_by == ("a", "b") and p.gpu("g1").pinned
    assert p.jobs[0].activity == Activity(dram_active=0.6, sm_active=0.3)
    assert parse_problem(problem_to_json(p)) == p
    assert "held" not in problem_to_json(_problem(600, [_gpu(0)], []))["gpus"][0]


@pytest.mark.parametrize(
    "gpus,jobs,where",
    [
        ([_gpu(0, shared_by=["a", "b"])], [_job("a", ["g0"])], "jobs[0].gpus[0]"),
        ([_gpu(0, shared_by=["a", "a"])], [], "gpus[0].shared_by"),
        ([_gpu(0, held="ecc")], [], "gpus[0].held"),
        ([_gpu(0)], [_job("a", ["g0"], activity={"dram_active": 60})], "activity.dram_active"),
        ([_gpu(0)], [_job("a", ["g0"], activity={"dram": 0.6})], "activity.dram"),
    ],
)
def test_bad_held_shared_or_activity_is_refused(
    gpus: list[dict[str, Any]], jobs: list[dict[str, Any]], where: str
) -> None:
    with pytest.raises(ProblemError, match=where.replace("[", r"\[").replace("]", r"\]")):
        _problem(600, gpus, jobs)


# -- the LP --------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["lp", "fast"])
def test_an_unhealthy_gpu_keeps_its_default_cap_and_the_others_make_room(method: str) -> None:
    # 500 W for two 300 W GPUs: healthy, the 200 W of room split any way (equal slopes)
    healthy = _problem(500, [_gpu(0), _gpu(1)], [_job("a", ["g0"]), _job("b", ["g1"])])
    r = solve_capping(healthy, method)  # type: ignore[arg-type]
    assert sum(r.caps_w.values()) == pytest.approx(500)
    # g1 flagged: it stays at 300 W, so g0 gets what is left, 500 - 300 = 200 W
    held = _problem(
        500,
        [_gpu(0), _gpu(1, held=["2 uncorrected ECC errors"])],
        [_job("a", ["g0"]), _job("b", ["g1"])],
    )
    r = solve_capping(held, method)  # type: ignore[arg-type]
    assert r.caps_w["g1"] == pytest.approx(300)
    assert r.caps_w["g0"] == pytest.approx(200)
    assert r.feasible


def test_a_held_gpu_pins_its_whole_synchronous_job() -> None:
    p = _problem(
        800,
        [_gpu(0), _gpu(1, held=["XID 79"]), _gpu(2)],
        [_job("sync", ["g0", "g1"], synchronous=True), _job("c", ["g2"])],
    )
    r = solve_capping(p, "lp")
    assert r.caps_w["g0"] == r.caps_w["g1"] == pytest.approx(300)  # one cap: the held one's
    assert r.caps_w["g2"] == pytest.approx(800 - 600)


def test_a_shared_gpu_counts_at_its_default_cap_not_idle() -> None:
    # g1 runs MIG instances of jobs x and y: it is busy, so the budget counts it at 300 W
    # (idle it would count 40 W and leave g0 260 W more than is there)
    p = _problem(450, [_gpu(0), _gpu(1, shared_by=["x", "y"])], [_job("a", ["g0"])])
    r = solve_capping(p, "lp")
    assert r.caps_w["g1"] == pytest.approx(300)
    assert r.caps_w["g0"] == pytest.approx(150)
    assert r.evaluation.domain_cap_load_w["rack"] == pytest.approx(450)


def test_the_report_names_held_and_shared_gpus() -> None:
    p = _problem(
        700,
        [_gpu(0), _gpu(1, held=["row remap pending"]), _gpu(2, shared_by=["x", "y"])],
        [_job("a", ["g0"]), _job("b", ["g1"])],
    )
    r = solve_capping(p, "lp")
    text = render_report(p, make_plan(p, r, created_ns=NOW))
    assert "GPUs held at their default cap" in text
    (g1,) = [line for line in text.splitlines() if line.startswith("g1 ")]
    assert "300 W" in g1 and "row remap pending" in g1
    (g2,) = [line for line in text.splitlines() if line.startswith("g2 ")]
    assert "shared by jobs x, y" in g2
    plain = _problem(700, [_gpu(0)], [_job("a", ["g0"])])
    assert "held" not in render_report(plain, make_plan(plain, solve_capping(plain, "lp")))


# -- the snapshot -----------------------------------------------------------------------------
def _gpu_point(uuid: str, t: int, job: str, **extra: Any) -> schema.Point:
    tags = {"host": "n1", "gpu": uuid[-1], "gpu_uuid": uuid, "model": "NVIDIA H100 80GB HBM3"}
    fields = {
        "power_w": 600.0,
        "util_gpu_pct": 95.0,
        "power_limit_w": 700.0,
        "power_limit_min_w": 200.0,
        "power_limit_max_w": 700.0,
        "power_limit_default_w": 700.0,
        "job_id": job,
        "job_count": 1 if job else 0,
        **extra,
    }
    return schema.point(schema.GPU, tags, fields, t)


def _job_point(job: str, uuids: str, t: int, **extra: Any) -> schema.Point:
    fields = {
        "throughput": 100.0,
        "throughput_unit": "samples",
        "power_limit_w": 700.0,
        "power_w": 600.0,
        "gpu_uuids": uuids,
        "gpu_count": len(uuids.split(",")),
        **extra,
    }
    return schema.point(schema.JOB, {"host": "n1", "job_id": job}, fields, t)


def _health_point(uuid: str, t: int, **fields: Any) -> schema.Point:
    tags = {"host": "n1", "gpu": uuid[-1], "gpu_uuid": uuid, "model": "NVIDIA H100 80GB HBM3"}
    base = {"ecc_uncorrected_volatile": 0, "remap_pending": 0, "xid_critical_events": 0}
    return schema.point(schema.GPU_HEALTH, tags, {**base, **fields}, t)


def _snapshot(points: list[schema.Point], tmp_path: Path) -> dict[str, Any]:
    store = EmbeddedStore(tmp_path / "s.sqlite")
    store.write(points)
    try:
        return build_problem(
            store,
            single_domain(10_000),
            now_ns=NOW,
            window_s=600,
            objective={"kind": "budget"},
            allowed_slowdown=0.1,
        )
    finally:
        store.close()


def test_snapshot_holds_gpus_unhealthy_in_the_window(tmp_path: Path) -> None:
    pts: list[schema.Point] = []
    for i in range(10):
        t = NOW - (60 - i) * S
        pts += [_gpu_point(f"GPU-{k}", t, f"j{k}") for k in range(4)]
        pts += [_job_point(f"j{k}", f"GPU-{k}", t) for k in range(4)]
        pts += [
            _health_point("GPU-0", t),
            _health_point("GPU-1", t, ecc_uncorrected_volatile=2),
            _health_point("GPU-2", t, remap_pending=1 if i < 5 else 0),  # reset since: fine
            # one XID early in the window is enough
            _health_point("GPU-3", t, xid_critical_events=int(i == 1), xid_last_critical=79),
        ]
    doc = _snapshot(pts, tmp_path)
    held = {g["id"]: g.get("held") for g in doc["gpus"]}
    assert held == {
        "GPU-0": None,
        "GPU-1": ["2 uncorrected ECC errors"],
        "GPU-2": None,
        "GPU-3": ["1 XID events in the window (last XID 79)"],
    }
    p = parse_problem(doc)
    plan = make_plan(p, solve_capping(p, "lp"), created_ns=NOW)
    assert "2 uncorrected ECC errors" in render_report(p, plan)


def test_snapshot_lists_a_mig_gpus_jobs_on_the_parent_and_gives_it_to_none(
    tmp_path: Path,
) -> None:
    pts: list[schema.Point] = []
    for i in range(10):
        t = NOW - (60 - i) * S
        pts += [
            # GPU-0: MIG instances of jobs a and b; GPU-1: job a alone
            _gpu_point("GPU-0", t, "a", job_count=2, job_ids="a,b"),
            _gpu_point("GPU-1", t, "a"),
            _job_point("a", "GPU-0,GPU-1", t, dram_active_pct=60.0, sm_active_pct=30.0),
            _job_point("b", "GPU-0", t, mig_uuids="MIG-b"),
        ]
    doc = _snapshot(pts, tmp_path)
    gpus = {g["id"]: g for g in doc["gpus"]}
    assert gpus["GPU-0"]["shared_by"] == ["a", "b"]
    assert "shared_by" not in gpus["GPU-1"]
    jobs = {j["id"]: j for j in doc["jobs"]}
    assert jobs["a"]["gpus"] == ["GPU-1"]  # not the shared parent
    assert "b" not in jobs  # its only GPU is shared: no GPU of its own to cap
    assert jobs["a"]["activity"] == {"dram_active": 0.6, "sm_active": 0.3}
    p = parse_problem(doc)  # no GPU in two jobs
    assert p.jobs[0].activity == Activity(dram_active=0.6, sm_active=0.3)


def test_snapshot_gives_a_gpu_to_the_job_running_on_it_now(tmp_path: Path) -> None:
    # j1 ran on GPU-0 and ended; j2 runs there now: both listed it in the window
    pts: list[schema.Point] = []
    for i in range(10):
        t = NOW - (60 - i) * S
        job = "j1" if i < 5 else "j2"
        pts += [_gpu_point("GPU-0", t, job), _job_point(job, "GPU-0", t)]
    doc = _snapshot(pts, tmp_path)
    assert [(j["id"], j["gpus"]) for j in doc["jobs"]] == [("j2", ["GPU-0"])]
    parse_problem(doc)
