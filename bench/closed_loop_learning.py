"""Does the closed loop learn its jobs' curves by itself? Energy mode, probing off and on.

The simulated fleet of ``dcenergy demo`` (real agent, reconciler and optimizer
code, embedded store, virtual time) starts uncapped, with no cap ever tried:
every job is on the pessimistic prior. Each cycle the optimizer builds the
problem from the store's recent window, solves in ``energy`` mode (5 %
allowed slowdown), signs and publishes; the agents apply the plan for one
interval, and the telemetry of that interval is measured. The jobs' only new
evidence is what the optimizer's own caps produce.

With probing on (``optimizer/probing.py``, ``--probe-share``, ``--probe-lease``)
each plan also probes the jobs whose curve is still uncertain with a short cap
inside their allowance on the steepest prior; the probe's readings become
their samples. The run is made once per mode (``--probing off|on|both``) on
the same simulated fleet.

Per cycle: GPU power saved against the uncapped first interval, the worst
measured job slowdown, jobs measured past their promise (slowdown above the
allowance), the jobs probed and their predicted cost, and how the jobs were
fitted. Figures are measured from the telemetry (probes included), not
predicted.

Run: ``python bench/closed_loop_learning.py [--cycles 6] [--interval 300] [--nodes 4]
[--probing both]``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.simfleet import SimFleet
from dcenergy.cli.demo import measure
from dcenergy.config import load_config
from dcenergy.plan import generate_keypair, load_private_key, load_public_key
from dcenergy.publish import publish
from dcenergy.store import EmbeddedStore
from optimizer.capping import solve_capping
from optimizer.curves import fit_curves
from optimizer.plan import make_plan, plan_to_json
from optimizer.probing import choose_probes
from optimizer.problem import parse_problem
from optimizer.snapshot import build_problem, objective_doc
from optimizer.topology import single_domain

ALLOWED = 0.05
SETTLE_S = 75.0  # the reconciler ramps caps in max_step_w steps; measure after


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--cycles", type=int, default=6)
    ap.add_argument("--interval", type=float, default=300.0, help="virtual s per plan")
    ap.add_argument("--window", type=float, default=1800.0, help="telemetry window, s")
    ap.add_argument("--nodes", type=int, default=4)
    ap.add_argument("--probing", choices=("off", "on", "both"), default="both")
    ap.add_argument("--probe-share", type=float, default=0.1, help="of each domain's budget")
    ap.add_argument("--probe-lease", type=float, default=120.0, help="virtual s")
    args = ap.parse_args()
    wall = time.perf_counter()
    for mode in ("off", "on") if args.probing == "both" else (args.probing,):
        run_mode(args, mode == "on")
    print(f"wall {time.perf_counter() - wall:.1f} s")


def run_mode(args: argparse.Namespace, probing: bool) -> None:
    cfg = load_config(None, env={})
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        generate_keypair(root / "plan.key", root / "plan.pub")
        key = load_private_key(root / "plan.key")
        store = EmbeddedStore(root / "store.sqlite")
        total_s = args.interval * (args.cycles + 1)
        fleet = SimFleet(
            args.nodes,
            8,
            store=store,
            state_root=root / "agents",
            public_key=load_public_key(root / "plan.pub"),
            reconciler_config=cfg.reconciler,
            start_ns=(time.time_ns() - int(total_s * 1e9)) // 10**9 * 10**9,
        )
        try:
            start = fleet.now_ns + 1
            fleet.run(args.interval)
            fleet.flush()
            base = measure(store, start, fleet.now_ns + 1)
            print(
                f"\nprobing {'on' if probing else 'off'}"
                + (f" (share {args.probe_share:g}, {args.probe_lease:g} s)" if probing else "")
                + f"; fleet: {args.nodes} nodes x 8 GPUs, {len(fleet.jobs)} jobs; uncapped "
                f"{base.fleet_w / 1000:.2f} kW; energy mode, {ALLOWED:.0%} allowed slowdown"
            )
            print("cycle  saved   worst job slowdown  past  probed (cost)  jobs by fit")
            for cycle in range(1, args.cycles + 1):
                doc = build_problem(
                    store,
                    single_domain(1e9),
                    now_ns=fleet.now_ns,
                    window_s=args.window,
                    objective=objective_doc(cfg.optimizer, "energy"),
                    allowed_slowdown=ALLOWED,
                )
                problem = parse_problem(doc, "<telemetry>")
                fits = fit_curves(problem)
                result = solve_capping(problem, fits=fits)
                probes = (
                    choose_probes(problem, result, share=args.probe_share, lease_s=args.probe_lease)
                    if probing
                    else None
                )
                plan = make_plan(
                    problem,
                    result,
                    created_ns=fleet.now_ns,
                    ttl_s=args.interval + 600.0,
                    probes=probes,
                )
                publish(plan_to_json(plan), store, key, fleet.now_ns)
                published = fleet.now_ns
                fleet.run(args.interval)
                fleet.flush()
                w = measure(store, published + int(SETTLE_S * 1e9), fleet.now_ns + 1)
                slow = {j: 1 - w.job_rate[j] / r for j, r in base.job_rate.items() if r > 0}
                worst = max(slow, key=lambda j: slow[j])
                methods = Counter(f.method for f in fits.values())
                past = sum(s > ALLOWED + 1e-9 for s in slow.values())
                n_probed = len(probes.job_caps_w) if probes is not None else 0
                cost = (
                    probes.given_up_value / probes.planned_value * 100
                    if probes is not None and probes.planned_value > 0
                    else 0.0
                )
                print(
                    f"{cycle:5d}  {(1 - w.fleet_w / base.fleet_w) * 100:4.1f} %  "
                    f"{slow[worst] * 100:5.1f} % ({worst:9s})  {past:4d}  "
                    f"{n_probed:3d} ({cost:4.2f} %)  "
                    + ", ".join(f"{m} {n}" for m, n in sorted(methods.items()))
                )
        finally:
            fleet.close()
            store.close()


if __name__ == "__main__":
    main()
