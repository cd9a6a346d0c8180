"""Plan parts: canonical bytes, Ed25519 signatures, every refusal reason, key files."""

from __future__ import annotations

import base64
import json
import os
import stat
from dataclasses import replace
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from dcenergy.errors import ConfigError, PlanError
from dcenergy.plan import (
    PartRefused,
    PlanPart,
    Refusal,
    Setpoint,
    canonical_json,
    canonical_part,
    generate_keypair,
    key_id,
    load_private_key,
    load_public_key,
    sign_part,
    verify_part,
)

NOW = 1_700_000_000_000_000_000
S = 1_000_000_000
SEED_KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))


def make_part(**kw: object) -> PlanPart:
    base = PlanPart(
        host="node-ü1",
        plan_id="plan-42",
        seq=NOW + 1,
        created_ns=NOW,
        expires_ns=NOW + 900 * S,
        key_id="",
        setpoints=(Setpoint("GPU-b", 300.0, None), Setpoint("GPU-a", 412.3456, 1410)),
        mode="dvfs",
    )
    return replace(base, **kw)  # type: ignore[arg-type]


def verify(payload: str, **kw: object) -> PlanPart:
    args: dict[str, object] = {
        "now_ns": NOW,
        "last_seq": None,
        "max_skew_s": 30.0,
        "host": "node-ü1",
    }
    args.update(kw)
    return verify_part(payload, SEED_KEY.public_key(), **args)  # type: ignore[arg-type]


def resign(body: dict[str, object] | str, key: Ed25519PrivateKey = SEED_KEY) -> str:
    """A payload signed over exactly these bytes: a compromised or buggy signer."""
    raw = body if isinstance(body, str) else canonical_json(body).decode()
    sig = base64.b64encode(key.sign(raw.encode())).decode()
    return '{"part":' + raw + ',"sig":"' + sig + '"}'


# --- canonical encoding ----------------------------------------------------------------


GOLDEN = (
    b'{"created_ns":1700000000000000000,"expires_ns":1700000900000000000,'
    b'"host":"node-\xc3\xbc1","key_id":"56475aa75463474c","mode":"dvfs","plan_id":"plan-42",'
    b'"seq":1700000000000000001,"setpoints":[{"gpu":"GPU-a","power_limit_w":412.346,'
    b'"sm_clock_max_mhz":1410},{"gpu":"GPU-b","power_limit_w":300.000,'
    b'"sm_clock_max_mhz":null}],"v":1}'
)
GOLDEN_SIG = (
    "/UcwEiUe80KZGg3U6z1nqe+PPxj0QWeGJVuLbnI33GHseFIQ/8/BOalgAmCyfL8gtxKPZ+GU9SWZCNgciPvEAQ=="
)


def test_canonical_bytes_are_stable_golden() -> None:
    signed = sign_part(make_part(), SEED_KEY)
    assert canonical_part(signed.part) == GOLDEN
    assert signed.signature == GOLDEN_SIG  # Ed25519 is deterministic
    assert signed.part.key_id == key_id(SEED_KEY.public_key()) == "56475aa75463474c"
    assert signed.payload == '{"part":' + GOLDEN.decode() + ',"sig":"' + GOLDEN_SIG + '"}'


def test_canonical_encoding_ignores_setpoint_order_and_float_noise() -> None:
    a = make_part()
    b = make_part(
        setpoints=(Setpoint("GPU-a", 412.34560000001, 1410), Setpoint("GPU-b", 300, None))  # type: ignore[arg-type]
    )
    assert canonical_part(replace(a, key_id="k")) == canonical_part(replace(b, key_id="k"))


def test_canonical_json_refuses_non_finite() -> None:
    with pytest.raises(ValueError, match="non-finite"):
        canonical_json({"x": float("nan")})
    assert canonical_json({"b": -0.0, "a": [1, True, None, "é"]}) == (
        '{"a":[1,true,null,"é"],"b":0.000}'.encode()
    )


def test_round_trip_gives_the_signed_part() -> None:
    signed = sign_part(make_part(), SEED_KEY)
    part = verify(signed.payload)
    assert part == signed.part
    assert part.setpoint("GPU-a") == Setpoint("GPU-a", 412.346, 1410)
    assert part.mode == "dvfs"


def test_sign_refuses_bad_values() -> None:
    with pytest.raises(PlanError, match="power_limit_w"):
        sign_part(make_part(setpoints=(Setpoint("GPU-a", -5.0),)), SEED_KEY)


# --- refusals ----------------------------------------------------------------------------


def refusal(payload: str, **kw: object) -> Refusal:
    with pytest.raises(PartRefused) as info:
        verify(payload, **kw)
    assert isinstance(info.value, PlanError)
    return info.value.reason


def test_unsigned() -> None:
    body = json.loads(sign_part(make_part(), SEED_KEY).payload)["part"]
    assert refusal(json.dumps({"part": body})) is Refusal.UNSIGNED
    assert refusal(json.dumps({"part": body, "sig": ""})) is Refusal.UNSIGNED


def test_bad_signature_tampered_value() -> None:
    payload = sign_part(make_part(), SEED_KEY).payload.replace("300.000", "700.000")
    assert refusal(payload) is Refusal.BAD_SIGNATURE


def test_bad_signature_not_base64() -> None:
    env = json.loads(sign_part(make_part(), SEED_KEY).payload)
    env["sig"] = "***"
    assert refusal(json.dumps(env)) is Refusal.BAD_SIGNATURE


def test_other_key() -> None:
    other = Ed25519PrivateKey.from_private_bytes(bytes(range(1, 33)))
    assert refusal(sign_part(make_part(), other).payload) is Refusal.OTHER_KEY


def test_key_id_claim_cannot_be_forged() -> None:
    """A part signed by another key that claims our key id fails on the signature."""
    other = Ed25519PrivateKey.from_private_bytes(bytes(range(1, 33)))
    body = json.loads(sign_part(make_part(), SEED_KEY).payload)["part"]
    assert refusal(resign(body, other)) is Refusal.BAD_SIGNATURE


def test_replayed() -> None:
    payload = sign_part(make_part(), SEED_KEY).payload
    assert refusal(payload, last_seq=NOW + 1) is Refusal.REPLAYED
    assert refusal(payload, last_seq=NOW + 2) is Refusal.REPLAYED
    assert verify(payload, last_seq=NOW).seq == NOW + 1


def test_expired() -> None:
    payload = sign_part(make_part(), SEED_KEY).payload
    assert refusal(payload, now_ns=NOW + 900 * S) is Refusal.EXPIRED


def test_future_beyond_skew() -> None:
    payload = sign_part(make_part(), SEED_KEY).payload
    assert verify(payload, now_ns=NOW - 30 * S).plan_id == "plan-42"  # within skew
    assert refusal(payload, now_ns=NOW - 31 * S) is Refusal.FUTURE


def test_wrong_host() -> None:
    payload = sign_part(make_part(), SEED_KEY).payload
    assert refusal(payload, host="node-2") is Refusal.WRONG_HOST


@pytest.mark.parametrize(
    "payload",
    ["", "not json", "[]", '{"part": 3, "sig": "x"}', '{"part": {}, "sig": 5}'],
)
def test_malformed_envelope(payload: str) -> None:
    assert refusal(payload) is Refusal.MALFORMED


def test_malformed_signed_body() -> None:
    body = json.loads(sign_part(make_part(), SEED_KEY).payload)["part"]
    del body["expires_ns"]
    assert refusal(resign(body)) is Refusal.MALFORMED
    body = json.loads(sign_part(make_part(), SEED_KEY).payload)["part"]
    body["v"] = 2
    assert refusal(resign(body)) is Refusal.MALFORMED


@pytest.mark.parametrize(
    "value", ["NaN", "Infinity", "-Infinity", "-300.000", "0.000", "200000.000"]
)
def test_bad_values_even_when_signed(value: str) -> None:
    raw = canonical_part(replace(make_part(), key_id="56475aa75463474c")).decode()
    raw = raw.replace("300.000", value)
    assert refusal(resign(raw)) is Refusal.BAD_VALUE


def test_negative_clock_is_a_bad_value() -> None:
    raw = canonical_part(replace(make_part(), key_id="56475aa75463474c")).decode()
    assert refusal(resign(raw.replace(":1410", ":-1410"))) is Refusal.BAD_VALUE


def test_verified_part_is_decoded_from_the_verified_bytes() -> None:
    """A float with more digits than signed is read as the signed (mW-rounded) value."""
    env = json.loads(sign_part(make_part(), SEED_KEY).payload)
    env["part"]["setpoints"][1]["power_limit_w"] = 300.0004
    sp = verify(json.dumps(env)).setpoint("GPU-b")
    assert sp is not None and sp.power_limit_w == 300.0


# --- key files -------------------------------------------------------------------------------


def test_generate_keypair_modes_and_round_trip(tmp_path: Path) -> None:
    old = os.umask(0)  # even with a permissive umask the private key is 0600
    try:
        kid = generate_keypair(tmp_path / "k" / "plan.key", tmp_path / "k" / "plan.pub")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "k" / "plan.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "k" / "plan.pub").stat().st_mode) == 0o644
    priv = load_private_key(tmp_path / "k" / "plan.key")
    pub = load_public_key(tmp_path / "k" / "plan.pub")
    assert key_id(pub) == key_id(priv.public_key()) == kid
    payload = sign_part(make_part(), priv).payload
    assert verify_part(payload, pub, now_ns=NOW, last_seq=None, max_skew_s=0).plan_id == "plan-42"
    assert not list((tmp_path / "k").glob(".*tmp"))


def test_generate_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    priv, pub = tmp_path / "plan.key", tmp_path / "plan.pub"
    generate_keypair(priv, pub)
    before = priv.read_bytes()
    with pytest.raises(ConfigError, match="--force"):
        generate_keypair(priv, pub)
    assert priv.read_bytes() == before
    generate_keypair(priv, pub, force=True)
    assert priv.read_bytes() != before
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o620, 0o644])
def test_private_key_readable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    priv, pub = tmp_path / "plan.key", tmp_path / "plan.pub"
    generate_keypair(priv, pub)
    priv.chmod(mode)
    with pytest.raises(ConfigError) as info:
        load_private_key(priv)
    assert "optimizer.signing_key" in str(info.value)
    assert f"chmod 600 {priv}" in str(info.value)


def test_missing_and_wrong_key_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="keys generate"):
        load_private_key(tmp_path / "absent.key")
    with pytest.raises(ConfigError, match=r"reconciler\.public_key"):
        load_public_key(tmp_path / "absent.pub")
    junk = tmp_path / "junk.pub"
    junk.write_text("not a key")
    with pytest.raises(ConfigError, match="Ed25519 public key"):
        load_public_key(junk)
