"""Consolidation: hand-solvable fleets, random fleets through an independent checker, bad input."""

from __future__ import annotations

import copy
import json
import math
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dcenergy.errors import ProblemError
from optimizer import consolidation as cons
from optimizer.consolidation import (
    ConsolidationProblem,
    ConsolidationResult,
    parse_consolidation,
    solve_consolidation,
)

NODE_IDLE_W = 400.0
GPU_IDLE_W = 60.0
ACTIVE_W = 300.0
METHODS = ("milp", "greedy")
TOL = 1e-6


def node(
    node_id: str, *, gpus: int = 8, mem: float = 80.0, may: bool = True, **kw: Any
) -> dict[str, Any]:
    return {
        "id": node_id,
        "gpus": gpus,
        "mem_per_gpu_gb": mem,
        "node_idle_w": kw.get("idle", NODE_IDLE_W),
        "gpu_idle_w": GPU_IDLE_W,
        "gpu_active_w_per_util": ACTIVE_W,
        "may_power_down": may,
    }


def job(
    job_id: str, node_id: str, *, gpus: int = 1, util: float = 0.5, **kw: Any
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": job_id,
        "gpus": gpus,
        "mem_per_gpu_gb": kw.pop("mem", 20.0),
        "util": util,
        "node": node_id,
    }
    out.update(kw)
    return out


def section(nodes: list[dict[str, Any]], jobs: list[dict[str, Any]], **kw: Any) -> dict[str, Any]:
    return {
        "horizon_h": kw.get("horizon_h", 24.0),
        "price_per_kwh": 0.1,
        "pue": 1.25,
        "carbon_g_per_kwh": 400.0,
        "nodes": nodes,
        "jobs": jobs,
    }


def solve(
    obj: dict[str, Any], method: str, **kw: Any
) -> tuple[ConsolidationProblem, ConsolidationResult]:
    p = parse_consolidation(obj, "test.json")
    r = solve_consolidation(p, method=method, time_limit_s=kw.pop("time_limit_s", 5.0), **kw)  # type: ignore[arg-type]
    check(p, r)
    return p, r


# ---------------------------------------------------------------------------------------------
# The independent checker: everything recomputed from the layout, nothing taken on trust.
# ---------------------------------------------------------------------------------------------


def check(p: ConsolidationProblem, r: ConsolidationResult) -> None:
    nodes = {n.id: n for n in p.nodes}
    jobs = {j.id: j for j in p.jobs}
    where: dict[str, str] = {}
    gpus_seen: dict[str, int] = {}
    for node_id, gpus in r.layout.items():
        n = nodes[node_id]
        assert len(gpus) <= n.gpus, f"{node_id}: {len(gpus)} GPUs used, has {n.gpus}"
        for group in gpus:
            assert group, f"{node_id}: an empty GPU is listed as used"
            members = [jobs[j] for j in group]
            if len(members) > 1:
                assert all(m.shareable and m.gpus == 1 for m in members), f"{node_id}: {group}"
                assert sum(m.util for m in members) <= 1.0 + TOL, f"{node_id}: util {group}"
            assert sum(m.mem_per_gpu_gb for m in members) <= n.mem_per_gpu_gb + TOL, (
                f"{node_id}: memory {group}"
            )
            for m in members:
                assert where.setdefault(m.id, node_id) == node_id, f"{m.id} split over nodes"
                gpus_seen[m.id] = gpus_seen.get(m.id, 0) + 1
    for j in p.jobs:
        assert j.id in where, f"job {j.id} lost"
        assert gpus_seen[j.id] == j.gpus, f"job {j.id} on {gpus_seen[j.id]} GPUs, needs {j.gpus}"
        if j.pinned:
            assert where[j.id] == j.node, f"pinned job {j.id} moved"
    for n in p.nodes:
        if not n.may_power_down:
            assert n.id in r.layout, f"node {n.id} may not power down but is off"
    assert set(r.nodes_freed) == set(nodes) - set(r.layout)
    moved = {j.id for j in p.jobs if where[j.id] != j.node}
    assert {m.job for m in r.moves} == moved
    for m in r.moves:
        assert (m.from_node, m.to_node) == (jobs[m.job].node, where[m.job])

    active = sum(j.gpus * j.util * nodes[j.node].gpu_active_w_per_util for j in p.jobs)
    used_after = {nid: len(g) for nid, g in r.layout.items()}
    after = active + sum(
        nodes[nid].node_idle_w + nodes[nid].gpu_idle_w * u for nid, u in used_after.items()
    )
    used_before: dict[str, set[Any]] = {n.id: set() for n in p.nodes}
    for j in p.jobs:
        idx = j.gpu_indices or [("own", j.id, k) for k in range(j.gpus)]
        used_before[j.node].update(idx)
    before = active + sum(n.node_idle_w + n.gpu_idle_w * len(used_before[n.id]) for n in p.nodes)
    mig_wh = sum(jobs[j].migration_cost_wh for j in moved)
    objective = after + mig_wh / p.horizon_h
    assert r.power_after_w == pytest.approx(after, abs=1e-6)
    assert r.power_before_w == pytest.approx(before, abs=1e-6)
    assert r.savings_w == pytest.approx(before - after, abs=1e-6)
    assert r.migration_cost_wh == pytest.approx(mig_wh, abs=1e-6)
    assert r.objective_w == pytest.approx(objective, abs=1e-6)
    assert r.gpus_freed == sum(len(s) for s in used_before.values()) - sum(used_after.values())
    kwh = (before - after) * p.pue * 24 / 1000
    assert r.kwh_day == pytest.approx(kwh, abs=1e-6)
    assert r.cost_day == pytest.approx(kwh * p.price_per_kwh, abs=1e-6)
    assert r.co2_kg_day == pytest.approx(kwh * p.carbon_g_per_kwh / 1000, abs=1e-6)
    # The bound is below every feasible result, and the gap says by how much.
    assert r.lower_bound_w <= objective * (1 + 1e-6) + 1e-6
    assert r.gap >= 0.0
    if r.lower_bound_w > 1e-6 and objective - r.lower_bound_w > 1e-6:
        assert r.gap == pytest.approx((objective - r.lower_bound_w) / r.lower_bound_w, abs=1e-6)
    # Never worse than doing nothing.
    assert objective <= before + 1e-6
    json.dumps(r.to_json(), allow_nan=False)


# ---------------------------------------------------------------------------------------------
# Hand-solvable fleets
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_two_half_empty_nodes_become_one(method: str) -> None:
    # a: two shareable jobs on their own GPUs; b: one shareable and one 2-GPU job.
    # Best: everything on one node, the three shareable jobs on one GPU (util 0.9).
    obj = section(
        [node("a"), node("b")],
        [
            job("s1", "a", util=0.3, shareable=True),
            job("s2", "a", util=0.3, shareable=True),
            job("s3", "b", util=0.3, shareable=True),
            job("x", "b", gpus=2, util=0.8),
        ],
    )
    _, r = solve(obj, method)
    assert len(r.nodes_freed) == 1
    assert r.gpus_freed == 2
    assert r.savings_w == pytest.approx(NODE_IDLE_W + 2 * GPU_IDLE_W)
    assert r.kwh_day == pytest.approx((NODE_IDLE_W + 2 * GPU_IDLE_W) * 1.25 * 24 / 1000)
    assert r.method == method
    if method == "milp":  # the MILP proves it; the LP bound alone is weak on 2 nodes
        assert r.gap == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_pinned_job_never_moves(method: str) -> None:
    # Moving the small pinned job would be cheapest; the 6-GPU job must move instead.
    obj = section(
        [node("a"), node("b")],
        [
            job("pin", "a", migration_cost_wh=10.0, pinned=True),
            job("big", "b", gpus=6, migration_cost_wh=100.0),
        ],
    )
    _, r = solve(obj, method)
    assert [(m.job, m.from_node, m.to_node) for m in r.moves] == [("big", "b", "a")]
    assert r.nodes_freed == ("b",)


@pytest.mark.parametrize("method", METHODS)
def test_pinned_flag_is_what_keeps_the_job(method: str) -> None:
    obj = section(
        [node("a"), node("b")],
        [job("pin", "a", migration_cost_wh=10.0), job("big", "b", gpus=6, migration_cost_wh=100.0)],
    )
    _, r = solve(obj, method)
    assert [m.job for m in r.moves] == ["pin"]


@pytest.mark.parametrize("method", METHODS)
def test_node_that_stays_on_is_the_target(method: str) -> None:
    # "a" costs more to run but may not power down, so it is on anyway: fill it.
    obj = section(
        [node("a", may=False, idle=600.0), node("b"), node("c")],
        [job("ja", "a", gpus=2), job("jb", "b", gpus=2), job("jc", "c", gpus=2)],
    )
    _, r = solve(obj, method)
    assert set(r.nodes_freed) == {"b", "c"}
    assert set(r.layout) == {"a"}
    assert r.savings_w == pytest.approx(2 * NODE_IDLE_W)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(("factor", "moves"), [(0.9, 1), (1.1, 0)])
def test_migration_cost_against_savings(method: str, factor: float, moves: int) -> None:
    # Emptying a node saves NODE_IDLE_W; a move costs factor * that over the horizon.
    horizon_h = 24.0
    cost_wh = factor * NODE_IDLE_W * horizon_h
    obj = section(
        [node("a"), node("b")],
        [job("ja", "a", migration_cost_wh=cost_wh), job("jb", "b", migration_cost_wh=cost_wh)],
        horizon_h=horizon_h,
    )
    _, r = solve(obj, method)
    assert len(r.moves) == moves
    assert len(r.nodes_freed) == moves


@pytest.mark.parametrize("method", METHODS)
def test_memory_keeps_a_job_off_small_gpus(method: str) -> None:
    # "small" is on anyway and has room, but its 40 GB GPUs cannot hold the 60 GB job.
    obj = section(
        [node("big"), node("small", mem=40.0, may=False)],
        [job("fat", "big", mem=60.0), job("thin", "small", mem=10.0)],
    )
    _, r = solve(obj, method)
    assert r.moves == ()
    assert r.nodes_freed == ()


def test_memory_respected_when_a_node_is_opened() -> None:
    # First-fit decreasing opens "s1", then must open another node for "fat": the cheaper
    # "s2" comes first but its 40 GB GPUs are too small, so "fat" has to stay on "b".
    obj = section(
        [node("s1", mem=40.0), node("s2", mem=40.0, idle=300.0), node("b")],
        [job(f"k{i}", "s1", mem=10.0) for i in range(6)]
        + [job("t", "s2", mem=10.0), job("fat", "b", mem=60.0)],
    )
    _, r = solve(obj, "greedy")
    assert "b" in r.layout


@pytest.mark.parametrize("method", METHODS)
def test_shared_gpus_respect_memory(method: str) -> None:
    # Low util, but 2 x 50 GB does not fit on one 80 GB GPU: no GPU can be freed.
    obj = section(
        [node("a", may=False)],
        [
            job("s1", "a", util=0.1, mem=50.0, shareable=True),
            job("s2", "a", util=0.1, mem=50.0, shareable=True),
        ],
    )
    _, r = solve(obj, method)
    assert r.gpus_freed == 0
    assert len(r.layout["a"]) == 2


@pytest.mark.parametrize("method", METHODS)
def test_shareable_jobs_pack_by_util(method: str) -> None:
    obj = section(
        [node("a", may=False)],
        [job(f"s{k}", "a", util=0.4, shareable=True) for k in range(3)],
    )
    _, r = solve(obj, method)
    assert r.gpus_freed == 1  # 0.4 + 0.4 on one GPU, 0.4 on another
    assert r.savings_w == pytest.approx(GPU_IDLE_W)


def test_multi_gpu_shareable_job_gets_whole_gpus() -> None:
    obj = section(
        [node("a", may=False)],
        [job("s", "a", gpus=2, util=0.1, shareable=True), job("t", "a", util=0.1, shareable=True)],
    )
    _, r = solve(obj, "greedy")
    assert r.gpus_freed == 0


def test_shared_gpu_indices_count_once_before() -> None:
    obj = section(
        [node("a", may=False)],
        [
            job("s1", "a", util=0.3, shareable=True, gpu_indices=[0]),
            job("s2", "a", util=0.3, shareable=True, gpu_indices=[0]),
        ],
    )
    _, r = solve(obj, "greedy")
    assert r.power_before_w == pytest.approx(NODE_IDLE_W + GPU_IDLE_W + 0.6 * ACTIVE_W)
    assert r.savings_w == pytest.approx(0.0)


def test_nothing_to_do() -> None:
    _, r = solve(section([node("a", may=False)], [job("j", "a", gpus=8)]), "milp")
    assert r.moves == () and r.nodes_freed == () and r.savings_w == 0.0
    _, r = solve(section([], []), "auto")
    assert r.power_before_w == 0.0 and r.gap == 0.0


def test_empty_node_that_may_power_down_is_freed() -> None:
    _, r = solve(section([node("a"), node("idle")], [job("j", "a")]), "greedy")
    assert r.nodes_freed == ("idle",) and r.moves == ()


# ---------------------------------------------------------------------------------------------
# Solver selection, fallback and output
# ---------------------------------------------------------------------------------------------


def _small() -> dict[str, Any]:
    return section([node("a"), node("b")], [job("ja", "a", gpus=2), job("jb", "b", gpus=2)])


def test_auto_picks_by_size() -> None:
    _, r = solve(_small(), "auto")
    assert (r.method, r.status) == ("milp", "optimal")
    _, r = solve(_small(), "auto", milp_max_pairs=1)
    assert (r.method, r.status) == ("greedy", "heuristic")


def test_milp_too_large_runs_greedy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cons, "MILP_HARD_MAX_PAIRS", 1)
    _, r = solve(_small(), "milp")
    assert (r.method, r.status) == ("greedy", "milp_too_large")


def test_milp_without_solution_falls_back_to_greedy(monkeypatch: pytest.MonkeyPatch) -> None:
    real = cons.milp

    def no_incumbent(c: Any, **kw: Any) -> Any:
        res = real(c, **kw)
        if kw["integrality"].any():  # the MILP, not the LP bound
            res.x = None
        return res

    monkeypatch.setattr(cons, "milp", no_incumbent)
    _, r = solve(_small(), "milp")
    assert (r.method, r.status) == ("greedy", "milp_no_solution")
    assert len(r.nodes_freed) == 1


def test_unknown_method_is_refused() -> None:
    p = parse_consolidation(_small(), "t")
    with pytest.raises(ValueError, match="method"):
        solve_consolidation(p, method="magic")  # type: ignore[arg-type]


def test_to_json_shape() -> None:
    _, r = solve(_small(), "auto")
    out = r.to_json()
    assert set(out) == {
        "moves", "gpus_freed", "nodes_freed", "power_before_w", "power_after_w", "savings_w",
        "migration_cost_wh", "objective_w", "kwh_day", "cost_day", "co2_kg_day", "method",
        "status", "gap", "lower_bound_w", "time_s", "layout",
    }  # fmt: skip
    assert out["moves"] in (
        [{"job": "ja", "from_node": "a", "to_node": "b"}],
        [{"job": "jb", "from_node": "b", "to_node": "a"}],
    )
    assert json.loads(json.dumps(out, allow_nan=False)) == out


def test_infinite_gap_is_null_in_json() -> None:
    _, r = solve(_small(), "greedy")
    inf = cons.ConsolidationResult(
        **{**{f: getattr(r, f) for f in r.__dataclass_fields__}, "gap": math.inf}
    )
    assert inf.to_json()["gap"] is None


# ---------------------------------------------------------------------------------------------
# Random fleets: every result passes the checker, greedy never beats the bound
# ---------------------------------------------------------------------------------------------


@st.composite
def fleets(draw: st.DrawFn) -> dict[str, Any]:
    n_nodes = draw(st.integers(1, 5))
    nodes = [
        {
            "id": f"n{i}",
            "gpus": draw(st.integers(1, 8)),
            "mem_per_gpu_gb": draw(st.sampled_from([24.0, 40.0, 80.0])),
            "node_idle_w": draw(st.floats(0, 800)),
            "gpu_idle_w": draw(st.floats(0, 100)),
            "gpu_active_w_per_util": draw(st.floats(0, 700)),
            "may_power_down": draw(st.booleans()),
        }
        for i in range(n_nodes)
    ]
    free = [n["gpus"] for n in nodes]
    jobs = []
    for k in range(draw(st.integers(0, 12))):
        gpus = draw(st.sampled_from([1, 1, 1, 2, 4, 8]))
        mem = draw(st.floats(0, 80))
        homes = [i for i, n in enumerate(nodes) if free[i] >= gpus and n["mem_per_gpu_gb"] >= mem]
        if not homes:
            continue
        i = draw(st.sampled_from(homes))
        free[i] -= gpus
        jobs.append(
            {
                "id": f"j{k}",
                "gpus": gpus,
                "mem_per_gpu_gb": mem,
                "util": draw(st.floats(0, 1)),
                "shareable": draw(st.booleans()),
                "node": nodes[i]["id"],
                "migration_cost_wh": draw(st.floats(0, 20_000)),
                "pinned": draw(st.integers(0, 9)) == 0,
            }
        )
    return section(nodes, jobs, horizon_h=draw(st.floats(0.5, 168)))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fleets())
def test_random_fleets_are_feasible_and_bounded(obj: dict[str, Any]) -> None:
    _, greedy = solve(obj, "greedy")
    _, exact = solve(obj, "milp", time_limit_s=2.0)
    assert greedy.objective_w >= greedy.lower_bound_w * (1 - 1e-6) - 1e-6
    assert greedy.objective_w >= exact.lower_bound_w * (1 - 1e-6) - 1e-6
    # The MILP path also runs the greedy and keeps the better one.
    assert exact.objective_w <= greedy.objective_w + 1e-6


# ---------------------------------------------------------------------------------------------
# Malformed input: every error names its field
# ---------------------------------------------------------------------------------------------


def _valid() -> dict[str, Any]:
    return section(
        [node("a"), node("b", gpus=2)],
        [job("j0", "a", gpus=2, gpu_indices=[0, 1]), job("j1", "b", shareable=True)],
    )


def _set(path: list[Any], value: Any) -> Any:
    def mutate(obj: dict[str, Any]) -> None:
        target: Any = obj
        for key in path[:-1]:
            target = target[key]
        if value is _DELETE:
            del target[path[-1]]
        else:
            target[path[-1]] = value

    return mutate


_DELETE = object()

BAD = [
    ("horizon_h", _set(["horizon_h"], 0), "horizon_h"),
    ("pue below 1", _set(["pue"], 0.5), "pue"),
    ("missing price", _set(["price_per_kwh"], _DELETE), "price_per_kwh"),
    ("nan carbon", _set(["carbon_g_per_kwh"], float("nan")), "carbon_g_per_kwh"),
    ("jobs not a list", _set(["jobs"], {}), "jobs"),
    ("node not an object", _set(["nodes", 1], 3), "nodes[1]"),
    ("node gpus string", _set(["nodes", 1, "gpus"], "8"), "nodes[1].gpus"),
    ("node gpus zero", _set(["nodes", 0, "gpus"], 0), "nodes[0].gpus"),
    ("node mem zero", _set(["nodes", 0, "mem_per_gpu_gb"], 0), "nodes[0].mem_per_gpu_gb"),
    ("negative idle", _set(["nodes", 1, "node_idle_w"], -1), "nodes[1].node_idle_w"),
    ("may_power_down int", _set(["nodes", 0, "may_power_down"], 1), "nodes[0].may_power_down"),
    ("duplicate node", _set(["nodes", 1, "id"], "a"), "nodes[1].id"),
    ("unknown node field", _set(["nodes", 0, "gpu"], 8), "nodes[0].gpu"),
    ("job gpus zero", _set(["jobs", 0, "gpus"], 0), "jobs[0].gpus"),
    ("job gpus bool", _set(["jobs", 0, "gpus"], True), "jobs[0].gpus"),
    ("job gpus float", _set(["jobs", 0, "gpus"], 2.0), "jobs[0].gpus"),
    ("util above 1", _set(["jobs", 1, "util"], 1.5), "jobs[1].util"),
    ("unknown node", _set(["jobs", 1, "node"], "zz"), "jobs[1].node"),
    ("empty id", _set(["jobs", 0, "id"], ""), "jobs[0].id"),
    ("duplicate job", _set(["jobs", 1, "id"], "j0"), "jobs[1].id"),
    ("negative migration", _set(["jobs", 0, "migration_cost_wh"], -5), "jobs[0].migration_cost_wh"),
    ("shareable string", _set(["jobs", 1, "shareable"], "yes"), "jobs[1].shareable"),
    ("pinned int", _set(["jobs", 1, "pinned"], 0), "jobs[1].pinned"),
    ("more gpus than node", _set(["jobs", 1, "gpus"], 3), "jobs[1].gpus"),
    ("more memory than node", _set(["jobs", 0, "mem_per_gpu_gb"], 90), "jobs[0].mem_per_gpu_gb"),
    ("index out of range", _set(["jobs", 0, "gpu_indices"], [0, 8]), "jobs[0].gpu_indices"),
    ("index count", _set(["jobs", 0, "gpu_indices"], [0]), "jobs[0].gpu_indices"),
    ("index twice", _set(["jobs", 0, "gpu_indices"], [1, 1]), "jobs[0].gpu_indices"),
    ("index not int", _set(["jobs", 0, "gpu_indices"], ["0", "1"]), "jobs[0].gpu_indices"),
    ("unknown job field", _set(["jobs", 0, "migration_cost"], 1), "jobs[0].migration_cost"),
]


@pytest.mark.parametrize(("mutate", "field"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_malformed_input_names_its_field(mutate: Any, field: str) -> None:
    obj = _valid()
    parse_consolidation(copy.deepcopy(obj), "p.json")  # the unmutated input is fine
    mutate(obj)
    with pytest.raises(ProblemError) as err:
        parse_consolidation(obj, "p.json")
    assert err.value.field == field
    assert err.value.path == "p.json"
    assert err.value.exit_code == 65
    assert field in str(err.value)


def test_overfull_node_names_the_job() -> None:
    obj = _valid()
    obj["jobs"].append(job("j2", "b", gpus=2))  # b has 2 GPUs, j1 already holds one
    with pytest.raises(ProblemError) as err:
        parse_consolidation(obj, "p.json")
    assert err.value.field == "jobs[2].node"


def test_exclusive_gpu_cannot_be_shared_now() -> None:
    obj = _valid()
    obj["jobs"].append(job("j2", "a", gpu_indices=[1]))
    with pytest.raises(ProblemError) as err:
        parse_consolidation(obj, "p.json")
    assert err.value.field == "jobs[2].gpu_indices"


def test_prefix_names_the_embedded_section() -> None:
    obj = _valid()
    obj["jobs"][0]["gpus"] = 0
    with pytest.raises(ProblemError) as err:
        parse_consolidation(obj, "p.json", prefix="consolidation")
    assert err.value.field == "consolidation.jobs[0].gpus"
    with pytest.raises(ProblemError) as err:
        parse_consolidation([], "p.json", prefix="consolidation")  # type: ignore[arg-type]
    assert err.value.field == "consolidation"


def test_tiny_memory_does_not_fool_the_milp() -> None:
    # Found by hypothesis: a 6e-8 GB coefficient made HiGHS report a wrong "optimal" whose
    # dual bound was above a feasible layout. Both jobs fit on n2's free GPU (idle 0 W).
    nodes = [
        {**node("n0", gpus=2, mem=24.0, may=False, idle=0.0), "gpu_idle_w": 1.0},
        {**node("n1", gpus=1, mem=24.0, may=False, idle=0.0), "gpu_idle_w": 1.0},
        {**node("n2", gpus=1, mem=24.0, may=False, idle=0.0), "gpu_idle_w": 0.0},
    ]
    for n in nodes:
        n["gpu_active_w_per_util"] = 0.0
    obj = section(
        nodes,
        [
            job("j0", "n0", util=0.0, mem=1.0, shareable=True),
            job("pin", "n0", util=0.0, mem=0.0, pinned=True),
            job("j10", "n1", util=0.0, mem=5.960464477539063e-08, shareable=True),
        ],
        horizon_h=1.0,
    )
    _, r = solve(obj, "milp")
    assert r.objective_w == pytest.approx(1.0)
    assert r.lower_bound_w <= r.objective_w + 1e-9


@pytest.mark.parametrize("method", METHODS)
def test_pinned_shared_job_stays_on_its_gpu_node(method: str) -> None:
    # Found by hypothesis: merging shared GPUs once moved a pinned shareable job.
    obj = section(
        [node("a", gpus=1, may=False), node("b", gpus=2, may=False)],
        [
            job("pin", "a", util=0.1, shareable=True, pinned=True),
            job("other", "b", util=0.1, shareable=True, pinned=True),
        ],
    )
    _, r = solve(obj, method)
    assert r.moves == ()
