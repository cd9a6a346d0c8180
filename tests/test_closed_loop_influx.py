"""End to end on a real influxd: agents → InfluxDB → optimizer → signed plan → agents → measured.

Simulated agents (real sampler, spool, shipper and reconciler) ship to influxd;
the optimizer builds its problem from the InfluxStore, solves, and publishes a
signed plan through it; the agents fetch, verify and apply their parts; then
the telemetry in influxd, queried with InfluxQL, must show every domain under
its budget and every job near the throughput the plan predicted.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.simfleet import SimFleet
from dcenergy.cli.demo import demo_topology
from dcenergy.publish import publish
from dcenergy.store import InfluxStore
from optimizer.capping import solve_capping
from optimizer.plan import make_plan, plan_to_json
from optimizer.problem import parse_problem
from optimizer.snapshot import build_problem
from optimizer.topology import parse_topology
from tests.influx_server import InfluxServer

pytestmark = [pytest.mark.influxdb, pytest.mark.slow]

S = 1_000_000_000
KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
STEP_S = 5.0
PROBE_LEVELS = (0.8, 0.65, 0.55, 0.45, 0.35)
SETTLE_S = 90.0  # the reconcilers' 100 W steps every 10 s reach any setpoint by then
THROUGHPUT_TOLERANCE = 0.05


@pytest.fixture
def store(influxd: InfluxServer, influx_db: str) -> Iterator[InfluxStore]:
    s = InfluxStore(influxd.url, influx_db)
    yield s
    s.close()


def host_power(server: InfluxServer, db: str, start_ns: int, end_ns: int) -> list[dict[str, float]]:
    """Per fleet snapshot (one sampling time), each host's summed GPU power, via InfluxQL."""
    q = (
        f'SELECT sum("power_w") FROM "gpu" WHERE time >= {start_ns} AND time < {end_ns} '
        f'GROUP BY time({int(STEP_S)}s), "host" fill(none)'
    )
    res: Any = server.query(q, db=db)
    per_t: dict[str, dict[str, float]] = defaultdict(dict)
    for series in res["results"][0].get("series", []):
        for t, w in series["values"]:
            per_t[t][series["tags"]["host"]] = w
    return list(per_t.values())


def test_closed_loop_keeps_every_domain_under_budget_at_the_predicted_throughput(
    tmp_path: Path, influxd: InfluxServer, influx_db: str, store: InfluxStore
) -> None:
    with SimFleet(
        4,
        4,
        store=store,
        state_root=tmp_path / "agents",
        public_key=KEY.public_key(),
        step_s=STEP_S,
    ) as fleet:
        hosts = fleet.hosts
        # samples at several caps, then the uncapped baseline
        for level in PROBE_LEVELS:
            fleet.set_power_limits(level)
            fleet.run(30.0)
        fleet.reset_power_limits()
        before_start = fleet.now_ns + 1
        fleet.run(240.0)
        assert fleet.flush() == 0
        before = host_power(influxd, influx_db, before_start, fleet.now_ns + 1)
        assert len(before) == 48 and all(len(s) == 4 for s in before)
        uncapped = {h: sum(s[h] for s in before) / len(before) for h in hosts}

        topo = parse_topology(demo_topology(uncapped, 0.75, 0.8))
        doc = build_problem(
            store,
            topo,
            now_ns=fleet.now_ns,
            window_s=(fleet.now_ns - fleet.start_ns) / 1e9,
            objective={"kind": "budget"},
            allowed_slowdown=0.1,
        )
        problem = parse_problem(doc, "<influx>")
        assert {j.id for j in problem.jobs} == {j.job_id for j in fleet.jobs}
        plan = make_plan(problem, solve_capping(problem), created_ns=fleet.now_ns, ttl_s=900)
        plan_json = plan_to_json(plan)
        publish(plan_json, store, KEY, fleet.now_ns)
        published = fleet.now_ns

        fleet.run(300.0)
        assert fleet.flush() == 0
        after_start, end = published + int(SETTLE_S * S), fleet.now_ns + 1
        jobs = {j.job_id: j for j in fleet.jobs}

    # every domain under its budget, at every sampling time after the reconcilers settled
    after = host_power(influxd, influx_db, after_start, end)
    assert len(after) == (300 - SETTLE_S) / STEP_S + 1  # both ends are sampling times
    for d in topo.domains:
        members = [h for h in hosts if d.id in topo.domains_of(h)]
        peak = max(d.baseline_w + sum(s[h] for h in members) for s in after)
        mean_before = d.baseline_w + sum(uncapped[h] for h in members)
        assert peak <= d.budget_w, (d.id, peak, d.budget_w)
        assert mean_before > d.budget_w or d.kind != "facility"  # the budget did bind

    # per job: measured throughput (its own counter, via the agent) matches the plan
    rates: dict[str, list[float]] = defaultdict(list)
    for p in store.read("job", start_ns=after_start, end_ns=end):
        rates[p.tags["job_id"]].append(float(p.fields["throughput"]))
    predicted = plan_json["predictions"]["after"]["job_throughput"]
    assert set(rates) == set(jobs) == set(predicted)
    for job_id, values in rates.items():
        measured = sum(values) / len(values)
        assert measured == pytest.approx(predicted[job_id], rel=THROUGHPUT_TOLERANCE), job_id
        assert measured == pytest.approx(jobs[job_id].last_rate, rel=1e-6)  # the ground truth

    # and the agents said what they did: applied, nothing refused
    audit = store.read("audit", start_ns=published, end_ns=end)
    actions = {p.tags["action"] for p in audit}
    assert "applied" in actions
    assert "refused" not in actions
