"""``dcenergy demo``: the whole loop on a simulated fleet, and what it measurably saved.

On a machine with no GPU and no server: a temporary state directory, the
embedded store, a fresh Ed25519 key pair and a simulated fleet of real agent
parts (``agent.simfleet``). The phases, all on virtual time:

1. **probe**: the busy GPUs step through a few caps, as an operator's capping
   experiment would, so every job's power→throughput curve has samples;
2. **before**: the fleet runs uncapped; this window is the "before" figure;
3. **plan**: a topology with budgets (facility ≈ ``facility_share`` of the
   measured uncapped draw, racks a little looser), ``build_problem`` from the
   store, ``solve_capping``, ``make_plan``; signed and published to the store;
4. **after**: the agents' reconcilers fetch, verify and apply their parts;
   the fleet runs on. The "after" window starts once the reconcilers can have
   stepped every GPU to its setpoint (``settle_s``).

Every figure printed is **measured** from the telemetry in the store (GPU
power, job throughput from the jobs' own reports, the agents' audit
records), never taken from the plan's prediction, which is shown beside it.
This module is the CLI's: it may import ``agent`` and ``optimizer``.
"""

from __future__ import annotations

import math
import statistics
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dcenergy import schema

if TYPE_CHECKING:
    from agent.simfleet import SimFleet
    from dcenergy.config import Config
    from dcenergy.store.base import Store
    from optimizer.topology import Topology

Progress = Callable[[str], None]
DEFAULT_STEP_S = 5.0  # the simulated agents' sampling step

PROBE_LEVELS = (0.8, 0.65, 0.55, 0.45, 0.35)  # share of the max limit; 1.0 is the "before" phase
SETTLED_STEPS = 2  # reconciler intervals of margin after the last expected change


@dataclass(frozen=True)
class DemoOptions:
    """Size and timing of a demo run (virtual seconds); defaults are the README's run."""

    nodes: int = 4
    gpus: int = 8
    probe_s: float = 300.0
    before_s: float = 600.0
    after_s: float = 600.0
    step_s: float = DEFAULT_STEP_S
    seed: int = 0
    facility_share: float = 0.75
    rack_share: float = 0.8
    objective: str | None = None  # None: optimizer.objective from the config


@dataclass
class Window:
    """What the store's telemetry says about one stretch of virtual time."""

    start_ns: int
    end_ns: int
    fleet_w: float = 0.0
    fleet_peak_w: float = 0.0
    host_w: dict[str, float] = field(default_factory=dict)
    domain_w: dict[str, float] = field(default_factory=dict)
    domain_peak_w: dict[str, float] = field(default_factory=dict)
    job_rate: dict[str, float] = field(default_factory=dict)
    job_w: dict[str, float] = field(default_factory=dict)
    job_unit: dict[str, str] = field(default_factory=dict)
    samples: int = 0


def measure(
    store: Store,
    start_ns: int,
    end_ns: int,
    topology: Topology | None = None,
    *,
    every_s: float = DEFAULT_STEP_S,
) -> Window:
    """Mean and peak GPU power (fleet, host, domain) and mean job rates in [start, end).

    The store sums per host (and per job) in buckets of one sampling step: all
    agents sample on one clock, so a bucket is one fleet snapshot; a domain's
    power is its hosts' GPU power plus its baseline.
    """
    from dcenergy.store.base import Agg, AggregateQuery, Fn

    w = Window(start_ns, end_ns)
    per_t: dict[int, dict[str, float]] = defaultdict(dict)
    host_q = AggregateQuery(
        schema.GPU.name,
        (Agg(Fn.SUM, "power_w"),),
        start_ns,
        end_ns,
        by=(schema.TAG_HOST,),
        every_s=every_s,
    )
    for r in store.aggregate(host_q):
        pw = r.values.get("sum_power_w")
        if isinstance(pw, int | float) and r.time_ns is not None:
            per_t[r.time_ns][r.tags[schema.TAG_HOST]] = float(pw)
    if per_t:
        snaps = list(per_t.values())
        w.samples = len(snaps)
        totals = [sum(s.values()) for s in snaps]
        w.fleet_w, w.fleet_peak_w = statistics.fmean(totals), max(totals)
        hosts = sorted({h for s in snaps for h in s})
        w.host_w = {h: statistics.fmean(s.get(h, 0.0) for s in snaps) for h in hosts}
        if topology is not None:
            base = {d.id: d.baseline_w for d in topology.domains}
            members: dict[str, list[str]] = defaultdict(list)
            for h in hosts:
                for d in topology.domains_of(h):
                    members[d].append(h)
            for d, hs in sorted(members.items()):
                series = [base[d] + sum(s.get(h, 0.0) for h in hs) for s in snaps]
                w.domain_w[d], w.domain_peak_w[d] = statistics.fmean(series), max(series)
    rates: dict[str, list[float]] = defaultdict(list)
    powers: dict[str, list[float]] = defaultdict(list)
    job_q = AggregateQuery(
        schema.JOB.name,
        (Agg(Fn.SUM, "throughput"), Agg(Fn.SUM, "power_w")),
        start_ns,
        end_ns,
        by=(schema.TAG_JOB,),
        every_s=every_s,
    )
    for r in store.aggregate(job_q):  # a job on several hosts: their rows summed
        job = r.tags[schema.TAG_JOB]
        thr, pw = r.values.get("sum_throughput"), r.values.get("sum_power_w")
        if not job or not isinstance(thr, int | float):
            continue
        rates[job].append(float(thr))
        if isinstance(pw, int | float):
            powers[job].append(float(pw))
    unit_q = AggregateQuery(
        schema.JOB.name,
        (Agg(Fn.LAST, "throughput_unit"),),
        start_ns,
        end_ns,
        by=(schema.TAG_JOB,),
    )
    for r in store.aggregate(unit_q):
        if r.tags[schema.TAG_JOB] in rates:
            w.job_unit[r.tags[schema.TAG_JOB]] = str(r.values.get("last_throughput_unit", "units"))
    w.job_rate = {j: statistics.fmean(v) for j, v in sorted(rates.items())}
    w.job_w = {j: statistics.fmean(v) for j, v in sorted(powers.items())}
    return w


def demo_topology(
    host_w: Mapping[str, float], facility_share: float, rack_share: float
) -> dict[str, Any]:
    """Facility budget ≈ ``facility_share`` of the measured uncapped draw, racks of two nodes.

    Budgets are rounded to 50 W, as an operator would write them; the racks'
    share is looser so that the facility binds and the racks nest under it.
    """
    hosts = sorted(host_w, key=_host_order)
    racks = [hosts[i : i + 2] for i in range(0, len(hosts), 2)]
    domains: list[dict[str, Any]] = [
        {
            "id": "facility",
            "kind": "facility",
            "budget_w": _round50(facility_share * sum(host_w.values())),
        }
    ]
    host_doms: dict[str, dict[str, Any]] = {}
    for k, members in enumerate(racks, start=1):
        rid = f"rack-{k}"
        budget = _round50(rack_share * sum(host_w[h] for h in members))
        domains.append({"id": rid, "kind": "rack", "parent": "facility", "budget_w": budget})
        for h in members:
            host_doms[h] = {"domains": [rid]}
    return {"version": 1, "domains": domains, "hosts": host_doms, "default_domains": ["facility"]}


def _round50(w: float) -> float:
    return float(max(50, 50 * round(w / 50)))


def _host_order(host: str) -> tuple[str, int]:
    name, _, num = host.rpartition("-")
    return (name, int(num)) if num.isdigit() else (host, 0)


def settle_s(fleet: SimFleet) -> float:
    """Virtual time the reconcilers need to step every GPU to any setpoint, with margin."""
    rc = fleet.reconciler_config
    span = max(
        (g.power_limits().max_w - g.power_limits().min_w for _, g in fleet.gpus()), default=0.0
    )
    steps = math.ceil(span / rc.max_step_w) + SETTLED_STEPS
    return steps * rc.interval_s + fleet.step_s


def run_demo(
    cfg: Config, opts: DemoOptions, state_dir: Path, progress: Progress = lambda _m: None
) -> dict[str, Any]:
    """Run the four phases in ``state_dir``; returns the measured report (JSON-able)."""
    from agent.simfleet import SimFleet
    from dcenergy.plan import generate_keypair, load_private_key, load_public_key
    from dcenergy.publish import publish
    from dcenergy.store import EmbeddedStore
    from optimizer.capping import solve_capping
    from optimizer.plan import make_plan, plan_to_json
    from optimizer.problem import parse_problem
    from optimizer.snapshot import build_problem, objective_doc
    from optimizer.topology import parse_topology

    wall0 = time.perf_counter()
    timings: dict[str, float] = {}
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    keys = state_dir / "keys"
    generate_keypair(keys / "plan.key", keys / "plan.pub", force=True)
    private_key = load_private_key(keys / "plan.key")
    public_key = load_public_key(keys / "plan.pub")
    store = EmbeddedStore(state_dir / "dcenergy.sqlite")
    probe_s = opts.probe_s if opts.probe_s > 0 else 0.0
    level_s = probe_s / len(PROBE_LEVELS)
    total_s = probe_s + opts.before_s + opts.after_s
    o = cfg.optimizer
    fleet = SimFleet(
        opts.nodes,
        opts.gpus,
        store=store,
        state_root=state_dir / "agents",
        public_key=public_key,
        reconciler_config=cfg.reconciler,
        seed=opts.seed,
        step_s=opts.step_s,
        start_ns=(time.time_ns() - int(total_s * 1e9)) // 10**9 * 10**9,  # ends about now
    )
    try:
        busy = sum(len(j.gpus) for j in fleet.jobs)
        n_gpus = len(fleet.gpus())
        progress(
            f"fleet: {opts.nodes} simulated nodes × {opts.gpus} GPUs, {len(fleet.jobs)} jobs, "
            f"{_n(n_gpus - busy, 'idle GPU')}; state in {state_dir}"
        )

        def phase(name: str, t0: float) -> None:
            timings[name] = time.perf_counter() - t0
            progress(f"  done in {timings[name]:.1f} s (virtual time {_clock(fleet, total_s)})")

        t = time.perf_counter()
        if probe_s:
            progress(
                f"[1/4] probe: caps at {', '.join(f'{x:.0%}' for x in PROBE_LEVELS)} of max, "
                f"{level_s:.0f} virtual s each"
            )
            for level in PROBE_LEVELS:
                fleet.set_power_limits(level)
                fleet.run(level_s)
            fleet.reset_power_limits()
            phase("probe", t)

        progress(f"[2/4] before: uncapped, {opts.before_s:.0f} virtual s")
        t = time.perf_counter()
        before_start = fleet.now_ns + 1
        fleet.run(opts.before_s)
        fleet.flush()
        before_end = fleet.now_ns + 1
        phase("before", t)

        progress("[3/4] plan: topology, problem from the store, solve, sign, publish")
        t = time.perf_counter()
        uncapped = measure(store, before_start, before_end, every_s=opts.step_s)
        topo_doc = demo_topology(uncapped.host_w, opts.facility_share, opts.rack_share)
        topo = parse_topology(topo_doc, "<demo topology>")
        objective = opts.objective or o.objective
        doc = build_problem(
            store,
            topo,
            now_ns=fleet.now_ns,
            window_s=(fleet.now_ns - fleet.start_ns) / 1e9,
            objective=objective_doc(o, objective),
            allowed_slowdown=o.allowed_slowdown,
        )
        problem = parse_problem(doc, "<telemetry>")
        result = solve_capping(problem)
        ttl_s = max(o.plan_ttl_s, opts.after_s + 120.0)  # one plan covers the whole phase
        plan = make_plan(problem, result, created_ns=fleet.now_ns, ttl_s=ttl_s)
        plan_json = plan_to_json(plan)
        signed = publish(plan_json, store, private_key, fleet.now_ns)
        published_ns = fleet.now_ns
        progress(
            f"  plan {plan.plan_id[:12]}: {result.method}, {result.status}; "
            f"{len(signed)} host parts signed and published"
        )
        phase("plan", t)

        settle = min(settle_s(fleet), opts.after_s / 2)
        progress(
            f"[4/4] after: agents apply the plan, {opts.after_s:.0f} virtual s "
            f"(measured after the first {settle:.0f} s)"
        )
        t = time.perf_counter()
        fleet.run(opts.after_s)
        fleet.flush()
        end_ns = fleet.now_ns + 1
        phase("after", t)

        before = measure(store, before_start, before_end, topo, every_s=opts.step_s)
        after = measure(store, published_ns + int(settle * 1e9), end_ns, topo, every_s=opts.step_s)
        report = _report(
            cfg=cfg,
            fleet=fleet,
            topo=topo,
            plan_json=plan_json,
            before=before,
            after=after,
            audit=_audit(store, published_ns, end_ns, plan.plan_id),
            at_setpoint=_at_setpoint(store, plan_json, end_ns, opts.step_s),
        )
        report["objective"] = objective
        report["virtual_s"] = {
            "probe": probe_s,
            "before": opts.before_s,
            "after": opts.after_s,
            "settle": settle,
        }
        report["state_dir"] = str(state_dir)
        timings["total"] = time.perf_counter() - wall0
        report["wall_s"] = {k: round(v, 2) for k, v in timings.items()}
        return report
    finally:
        fleet.close()
        store.close()


def _clock(fleet: SimFleet, total_s: float) -> str:
    done = (fleet.now_ns - fleet.start_ns) / 1e9
    return f"{done / 60:.0f}/{total_s / 60:.0f} min"


def _audit(store: Store, start_ns: int, end_ns: int, plan_id: str) -> dict[str, Any]:
    """The agents' audit records about this plan: counts by action and by clamp reason."""
    actions: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    gpus: dict[str, set[str]] = defaultdict(set)
    for p in store.read(schema.AUDIT.name, start_ns=start_ns, end_ns=end_ns):
        action = p.tags.get(schema.TAG_ACTION, "")
        if p.fields.get("plan_id", "") not in ("", plan_id):
            continue
        actions[action] += 1
        gpus[action].add(p.tags.get(schema.TAG_GPU_UUID, ""))
        for r in str(p.fields.get("reason", "")).split(","):
            if r and action == "clamped":
                reasons[r] += 1
    return {
        "records": dict(sorted(actions.items())),
        "gpus": {a: len(g) for a, g in sorted(gpus.items())},
        "clamp_reasons": dict(sorted(reasons.items())),
    }


def _at_setpoint(
    store: Store, plan_json: Mapping[str, Any], end_ns: int, step_s: float
) -> dict[str, int]:
    """How many planned GPUs the last telemetry shows enforcing their planned limit (±1 W)."""
    from dcenergy.store.base import Agg, AggregateQuery, Fn

    q = AggregateQuery(
        schema.GPU.name,
        (Agg(Fn.LAST, "power_limit_enforced_w"),),
        end_ns - int(3 * step_s * 1e9),
        end_ns,
        by=(schema.TAG_GPU_UUID,),
    )
    latest = {
        r.tags[schema.TAG_GPU_UUID]: float(r.values["last_power_limit_enforced_w"])
        for r in store.aggregate(q)
        if isinstance(r.values.get("last_power_limit_enforced_w"), int | float)
    }
    sps = plan_json["setpoints"]
    ok = sum(1 for s in sps if abs(latest.get(s["gpu"], -1e9) - s["power_limit_w"]) <= 1.0)
    return {"setpoints": len(sps), "at_setpoint": ok}


def _report(
    *,
    cfg: Config,
    fleet: SimFleet,
    topo: Topology,
    plan_json: Mapping[str, Any],
    before: Window,
    after: Window,
    audit: dict[str, Any],
    at_setpoint: dict[str, int],
) -> dict[str, Any]:
    o = cfg.optimizer
    pred_before = plan_json["predictions"]["before"]
    pred_after = plan_json["predictions"]["after"]
    defaults = {g.identity.uuid: g.power_limits().default_w for _, g in fleet.gpus()}
    capped = sum(1 for s in plan_json["setpoints"] if s["power_limit_w"] < defaults[s["gpu"]] - 0.5)
    domains = []
    for d in topo.domains:
        if d.id not in after.domain_w:
            continue
        domains.append(
            {
                "domain": d.id,
                "kind": d.kind,
                "budget_w": d.budget_w,
                "before_w": before.domain_w[d.id],
                "after_w": after.domain_w[d.id],
                "after_peak_w": after.domain_peak_w[d.id],
                "predicted_after_w": pred_after["domain_power_w"].get(d.id),
                "within_budget": after.domain_peak_w[d.id] <= d.budget_w,
            }
        )
    jobs = []
    for job in fleet.jobs:
        jid = job.job_id
        b, a = before.job_rate.get(jid), after.job_rate.get(jid)
        eb = _per_unit(before.job_w.get(jid), b)
        ea = _per_unit(after.job_w.get(jid), a)
        jobs.append(
            {
                "job": jid,
                "kind": job.kind,
                "gpus": len(job.gpus),
                "unit": job.unit,
                "before": b,
                "after": a,
                "change": (a / b - 1.0) if a is not None and b else None,
                "predicted_after": pred_after["job_throughput"].get(jid),
                "power_before_w": before.job_w.get(jid),
                "power_after_w": after.job_w.get(jid),
                "energy_per_unit_before_j": eb,
                "energy_per_unit_after_j": ea,
            }
        )
    saved_w = before.fleet_w - after.fleet_w
    it_kwh_day = saved_w * 24.0 / 1000.0
    facility_kwh_day = it_kwh_day * o.pue
    facility = next((d for d in domains if d["kind"] == "facility"), None)
    return {
        "fleet": {
            "nodes": len(fleet.nodes),
            "gpus": len(fleet.gpus()),
            "jobs": len(fleet.jobs),
            "idle_gpus": len(fleet.gpus()) - sum(len(j.gpus) for j in fleet.jobs),
            "model": fleet.gpus()[0][1].identity.name,
        },
        "plan": {
            "plan_id": plan_json["plan_id"],
            "method": plan_json["solver"]["method"],
            "status": plan_json["solver"]["status"],
            "feasible": plan_json["solver"]["feasible"],
            "slowdown_exceeded": plan_json["solver"]["slowdown_exceeded"],
            "setpoints": len(plan_json["setpoints"]),
            "gpus_capped": capped,
            "allowed_slowdown": o.allowed_slowdown,
            "predicted_power_before_w": pred_before["fleet_power_w"],
            "predicted_power_after_w": pred_after["fleet_power_w"],
            "lease_s": (plan_json["expires_ns"] - plan_json["created_ns"]) / 1e9,
        },
        "fleet_power": {
            "budget_w": facility["budget_w"] if facility else None,
            "before_w": before.fleet_w,
            "after_w": after.fleet_w,
            "after_peak_w": after.fleet_peak_w,
            "predicted_after_w": pred_after["fleet_power_w"],
            "within_budget": bool(domains) and all(d["within_budget"] for d in domains),
        },
        "domains": domains,
        "jobs": jobs,
        "savings": {
            "power_w": saved_w,
            "it_kwh_per_day": it_kwh_day,
            "facility_kwh_per_day": facility_kwh_day,
            "cost_per_day": facility_kwh_day * o.price_per_kwh,
            "co2_kg_per_day": facility_kwh_day * o.carbon_g_per_kwh / 1000.0,
            "price_per_kwh": o.price_per_kwh,
            "pue": o.pue,
            "carbon_g_per_kwh": o.carbon_g_per_kwh,
        },
        "audit": {**audit, **at_setpoint},
        "windows": {
            "before": {
                "start_ns": before.start_ns,
                "end_ns": before.end_ns,
                "samples": before.samples,
            },
            "after": {"start_ns": after.start_ns, "end_ns": after.end_ns, "samples": after.samples},
        },
    }


def _per_unit(power_w: float | None, rate: float | None) -> float | None:
    """Energy per unit of work (J/unit) = power / rate."""
    if power_w is None or not rate:
        return None
    return power_w / rate


# --- text -------------------------------------------------------------------------------


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], right: set[int]) -> list[str]:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def fmt(r: Sequence[str]) -> str:
        cells = [str(c).rjust(w) if i in right else str(c).ljust(w) for i, (c, w) in
                 enumerate(zip(r, widths, strict=True))]  # fmt: skip
        return "  " + "  ".join(cells).rstrip()

    return [fmt(header), *[fmt(r) for r in rows]]


def _num(x: float | None, spec: str = ",.0f") -> str:
    return "-" if x is None else format(x, spec)


def render(report: Mapping[str, Any]) -> str:
    """The measured before/after report as text (the README shows one)."""
    f, p, fp, s, a = (report[k] for k in ("fleet", "plan", "fleet_power", "savings", "audit"))
    v = report["virtual_s"]
    out = [
        f"dcenergy demo: {f['nodes']} simulated nodes × {f['gpus'] // f['nodes']} "
        f"{f['model']}, {_n(f['jobs'], 'job')}, {_n(f['idle_gpus'], 'idle GPU')}",
        f"virtual time: probe {v['probe'] / 60:.0f} min, before {v['before'] / 60:.0f} min, "
        f"after {v['after'] / 60:.0f} min (first {v['settle']:.0f} s not measured); "
        f"wall {report['wall_s']['total']:.1f} s",
        "",
        f"Plan {p['plan_id'][:12]} (objective {report['objective']}, {p['method']}, "
        f"{p['status']}): {p['gpus_capped']} of {p['setpoints']} GPUs capped, "
        f"allowed slowdown {p['allowed_slowdown']:.0%}, lease {p['lease_s'] / 60:.0f} min",
    ]
    if p["slowdown_exceeded"]:
        out.append("  jobs past their allowed slowdown: " + ", ".join(p["slowdown_exceeded"]))
    recs = a["records"]
    out.append(
        f"Agents: {a['at_setpoint']} of {a['setpoints']} GPUs enforce their setpoint; audit "
        f"records: {recs.get('applied', 0)} applied, {recs.get('clamped', 0)} clamped "
        f"({_reasons(a['clamp_reasons'])}), {recs.get('refused', 0)} refused"
    )
    out += ["", "Power, measured from telemetry (GPU draw, mean over each window)"]
    rows = [
        [
            d["domain"],
            _num(d["budget_w"]) + " W",
            _num(d["before_w"]) + " W",
            _num(d["after_w"]) + " W",
            _num(d["after_peak_w"]) + " W",
            _num(d["predicted_after_w"]) + " W",
            "ok" if d["within_budget"] else "OVER",
        ]
        for d in report["domains"]
    ]
    out += _table(
        ["domain", "budget", "before", "after", "after peak", "predicted", ""],
        rows,
        right={1, 2, 3, 4, 5},
    )
    out += ["", "Jobs, measured throughput (from the jobs' own counters)"]
    rows = []
    for j in report["jobs"]:
        unit = j["unit"]
        rows.append(
            [
                j["job"],
                j["kind"],
                str(j["gpus"]),
                f"{_num(j['before'])} {unit}/s",
                f"{_num(j['after'])}",
                _num(None if j["change"] is None else 100 * j["change"], "+.1f") + " %",
                _num(j["predicted_after"]),
                f"{_num(j['energy_per_unit_before_j'], '.3g')} → "
                f"{_num(j['energy_per_unit_after_j'], '.3g')} J/{unit.rstrip('s')}",
            ]
        )
    out += _table(
        ["job", "kind", "GPUs", "before", "after", "change", "predicted", "energy per unit"],
        rows,
        right={2, 3, 4, 5, 6},
    )
    out += [
        "",
        f"Fleet GPU power: {fp['before_w'] / 1000:.2f} kW → {fp['after_w'] / 1000:.2f} kW "
        f"(budget {fp['budget_w'] / 1000:.2f} kW, "
        f"{'every domain within budget' if fp['within_budget'] else 'OVER BUDGET'})",
        f"Savings: {s['power_w'] / 1000:.2f} kW = "
        f"{s['it_kwh_per_day']:,.0f} kWh/day of GPU energy, "
        f"{s['facility_kwh_per_day']:,.0f} kWh/day at the meter (PUE {s['pue']:g}): "
        f"{s['cost_per_day']:,.2f}/day at {s['price_per_kwh']:g}/kWh, "
        f"{s['co2_kg_per_day']:,.1f} kg CO2/day at {s['carbon_g_per_kwh']:g} g/kWh",
    ]
    return "\n".join(out)


def _reasons(r: Mapping[str, int]) -> str:
    """Clamp causes; ``max_step`` is the reconciler stepping towards the setpoint, not a limit."""
    named = {"max_step": "max_step (steps on the way)"}
    return ", ".join(f"{named.get(k, k)}: {n}" for k, n in r.items()) or "none"


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")
