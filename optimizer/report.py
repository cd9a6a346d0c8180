"""A plan as text for people: what changes, what it costs, what it buys.

Pure: it takes the problem and the plan and returns a string; the CLI prints it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from optimizer.plan import Plan
from optimizer.problem import Problem, measured_domain_power


def _table(header: list[str], rows: list[list[str]], *, text_last: bool = False) -> list[str]:
    """Columns: the first (and with ``text_last`` the last: free text) left, numbers right."""
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)
    ]
    last = len(widths) - 1 if text_last else 0
    fmt = "  ".join(f"{{:<{w}}}" if i in (0, last) else f"{{:>{w}}}" for i, w in enumerate(widths))
    return [fmt.format(*header).rstrip(), fmt.format(*("-" * w for w in widths))] + [
        fmt.format(*r).rstrip() for r in rows
    ]


def _w(x: float) -> str:
    return f"{x / 1000:.2f} kW" if abs(x) >= 10_000 else f"{x:.0f} W"


def render_report(problem: Problem, plan: Plan, *, max_rows: int = 50) -> str:
    """The plan as a readable report: domains, jobs, moves, shadow prices, baselines."""
    out: list[str] = []
    s = plan.solver
    out.append(f"Plan {plan.plan_id}  objective: {plan.objective.get('kind')}")
    feasible = "yes" if s.feasible else "NO"
    out.append(f"solver: {s.method}, {s.status}, {s.time_s * 1000:.0f} ms, feasible: {feasible}")
    for short in s.infeasible_domains:
        out.append(
            f"  ! domain {short.id}: budget short by {short.shortfall_w:.0f} W even with every GPU "
            "at its minimum; its GPUs are held at minimum (best effort)"
        )
    if s.slowdown_exceeded:
        past, margin = _split_exceeded(problem, plan)
        if past:
            out.append("  ! jobs past their allowed slowdown: " + ", ".join(past))
        if margin:
            out.append(
                "  ! jobs within their allowed slowdown but inside the fit's safety margin: "
                + ", ".join(margin)
            )
    out.append("")

    # domains
    now = measured_domain_power(problem)
    rows = []
    for d in problem.domains[:max_rows]:
        before = plan.before.domain_power_w.get(d.id, 0.0)
        after = plan.after.domain_power_w.get(d.id, 0.0)
        rows.append(
            [
                d.id,
                d.kind or "",
                _w(d.budget_w),
                _w(now[d.id]) if d.id in now else _w(before),
                _w(after),
                _w(before - after),
                f"{plan.shadow_prices.get(d.id, 0.0):.3g}",
            ]
        )
    out.append("Domains (power = predicted GPU draw + baseline)")
    out += _table(["domain", "kind", "budget", "now", "planned", "saved", "value/kW"], rows)
    if len(problem.domains) > max_rows:
        out.append(f"... {len(problem.domains) - max_rows} more domains")
    out.append("")

    # jobs
    caps = {sp.gpu: sp.power_limit_w for sp in plan.setpoints}
    clocks = {sp.gpu: sp.sm_clock_max_mhz for sp in plan.setpoints}
    with_policy = any(j.policy is not None or j.exempt for j in problem.jobs)
    rows = []
    for j in problem.jobs[:max_rows]:
        jc = [caps.get(g, 0.0) for g in j.gpus]
        cap_txt = f"{min(jc):.0f}" if max(jc) - min(jc) < 0.5 else f"{min(jc):.0f}-{max(jc):.0f}"
        clk = [c for c in (clocks.get(g) for g in j.gpus) if c is not None]
        b = plan.before.job_throughput.get(j.id, 0.0)
        a = plan.after.job_throughput.get(j.id, 0.0)
        slow = (1 - a / b) * 100 if b > 0 else 0.0
        row = [
            j.id,
            str(len(j.gpus)),
            cap_txt + " W",
            f"{min(clk)} MHz" if clk else "-",
            f"{a:.4g} {j.unit}/s",
            f"{slow:.1f} %",
            "exempt" if j.exempt else f"{j.allowed_slowdown * 100:.0f} %",
        ]
        if with_policy:
            row += [f"{j.weight:g}", j.policy or "-"]
        rows.append(row)
    out.append("Jobs")
    header = ["job", "gpus", "cap", "sm clock", "throughput", "slowdown", "allowed"]
    extra = ["weight", "policy (where it came from)"] if with_policy else []
    out += _table(header + extra, rows, text_last=with_policy)
    if len(problem.jobs) > max_rows:
        out.append(f"... {len(problem.jobs) - max_rows} more jobs")
    out.append("")
    out += _held(problem, plan, max_rows)

    out.append(
        f"Fleet GPU power: {_w(plan.before.fleet_power_w)} -> {_w(plan.after.fleet_power_w)} "
        f"(saves {_w(plan.before.fleet_power_w - plan.after.fleet_power_w)})"
    )
    o = problem.objective
    if o.price_per_kwh or o.carbon_g_per_kwh:
        saved_kw = (plan.before.fleet_power_w - plan.after.fleet_power_w) / 1000 * o.pue
        out.append(
            f"  per day: {saved_kw * 24:.1f} kWh, {saved_kw * 24 * o.price_per_kwh:.2f} money, "
            f"{saved_kw * 24 * o.carbon_g_per_kwh / 1000:.1f} kg CO2 (PUE {o.pue:g})"
        )
    out.append("")

    if plan.consolidation:
        out += _consolidation(plan.consolidation)
        out.append("")

    if plan.probes:
        pr = plan.probes
        planned = float(pr.get("planned_normalized") or 0.0)
        lost = float(pr.get("given_up_normalized") or 0.0)
        out.append(
            f"Probes ({len(pr.get('jobs', {}))} jobs, {pr.get('gpus', 0)} GPUs, "
            f"{float(pr.get('lease_s', 0.0)):.0f} s each): predicted throughput given up "
            f"{lost:.4g} ({lost / planned * 100 if planned > 0 else 0.0:.2f} % of planned) "
            "while they last"
        )
        out.append("")

    if plan.baselines:
        rows = [
            [name, f"{b.throughput:.4g}", _w(b.power_w), ", ".join(b.budget_violations) or "-"]
            for name, b in plan.baselines.items()
        ]
        per = "" if problem.objective.job_value == "per_job" else " x GPUs"
        out.append(f"Policies compared (throughput = sum of weight{per} x fraction of uncapped)")
        out += _table(["policy", "throughput", "GPU power", "over budget"], rows)
    return "\n".join(out).rstrip() + "\n"


def _held(problem: Problem, plan: Plan, max_rows: int) -> list[str]:
    """GPUs the plan left at their default cap because they are unhealthy or shared."""
    held = [g for g in problem.gpus if g.pinned]
    if not held:
        return []
    caps = {sp.gpu: sp.power_limit_w for sp in plan.setpoints}
    rows = []
    for g in held[:max_rows]:
        why = list(g.held)
        if g.shared_by:
            why.append("shared by jobs " + ", ".join(g.shared_by) + " (MIG, MPS or time slicing)")
        rows.append([g.id, g.host, f"{caps.get(g.id, g.default_w):.0f} W", "; ".join(why)])
    out = ["GPUs held at their default cap (not capped: unhealthy, or shared by several jobs)"]
    out += _table(["gpu", "host", "cap", "why"], rows, text_last=True)
    if len(held) > max_rows:
        out.append(f"... {len(held) - max_rows} more held GPUs")
    return [*out, ""]


def _split_exceeded(problem: Problem, plan: Plan) -> tuple[list[str], list[str]]:
    """Jobs the solver could not keep at their floor: truly past the allowance, or only
    past the floor the fit's uncertainty margin tightened (predicted slowdown still allowed)."""
    allowed = {j.id: j.allowed_slowdown for j in problem.jobs}
    past: list[str] = []
    margin: list[str] = []
    for job in plan.solver.slowdown_exceeded:
        b = plan.before.job_throughput.get(job, 0.0)
        a = plan.after.job_throughput.get(job, 0.0)
        slow = 1 - a / b if b > 0 else 0.0
        (past if slow > allowed.get(job, 0.0) + 1e-9 else margin).append(job)
    return past, margin


def _consolidation(c: Mapping[str, Any], max_moves: int = 50) -> list[str]:
    freed = c.get("nodes_freed") or []
    nodes = len(freed) if isinstance(freed, list) else int(freed)
    gap = c.get("gap")
    out = [
        "Consolidation "
        f"({c.get('method', '?')}, {c.get('status', '?')}, "
        f"gap {'unbounded' if gap is None else f'{100 * float(gap):.2f} %'})",
        f"  frees {c.get('gpus_freed', 0)} GPUs and {nodes} nodes: saves "
        f"{_w(float(c.get('savings_w', 0.0)))} = {float(c.get('kwh_day', 0.0)):.1f} kWh/day, "
        f"{float(c.get('cost_day', 0.0)):.2f}/day, "
        f"{float(c.get('co2_kg_day', 0.0)):.1f} kg CO2/day",
    ]
    if isinstance(freed, list) and freed:
        shown = ", ".join(str(n) for n in freed[:10])
        more = f" (+{len(freed) - 10} more)" if len(freed) > 10 else ""
        out.append(f"  nodes to power down: {shown}{more}")
    moves = c.get("moves") or []
    for mv in moves[:max_moves]:
        if isinstance(mv, Mapping):
            out.append(f"  move {mv.get('job')}: {mv.get('from_node')} -> {mv.get('to_node')}")
    if len(moves) > max_moves:
        out.append(f"  ... {len(moves) - max_moves} more moves (see the plan JSON)")
    return out


__all__ = ["render_report"]
