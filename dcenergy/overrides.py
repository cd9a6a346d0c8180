"""Budget overrides (demand response): a signed, expiring budget for one power domain.

``dcenergy budget set --domain rack-a --watts 12000 --until 2h`` writes one
``budget_override`` point (tag ``domain``; fields ``watts``, ``expires_ns``,
``allow_raise``, ``cleared``, ``payload``), stamped when it was made; ``budget
clear`` writes a newer one with ``cleared = true``. The optimizer service
reads every domain's newest point with one aggregate query at each run
(:func:`read_overrides`) and uses, while it is live, the override's watts as
that domain's budget — never above the topology's own budget unless the
override says ``allow_raise`` (``optimizer.budget_overrides``).

The ``payload`` is signed like a plan part, with the same key and the same
canonical JSON (``dcenergy.plan.canonical_json``)::

    {"allow_raise":false,"cleared":false,"created_ns":…,"domain":"rack-a",
     "expires_ns":…,"key_id":"…","kind":"budget_override","v":1,"watts":12000.000}

The plain fields are for people and dashboards: the optimizer acts only on a
payload its own key signed, for the domain its point is tagged with. Anyone
who can write to the store could otherwise raise a room's budget.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from dcenergy import schema
from dcenergy.errors import ConfigError, PlanError
from dcenergy.lineprotocol import MAX_TIME_NS, name_problem
from dcenergy.plan import canonical_json, key_id

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (
        Ed25519PrivateKey,
        Ed25519PublicKey,
    )

    from dcenergy.store.base import Store

KIND = "budget_override"
FORMAT_VERSION = 1
MAX_OVERRIDE_S = 7 * 86_400.0  # the longest override; readers look back this far
MAX_WATTS = 1e9  # a gigawatt: anything larger is a typo


class OverrideRefused(PlanError):
    """An override the optimizer must not use (unsigned, other key, tampered, malformed)."""


@dataclass(frozen=True, slots=True)
class BudgetOverride:
    domain: str
    watts: float  # 0 for a clear
    created_ns: int
    expires_ns: int
    allow_raise: bool = False
    cleared: bool = False
    key_id: str = ""


def _to_dict(o: BudgetOverride) -> dict[str, Any]:
    return {
        "v": FORMAT_VERSION,
        "kind": KIND,
        "domain": o.domain,
        "watts": float(o.watts),
        "created_ns": o.created_ns,
        "expires_ns": o.expires_ns,
        "allow_raise": o.allow_raise,
        "cleared": o.cleared,
        "key_id": o.key_id,
    }


def check_override(o: BudgetOverride) -> None:
    """ConfigError (the CLI's options) for a value no override may have."""
    if (bad := name_problem(o.domain, "domain id")) is not None or not o.domain:
        raise ConfigError("--domain", o.domain, bad or "a domain id of the topology")
    if not o.cleared and not (math.isfinite(o.watts) and 0 < o.watts <= MAX_WATTS):
        raise ConfigError("--watts", o.watts, f"a number of watts in (0, {MAX_WATTS:g}]")
    if o.expires_ns <= o.created_ns:
        raise ConfigError("--until", o.expires_ns, "a time in the future")
    if (o.expires_ns - o.created_ns) / 1e9 > MAX_OVERRIDE_S:
        raise ConfigError(
            "--until", o.expires_ns, f"at most {MAX_OVERRIDE_S / 86400:g} days from now"
        )


def sign_override(o: BudgetOverride, private_key: Ed25519PrivateKey) -> tuple[BudgetOverride, str]:
    """Stamp the key id, sign the canonical bytes; returns the override and its payload."""
    stamped = replace(o, key_id=key_id(private_key.public_key()), watts=round(o.watts, 3))
    check_override(stamped)
    body = canonical_json(_to_dict(stamped))
    sig = base64.b64encode(private_key.sign(body)).decode("ascii")
    return stamped, '{"override":' + body.decode("utf-8") + ',"sig":"' + sig + '"}'


def override_point(o: BudgetOverride, payload: str) -> schema.Point:
    return schema.point(
        schema.BUDGET_OVERRIDE,
        {schema.TAG_DOMAIN: o.domain},
        {
            "watts": float(o.watts),
            "expires_ns": o.expires_ns,
            "allow_raise": o.allow_raise,
            "cleared": o.cleared,
            "payload": payload,
        },
        o.created_ns,
    )


def verify_override(payload: str, public_key: Ed25519PublicKey) -> BudgetOverride:
    """The override ``payload`` carries, if ``public_key`` signed it; else OverrideRefused."""
    from cryptography.exceptions import InvalidSignature

    try:
        env = json.loads(payload)
    except (TypeError, ValueError):
        raise OverrideRefused("payload is not JSON") from None
    body = env.get("override") if isinstance(env, dict) else None
    sig = env.get("sig") if isinstance(env, dict) else None
    if not isinstance(body, dict):
        raise OverrideRefused("payload has no 'override' object")
    if not isinstance(sig, str) or not sig:
        raise OverrideRefused("unsigned")
    if body.get("key_id") != key_id(public_key):
        raise OverrideRefused(f"signed by key {body.get('key_id')!r}, not ours")
    try:
        public_key.verify(base64.b64decode(sig, validate=True), canonical_json(body))
    except (InvalidSignature, binascii.Error, ValueError):
        raise OverrideRefused("bad signature") from None
    try:
        o = BudgetOverride(
            domain=_typed(body, "domain", str),
            watts=float(_typed(body, "watts", (int, float))),
            created_ns=_typed(body, "created_ns", int),
            expires_ns=_typed(body, "expires_ns", int),
            allow_raise=_typed(body, "allow_raise", bool),
            cleared=_typed(body, "cleared", bool),
            key_id=_typed(body, "key_id", str),
        )
        if body.get("v") != FORMAT_VERSION or body.get("kind") != KIND:
            raise ValueError("not a version 1 budget override")
        check_override(o)
    except (ValueError, ConfigError) as e:
        raise OverrideRefused(f"malformed: {e}") from None
    return o


def _typed(body: dict[str, Any], name: str, typ: type | tuple[type, ...]) -> Any:
    v = body.get(name)
    if not isinstance(v, typ) or (isinstance(v, bool) and typ is not bool):
        raise ValueError(f"field {name!r} is missing or of the wrong type")
    return v


@dataclass(frozen=True, slots=True)
class OverrideState:
    """A domain's newest override point and what it means now."""

    domain: str
    watts: float
    expires_ns: int
    allow_raise: bool
    cleared: bool
    verified: bool | None  # None: no key to check it with
    problem: str = ""  # why the optimizer ignores it ("" when it is usable)

    def live(self, now_ns: int) -> bool:
        """In force: not cleared, not expired, and signed by our key (or not checked)."""
        return (
            not self.cleared and self.expires_ns > now_ns and self.verified is not False
        ) and not self.problem

    def left_s(self, now_ns: int) -> float:
        return (self.expires_ns - now_ns) / 1e9


def read_overrides(
    store: Store,
    now_ns: int,
    public_key: Ed25519PublicKey | None,
    lookback_s: float = MAX_OVERRIDE_S,
) -> list[OverrideState]:
    """Every domain's newest override in the last ``lookback_s``: one aggregate read.

    With ``public_key`` each payload is verified (``verified`` and ``problem`` say
    how it went); without, ``verified`` is None. Sorted by domain.
    """
    from dcenergy.store.base import Agg, AggregateQuery, Fn

    q = AggregateQuery(
        schema.BUDGET_OVERRIDE.name,
        tuple(
            Agg(Fn.LAST, f) for f in ("watts", "expires_ns", "allow_raise", "cleared", "payload")
        ),
        now_ns - int(lookback_s * 1e9),
        MAX_TIME_NS,
        by=(schema.TAG_DOMAIN,),
    )
    out: list[OverrideState] = []
    for r in store.aggregate(q):
        domain = r.tags.get(schema.TAG_DOMAIN, "")
        v = r.values
        watts, expires = v.get("last_watts"), v.get("last_expires_ns")
        if not domain or not isinstance(watts, int | float) or not isinstance(expires, int):
            continue
        state = OverrideState(
            domain,
            float(watts),
            expires,
            v.get("last_allow_raise") is True,
            v.get("last_cleared") is True,
            None,
        )
        payload = v.get("last_payload")
        if public_key is not None:
            state = _checked(state, payload if isinstance(payload, str) else "", public_key)
        out.append(state)
    return sorted(out, key=lambda s: s.domain)


def _checked(state: OverrideState, payload: str, public_key: Ed25519PublicKey) -> OverrideState:
    """The state as the signed payload has it, or marked unverified with the reason."""
    try:
        o = verify_override(payload, public_key)
    except OverrideRefused as e:
        return replace(state, verified=False, problem=e.message)
    if o.domain != state.domain:
        return replace(state, verified=False, problem=f"signed for domain {o.domain!r}")
    return OverrideState(o.domain, o.watts, o.expires_ns, o.allow_raise, o.cleared, True)
