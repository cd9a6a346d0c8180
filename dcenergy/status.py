"""The fleet at a glance: what ``dcenergy status`` and ``dcenergy check`` report.

Pure over the store protocol: :func:`collect` asks the store a handful of
aggregate queries (whatever the fleet's size, about ten, and rows that grow
with hosts, never with raw points) and returns a :class:`FleetStatus`: per
host the age of its last ``agent`` and ``gpu`` sample, its GPUs (and how many
are lost), the plan part in force (the newest ``plan_part``: plan id, seq,
lease left, revert), what its agent did since that part was published
(``audit`` counts by action), its spool depth and drop counters; fleet totals,
the newest plan's solver status and the budget overrides. Each thing that
needs attention is a :class:`Finding` with a severity; ``status`` exits
``EX_ATTENTION`` when any is a warning or critical, ``check`` maps them to
Nagios' codes.

Queries (``now`` is the caller's clock):

* ``agent``, last values by host over ``window_s``; ``first``/``last`` of the
  counters by host over ``drops_window_s`` (what rose recently); ``last`` by
  host in 10 s buckets over the last ``silent_s`` (who is alive, and how
  recently: an age is rounded up to the bucket, 10 s);
* ``gpu``, ``last(lost)`` by host and GPU over ``window_s``; ``last`` by host
  in 10 s buckets over the last ``silent_s``;
* ``plan_part``, ``last`` by host over a day (:func:`dcenergy.publish.newest_parts`);
* ``audit``, ``count`` by host and action since each host's part was
  published (less ``CLOCK_SKEW_S``: an agent's clock may run behind the
  publisher's, as ``reconciler.max_clock_skew_s`` allows): one query per
  distinct publication time (a plan's parts share one; at most
  ``MAX_AUDIT_QUERIES``, the rest counted from the earliest of them);
* ``plan``, the newest plan's id and status; ``budget_override``, each
  domain's newest override (:func:`dcenergy.overrides.read_overrides`);
* for each silent host (at most ``MAX_SILENT_LOOKUPS``), its newest ``agent``
  point, for the exact time it was last heard of.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from dcenergy import schema
from dcenergy.lineprotocol import MAX_TIME_NS
from dcenergy.overrides import OverrideState, read_overrides
from dcenergy.publish import DEFAULT_LOOKBACK_S, PartSummary, newest_parts
from dcenergy.store.base import Agg, AggregateQuery, AggRow, Fn

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    from dcenergy.store.base import Store

STATUS_VERSION = 1
AGE_RESOLUTION_S = 10.0
MAX_AUDIT_QUERIES = 8
MAX_SILENT_LOOKUPS = 100
CLOCK_SKEW_S = 30.0  # agents' clocks may be this far off the reader's (as max_clock_skew_s)
DROP_REASONS = ("overflow", "rejected", "partial", "corrupt", "disk_full")

INFO, WARNING, CRITICAL = "info", "warning", "critical"
SEVERITIES = (INFO, WARNING, CRITICAL)

# plan states
NO_PLAN, IN_FORCE, LAPSED, REVERTED, REVERT_ENDED = (
    "none",
    "in_force",
    "lapsed",
    "reverted",
    "revert_ended",
)


@dataclass(frozen=True, slots=True)
class Thresholds:
    """What counts as needing attention (``dcenergy status``/``check`` options)."""

    silent_s: float = 120.0  # no agent sample for this long: silent (critical)
    window_s: float = 3600.0  # hosts that reported within this are listed
    drops_window_s: float = 900.0  # drops and errors that rose within this are reported
    spool_warn: int = 10_000  # points waiting in a spool: warning from, critical from
    spool_crit: int = 100_000
    lease_warn_s: float = 0.0  # warn when a lease has less than this left (0: only lapsed)


@dataclass(frozen=True, slots=True)
class Finding:
    severity: str  # info | warning | critical
    code: str
    message: str
    host: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "severity": self.severity,
            "code": self.code,
            "host": self.host,
            "message": self.message,
        }


@dataclass
class HostStatus:
    host: str
    agent_age_s: float | None = None  # None: no agent sample within the window
    gpu_age_s: float | None = None
    silent: bool = True
    gpus: int = 0
    gpus_lost: int = 0
    part: PartSummary | None = None
    plan_state: str = NO_PLAN
    audit_since_ns: int = 0
    audit: dict[str, int] = field(default_factory=lambda: dict.fromkeys(schema.AUDIT_ACTIONS, 0))
    spool_depth: int | None = None
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> last total
    dropped_recent: dict[str, int] = field(default_factory=dict)  # reason -> rise in window
    errors_total: int | None = None
    errors_recent: int = 0
    last_error: str = ""
    findings: list[Finding] = field(default_factory=list)

    def lease_left_s(self, now_ns: int) -> float | None:
        return None if self.part is None else self.part.lease_left_s(now_ns)

    def to_json(self, now_ns: int) -> dict[str, Any]:
        p = self.part
        return {
            "host": self.host,
            "silent": self.silent,
            "agent_age_s": _round(self.agent_age_s),
            "gpu_age_s": _round(self.gpu_age_s),
            "gpus": self.gpus,
            "gpus_lost": self.gpus_lost,
            "plan": None
            if p is None
            else {
                "plan_id": p.plan_id,
                "seq": p.seq,
                "expires_ns": p.expires_ns,
                "lease_left_s": _round(p.lease_left_s(now_ns)),
                "revert": p.revert,
                "state": self.plan_state,
            },
            "audit_since_ns": self.audit_since_ns,
            "audit": dict(self.audit),
            "spool_depth": self.spool_depth,
            "dropped_total": dict(self.dropped),
            "dropped_recent": dict(self.dropped_recent),
            "errors_total": self.errors_total,
            "errors_recent": self.errors_recent,
            "last_error": self.last_error,
            "findings": [f.to_json() for f in self.findings],
        }


@dataclass(frozen=True, slots=True)
class PlanRecord:
    plan_id: str
    status: str


@dataclass
class FleetStatus:
    now_ns: int
    thresholds: Thresholds
    hosts: list[HostStatus]
    plan: PlanRecord | None = None
    overrides: list[OverrideState] = field(default_factory=list)
    fleet_findings: list[Finding] = field(default_factory=list)

    @property
    def findings(self) -> list[Finding]:
        """Fleet-wide findings first, then each host's, most severe first."""
        out = list(self.fleet_findings) + [f for h in self.hosts for f in h.findings]
        return sorted(out, key=lambda f: -SEVERITIES.index(f.severity))

    @property
    def severity(self) -> str | None:
        """The worst warning/critical finding's severity; None when all is well."""
        worst = [f.severity for f in self.findings if f.severity != INFO]
        if CRITICAL in worst:
            return CRITICAL
        return WARNING if worst else None

    def live_overrides(self) -> list[OverrideState]:
        return [o for o in self.overrides if o.live(self.now_ns)]

    def totals(self) -> dict[str, Any]:
        hs = self.hosts
        audit = dict.fromkeys(schema.AUDIT_ACTIONS, 0)
        for h in hs:
            for a, n in h.audit.items():
                audit[a] = audit.get(a, 0) + n
        dropped_recent = dict.fromkeys(DROP_REASONS, 0)
        for h in hs:
            for r, n in h.dropped_recent.items():
                dropped_recent[r] = dropped_recent.get(r, 0) + n
        return {
            "hosts": len(hs),
            "hosts_silent": sum(h.silent for h in hs),
            "gpus": sum(h.gpus for h in hs),
            "gpus_lost": sum(h.gpus_lost for h in hs),
            "hosts_in_force": sum(h.plan_state == IN_FORCE for h in hs),
            "hosts_lapsed": sum(h.plan_state == LAPSED for h in hs),
            "hosts_reverted": sum(h.plan_state == REVERTED for h in hs),
            "audit": audit,
            "spool_depth": sum(h.spool_depth or 0 for h in hs),
            "dropped_recent": dropped_recent,
            "errors_recent": sum(h.errors_recent for h in hs),
            "budget_overrides": len(self.live_overrides()),
        }

    def to_json(self) -> dict[str, Any]:
        from dcenergy.errors import EX_ATTENTION, EX_OK

        t = self.thresholds
        return {
            "version": STATUS_VERSION,
            "now_ns": self.now_ns,
            "attention": self.severity is not None,
            "severity": self.severity or "ok",
            "exit_code": EX_OK if self.severity is None else EX_ATTENTION,
            "thresholds": {
                "silent_s": t.silent_s,
                "window_s": t.window_s,
                "drops_window_s": t.drops_window_s,
                "spool_warn": t.spool_warn,
                "spool_crit": t.spool_crit,
                "lease_warn_s": t.lease_warn_s,
            },
            "totals": self.totals(),
            "plan": None
            if self.plan is None
            else {"plan_id": self.plan.plan_id, "status": self.plan.status},
            "budget_overrides": [
                {
                    "domain": o.domain,
                    "watts": o.watts,
                    "expires_ns": o.expires_ns,
                    "left_s": _round(o.left_s(self.now_ns)),
                    "allow_raise": o.allow_raise,
                    "verified": o.verified,
                    "live": o.live(self.now_ns),
                    "problem": o.problem,
                }
                for o in self.overrides
                if o.live(self.now_ns) or o.problem
            ],
            "findings": [f.to_json() for f in self.findings],
            "hosts": [h.to_json(self.now_ns) for h in self.hosts],
        }


def plural(n: int, word: str) -> str:
    """``1 host``, ``2 hosts``."""
    return f"{n} {word}{'' if n == 1 else 's'}"


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 1)


def _int(v: object) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


# --- collecting ----------------------------------------------------------------------------


def collect(
    store: Store,
    now_ns: int,
    thresholds: Thresholds = Thresholds(),
    *,
    hosts: Sequence[str] = (),
    public_key: Ed25519PublicKey | None = None,
) -> FleetStatus:
    """The fleet's status as the store knows it at ``now_ns`` (see the module docstring).

    ``hosts`` limits the report to those hosts (queries filter on the tag when
    there is one) and leaves out the fleet-wide findings (the newest plan's status, the
    overrides); ``public_key`` verifies the budget overrides' signatures.
    """
    t = thresholds
    only = {schema.TAG_HOST: hosts[0]} if len(hosts) == 1 else {}
    wanted = set(hosts)
    end = now_ns + int(CLOCK_SKEW_S * 1e9)  # points an agent's fast clock dated ahead count
    by_host: dict[str, HostStatus] = {}

    def host(name: str) -> HostStatus | None:
        if not name or (wanted and name not in wanted):
            return None
        if name not in by_host:
            by_host[name] = HostStatus(name)
        return by_host[name]

    for name in hosts:
        host(name)
    window_start = now_ns - int(t.window_s * 1e9)
    counters = [f"dropped_{r}_total" for r in DROP_REASONS] + ["errors_total"]

    # agent: last values over the window
    for r in store.aggregate(
        AggregateQuery(
            schema.AGENT.name,
            tuple(
                Agg(Fn.LAST, f) for f in ("samples_total", "spool_depth", "last_error", *counters)
            ),
            window_start,
            end,
            by=(schema.TAG_HOST,),
            tags=only,
        )
    ):
        h = host(r.tags.get(schema.TAG_HOST, ""))
        if h is None:
            continue
        v = r.values
        h.spool_depth = _int(v.get("last_spool_depth"))
        h.errors_total = _int(v.get("last_errors_total"))
        err = v.get("last_last_error")
        h.last_error = err if isinstance(err, str) else ""
        for reason in DROP_REASONS:
            n = _int(v.get(f"last_dropped_{reason}_total"))
            if n is not None:
                h.dropped[reason] = n

    # agent: what rose within the drops window (a counter reset counts from zero)
    for r in store.aggregate(
        AggregateQuery(
            schema.AGENT.name,
            tuple(Agg(fn, f) for f in counters for fn in (Fn.FIRST, Fn.LAST)),
            now_ns - int(t.drops_window_s * 1e9),
            end,
            by=(schema.TAG_HOST,),
            tags=only,
        )
    ):
        h = host(r.tags.get(schema.TAG_HOST, ""))
        if h is None:
            continue
        for f in counters:
            first, last = _int(r.values.get(f"first_{f}")), _int(r.values.get(f"last_{f}"))
            if first is None or last is None:
                continue
            rise = last - first if last >= first else last
            if f == "errors_total":
                h.errors_recent = rise
            else:
                h.dropped_recent[f.removeprefix("dropped_").removesuffix("_total")] = rise

    # ages: the newest 10 s bucket with a sample, within the silent window
    silent_start = now_ns - int(t.silent_s * 1e9)
    for measurement, probe, attr in (
        (schema.AGENT.name, "samples_total", "agent_age_s"),
        (schema.GPU.name, "lost", "gpu_age_s"),
    ):
        newest: dict[str, int] = {}
        for r in store.aggregate(
            AggregateQuery(
                measurement,
                (Agg(Fn.LAST, probe),),
                silent_start,
                end,
                by=(schema.TAG_HOST,),
                every_s=AGE_RESOLUTION_S,
                tags=only,
            )
        ):
            name = r.tags.get(schema.TAG_HOST, "")
            if r.time_ns is not None:
                newest[name] = max(newest.get(name, r.time_ns), r.time_ns)
        for name, bucket in newest.items():
            h = host(name)
            if h is None:
                continue
            setattr(h, attr, max(0.0, (now_ns - max(bucket, silent_start)) / 1e9))
            if measurement == schema.AGENT.name:
                h.silent = False

    # GPUs and the lost ones
    for r in store.aggregate(
        AggregateQuery(
            schema.GPU.name,
            (Agg(Fn.LAST, "lost"),),
            window_start,
            end,
            by=(schema.TAG_HOST, schema.TAG_GPU_UUID),
            tags=only,
        )
    ):
        h = host(r.tags.get(schema.TAG_HOST, ""))
        if h is None or not r.tags.get(schema.TAG_GPU_UUID):
            continue
        h.gpus += 1
        h.gpus_lost += r.values.get("last_lost") is True

    # the part in force
    for name, part in newest_parts(store, now_ns).items():
        h = host(name)
        if h is None:
            continue
        h.part = part
        live = part.expires_ns > now_ns
        if part.revert:
            h.plan_state = REVERTED if live else REVERT_ENDED
        else:
            h.plan_state = IN_FORCE if live else LAPSED

    # audit counts since each host's part was published
    for h in by_host.values():
        h.audit_since_ns = (
            h.part.seq - int(CLOCK_SKEW_S * 1e9) if h.part is not None else window_start
        )
    _count_audit(store, list(by_host.values()), end, only)

    # hosts silent for longer than the bucket window: when were they last heard of
    silent = [h for h in by_host.values() if h.silent]
    for h in silent[:MAX_SILENT_LOOKUPS]:
        p = store.newest(
            schema.AGENT.name,
            tags={schema.TAG_HOST: h.host},
            start_ns=now_ns - int(max(t.window_s, DEFAULT_LOOKBACK_S) * 1e9),
        )
        if p is not None:
            h.agent_age_s = max(0.0, (now_ns - p.time_ns) / 1e9)

    status = FleetStatus(
        now_ns,
        t,
        sorted(by_host.values(), key=lambda h: h.host),
        plan=_newest_plan(store, now_ns, window_start),
        overrides=read_overrides(store, now_ns, public_key),
    )
    _judge(status, fleet=not hosts)
    return status


def _count_audit(store: Store, hosts: list[HostStatus], end: int, only: Mapping[str, str]) -> None:
    """``count`` by host and action from each host's ``audit_since_ns``: one query per
    distinct start (the hosts of one plan share it), at most ``MAX_AUDIT_QUERIES``."""
    starts = sorted({h.audit_since_ns for h in hosts if h.audit_since_ns < end}, reverse=True)
    if len(starts) > MAX_AUDIT_QUERIES:  # the oldest share the earliest start: counted more
        keep = starts[: MAX_AUDIT_QUERIES - 1]
        floor = min(starts)
        for h in hosts:
            if h.audit_since_ns not in keep:
                h.audit_since_ns = floor
        starts = [*keep, floor]
    for start in starts:
        group = {h.host: h for h in hosts if h.audit_since_ns == start}
        rows: Iterable[AggRow] = store.aggregate(
            AggregateQuery(
                schema.AUDIT.name,
                (Agg(Fn.COUNT, "plan_id"),),
                start,
                end,
                by=(schema.TAG_HOST, schema.TAG_ACTION),
                tags=only,
            )
        )
        for r in rows:
            hs = group.get(r.tags.get(schema.TAG_HOST, ""))
            n = _int(r.values.get("count_plan_id"))
            if hs is not None and n:
                action = r.tags.get(schema.TAG_ACTION, "")
                hs.audit[action] = hs.audit.get(action, 0) + n


def _newest_plan(store: Store, now_ns: int, start_ns: int) -> PlanRecord | None:
    rows = store.aggregate(
        AggregateQuery(
            schema.PLAN.name,
            (Agg(Fn.LAST, "plan_id"), Agg(Fn.LAST, "status")),
            start_ns,
            MAX_TIME_NS,
        )
    )
    for r in rows:
        pid, st = r.values.get("last_plan_id"), r.values.get("last_status")
        if isinstance(pid, str) and isinstance(st, str):
            return PlanRecord(pid, st)
    return None


# --- judging ----------------------------------------------------------------------------


def _age(s: float | None) -> str:
    from dcenergy.timespec import format_duration

    return "never" if s is None else format_duration(s)


def _judge(status: FleetStatus, *, fleet: bool = True) -> None:
    """Fill in every host's findings, and the fleet's (the plan, the overrides) with ``fleet``."""
    t = status.thresholds
    now = status.now_ns
    for h in status.hosts:
        add = h.findings.append
        if h.silent:
            heard = (
                f"last sample {_age(h.agent_age_s)} ago"
                if h.agent_age_s is not None
                else f"no sample in the last {_age(max(t.window_s, DEFAULT_LOOKBACK_S))}"
            )
            add(Finding(CRITICAL, "silent", f"agent silent: {heard}", h.host))
        p = h.part
        if p is not None:
            left = p.lease_left_s(now)
            if h.plan_state == LAPSED:
                add(
                    Finding(
                        WARNING,
                        "lease_lapsed",
                        f"lease of {p.plan_id} lapsed {_age(-left)} ago: its GPUs are back at "
                        "their saved limits",
                        h.host,
                    )
                )
            elif h.plan_state == IN_FORCE and t.lease_warn_s > 0 and left < t.lease_warn_s:
                add(
                    Finding(
                        WARNING,
                        "lease_short",
                        f"lease of {p.plan_id} ends in {_age(left)}: no newer plan yet",
                        h.host,
                    )
                )
            elif h.plan_state == REVERTED:
                add(
                    Finding(
                        INFO,
                        "reverted",
                        f"reverted (dcenergy revert) for {_age(left)} more: GPUs at their "
                        "saved limits, the optimizer skips this host",
                        h.host,
                    )
                )
        a = h.audit
        if a.get("refused"):
            add(
                Finding(
                    CRITICAL,
                    "refused",
                    f"plan parts refused {a['refused']} times (the audit log says why)",
                    h.host,
                )
            )
        if a.get("restored"):
            add(Finding(WARNING, "restored", f"{a['restored']} GPUs restored", h.host))
        if a.get("error"):
            add(Finding(WARNING, "reconciler_error", f"{a['error']} reconciler errors", h.host))
        if a.get("thermal"):
            add(Finding(WARNING, "thermal", f"thermal guard acted {a['thermal']} times", h.host))
        if a.get("drift"):
            add(Finding(INFO, "drift", f"{a['drift']} limits drifted from the plan", h.host))
        if h.gpus_lost:
            add(Finding(WARNING, "gpu_lost", f"{h.gpus_lost} GPUs lost", h.host))
        rose = {r: n for r, n in h.dropped_recent.items() if n > 0}
        if rose:
            what = ", ".join(f"{n} {r}" for r, n in sorted(rose.items()))
            add(
                Finding(
                    CRITICAL,
                    "drops",
                    f"{sum(rose.values())} points dropped in the last "
                    f"{_age(t.drops_window_s)} ({what})",
                    h.host,
                )
            )
        if h.errors_recent > 0:
            tail = f": {h.last_error}" if h.last_error else ""
            add(
                Finding(
                    WARNING,
                    "agent_errors",
                    f"{h.errors_recent} agent errors in the last {_age(t.drops_window_s)}{tail}",
                    h.host,
                )
            )
        depth = h.spool_depth or 0
        if depth >= t.spool_warn:
            sev = CRITICAL if depth >= t.spool_crit else WARNING
            add(Finding(sev, "spool_depth", f"{depth} points waiting in the spool", h.host))
    if not fleet:
        return
    found = status.fleet_findings
    if status.plan is not None:
        st = status.plan.status
        if st.startswith("best-effort"):
            found.append(Finding(WARNING, "plan_infeasible", f"plan {status.plan.plan_id}: {st}"))
        elif "floors" in st:
            found.append(
                Finding(
                    WARNING,
                    "plan_slowdown",
                    f"plan {status.plan.plan_id}: {st} (jobs may run past their allowed slowdown)",
                )
            )
    for o in status.overrides:
        if o.problem:
            found.append(
                Finding(WARNING, "override_ignored", f"budget override {o.domain}: {o.problem}")
            )
        elif o.live(now):
            found.append(
                Finding(
                    INFO,
                    "budget_override",
                    f"budget of {o.domain} overridden: {o.watts:g} W for {_age(o.left_s(now))}"
                    + (" (may exceed the topology's)" if o.allow_raise else ""),
                )
            )


# --- Nagios / Icinga ----------------------------------------------------------------------

NAGIOS_OK, NAGIOS_WARNING, NAGIOS_CRITICAL, NAGIOS_UNKNOWN = 0, 1, 2, 3
_NAGIOS_NAMES = {0: "OK", 1: "WARNING", 2: "CRITICAL", 3: "UNKNOWN"}


def nagios_line(code: int, text: str, perfdata: str = "") -> str:
    """``DCENERGY <STATE> - text|perfdata`` (the plugin convention's one status line)."""
    line = f"DCENERGY {_NAGIOS_NAMES[code]} - {text}"
    return f"{line}|{perfdata}" if perfdata else line


def nagios(status: FleetStatus) -> tuple[int, list[str]]:
    """The plugin's exit code and output: the status line, then one line per finding."""
    sev = status.severity
    code = {None: NAGIOS_OK, WARNING: NAGIOS_WARNING, CRITICAL: NAGIOS_CRITICAL}[sev]
    tot = status.totals()
    t = status.thresholds
    problems = [f for f in status.findings if f.severity != INFO]
    if problems:
        counts: dict[str, int] = {}
        for f in problems:
            counts[f.code] = counts.get(f.code, 0) + 1
        # most severe first (the findings' order), then in the order they came
        text = ", ".join(f"{n} {code_.replace('_', ' ')}" for code_, n in counts.items())
        first = problems[0]
        text += f" (first: {first.host + ': ' if first.host else ''}{first.message})"
    else:
        text = (
            f"{plural(tot['hosts'], 'host')}, {plural(tot['gpus'], 'GPU')}, "
            f"{tot['hosts_in_force']} under a plan"
            + (f", {tot['hosts_reverted']} reverted" if tot["hosts_reverted"] else "")
            + (f", {tot['budget_overrides']} budget overrides" if tot["budget_overrides"] else "")
        )
    audit = tot["audit"]
    dropped = sum(tot["dropped_recent"].values())
    perf = [
        f"hosts={tot['hosts']};;;0",
        f"hosts_silent={tot['hosts_silent']};;0;0",
        f"gpus={tot['gpus']};;;0",
        f"gpus_lost={tot['gpus_lost']};0;;0",
        f"hosts_lapsed={tot['hosts_lapsed']};0;;0",
        f"hosts_reverted={tot['hosts_reverted']};;;0",
        f"refused={audit.get('refused', 0)};;0;0",
        f"restored={audit.get('restored', 0)};0;;0",
        f"thermal={audit.get('thermal', 0)};0;;0",
        f"spool_depth={tot['spool_depth']};{t.spool_warn};{t.spool_crit};0",
        f"dropped={dropped};;0;0",
        f"budget_overrides={tot['budget_overrides']};;;0",
    ]
    lines = [nagios_line(code, text, " ".join(perf))]
    lines += [
        f"{f.severity.upper()} {f.host + ': ' if f.host else ''}{f.message}"
        for f in status.findings
    ]
    return code, lines
