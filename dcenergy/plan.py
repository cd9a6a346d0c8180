"""Signed plan parts: what one host may apply, its canonical bytes, its Ed25519 signature.

The optimizer splits a plan into one *part* per host and signs each; an agent
reads only its own part and applies it only after ``verify_part`` accepts it.

Canonical encoding (the bytes the signature covers)
---------------------------------------------------
JSON, UTF-8, object keys sorted, no whitespace (``,`` and ``:`` only), strings
escaped as JSON requires with non-ASCII left as UTF-8, integers in decimal,
and every float written with exactly three decimals (``250.000``): milliwatt
resolution, which is what NVML takes, so the rounding loses nothing a GPU can
use and any language can reproduce the bytes with a ``%.3f`` formatter. NaN and
infinities cannot be encoded. The part's body is::

    {"created_ns":…,"expires_ns":…,"host":"…","key_id":"…","mode":"power",
     "plan_id":"…","seq":…,"setpoints":[{"gpu":"GPU-…","power_limit_w":250.000,
     "sm_clock_max_mhz":null},…],"v":1}

with setpoints sorted by GPU UUID. Two optional keys appear only when set, so
parts without them keep their bytes: ``"next_plan_ns"`` (when the next plan
is due) and ``"revert":true`` (the emergency stop: no setpoints, every GPU
back at its saved limit until ``expires_ns``). A setpoint may carry a probe,
``"probe_w"`` and ``"probe_until_ns"`` together and only when set: the agent
applies ``probe_w`` (never above ``power_limit_w``) until then, audited
``probe``, and the plan's limit after. The stored payload is the envelope
``{"part":<body>,"sig":"<base64 signature>"}``. A verifier parses the envelope,
re-encodes ``part`` canonically, checks the signature over those bytes and then
decodes the part *from the bytes it verified*, so what an agent acts on is
exactly what was signed.

Sequence numbers are strictly increasing per host: the publisher uses
``max(now_ns, last_published + 1)`` (nanoseconds), so the optimizer needs no
stored counter, and an agent refuses any part whose ``seq`` is not above the
last one it accepted (a replay).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import json
import math
import os
import stat
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from dcenergy.errors import ConfigError, PlanError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (
        Ed25519PrivateKey,
        Ed25519PublicKey,
    )

FORMAT_VERSION = 1
Mode = Literal["power", "dvfs"]
MODES: tuple[str, ...] = ("power", "dvfs")
MAX_POWER_W = 100_000.0  # no single GPU draws this: a larger value is a bug, not a plan
MAX_CLOCK_MHZ = 100_000


class Refusal(StrEnum):
    """Why a part was refused; the value is what audit records carry as ``reason``."""

    UNSIGNED = "unsigned"
    BAD_SIGNATURE = "bad_signature"
    OTHER_KEY = "other_key"
    WRONG_HOST = "wrong_host"
    REPLAYED = "replayed"
    EXPIRED = "expired"
    FUTURE = "future"
    MALFORMED = "malformed"
    BAD_VALUE = "bad_value"
    UNKNOWN_GPU = "unknown_gpu"


class PartRefused(PlanError):
    """A plan part an agent must not apply; ``reason`` is a ``Refusal`` (machine-readable)."""

    def __init__(self, reason: Refusal, detail: str) -> None:
        super().__init__(f"plan part refused ({reason.value}): {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Setpoint:
    """One GPU's target: a power limit, a locked SM-clock maximum (DVFS), or both."""

    gpu_uuid: str
    power_limit_w: float | None
    sm_clock_max_mhz: int | None = None
    # A probe (the optimizer learning the job's curve): ``probe_w`` instead of
    # ``power_limit_w`` until ``probe_until_ns``, then the plan's limit. Never above it.
    probe_w: float | None = None
    probe_until_ns: int | None = None


@dataclass(frozen=True, slots=True)
class PlanPart:
    """One host's share of a plan: the unit that is signed, stored and verified."""

    host: str
    plan_id: str
    seq: int
    created_ns: int
    expires_ns: int
    key_id: str
    setpoints: tuple[Setpoint, ...]
    mode: Mode = "power"
    # When the optimizer means to publish the next plan: an agent configured to
    # poll when due (reconciler.poll_when_due) skips fetches until then. Signed.
    next_plan_ns: int | None = None
    # The emergency stop (``dcenergy revert``): no setpoints; until ``expires_ns``
    # the agent keeps every GPU at its saved pre-agent limit. Signed.
    revert: bool = False

    def setpoint(self, gpu_uuid: str) -> Setpoint | None:
        return next((s for s in self.setpoints if s.gpu_uuid == gpu_uuid), None)


@dataclass(frozen=True, slots=True)
class SignedPart:
    """A part with its signature; ``payload`` is what goes into ``plan_part.payload``."""

    part: PlanPart
    signature: str  # base64 of the 64-byte Ed25519 signature
    payload: str


# --- canonical encoding ---------------------------------------------------------


def _encode(value: Any, out: list[str]) -> None:
    if value is None:
        out.append("null")
    elif value is True:
        out.append("true")
    elif value is False:
        out.append("false")
    elif isinstance(value, int):
        out.append(str(value))
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"non-finite number {value!r} cannot be encoded")
        text = f"{value:.3f}"
        out.append("0.000" if text == "-0.000" else text)
    elif isinstance(value, str):
        out.append(json.dumps(value, ensure_ascii=False))
    elif isinstance(value, list | tuple):
        out.append("[")
        for i, item in enumerate(value):
            if i:
                out.append(",")
            _encode(item, out)
        out.append("]")
    elif isinstance(value, dict):
        out.append("{")
        for i, key in enumerate(sorted(value)):
            if not isinstance(key, str):
                raise ValueError(f"object key {key!r} is not a string")
            if i:
                out.append(",")
            out.append(json.dumps(key, ensure_ascii=False))
            out.append(":")
            _encode(value[key], out)
        out.append("}")
    else:
        raise ValueError(f"cannot encode {type(value).__name__}")


def canonical_json(value: Any) -> bytes:
    """The canonical bytes of a JSON value (see the module docstring); ValueError on NaN/inf."""
    out: list[str] = []
    _encode(value, out)
    return "".join(out).encode("utf-8")


def part_to_dict(part: PlanPart) -> dict[str, Any]:
    """The part as the JSON object that is signed (setpoints sorted by GPU UUID)."""
    return {
        "v": FORMAT_VERSION,
        "host": part.host,
        "plan_id": part.plan_id,
        "seq": part.seq,
        "created_ns": part.created_ns,
        "expires_ns": part.expires_ns,
        "key_id": part.key_id,
        "mode": part.mode,
        "setpoints": [
            {
                "gpu": s.gpu_uuid,
                "power_limit_w": None if s.power_limit_w is None else float(s.power_limit_w),
                "sm_clock_max_mhz": s.sm_clock_max_mhz,
                # only when set, so setpoints without a probe keep their canonical bytes
                **(
                    {}
                    if s.probe_w is None
                    else {"probe_w": float(s.probe_w), "probe_until_ns": s.probe_until_ns}
                ),
            }
            for s in sorted(part.setpoints, key=lambda s: s.gpu_uuid)
        ],
        # only when set, so parts without it keep their canonical bytes
        **({} if part.next_plan_ns is None else {"next_plan_ns": part.next_plan_ns}),
        **({"revert": True} if part.revert else {}),
    }


def canonical_part(part: PlanPart) -> bytes:
    """The exact bytes the signature of ``part`` covers."""
    return canonical_json(part_to_dict(part))


# --- keys ----------------------------------------------------------------------------


def key_id(public_key: Ed25519PublicKey) -> str:
    """First 16 hex digits of SHA-256 over the raw 32-byte public key."""
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    raw = public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def _write_new_file(path: Path, data: bytes, mode: int, *, force: bool) -> None:
    """Write ``data`` to ``path`` with ``mode`` from the first byte on, atomically.

    The temporary file is created with ``O_EXCL`` and ``mode`` (never wider, whatever
    the umask), then linked into place (refusing an existing file) or, with
    ``force``, renamed over it.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        try:
            os.fchmod(fd, mode)
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        if force:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # fails with FileExistsError instead of overwriting
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def generate_keypair(
    private_path: str | Path,
    public_path: str | Path,
    *,
    force: bool = False,
    private_key_name: str = "optimizer.signing_key",
    public_key_name: str = "reconciler.public_key",
) -> str:
    """Create an Ed25519 key pair: private PEM (0600, never readable by others), public PEM.

    Refuses to replace an existing file unless ``force``. Returns the key id.
    """
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import (
        Encoding,
        NoEncryption,
        PrivateFormat,
        PublicFormat,
    )

    priv_p, pub_p = Path(private_path), Path(public_path)
    if priv_p.resolve() == pub_p.resolve():
        raise ConfigError(public_key_name, str(pub_p), "a path other than the private key's")
    if not force:
        for name, p in ((private_key_name, priv_p), (public_key_name, pub_p)):
            if p.exists() or p.is_symlink():
                raise ConfigError(name, str(p), "a path with no key yet (--force replaces it)")
    key = Ed25519PrivateKey.generate()
    priv_pem = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    pub_pem = key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    for name, p, data, mode in (
        (private_key_name, priv_p, priv_pem, 0o600),
        (public_key_name, pub_p, pub_pem, 0o644),
    ):
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
            _write_new_file(p, data, mode, force=force)
        except FileExistsError as e:
            raise ConfigError(name, str(p), "a path with no key yet (--force replaces it)") from e
        except OSError as e:
            raise ConfigError(name, str(p), f"a writable path ({e.strerror})") from e
    return key_id(key.public_key())


def _read_key_file(path: Path, name: str, source: str | None = None) -> bytes:
    if path.is_dir():
        raise ConfigError(name, str(path), "a key file, but it is a folder", source=source)
    try:
        return path.read_bytes()
    except FileNotFoundError as e:
        raise ConfigError(
            name, str(path), "an existing key file (dcenergy keys generate)", source=source
        ) from e
    except OSError as e:
        raise ConfigError(
            name, str(path), f"a readable key file ({e.strerror})", source=source
        ) from e


def _is_public_pem(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            head = f.read(64)
    except OSError:
        return False
    return head.lstrip().startswith(b"-----BEGIN PUBLIC KEY-----")


def load_private_key(
    path: str | Path, *, key: str = "optimizer.signing_key", source: str | None = None
) -> Ed25519PrivateKey:
    """Load the signing key, refusing a file that group or others may read or write.

    ``source`` (a config file's path, ``env VAR``) goes into the error's hint.
    """
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    p = Path(path)
    try:
        mode = p.stat().st_mode
    except FileNotFoundError as e:
        raise ConfigError(
            key, str(p), "an existing key file (dcenergy keys generate)", source=source
        ) from e
    if stat.S_ISDIR(mode):
        raise ConfigError(key, str(p), "the private key file, but it is a folder", source=source)
    if _is_public_pem(p):
        raise ConfigError(
            key,
            str(p),
            "the Ed25519 private key, but this file is a public key "
            "(the private one is the 0600 file `dcenergy keys generate` wrote next to it)",
            source=source,
        )
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(
            key,
            str(p),
            f"a key file only its owner can read: it is mode {stat.S_IMODE(mode):04o} "
            f"(chmod 600 {p})",
            source=source,
        )
    try:
        loaded = load_pem_private_key(_read_key_file(p, key, source), password=None)
    except (ValueError, TypeError) as e:
        raise ConfigError(
            key, str(p), "an unencrypted Ed25519 private key in PEM", source=source
        ) from e
    if not isinstance(loaded, Ed25519PrivateKey):
        raise ConfigError(
            key, str(p), "an Ed25519 private key (not another algorithm)", source=source
        )
    return loaded


def load_public_key(
    path: str | Path, *, key: str = "reconciler.public_key", source: str | None = None
) -> Ed25519PublicKey:
    """Load the optimizer's public key (PEM); agents hold only this."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    p = Path(path)
    data = _read_key_file(p, key, source)
    if b"PRIVATE KEY-----" in data[:200]:
        raise ConfigError(
            key,
            str(p),
            "the Ed25519 public key, but this file is the private key (keep it off agents)",
            source=source,
        )
    try:
        loaded = load_pem_public_key(data)
    except ValueError as e:
        raise ConfigError(key, str(p), "an Ed25519 public key in PEM", source=source) from e
    if not isinstance(loaded, Ed25519PublicKey):
        raise ConfigError(
            key, str(p), "an Ed25519 public key (not another algorithm)", source=source
        )
    return loaded


# --- sign and verify -----------------------------------------------------------------


def _envelope(body: bytes, signature: bytes) -> str:
    sig = base64.b64encode(signature).decode("ascii")
    return '{"part":' + body.decode("utf-8") + ',"sig":"' + sig + '"}'


def sign_part(part: PlanPart, private_key: Ed25519PrivateKey) -> SignedPart:
    """Stamp the signer's key id on ``part``, sign its canonical bytes, build the payload."""
    from dataclasses import replace

    stamped = replace(part, key_id=key_id(private_key.public_key()))
    _check_values(stamped, PlanError)
    body = canonical_part(stamped)
    signature = private_key.sign(body)
    return SignedPart(
        part=_decode_part(json.loads(body)),  # as agents will see it: sorted, rounded to mW
        signature=base64.b64encode(signature).decode("ascii"),
        payload=_envelope(body, signature),
    )


def _check_values(part: PlanPart, exc: type[Exception]) -> None:
    """Refuse NaN, infinite, zero or negative setpoints and impossible times."""
    if part.mode not in MODES:
        raise exc(f"mode {part.mode!r} is not one of {MODES}")
    if part.expires_ns <= part.created_ns:
        raise exc(f"expires_ns {part.expires_ns} is not after created_ns {part.created_ns}")
    if part.revert and part.setpoints:
        raise exc(f"a revert part carries no setpoints ({len(part.setpoints)} given)")
    seen: set[str] = set()
    for s in part.setpoints:
        if s.gpu_uuid in seen:
            raise exc(f"GPU {s.gpu_uuid} appears twice")
        seen.add(s.gpu_uuid)
        w = s.power_limit_w
        if w is not None and not (math.isfinite(w) and 0 < w <= MAX_POWER_W):
            raise exc(
                f"GPU {s.gpu_uuid}: power_limit_w {w!r} is not a number in (0, {MAX_POWER_W}]"
            )
        c = s.sm_clock_max_mhz
        if c is not None and not 0 < c <= MAX_CLOCK_MHZ:
            raise exc(f"GPU {s.gpu_uuid}: sm_clock_max_mhz {c!r} is not in (0, {MAX_CLOCK_MHZ}]")
        if w is None and c is None:
            raise exc(f"GPU {s.gpu_uuid}: neither power_limit_w nor sm_clock_max_mhz")
        if (s.probe_w is None) != (s.probe_until_ns is None):
            raise exc(f"GPU {s.gpu_uuid}: probe_w and probe_until_ns go together")
        if s.probe_w is not None:
            pw, until = s.probe_w, s.probe_until_ns
            if w is None or not (math.isfinite(pw) and 0 < pw <= w):
                raise exc(f"GPU {s.gpu_uuid}: probe_w {pw!r} is not in (0, power_limit_w]")
            if until is None or not part.created_ns < until <= part.expires_ns:
                raise exc(f"GPU {s.gpu_uuid}: probe_until_ns {until!r} is outside the lease")


def _malformed(detail: str) -> PartRefused:
    return PartRefused(Refusal.MALFORMED, detail)


def _get(obj: dict[str, Any], name: str, typ: type | tuple[type, ...]) -> Any:
    if name not in obj:
        raise _malformed(f"field {name!r} is missing")
    value = obj[name]
    if isinstance(value, bool) or not isinstance(value, typ):
        raise _malformed(f"field {name!r} has the wrong type ({type(value).__name__})")
    return value


def _decode_part(body: dict[str, Any]) -> PlanPart:
    if _get(body, "v", int) != FORMAT_VERSION:
        raise _malformed(f"format version {body['v']!r} is not {FORMAT_VERSION}")
    raw_setpoints = _get(body, "setpoints", list)
    setpoints: list[Setpoint] = []
    for raw in raw_setpoints:
        if not isinstance(raw, dict):
            raise _malformed("a setpoint is not an object")
        w = raw.get("power_limit_w")
        c = raw.get("sm_clock_max_mhz")
        if w is not None and (isinstance(w, bool) or not isinstance(w, int | float)):
            raise _malformed("power_limit_w is not a number")
        if c is not None and (isinstance(c, bool) or not isinstance(c, int)):
            raise _malformed("sm_clock_max_mhz is not an integer")
        pw, until = raw.get("probe_w"), raw.get("probe_until_ns")
        if pw is not None and (isinstance(pw, bool) or not isinstance(pw, int | float)):
            raise _malformed("probe_w is not a number")
        if until is not None and (isinstance(until, bool) or not isinstance(until, int)):
            raise _malformed("probe_until_ns is not an integer")
        setpoints.append(
            Setpoint(
                gpu_uuid=_get(raw, "gpu", str),
                power_limit_w=None if w is None else float(w),
                sm_clock_max_mhz=c,
                probe_w=None if pw is None else float(pw),
                probe_until_ns=until,
            )
        )
    mode = _get(body, "mode", str)
    next_plan_ns = body.get("next_plan_ns")
    if next_plan_ns is not None and (
        isinstance(next_plan_ns, bool) or not isinstance(next_plan_ns, int)
    ):
        raise _malformed("next_plan_ns is not an integer")
    revert = body.get("revert", False)
    if not isinstance(revert, bool):
        raise _malformed("revert is not a boolean")
    part = PlanPart(
        host=_get(body, "host", str),
        plan_id=_get(body, "plan_id", str),
        seq=_get(body, "seq", int),
        created_ns=_get(body, "created_ns", int),
        expires_ns=_get(body, "expires_ns", int),
        key_id=_get(body, "key_id", str),
        setpoints=tuple(setpoints),
        mode=mode,
        next_plan_ns=next_plan_ns,
        revert=revert,
    )
    try:
        _check_values(part, ValueError)
    except ValueError as e:
        raise PartRefused(Refusal.BAD_VALUE, str(e)) from None
    return part


def parse_envelope(payload: str) -> tuple[dict[str, Any], str | None]:
    """Split a payload into its (unverified) part object and signature; for display too."""
    try:
        env = json.loads(payload)
    except (ValueError, TypeError) as e:
        raise _malformed(f"payload is not JSON ({e})") from None
    if not isinstance(env, dict) or not isinstance(env.get("part"), dict):
        raise _malformed("payload has no 'part' object")
    sig = env.get("sig")
    if sig is not None and not isinstance(sig, str):
        raise _malformed("'sig' is not a string")
    return env["part"], (sig or None)


def verify_part(
    payload: str,
    public_key: Ed25519PublicKey,
    *,
    now_ns: int,
    last_seq: int | None,
    max_skew_s: float,
    host: str | None = None,
) -> PlanPart:
    """Accept a payload only if it is signed by ``public_key``, fresh, new and sane.

    Raises ``PartRefused`` (a ``PlanError``) whose ``reason`` says why. The checks
    run in this order: malformed, unsigned, other key, bad signature, bad value,
    wrong host, expired, future (beyond ``max_skew_s``), replayed
    (``seq <= last_seq``).
    """
    from cryptography.exceptions import InvalidSignature

    body, sig = parse_envelope(payload)
    if sig is None:
        raise PartRefused(Refusal.UNSIGNED, "the part carries no signature")
    claimed = body.get("key_id")
    ours = key_id(public_key)
    if claimed != ours:
        raise PartRefused(Refusal.OTHER_KEY, f"signed by key {claimed!r}, we trust {ours}")
    try:
        signature = base64.b64decode(sig, validate=True)
    except (binascii.Error, ValueError):
        raise PartRefused(Refusal.BAD_SIGNATURE, "the signature is not base64") from None
    try:
        signed = canonical_json(body)
    except ValueError as e:  # NaN or infinity in the part
        raise PartRefused(Refusal.BAD_VALUE, str(e)) from None
    try:
        public_key.verify(signature, signed)
    except InvalidSignature:
        raise PartRefused(Refusal.BAD_SIGNATURE, "the signature does not match") from None
    part = _decode_part(json.loads(signed))  # exactly the bytes just verified
    if host is not None and part.host != host:
        raise PartRefused(Refusal.WRONG_HOST, f"part is for host {part.host!r}, not {host!r}")
    if part.expires_ns <= now_ns:
        raise PartRefused(Refusal.EXPIRED, f"expired {(now_ns - part.expires_ns) / 1e9:.0f} s ago")
    if part.created_ns > now_ns + int(max_skew_s * 1e9):
        ahead = (part.created_ns - now_ns) / 1e9
        raise PartRefused(
            Refusal.FUTURE, f"created {ahead:.0f} s in the future (skew allowed: {max_skew_s:g} s)"
        )
    if last_seq is not None and part.seq <= last_seq:
        raise PartRefused(Refusal.REPLAYED, f"seq {part.seq} is not above {last_seq}")
    return part


def payload_digest(payload: str) -> str:
    """SHA-256 of a payload: how an agent recognises the part it already accepted."""
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()
