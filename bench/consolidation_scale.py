"""How consolidation scales: time, method, objective, LP bound and gap on random fleets.

Run ``python bench/consolidation_scale.py`` (or call :func:`bench_consolidation`). Figures
only; nothing here asserts a time.

Instances: 500 nodes of 8 GPUs (60 % H100-like, 40 % A100-like, 10 % may not power down),
jobs sized 1/2/4/8 GPUs (78/12/6/4 %), a third of the 1-GPU jobs shareable inference at low
utilization, 5 % pinned, migration cost 20–200 Wh per GPU, current placement random.
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from optimizer.consolidation import ConsolidationProblem, parse_consolidation, solve_consolidation

_NODE_TYPES = (
    # share, mem_per_gpu_gb, node_idle_w, gpu_idle_w, gpu_active_w_per_util
    (0.6, 80.0, 700.0, 70.0, 630.0),
    (0.4, 40.0, 500.0, 55.0, 340.0),
)


def random_fleet(
    n_jobs: int, n_nodes: int = 500, gpus_per_node: int = 8, seed: int = 0
) -> dict[str, Any]:
    """A ``"consolidation"`` section with a feasible, randomly spread current placement."""
    rng = random.Random(seed)
    nodes: list[dict[str, Any]] = []
    for i in range(n_nodes):
        _, mem, idle, gidle, act = (
            _NODE_TYPES[0] if rng.random() < _NODE_TYPES[0][0] else _NODE_TYPES[1]
        )
        nodes.append(
            {
                "id": f"node{i:04d}",
                "gpus": gpus_per_node,
                "mem_per_gpu_gb": mem,
                "node_idle_w": idle,
                "gpu_idle_w": gidle,
                "gpu_active_w_per_util": act,
                "may_power_down": rng.random() >= 0.1,
            }
        )
    free = [n["gpus"] for n in nodes]
    # shared GPUs per node: [util, mem, index]
    shared: list[list[list[float]]] = [[] for _ in nodes]
    next_index = [0] * n_nodes
    specs = []
    for k in range(n_jobs):
        gpus = rng.choices((1, 2, 4, 8), weights=(80, 11, 5, 4))[0]
        shareable = gpus == 1 and rng.random() < 1 / 3
        util = rng.uniform(0.05, 0.4) if shareable else rng.uniform(0.4, 0.98)
        mem = rng.uniform(4, 20) if shareable else rng.uniform(10, 78)
        specs.append((k, gpus, shareable, util, mem))
    jobs: list[dict[str, Any]] = []
    # Biggest first (so the random spread always fits), then listed in id order.
    for k, gpus, shareable, util, mem in sorted(specs, key=lambda s: -s[1]):
        start = rng.randrange(n_nodes)
        for off in range(n_nodes):
            n = (start + off) % n_nodes
            if mem > nodes[n]["mem_per_gpu_gb"]:
                continue
            if shareable:
                slot = next(
                    (
                        s
                        for s in shared[n]
                        if s[0] + util <= 1 and s[1] + mem <= nodes[n]["mem_per_gpu_gb"]
                    ),
                    None,
                )
                if slot is None and free[n] >= 1 and rng.random() < 0.5:
                    slot = [0.0, 0.0, float(next_index[n])]
                    shared[n].append(slot)
                    next_index[n] += 1
                    free[n] -= 1
                if slot is None:
                    continue
                slot[0] += util
                slot[1] += mem
                indices = [int(slot[2])]
            elif free[n] >= gpus:
                indices = list(range(next_index[n], next_index[n] + gpus))
                next_index[n] += gpus
                free[n] -= gpus
            else:
                continue
            break
        else:
            raise RuntimeError("fleet too small for the jobs")
        jobs.append(
            {
                "id": f"job{k:05d}",
                "gpus": gpus,
                "mem_per_gpu_gb": round(mem, 1),
                "util": round(util, 3),
                "shareable": shareable,
                "node": nodes[n]["id"],
                "gpu_indices": indices,
                "migration_cost_wh": round(gpus * rng.uniform(20, 200), 1),
                "pinned": rng.random() < 0.05,
            }
        )
    return {
        "horizon_h": 24.0,
        "price_per_kwh": 0.12,
        "pue": 1.3,
        "carbon_g_per_kwh": 350.0,
        "nodes": nodes,
        "jobs": sorted(jobs, key=lambda j: j["id"]),
    }


def _row(label: str, problem: ConsolidationProblem, **kw: Any) -> str:
    t0 = time.perf_counter()
    r = solve_consolidation(problem, **kw)
    wall = time.perf_counter() - t0
    # Share of the largest possible saving (before - bound) that the result achieves.
    possible = r.power_before_w - r.lower_bound_w
    achieved = r.power_before_w - r.objective_w
    share = achieved / possible if possible > 0 else 1.0
    return (
        f"{label:<28} {wall:7.2f} {r.method:>7} {r.status:>16} {r.objective_w:12.0f} "
        f"{r.lower_bound_w:12.0f} {100 * r.gap:7.3f} {100 * share:8.2f} {len(r.moves):6d} "
        f"{len(r.nodes_freed):6d}"
    )


def bench_consolidation() -> None:
    """Print one row per instance and solver setting."""
    print(
        f"{'instance':<28} {'time_s':>7} {'method':>7} {'status':>16} {'objective_w':>12} "
        f"{'lp_bound_w':>12} {'gap_%':>7} {'saved_%':>8} {'moves':>6} {'off':>6}"
    )
    print("(saved_% = achieved saving / (power_before - bound), the share of the best possible)")
    for n_jobs in (500, 2000):
        problem = parse_consolidation(random_fleet(n_jobs, seed=n_jobs), "bench")
        print(_row(f"{n_jobs} jobs / 500 nodes auto", problem, time_limit_s=10.0))
        print(_row(f"{n_jobs} jobs / 500 nodes milp", problem, time_limit_s=10.0, method="milp"))
    small = parse_consolidation(random_fleet(60, n_nodes=40, seed=7), "bench")
    print(_row("60 jobs / 40 nodes auto", small, time_limit_s=10.0))
    print(_row("60 jobs / 40 nodes greedy", small, time_limit_s=10.0, method="greedy"))


if __name__ == "__main__":
    bench_consolidation()
