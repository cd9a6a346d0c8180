"""Plan quality on held-out fleet families, scored on their TRUE curves.

The fleets come from ``bench/fleets.py``: families unlike the quality bench's
one (mixed GPU models, A/B feeds that are not a tree, 3 noisy samples per job,
no power readings, compute-bound truths steeper than any prior, memory-bound
jobs sampled only above their draw), with true curves read off published
power-limit sweeps. By default it runs the HELD_OUT families on held-out seeds
(1000+), which must not be used for tuning (see ``bench/fleets.py``);
``--tuning`` runs the tuning families on seeds 0-9 instead.

The product is measured through its public entry points only:
``optimizer.problem.parse_problem`` on the generated document, then
``optimizer.capping.solve_capping`` (it fits the curves itself) and
``optimizer.capping.evaluate_caps`` with the true curves. The **oracle** is the
same LP (``solve_capping(..., "lp", fits=truth)``) on exact points of the true
curves (every 10 W and at the draw, no noise, no margin), as in
``bench/optimizer_quality.py``.

* budget mode, every budgeted domain at 70 % and 50 % of its uncapped draw
  (facility, racks at 1.0-1.2x that, feeds at 0.9-1.05x; raised where the GPUs
  at their minimum caps would already exceed it), jobs' allowances lifted
  (0.99) so the plan is scored on throughput: score = Σ weight × throughput /
  uncapped of the product's caps on the true curves over the oracle's
  (target >= 0.99 on every family and level), and budget violations;
* energy mode, every job at 5 / 10 / 20 % allowed slowdown, and at the family's
  own mix of those ("mix"): GPU power saved on the true curves against no
  capping, and against the oracle's saving (target >= 0.90 of it); jobs past
  their promise (true slowdown > allowance) as a share of jobs (target <= 2 %)
  and the worst excess in points (target <= 1); coverage, the share of jobs
  within their allowance, against the stated ``slowdown_confidence`` (0.95).

Each cell is run in its own ``try``: a crash (e.g. ``--method fast`` on feeds,
or in energy mode) is printed in its row and the run goes on.

A saving ratio above 1 is no success: the product saved more than the oracle
by slowing jobs past their promise (the "past" column says how many).

Run: ``python bench/heldout_quality.py [--tuning] [--seeds 5] [--quick] [--method auto]``.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.fleets import (
    FAMILIES,
    HELD_OUT,
    HELD_OUT_SEED_START,
    TUNING,
    TUNING_SEEDS,
    Fleet,
    budget_clamped,
    budget_document,
    describe,
    energy_document,
    generate,
)
from optimizer.capping import Evaluation, Method, evaluate_caps, solve_capping
from optimizer.curves import Curve, CurveFit
from optimizer.problem import DEFAULT_SLOWDOWN_CONFIDENCE, Problem, parse_problem

BUDGET_LEVELS = (0.7, 0.5)
ALLOWANCES: tuple[float | None, ...] = (0.05, 0.10, 0.20, None)  # None: the family's mix
TARGET_BUDGET = 0.99
TARGET_ENERGY = 0.90
TARGET_PAST = 0.02
TARGET_EXCESS_PTS = 1.0
QUICK_JOBS = 20
TOL = 1e-6


def truth_fits(fleet: Fleet) -> dict[str, CurveFit]:
    """The true curves as fits: exact points, no noise, no margin (the oracle's input)."""
    out: dict[str, CurveFit] = {}
    for jid, c in fleet.truth.items():
        xs, ys = c.table(10.0)
        out[jid] = CurveFit(
            curve=Curve(xs, ys),
            method="truth",
            n_samples=0,
            n_distinct_caps=0,
            rmse_rel=None,
            draw_w=c.draw_w,
        )
    return out


@dataclass
class BudgetCell:
    scores: list[float] = field(default_factory=list)
    violations: int = 0
    clamped: int = 0
    crashes: list[str] = field(default_factory=list)


@dataclass
class EnergyCell:
    saved_w: float = 0.0
    oracle_saved_w: float = 0.0
    before_w: float = 0.0
    ratios: list[float] = field(default_factory=list)  # per seed
    slowdown_excess: list[float] = field(default_factory=list)  # per job: slowdown - allowance
    oracle_past: int = 0  # jobs past their allowance under the oracle's caps (a check: 0)
    crashes: list[str] = field(default_factory=list)

    @property
    def jobs(self) -> int:
        return len(self.slowdown_excess)

    @property
    def past(self) -> int:
        return sum(e > TOL for e in self.slowdown_excess)


def _crash(e: BaseException, debug: bool) -> str:
    if debug:
        traceback.print_exc()
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:110]


def run_budget(
    fleet: Fleet,
    level: float,
    truth: dict[str, CurveFit],
    method: Method,
    cell: BudgetCell,
    dbg: bool,
) -> None:
    p = parse_problem(budget_document(fleet, level), f"{fleet.family}:{fleet.seed}")
    cell.clamped += len(budget_clamped(fleet, level))
    try:
        plan = solve_capping(p, method)
    except Exception as e:
        cell.crashes.append(_crash(e, dbg))
        return
    oracle = solve_capping(p, "lp", fits=truth)
    got = evaluate_caps(p, plan.caps_w, truth)
    best = evaluate_caps(p, oracle.caps_w, truth)
    cell.scores.append(got.normalized_throughput / best.normalized_throughput)
    cell.violations += len(got.budget_violations)


def _slowdowns(p: Problem, before: Evaluation, after: Evaluation) -> list[float]:
    allowed = {j.id: j.allowed_slowdown for j in p.jobs}
    return [
        1 - after.job_throughput[j] / before.job_throughput[j] - allowed[j]
        for j in before.job_throughput
    ]


def run_energy(
    fleet: Fleet,
    allowance: float | None,
    truth: dict[str, CurveFit],
    method: Method,
    cell: EnergyCell,
    dbg: bool,
) -> None:
    p = parse_problem(energy_document(fleet, allowance), f"{fleet.family}:{fleet.seed}")
    before = evaluate_caps(p, {}, truth)
    try:
        plan = solve_capping(p, method)
    except Exception as e:
        cell.crashes.append(_crash(e, dbg))
        return
    oracle = solve_capping(p, "lp", fits=truth)
    got = evaluate_caps(p, plan.caps_w, truth)
    best = evaluate_caps(p, oracle.caps_w, truth)
    saved = before.fleet_power_w - got.fleet_power_w
    best_saved = before.fleet_power_w - best.fleet_power_w
    cell.before_w += before.fleet_power_w
    cell.saved_w += saved
    cell.oracle_saved_w += best_saved
    if best_saved > 1e-6 * before.fleet_power_w:
        cell.ratios.append(saved / best_saved)
    cell.slowdown_excess += _slowdowns(p, before, got)
    cell.oracle_past += sum(e > TOL for e in _slowdowns(p, before, best))


def _fmt_crashes(crashes: Sequence[str]) -> str:
    if not crashes:
        return ""
    kinds = sorted(set(crashes))
    return f"  CRASH x{len(crashes)}: " + "; ".join(kinds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--tuning", action="store_true", help="the tuning families (seeds 0-9)")
    ap.add_argument("--seeds", type=int, default=5, help="seeds per family (default 5)")
    ap.add_argument("--quick", action="store_true", help=f"1 seed, {QUICK_JOBS} jobs a fleet")
    ap.add_argument("--method", default="auto", choices=("auto", "lp", "fast"))
    ap.add_argument("--family", action="append", help="only this family (repeatable)")
    ap.add_argument("--debug", action="store_true", help="print tracebacks of crashes")
    args = ap.parse_args()
    method = cast("Method", args.method)

    names = TUNING if args.tuning else HELD_OUT
    if args.family:
        names = tuple(n for n in names if n in args.family)
    n_seeds = 1 if args.quick else args.seeds
    start = TUNING_SEEDS.start if args.tuning else HELD_OUT_SEED_START
    seeds = list(range(start, start + n_seeds))
    n_jobs = QUICK_JOBS if args.quick else None
    split = "tuning" if args.tuning else "held-out"
    t0 = time.perf_counter()
    print(
        f"{split} families, seeds {seeds[0]}-{seeds[-1]}, product method {args.method!r}; "
        f"scored on the true curves against the oracle LP on them"
    )
    budget: dict[tuple[str, float], BudgetCell] = {}
    energy: dict[tuple[str, float | None], EnergyCell] = {}
    for name in names:
        tf = time.perf_counter()
        print(f"\n== {name}: {FAMILIES[name].stresses}")
        fleets = []
        for seed in seeds:
            try:
                fleets.append(generate(name, seed, n_jobs))
            except Exception as exc:
                print(f"  seed {seed}: generator CRASH {_crash(exc, args.debug)}")
        for fl in fleets:
            print(f"  seed {fl.seed}: {describe(fl)}")
        for fl in fleets:
            truth = truth_fits(fl)
            for level in BUDGET_LEVELS:
                cell = budget.setdefault((name, level), BudgetCell())
                try:
                    run_budget(fl, level, truth, method, cell, args.debug)
                except Exception as exc:
                    cell.crashes.append(_crash(exc, args.debug))
            for a in ALLOWANCES:
                ecell = energy.setdefault((name, a), EnergyCell())
                try:
                    run_energy(fl, a, truth, method, ecell, args.debug)
                except Exception as exc:
                    ecell.crashes.append(_crash(exc, args.debug))
        print(
            "  mode    level   score vs oracle: min   mean  (per seed)        violations  "
            "clamped domains"
        )
        for level in BUDGET_LEVELS:
            c = budget[(name, level)]
            per = " ".join(f"{s:.3f}" for s in c.scores)
            line = (
                f"  budget  {level * 100:3.0f} %   "
                + (f"{min(c.scores):.4f} {np.mean(c.scores):.4f}  ({per})" if c.scores else "-")
            ).ljust(66)
            print(f"{line}  {c.violations:3d}        {c.clamped:3d}{_fmt_crashes(c.crashes)}")
        print("  mode    allow.  saved  oracle  ratio (min seed)   past   worst     coverage  jobs")
        for a in ALLOWANCES:
            e = energy[(name, a)]
            label = "mix " if a is None else f"{a * 100:2.0f} %"
            if e.jobs:
                saved = e.saved_w / e.before_w
                orc = e.oracle_saved_w / e.before_w
                ratio = e.saved_w / e.oracle_saved_w if e.oracle_saved_w > 0 else float("nan")
                worst = max(0.0, *e.slowdown_excess) * 100
                cov = 1 - e.past / e.jobs
                print(
                    f"  energy  {label}  {saved * 100:5.1f} % {orc * 100:5.1f} %  "
                    f"{ratio:5.3f} ({min(e.ratios, default=float('nan')):5.3f})   "
                    f"{e.past / e.jobs * 100:4.1f} %  +{worst:4.1f} pts  {cov * 100:5.1f} %  "
                    f"{e.jobs:4d}{_fmt_crashes(e.crashes)}"
                )
            else:
                print(f"  energy  {label}  -{_fmt_crashes(e.crashes)}")
        print(f"  ({time.perf_counter() - tf:.1f} s)")

    print("\n== summary (targets: budget >= 0.99 of the oracle on every family and level;")
    print("   energy >= 0.90 of the oracle's saving at each allowance; <= 2 % of jobs past")
    print(
        f"   their promise, none by more than 1 point; coverage vs the stated "
        f"{DEFAULT_SLOWDOWN_CONFIDENCE:.2f})"
    )
    cells = [(k, c) for k, c in budget.items() if c.scores]
    met = sum(min(c.scores) >= TARGET_BUDGET for _, c in cells)
    crashed = sum(bool(c.crashes) for c in budget.values())
    if cells:
        (wf, wl), wc = min(cells, key=lambda kc: min(kc[1].scores))
        print(
            f"budget: worst {min(wc.scores):.4f} ({wf}, {wl * 100:.0f} %); {met} of "
            f"{len(budget)} family x level cells >= {TARGET_BUDGET} on every seed; "
            f"violations {sum(c.violations for c in budget.values())}; "
            f"cells with a crash {crashed}: {'MET' if met == len(budget) else 'NOT MET'}"
        )
    else:
        print(f"budget: no result (cells with a crash {crashed}): NOT MET")
    for a in ALLOWANCES:
        es = [(n, energy[(n, a)]) for n in names if (n, a) in energy]
        label = "mix" if a is None else f"{a * 100:.0f} %"
        done = [(n, e) for n, e in es if e.jobs]
        crashed = sum(bool(e.crashes) for _, e in es)
        if not done:
            print(f"energy {label}: no result (families with a crash {crashed}): NOT MET")
            continue
        ratios = [(n, e.saved_w / e.oracle_saved_w) for n, e in done if e.oracle_saved_w > 0]
        wn, wr = min(ratios, key=lambda nr: nr[1]) if ratios else ("-", float("nan"))
        jobs = sum(e.jobs for _, e in done)
        past = sum(e.past for _, e in done)
        worst = max(max(e.slowdown_excess) for _, e in done) * 100
        cov = 1 - past / jobs
        ok = (
            wr >= TARGET_ENERGY
            and past / jobs <= TARGET_PAST
            and worst <= TARGET_EXCESS_PTS + TOL
            and not crashed
        )
        print(
            f"energy {label}: saving ratio worst {wr:.3f} ({wn}), "
            f"{sum(r >= TARGET_ENERGY for _, r in ratios)} of {len(es)} families >= "
            f"{TARGET_ENERGY}; past promise {past} of {jobs} jobs ({past / jobs * 100:.1f} %), "
            f"worst +{max(worst, 0.0):.1f} pts; coverage {cov * 100:.1f} % "
            f"(stated {DEFAULT_SLOWDOWN_CONFIDENCE * 100:.0f} %); crashes {crashed}; "
            f"oracle past {sum(e.oracle_past for _, e in done)}: "
            f"{'MET' if ok else 'NOT MET'}"
        )
    print(f"runtime {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
