"""Publishing a plan: split it per host, sign each part, write ``plan_part`` points.

Works on the plan's JSON dict (``plan_id``, ``created_ns``, ``expires_ns``,
``setpoints: [{"gpu", "host", "power_limit_w", "sm_clock_max_mhz"}]``) so that
neither ``dcenergy/`` nor the agent imports the optimizer. Agents read back only
their own host's newest part (``fetch_latest_part``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dcenergy import schema
from dcenergy.errors import ConfigError, InputError
from dcenergy.lineprotocol import MAX_TIME_NS, name_problem, string_field_problem
from dcenergy.plan import MODES, Mode, PlanPart, Setpoint, SignedPart, sign_part

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from dcenergy.store.base import Store

DEFAULT_LOOKBACK_S = 86_400.0  # the longest plan lease an agent honours


def _int(plan: Mapping[str, Any], name: str, source: str) -> int:
    value = plan.get(name)
    if value is None:
        raise InputError(source, name, "is missing")
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise InputError(
            source, name, f"must be an integer > 0 (ns since the epoch), not {value!r}"
        )
    return value


def _setpoint(raw: Any, i: int, source: str) -> tuple[str, Setpoint]:
    where = f"setpoints[{i}]"
    if not isinstance(raw, Mapping):
        raise InputError(source, where, "must be an object")
    gpu, host = raw.get("gpu"), raw.get("host")
    if not isinstance(gpu, str) or not gpu:
        raise InputError(source, f"{where}.gpu", f"must be a GPU UUID string, not {gpu!r}")
    if not isinstance(host, str) or not host:
        raise InputError(source, f"{where}.host", f"must be a host name, not {host!r}")
    if (bad := name_problem(host, "host name")) is not None:
        raise InputError(source, f"{where}.host", bad)
    w = raw.get("power_limit_w")
    if w is not None and (
        isinstance(w, bool) or not isinstance(w, int | float) or not math.isfinite(w) or w <= 0
    ):
        raise InputError(source, f"{where}.power_limit_w", f"must be a number > 0 W, not {w!r}")
    c = raw.get("sm_clock_max_mhz")
    if c is not None and (isinstance(c, bool) or not isinstance(c, int) or c <= 0):
        raise InputError(source, f"{where}.sm_clock_max_mhz", f"must be an integer > 0, not {c!r}")
    if w is None and c is None:
        raise InputError(source, where, "needs power_limit_w or sm_clock_max_mhz")
    pw, until = raw.get("probe_w"), raw.get("probe_until_ns")
    if pw is not None and (
        isinstance(pw, bool) or not isinstance(pw, int | float) or not math.isfinite(pw) or pw <= 0
    ):
        raise InputError(source, f"{where}.probe_w", f"must be a number > 0 W, not {pw!r}")
    if (pw is None) != (until is None) or (
        until is not None and (isinstance(until, bool) or not isinstance(until, int))
    ):
        raise InputError(source, f"{where}.probe_until_ns", "an integer, with probe_w")
    return host, Setpoint(
        gpu, None if w is None else float(w), c, None if pw is None else float(pw), until
    )


def split_plan(
    plan: Mapping[str, Any],
    *,
    seq_from_ns: int,
    source: str = "<plan>",
    next_plan_ns: int | None = None,
) -> list[PlanPart]:
    """Validate ``plan`` and split it into one unsigned part per host (sorted by host).

    Every part gets ``seq = seq_from_ns``; ``key_id`` is filled in by ``sign_part``.
    Raises ``InputError`` (exit 65) naming the bad field.
    """
    if not isinstance(plan, Mapping):
        raise InputError(source, "<root>", "must be a JSON object")
    plan_id = plan.get("plan_id")
    if not isinstance(plan_id, str) or not plan_id:
        raise InputError(source, "plan_id", f"must be a non-empty string, not {plan_id!r}")
    if (bad := string_field_problem(plan_id, "plan_id", max_bytes=256)) is not None:
        raise InputError(source, "plan_id", bad)
    created_ns = _int(plan, "created_ns", source)
    expires_ns = _int(plan, "expires_ns", source)
    if expires_ns <= created_ns:
        raise InputError(source, "expires_ns", "must be after created_ns")
    mode_raw = plan.get("mode")
    if mode_raw is not None and mode_raw not in MODES:
        raise InputError(source, "mode", f"must be one of {', '.join(MODES)}, not {mode_raw!r}")
    raw_setpoints = plan.get("setpoints")
    if raw_setpoints is None:
        raise InputError(source, "setpoints", "is missing")
    if not isinstance(raw_setpoints, list) or not raw_setpoints:
        raise InputError(source, "setpoints", "must be a non-empty list")
    by_host: dict[str, list[Setpoint]] = {}
    seen: set[str] = set()
    for i, raw in enumerate(raw_setpoints):
        host, sp = _setpoint(raw, i, source)
        if sp.gpu_uuid in seen:
            raise InputError(source, f"setpoints[{i}].gpu", f"{sp.gpu_uuid} appears twice")
        seen.add(sp.gpu_uuid)
        by_host.setdefault(host, []).append(sp)
    parts: list[PlanPart] = []
    for host in sorted(by_host):
        sps = tuple(sorted(by_host[host], key=lambda s: s.gpu_uuid))
        mode: Mode
        if mode_raw is not None:
            mode = "dvfs" if mode_raw == "dvfs" else "power"
        else:
            mode = "dvfs" if any(s.sm_clock_max_mhz is not None for s in sps) else "power"
        parts.append(
            PlanPart(
                host=host,
                plan_id=plan_id,
                seq=seq_from_ns,
                created_ns=created_ns,
                expires_ns=expires_ns,
                key_id="",
                setpoints=sps,
                mode=mode,
                next_plan_ns=next_plan_ns,
            )
        )
    return parts


def part_point(signed: SignedPart, time_ns: int) -> schema.Point:
    """The ``plan_part`` point carrying one signed part (``revert`` always written, so that
    ``last("revert")`` per host is the newest part's)."""
    p = signed.part
    return schema.point(
        schema.PLAN_PART,
        {schema.TAG_HOST: p.host},
        {
            "plan_id": p.plan_id,
            "seq": p.seq,
            "payload": signed.payload,
            "expires_ns": p.expires_ns,
            "revert": p.revert,
        },
        time_ns,
    )


def sign_plan(
    plan: Mapping[str, Any],
    private_key: Ed25519PrivateKey,
    now_ns: int,
    *,
    last_seq: int = 0,
    source: str = "<plan>",
    next_plan_ns: int | None = None,
) -> list[SignedPart]:
    """Split and sign without writing; ``seq = max(now_ns, last_seq + 1)``."""
    seq = max(now_ns, last_seq + 1)
    parts = split_plan(plan, seq_from_ns=seq, source=source, next_plan_ns=next_plan_ns)
    return [sign_part(p, private_key) for p in parts]


def publish(
    plan: Mapping[str, Any],
    store: Store,
    private_key: Ed25519PrivateKey,
    now_ns: int,
    *,
    last_seq: int = 0,
    source: str = "<plan>",
    next_plan_ns: int | None = None,
) -> list[SignedPart]:
    """Sign every host's part and write them to ``store`` in one batch, stamped ``now_ns``.

    ``last_seq`` is the highest seq this publisher used before (0 if unknown):
    passing it keeps seqs increasing even if the clock stepped back.
    ``next_plan_ns`` tells agents when the next plan is due (the service's next run).
    """
    signed = sign_plan(
        plan, private_key, now_ns, last_seq=last_seq, source=source, next_plan_ns=next_plan_ns
    )
    store.write([part_point(s, now_ns) for s in signed])
    return signed


def fetch_latest_part(
    store: Store, host: str, now_ns: int, lookback_s: float = DEFAULT_LOOKBACK_S
) -> str | None:
    """Payload of the newest part written for ``host``, or None: one small query.

    The store answers with the one newest point (``ORDER BY time DESC LIMIT 1``
    on InfluxDB), so the poll costs the same whatever history the store holds.
    Unverified: the caller passes it to ``verify_part``. Points dated after
    ``now_ns`` are included, so that a future-dated part is seen and refused.
    A part older than ``lookback_s`` is not seen; the agent then treats its host
    as having no plan and restores its defaults when the lease it holds ends
    (the safe direction), so the lookback is the longest lease honoured.
    """
    p = store.newest(
        schema.PLAN_PART.name,
        tags={schema.TAG_HOST: host},
        start_ns=now_ns - int(lookback_s * 1e9),
    )
    if p is None:
        return None
    payload = p.fields.get("payload")
    return payload if isinstance(payload, str) else None


# --- what the store says each host was last sent -------------------------------------------


@dataclass(frozen=True, slots=True)
class PartSummary:
    """A host's newest ``plan_part`` as the store's plain fields tell it (unverified: for
    people, ``dcenergy status`` and the optimizer's own bookkeeping, never for agents)."""

    host: str
    plan_id: str
    seq: int
    expires_ns: int
    revert: bool

    def lease_left_s(self, now_ns: int) -> float:
        return (self.expires_ns - now_ns) / 1e9


def newest_parts(
    store: Store, now_ns: int, lookback_s: float = DEFAULT_LOOKBACK_S
) -> dict[str, PartSummary]:
    """Every host's newest part within ``lookback_s``: one aggregate read (``last`` by host)."""
    from dcenergy.store.base import Agg, AggregateQuery, Fn

    q = AggregateQuery(
        schema.PLAN_PART.name,
        (
            Agg(Fn.LAST, "plan_id"),
            Agg(Fn.LAST, "seq"),
            Agg(Fn.LAST, "expires_ns"),
            Agg(Fn.LAST, "revert"),
        ),
        now_ns - int(lookback_s * 1e9),
        MAX_TIME_NS,  # future-dated parts are seen, as the agents see them
        by=(schema.TAG_HOST,),
    )
    out: dict[str, PartSummary] = {}
    for r in store.aggregate(q):
        host = r.tags.get(schema.TAG_HOST, "")
        seq, expires = r.values.get("last_seq"), r.values.get("last_expires_ns")
        if not host or not isinstance(seq, int) or not isinstance(expires, int):
            continue
        plan_id = r.values.get("last_plan_id")
        out[host] = PartSummary(
            host,
            plan_id if isinstance(plan_id, str) else "",
            seq,
            expires,
            r.values.get("last_revert") is True,
        )
    return out


MAX_REVERT_S = DEFAULT_LOOKBACK_S  # agents and the optimizer look back this far, no further
REVERT_PLAN_PREFIX = "revert-"


def revert_parts(
    hosts: Sequence[str],
    now_ns: int,
    duration_s: float,
    *,
    last_seqs: Mapping[str, int] | None = None,
) -> list[PlanPart]:
    """One unsigned revert part per host: no setpoints, a lease of ``duration_s``.

    ``seq`` is ``max(now_ns, the host's last seq + 1)`` (``last_seqs``, from
    :func:`newest_parts`), so a revert is never refused as a replay of a part
    published by a clock running ahead of ours; the point is stamped with it too.
    """
    if not 1.0 <= duration_s <= MAX_REVERT_S:
        raise ConfigError(
            "--for", f"{duration_s:g} s", f"a duration from 1 s to {MAX_REVERT_S:g} s"
        )
    last = last_seqs or {}
    plan_id = REVERT_PLAN_PREFIX + str(now_ns)
    parts = []
    for host in sorted(set(hosts)):
        if (bad := name_problem(host, "host name")) is not None:
            raise ConfigError("--host", host, bad)
        seq = max(now_ns, last.get(host, 0) + 1)
        parts.append(
            PlanPart(
                host=host,
                plan_id=plan_id,
                seq=seq,
                created_ns=now_ns,
                expires_ns=now_ns + int(duration_s * 1e9),
                key_id="",
                setpoints=(),
                revert=True,
            )
        )
    return parts


def publish_revert(
    store: Store,
    hosts: Sequence[str],
    private_key: Ed25519PrivateKey,
    now_ns: int,
    duration_s: float,
) -> list[SignedPart]:
    """Sign and write a revert part for each of ``hosts`` (one batch), each stamped its seq."""
    last = {h: s.seq for h, s in newest_parts(store, now_ns).items()}
    signed = [
        sign_part(p, private_key) for p in revert_parts(hosts, now_ns, duration_s, last_seqs=last)
    ]
    store.write([part_point(s, s.part.seq) for s in signed])
    return signed
