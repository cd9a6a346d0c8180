"""``dcenergy.status.collect`` on both stores, over a fleet with one host in every state.

The fleet (times relative to ``NOW``):

* ``ok-1``: reporting, 2 GPUs, a plan part in force, 2 ``applied`` since it (and an
  older refusal, from before the part, that does not count);
* ``silent-1``: its agent stopped 5 minutes ago;
* ``refused-1``: its newest part was refused;
* ``lapsed-1``: its lease ended a minute ago and its GPUs were restored;
* ``revert-1``: under a live revert (``dcenergy revert``);
* ``drops-1``: its spool overflowed (50 points dropped in the last 15 minutes), 20,000
  points waiting, one GPU lost, the thermal guard acted.

Plus a best-effort plan record, a live budget override signed with our key and one
with a forged signature.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from dcenergy import schema
from dcenergy.overrides import BudgetOverride, override_point, sign_override
from dcenergy.plan import PlanPart, Setpoint, sign_part
from dcenergy.publish import part_point, revert_parts
from dcenergy.schema import Point, point
from dcenergy.status import (
    CRITICAL,
    INFO,
    LAPSED,
    REVERTED,
    WARNING,
    Thresholds,
    collect,
    nagios,
)
from dcenergy.store.base import Store
from dcenergy.store.embedded import EmbeddedStore
from dcenergy.store.influx import InfluxStore

S = 1_000_000_000
NOW = (time.time_ns() // S) * S
KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
OTHER = Ed25519PrivateKey.from_private_bytes(bytes(range(1, 33)))
_counter = itertools.count()
HOSTS = ("ok-1", "silent-1", "refused-1", "lapsed-1", "revert-1", "drops-1")


def _agent(host: str, t: int, *, overflow: int = 0, depth: int = 0) -> Point:
    return point(
        schema.AGENT,
        {"host": host},
        {
            "samples_total": t // S % 100_000,
            "spool_depth": depth,
            "dropped_overflow_total": overflow,
            "dropped_rejected_total": 0,
            "dropped_partial_total": 0,
            "dropped_corrupt_total": 0,
            "dropped_disk_full_total": 0,
            "errors_total": 0,
            "last_error": "",
        },
        t,
    )


def _gpu(host: str, i: int, t: int, *, lost: bool = False) -> Point:
    tags = {"host": host, "gpu": str(i), "gpu_uuid": f"GPU-{host}-{i}", "model": "H100"}
    fields: dict[str, schema.FieldValue | None] = {"lost": lost}
    if not lost:
        fields["power_w"] = 400.0
    return point(schema.GPU, tags, fields, t)


def _part(host: str, at: int, ttl_s: float, plan_id: str = "plan-7") -> Point:
    part = PlanPart(
        host, plan_id, at, at, at + int(ttl_s * S), "", (Setpoint(f"GPU-{host}-0", 300.0),)
    )
    return part_point(sign_part(part, KEY), at)


def _audit(host: str, action: str, t: int, gpu: str = "all") -> Point:
    return point(
        schema.AUDIT,
        {"host": host, "gpu_uuid": gpu, "action": action},
        {"reason": "", "plan_id": "plan-7", "seq": 1},
        t,
    )


def fleet() -> list[Point]:
    pts: list[Point] = []
    for host in HOSTS:
        stop = NOW - 300 * S if host == "silent-1" else NOW - 3 * S
        for k in range(0, 1800, 5):  # 30 minutes of agent points every 5 s
            t = NOW - 1800 * S + k * S
            if t > stop:
                break
            over = 0 if k < 1200 else 50  # the last 10 minutes: 50 dropped
            depth = 20_000 if host == "drops-1" and k > 1700 else 0
            pts.append(_agent(host, t, overflow=over if host == "drops-1" else 0, depth=depth))
            if k % 30 == 0 or t == stop:
                for i in range(2):
                    lost = host == "drops-1" and i == 1 and k > 1500
                    pts.append(_gpu(host, i, t, lost=lost))
    pts += [_gpu(h, i, NOW - 3 * S) for h in HOSTS if h != "silent-1" for i in range(2)]
    pts[-1:] = []  # drops-1's GPU 1 stays lost (its last point is the lost one)
    part_at = NOW - 120 * S
    pts.append(_audit("ok-1", "refused", part_at - 60 * S))  # before the part: not counted
    for host in ("ok-1", "silent-1", "refused-1", "drops-1"):
        pts.append(_part(host, part_at, 900))
    pts.append(_part("lapsed-1", NOW - 960 * S, 900, plan_id="plan-6"))
    (rev,) = revert_parts(["revert-1"], NOW - 30 * S, 3600)
    pts.append(part_point(sign_part(rev, KEY), rev.seq))
    pts += [_audit("ok-1", "applied", part_at + 5 * S, f"GPU-ok-1-{i}") for i in range(2)]
    pts.append(_audit("refused-1", "refused", part_at + 5 * S))
    pts += [_audit("lapsed-1", "restored", NOW - 55 * S, f"GPU-lapsed-1-{i}") for i in range(2)]
    pts.append(_audit("revert-1", "reverted", NOW - 25 * S))
    pts.append(_audit("drops-1", "thermal", NOW - 20 * S, "GPU-drops-1-0"))
    pts.append(
        point(
            schema.PLAN,
            {"objective": "budget"},
            {"plan_id": "plan-7", "status": "best-effort (budget infeasible)"},
            part_at,
        )
    )
    o, payload = sign_override(BudgetOverride("rack-a", 4000.0, NOW - 60 * S, NOW + 3600 * S), KEY)
    pts.append(override_point(o, payload))
    forged, fp = sign_override(BudgetOverride("rack-b", 9e5, NOW - 60 * S, NOW + 3600 * S), KEY)
    fp = fp.replace("900000.000", "990000.000")
    pts.append(override_point(forged, fp))
    return pts


@pytest.fixture(
    scope="module", params=["embedded", pytest.param("influx", marks=pytest.mark.influxdb)]
)
def store(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Store]:
    s: Store
    if request.param == "influx":
        server = request.getfixturevalue("influxd")
        name = f"status{os.getpid()}_{next(_counter)}"
        server.create_database(name)
        s = InfluxStore(server.url, name)
    else:
        s = EmbeddedStore(tmp_path_factory.mktemp("status") / "store.sqlite")
    s.write(fleet())
    yield s
    s.close()
    if request.param == "influx":
        server.query(f'DROP DATABASE "{name}"')


def codes(status: object, host: str | None = None) -> dict[str, str]:
    from dcenergy.status import FleetStatus

    assert isinstance(status, FleetStatus)
    return {f.code: f.severity for f in status.findings if f.host == host}


def test_every_host_in_its_state(store: Store) -> None:
    st = collect(store, NOW, public_key=KEY.public_key())
    hosts = {h.host: h for h in st.hosts}
    assert sorted(hosts) == sorted(HOSTS)

    ok = hosts["ok-1"]
    # the last agent point 5 s ago, the last GPU point 3 s ago; ages are rounded up to
    # their 10 s bucket (epoch-aligned, so by 0 to 10 s)
    assert not ok.silent and ok.agent_age_s is not None and 5 <= ok.agent_age_s <= 15
    assert ok.gpu_age_s is not None and 3 <= ok.gpu_age_s <= 13
    assert ok.gpus == 2 and ok.gpus_lost == 0
    assert ok.part is not None and ok.part.plan_id == "plan-7" and not ok.part.revert
    assert ok.lease_left_s(NOW) == pytest.approx(780.0)
    assert ok.audit["applied"] == 2 and ok.audit["refused"] == 0  # the older refusal: before
    assert ok.audit_since_ns == NOW - 150 * S  # the part's time less 30 s of clock skew
    assert ok.spool_depth == 0 and ok.dropped["overflow"] == 0
    assert codes(st, "ok-1") == {}

    silent = hosts["silent-1"]
    assert silent.silent and silent.agent_age_s == pytest.approx(300.0)
    assert codes(st, "silent-1") == {"silent": CRITICAL}

    assert codes(st, "refused-1") == {"refused": CRITICAL}

    lapsed = hosts["lapsed-1"]
    assert lapsed.plan_state == LAPSED and lapsed.audit["restored"] == 2
    assert codes(st, "lapsed-1") == {"lease_lapsed": WARNING, "restored": WARNING}

    rev = hosts["revert-1"]
    assert rev.plan_state == REVERTED and rev.part is not None and rev.part.revert
    assert rev.audit["reverted"] == 1
    assert codes(st, "revert-1") == {"reverted": INFO}

    drops = hosts["drops-1"]
    assert drops.dropped_recent["overflow"] == 50 and drops.dropped["overflow"] == 50
    assert drops.spool_depth == 20_000 and drops.gpus == 2 and drops.gpus_lost == 1
    assert drops.audit["thermal"] == 1
    assert codes(st, "drops-1") == {
        "drops": CRITICAL,
        "spool_depth": WARNING,
        "gpu_lost": WARNING,
        "thermal": WARNING,
    }

    fleet_codes = codes(st)
    assert fleet_codes == {
        "plan_infeasible": WARNING,
        "budget_override": INFO,
        "override_ignored": WARNING,
    }
    assert st.severity == CRITICAL
    tot = st.totals()
    assert tot["hosts"] == 6 and tot["hosts_silent"] == 1 and tot["gpus"] == 12
    assert tot["hosts_reverted"] == 1 and tot["hosts_lapsed"] == 1 and tot["budget_overrides"] == 1
    assert tot["dropped_recent"]["overflow"] == 50 and tot["spool_depth"] == 20_000


def test_json_is_one_documented_document(store: Store) -> None:
    doc = collect(store, NOW, public_key=KEY.public_key()).to_json()
    json.dumps(doc, allow_nan=False)
    assert doc["version"] == 1 and doc["severity"] == "critical" and doc["exit_code"] == 5
    assert set(doc) == {
        "version",
        "now_ns",
        "attention",
        "severity",
        "exit_code",
        "thresholds",
        "totals",
        "plan",
        "budget_overrides",
        "findings",
        "hosts",
    }
    ok = next(h for h in doc["hosts"] if h["host"] == "ok-1")
    assert set(ok) == {
        "host",
        "silent",
        "agent_age_s",
        "gpu_age_s",
        "gpus",
        "gpus_lost",
        "plan",
        "audit_since_ns",
        "audit",
        "spool_depth",
        "dropped_total",
        "dropped_recent",
        "errors_total",
        "errors_recent",
        "last_error",
        "findings",
    }
    assert set(ok["audit"]) == set(schema.AUDIT_ACTIONS)
    assert ok["plan"]["state"] == "in_force" and ok["plan"]["lease_left_s"] == 780.0
    (live,) = [o for o in doc["budget_overrides"] if o["live"]]
    assert live["domain"] == "rack-a" and live["watts"] == 4000.0 and live["verified"] is True
    (bad,) = [o for o in doc["budget_overrides"] if not o["live"]]
    assert bad["domain"] == "rack-b" and bad["verified"] is False and bad["problem"]


def test_one_host_and_quiet_thresholds(store: Store) -> None:
    st = collect(store, NOW, Thresholds(silent_s=600.0), hosts=["silent-1"])
    assert [h.host for h in st.hosts] == ["silent-1"]
    assert codes(st, "silent-1") == {}
    assert st.overrides and all(o.verified is None for o in st.overrides)  # no key: unchecked


def test_a_lease_ending_soon_warns_when_asked(store: Store) -> None:
    st = collect(store, NOW, Thresholds(lease_warn_s=900.0), hosts=["ok-1"])
    assert codes(st, "ok-1") == {"lease_short": WARNING}


def test_nagios_line_and_perfdata(store: Store) -> None:
    code, lines = nagios(collect(store, NOW, public_key=KEY.public_key()))
    assert code == 2
    head, perf = lines[0].split("|")
    assert head.startswith("DCENERGY CRITICAL - ")
    assert "1 silent" in head and "1 refused" in head
    values = dict(p.split("=") for p in perf.split())
    assert values["hosts"] == "6;;;0" and values["hosts_silent"] == "1;;0;0"
    assert values["spool_depth"] == "20000;10000;100000;0"
    assert any(line.startswith("CRITICAL silent-1: agent silent") for line in lines[1:])
    ok_code, ok_lines = nagios(collect(store, NOW, hosts=["ok-1"]))
    assert ok_code == 0 and ok_lines[0].startswith("DCENERGY OK - 1 host, 2 GPUs, 1 under a plan")


@pytest.mark.parametrize("kind", ["embedded", pytest.param("influx", marks=pytest.mark.influxdb)])
def test_an_empty_store_has_no_hosts(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """Measurements that were never written (a fresh InfluxDB database) read as nothing."""
    s: Store
    if kind == "influx":
        s = InfluxStore(
            request.getfixturevalue("influxd").url, request.getfixturevalue("influx_db")
        )
    else:
        s = EmbeddedStore(tmp_path / "empty.sqlite")
    try:
        st = collect(s, NOW, public_key=KEY.public_key())
    finally:
        s.close()
    assert st.hosts == [] and st.severity is None and st.overrides == []
