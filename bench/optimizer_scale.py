"""Capping at fleet scale: build + solve time of the fast path and the LP, and their agreement.

Run: ``python bench/optimizer_scale.py [--sizes 1000 10000 100000] [--fit-jobs 3000 30000]``.
Targets (2-core machine): 100k GPUs <= 1 s on the fast path, <= 15 s on the LP.

Curve fitting per job (``--fit-jobs``): ``fit_curves`` against the per-job
reference it is checked against (``optimizer.curves._fit_curves_reference``),
timed in the same run, on the quality bench's fleet (``bench/optimizer_quality.py``:
every job its own noisy samples, where this file's fleet runs replicas that
share one fit). Target: <= 0.3 ms per job at fleet size.
The ``consolidation`` half lives in ``bench/consolidation_scale.py``; ``main``
runs it too when it is importable.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.optimizer_quality import fleet as quality_fleet
from optimizer.capping import solve_capping
from optimizer.curves import CurveFit, _fit_curves_reference, fit_curves
from optimizer.problem import Domain, Gpu, Job, Objective, Problem, Sample

# (share of draw, throughput fraction) shapes: compute-bound, memory-bound, in between
_SHAPES = (
    ((0.25, 0.35), (0.5, 0.7), (0.7, 0.9), (0.85, 0.97), (1.0, 1.0)),
    ((0.25, 0.55), (0.45, 0.85), (0.6, 0.97), (0.75, 1.0), (1.0, 1.0)),
    ((0.25, 0.45), (0.5, 0.78), (0.65, 0.9), (0.8, 0.97), (1.0, 1.0)),
)


def synthetic_fleet(
    n_gpus: int,
    *,
    seed: int = 0,
    budget_share: float = 0.7,
    kind: str = "budget",
    gpus_per_node: int = 8,
    nodes_per_rack: int = 4,
    racks_per_row: int = 32,
) -> Problem:
    """A laminar facility → row → rack → node fleet of H100-like GPUs with mixed jobs."""
    rng = np.random.default_rng(seed)
    n_nodes = -(-n_gpus // gpus_per_node)
    gpus: list[Gpu] = []
    jobs: list[Job] = []
    node_ids = [f"node{i}" for i in range(n_nodes)]
    rack_of = [i // nodes_per_rack for i in range(n_nodes)]
    row_of = [r // racks_per_row for r in rack_of]
    draws = {0: 700.0, 1: 520.0, 2: 640.0}
    total_draw = 0.0
    rack_draw: dict[int, float] = {}
    node_draw: dict[int, float] = {}
    g = 0
    for n in range(n_nodes):
        doms = ("facility", f"row{row_of[n]}", f"rack{rack_of[n]}", node_ids[n])
        in_node = min(gpus_per_node, n_gpus - g)
        ids = [f"GPU-{g + i:06d}" for i in range(in_node)]
        for gid in ids:
            gpus.append(Gpu(gid, node_ids[n], "NVIDIA H100 SXM", 200.0, 700.0, 700.0, 70.0, doms))
        g += in_node
        # split the node into jobs of 1, 2, 4 or 8 GPUs
        i = 0
        while i < in_node:
            size = int(min(in_node - i, rng.choice([1, 2, 4, 8])))
            if rng.random() < 0.05:  # an idle GPU
                i += 1
                continue
            t = int(rng.integers(3))
            scale = float(rng.choice([1.0, 2.0, 3.0]))
            draw = draws[t]
            samples = tuple(
                Sample(
                    throughput=scale * size * y,
                    cap_w=max(200.0, p * 700.0),
                    power_w=min(draw, p * 700.0),
                )
                for p, y in _SHAPES[t]
            )
            jobs.append(
                Job(
                    f"job{len(jobs)}",
                    tuple(ids[i : i + size]),
                    samples,
                    weight=float(rng.choice([1.0, 2.0])),
                    allowed_slowdown=0.9 if kind == "budget" else 0.05,
                    synchronous=size > 1 and rng.random() < 0.5,
                )
            )
            for _ in range(size):
                total_draw += draw
                rack_draw[rack_of[n]] = rack_draw.get(rack_of[n], 0.0) + draw
                node_draw[n] = node_draw.get(n, 0.0) + draw
            i += size
    domains = [Domain("facility", budget_share * total_draw + 70.0 * n_gpus, kind="facility")]
    n_rows = row_of[-1] + 1
    for r in range(n_rows):
        domains.append(Domain(f"row{r}", 1e12, kind="row"))
    for r in range(rack_of[-1] + 1):
        domains.append(
            Domain(
                f"rack{r}",
                0.85 * rack_draw.get(r, 0.0) + 8 * 70 * nodes_per_rack + 500,
                baseline_w=500.0,
                kind="rack",
            )
        )
    for n in range(n_nodes):
        domains.append(
            Domain(
                node_ids[n],
                0.95 * node_draw.get(n, 0.0) + 8 * 70 + 800,
                baseline_w=800.0,
                kind="node",
            )
        )
    return Problem(
        tuple(gpus), tuple(domains), tuple(jobs), Objective(kind, price_per_kwh=0.12, pue=1.3)
    )


def bench_capping(sizes: list[int], lp_max: int = 100_000) -> None:
    print("capping: size, fit s, fast s, lp s, fast objective, lp objective, rel diff, lp status")
    for n in sizes:
        p = synthetic_fleet(n)
        t0 = time.perf_counter()
        fits = fit_curves(p)
        t_fit = time.perf_counter() - t0
        t0 = time.perf_counter()
        fast = solve_capping(p, "fast", fits=fits)
        t_fast = time.perf_counter() - t0
        if n <= lp_max:
            t0 = time.perf_counter()
            lp = solve_capping(p, "lp", fits=fits)
            t_lp = time.perf_counter() - t0
            rel = abs(fast.objective_value - lp.objective_value) / max(
                1e-12, abs(lp.objective_value)
            )
            print(
                f"  {n:>7} GPUs  fit {t_fit:6.2f}  fast {t_fast:6.2f}  lp {t_lp:6.2f}  "
                f"{fast.objective_value:.6f}  {lp.objective_value:.6f}  {rel:.1e}  {lp.status}  "
                f"(jobs {len(p.jobs)}, domains {len(p.domains)}, fast status: {fast.status})"
            )
        else:
            print(f"  {n:>7} GPUs  fit {t_fit:6.2f}  fast {t_fast:6.2f}  lp skipped")


# jobs per node of the quality bench's fleet (8 GPUs a node, jobs of 1-8 GPUs)
_QUALITY_JOBS_PER_NODE = 2.62


def _timed(fit: Callable[[Problem], dict[str, CurveFit]], p: Problem) -> tuple[float, float]:
    """Wall and CPU seconds of one fit of ``p``, the garbage left before it collected first
    (a collection it would otherwise pay for: building a large problem leaves one due)."""
    gc.collect()
    t0, c0 = time.perf_counter(), time.process_time()
    fit(p)
    return time.perf_counter() - t0, time.process_time() - c0


def bench_fit(job_counts: list[int], repeats: int = 3) -> None:
    print(
        f"curve fitting: ms per job, median of {repeats} runs (wall / CPU), batched fit_curves "
        "vs the per-job reference, on the quality bench's fleet"
    )
    for n in job_counts:
        p, _ = quality_fleet(max(1, round(n / _QUALITY_JOBS_PER_NODE)), 1, "energy", 0.05, 10.0)
        runs = {
            name: [_timed(fit, p) for _ in range(repeats)]
            for name, fit in (("batched", fit_curves), ("per-job", _fit_curves_reference))
        }
        ms = {
            name: [statistics.median(t[k] for t in r) * 1000 / len(p.jobs) for k in (0, 1)]
            for name, r in runs.items()
        }
        print(
            f"  {len(p.jobs):>7} jobs  batched {ms['batched'][0]:.3f} / {ms['batched'][1]:.3f}  "
            f"per-job {ms['per-job'][0]:.3f} / {ms['per-job'][1]:.3f}  "
            f"ratio {ms['per-job'][0] / ms['batched'][0]:.1f}x / "
            f"{ms['per-job'][1] / ms['batched'][1]:.1f}x  (target batched <= 0.3 ms/job)"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sizes", type=int, nargs="*", default=[1000, 10_000, 100_000])
    ap.add_argument("--fit-jobs", type=int, nargs="*", default=[3000, 30_000])
    ap.add_argument("--fit-repeats", type=int, default=3)
    args = ap.parse_args()
    bench_capping(args.sizes)
    bench_fit(args.fit_jobs, args.fit_repeats)
    try:
        from bench.consolidation_scale import bench_consolidation
    except ImportError:
        print("consolidation: bench/consolidation_scale.py not available")
    else:
        bench_consolidation()


if __name__ == "__main__":
    main()
