"""Plan quality when the fitted curves are not the true ones.

A synthetic fleet whose jobs follow true curves (compute-bound, memory-bound,
never reaching their cap) while the optimizer sees only noisy samples, and
some jobs were never observed under a cap (the prior must do). Everything is
scored on the TRUE curves.

* budget mode, facility budget = 70 % of the uncapped draw: throughput of the
  plan vs uniform capping (target >= 1.10x) and vs the oracle LP that knows the
  true curves (target >= 0.99x), and budget violations (target 0);
* energy mode, 5 % allowed slowdown: GPU power saved vs no capping (target >= 20 %;
  energy over a fixed window, and per unit of work), and the true slowdown of
  the worst job.

Fit error is reported per job twice: RMSE / mean over the samples (what the
fit sees) and the mean |fitted - true| over the cap range, relative to uncapped
throughput (what it gets wrong), by fit method.

The energy mode tightens every job's floor by its fit's ``slowdown_margin``
(a one-sided bound at the objective's ``slowdown_confidence``, 95 % by default,
``optimizer/curves.py``). The bench also solves at 80 %, with no margin, and
with the true curves (the oracle), so the trade-off between energy saved and
jobs past their allowance is visible rather than one point of it; and with
each job fitted on its own samples alone (no fleet pooling: what the
optimizer did before it pooled shapes across jobs of a kind).

About the fleet: the issue's three classes of job. 20 % never reach their cap
(held back by data loading, the host or the network: 150-280 W of an H100's
700 W); of the rest, 60 % compute-bound training near TDP and 40 %
memory-bound inference at 43-64 % of TDP. 1-8 GPUs per job, 20 % never
observed under a cap (one uncapped sample: the prior must do), 3 % throughput
noise, 1 % power-reading noise. The true shapes deliberately differ from the
optimizer's priors (the memory-bound truth is steeper below 70 % of its draw).
The budget lines are printed for the same fleet without the jobs that never
reach their cap too: there uniform shares (~390 W) already sit near the
memory-bound jobs' draw and the oracle itself gains only ~1.09x, so the
1.10x target depends on such jobs being in the fleet, as they are in real ones.

Run: ``python bench/optimizer_quality.py [--nodes 200] [--seed 1]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from optimizer.baselines import evaluate_baselines
from optimizer.capping import Evaluation, evaluate_caps, solve_capping
from optimizer.curves import Curve, CurveFit, fit_curves
from optimizer.problem import Domain, Gpu, Job, Objective, Problem, Sample

MAX_W, MIN_W, IDLE_W = 700.0, 200.0, 70.0
# true shapes: (cap as a share of the job's draw, share of uncapped throughput)
COMPUTE = ((0.28, 0.38), (0.45, 0.64), (0.6, 0.81), (0.75, 0.93), (0.9, 0.99), (1.0, 1.0))
MEMORY = ((0.44, 0.70), (0.55, 0.86), (0.7, 0.97), (0.85, 1.0), (1.0, 1.0))
# jobs that never reach their cap: held back by data loading, the host or the
# network, drawing 150-280 W of an H100's 700 W; a share of all jobs
HOST_SHARE = 0.2
HOST_DRAW_W = (150.0, 280.0)


def true_curve(shape: tuple[tuple[float, float], ...], draw: float, scale: float) -> Curve:
    xs = [p * draw for p, _ in shape]
    ys = [scale * r for _, r in shape]
    if xs[0] > MIN_W:
        s0 = (ys[1] - ys[0]) / (xs[1] - xs[0])
        xs.insert(0, MIN_W)
        ys.insert(0, max(0.0, ys[0] - s0 * (xs[1] - MIN_W)))
    else:
        y_min = float(np.interp(MIN_W, xs, ys))
        keep = [(x, y) for x, y in zip(xs, ys, strict=True) if x > MIN_W]
        xs = [MIN_W] + [x for x, _ in keep]
        ys = [y_min] + [y for _, y in keep]
    if xs[-1] < MAX_W:
        xs.append(MAX_W)
        ys.append(ys[-1])
    return Curve(tuple(xs), tuple(ys))


def fleet(
    n_nodes: int,
    seed: int,
    kind: str,
    slowdown: float,
    budget_share: float,
    host_share: float = HOST_SHARE,
) -> tuple[Problem, dict[str, CurveFit]]:
    rng = np.random.default_rng(seed)
    gpus: list[Gpu] = []
    jobs: list[Job] = []
    truth: dict[str, CurveFit] = {}
    total_draw = 0.0
    for n in range(n_nodes):
        node, rack = f"node{n}", f"rack{n // 4}"
        ids = [f"GPU-{n:04d}-{i}" for i in range(8)]
        gpus += [
            Gpu(g, node, "NVIDIA H100", MIN_W, MAX_W, MAX_W, IDLE_W, ("facility", rack, node))
            for g in ids
        ]
        i = 0
        while i < 8:
            size = int(min(8 - i, rng.choice([1, 2, 4, 8])))
            members = tuple(ids[i : i + size])
            i += size
            # one draw picks the class, so host_share=0 replays the two-class fleet exactly
            u = float(rng.random())
            host_bound = u < host_share
            mem_bound = not host_bound and (u - host_share) / (1 - host_share) < 0.4
            shape = MEMORY if mem_bound or host_bound else COMPUTE
            if host_bound:
                draw = float(rng.uniform(*HOST_DRAW_W))
            else:
                draw = float(rng.uniform(300, 450) if mem_bound else rng.uniform(640, 700))
            scale = float(rng.uniform(50, 150)) * size
            curve = true_curve(shape, draw, scale)
            jid = f"job{len(jobs)}"
            samples: tuple[Sample, ...]
            if rng.random() < 0.2:  # never capped: one uncapped observation
                samples = (
                    Sample(
                        throughput=scale * rng.normal(1, 0.02), power_w=draw * rng.normal(1, 0.01)
                    ),
                )
            else:
                caps = rng.choice(
                    np.arange(250.0, 701.0, 50.0), size=int(rng.integers(4, 9)), replace=False
                )
                samples = tuple(
                    Sample(
                        throughput=max(0.0, curve.value(c) * rng.normal(1, 0.03)),
                        cap_w=float(c),
                        power_w=float(min(c, draw) * rng.normal(1, 0.01)),
                    )
                    for c in caps
                )
            jobs.append(
                Job(
                    jid,
                    members,
                    samples,
                    weight=1.0,
                    allowed_slowdown=slowdown,
                    synchronous=size > 1,
                )
            )
            truth[jid] = CurveFit(curve, "truth", 0, 0, None, draw)
            total_draw += draw * size
    budget = budget_share * total_draw
    domains = [Domain("facility", budget, kind="facility")]
    domains += [Domain(f"rack{r}", 1e9, kind="rack") for r in range(-(-n_nodes // 4))]
    domains += [Domain(f"node{n}", 1e9, kind="node") for n in range(n_nodes)]
    return Problem(tuple(gpus), tuple(domains), tuple(jobs), Objective(kind)), truth


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--nodes", type=int, default=200)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()

    p, truth = fleet(args.nodes, args.seed, "budget", 0.99, 0.7)
    fits = fit_curves(p)
    rmse = [
        f.rmse_rel
        for f in fits.values()
        if f.rmse_rel is not None and f.method not in ("prior", "fleet")
    ]
    priors = sum(f.method in ("prior", "fleet") for f in fits.values())
    hosts = sum(t.draw_w <= HOST_DRAW_W[1] for t in truth.values())
    print(
        f"fleet: {len(p.gpus)} GPUs, {len(p.jobs)} jobs ({hosts} never reach their cap, "
        f"{priors} never measured below it: on the fleet's or the fixed prior), "
        f"fit RMSE/mean median {np.median(rmse):.3f}"
    )
    grid = np.linspace(MIN_W, MAX_W, 101)
    by_method: dict[str, list[float]] = {}
    for jid, f in fits.items():
        t = truth[jid]
        err = np.abs(f.curve.values(grid) / f.uncapped - t.curve.values(grid) / t.uncapped)
        by_method.setdefault(f.method, []).append(float(err.mean()))
    print("  true-curve error per job, mean |fit - true| / uncapped over the cap range:")
    for method, errs in sorted(by_method.items()):
        print(
            f"    {method:6s} {len(errs):4d} jobs: median {np.median(errs) * 100:.2f} %, "
            f"p90 {np.percentile(errs, 90) * 100:.2f} %, worst {max(errs) * 100:.2f} %"
        )
    print("budget mode, facility budget = 70 % of uncapped draw (scored on true curves)")
    _budget_lines(p, truth, fits)
    print("  same, every job alike (objective.job_value per_job: what the 1.10x target was set on)")
    per_job = dataclasses.replace(
        p, objective=dataclasses.replace(p.objective, job_value="per_job")
    )
    _budget_lines(per_job, truth, fits)
    p0, truth0 = fleet(args.nodes, args.seed, "budget", 0.99, 0.7, host_share=0.0)
    print("  same, on a fleet without jobs that never reach their cap:")
    _budget_lines(p0, truth0, fit_curves(p0))

    p2, truth2 = fleet(args.nodes, args.seed, "energy", 0.05, 10.0)
    fits2 = fit_curves(p2)
    before = evaluate_caps(p2, {}, truth2)
    print("energy mode, 5 % allowed slowdown (scored on true curves)")
    print(f"  GPU power uncapped {before.fleet_power_w / 1000:.1f} kW")
    no_margin = {k: dataclasses.replace(f, slowdown_margin=0.0) for k, f in fits2.items()}
    _energy_line("no margin", p2, before, solve_capping(p2, fits=no_margin).caps_w, truth2)
    for label, conf in (("confidence 80 %", 0.8), ("confidence 95 % *", 0.95)):
        p_conf = dataclasses.replace(
            p2, objective=dataclasses.replace(p2.objective, slowdown_confidence=conf)
        )
        _energy_line(label, p_conf, before, solve_capping(p_conf).caps_w, truth2)
    alone = solve_capping(p2, fits=fit_curves(p2, pool=False)).caps_w
    _energy_line("each job alone", p2, before, alone, truth2)
    _energy_line("oracle", p2, before, solve_capping(p2, "lp", fits=truth2).caps_w, truth2)
    print(
        "  (* default; target: >= 20 % saved with as few jobs past 5 % as possible; saved =\n"
        "   GPU power, i.e. energy over a fixed window; per unit of work less by the slowdown)"
    )


def _budget_lines(p: Problem, truth: dict[str, CurveFit], fits: dict[str, CurveFit]) -> None:
    plan = solve_capping(p, fits=fits)
    oracle = solve_capping(p, "lp", fits=truth)
    score = evaluate_caps(p, plan.caps_w, truth)
    best = evaluate_caps(p, oracle.caps_w, truth)
    uniform = evaluate_baselines(p, fits)["uniform"].caps_w
    uni = evaluate_caps(p, dict(zip((g.id for g in p.gpus), uniform, strict=True)), truth)
    print(
        f"  optimized {score.normalized_throughput:.2f} "
        f"{'job' if p.objective.job_value == 'per_job' else 'GPU'}-eq ({plan.method}), uniform "
        f"{uni.normalized_throughput:.2f}, oracle {best.normalized_throughput:.2f}"
    )
    vs_uni = score.normalized_throughput / uni.normalized_throughput
    vs_oracle = score.normalized_throughput / best.normalized_throughput
    ceiling = best.normalized_throughput / uni.normalized_throughput
    print(
        f"  vs uniform {vs_uni:.3f}x (target >= 1.10; the oracle itself gets {ceiling:.3f}x), "
        f"vs oracle {vs_oracle:.4f}x (target >= 0.99)"
    )
    print(
        f"  budget violations: {len(score.budget_violations)} (target 0); "
        f"uniform: {len(uni.budget_violations)}"
    )


def _energy_line(
    label: str, p: Problem, before: Evaluation, caps: dict[str, float], truth: dict[str, CurveFit]
) -> None:
    after = evaluate_caps(p, caps, truth)
    saved = 1 - after.fleet_power_w / before.fleet_power_w
    slow = [1 - after.job_throughput[j] / before.job_throughput[j] for j in before.job_throughput]
    over = sum(s > 0.05 + 1e-9 for s in slow)
    work = after.normalized_throughput / before.normalized_throughput
    per_work = 1 - (after.fleet_power_w / work) / before.fleet_power_w
    print(
        f"  {label:17s} saved {saved * 100:4.1f} % ({per_work * 100:4.1f} % per unit of work); "
        f"true slowdown median {np.median(slow) * 100:.1f} %, worst {max(slow) * 100:4.1f} %, "
        f"{over} of {len(slow)} jobs past 5 %"
    )


if __name__ == "__main__":
    main()
