"""What the reconciler must remember across restarts, in the agent's state directory.

* ``saved_limits.json``: each GPU's power limit from *before* the agent first
  changed it, and how to undo clock changes. NVML cannot read locked clocks
  back, so the only restore action for clocks is "reset" (taken only when the
  agent itself locked them). The file exists exactly while some GPU is not at
  its pre-agent setting: after a crash, its presence says what to undo.
* ``reconciler_state.json``: the seq and payload digest of the last accepted
  plan part, so that a restarted agent still refuses replays and recognises
  the part it was already applying.

Both are written atomically (temporary file, fsync, rename), mode 0600.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dcenergy.files import write_private_atomic

log = logging.getLogger(__name__)

SAVED_LIMITS_FILE = "saved_limits.json"
RECONCILER_STATE_FILE = "reconciler_state.json"
CLOCKS_RESET = "reset"


@dataclass(frozen=True, slots=True)
class SavedLimit:
    """A GPU's pre-agent setting and the restore action for its clocks."""

    gpu_uuid: str
    power_limit_w: float
    clocks_locked_by_agent: bool = False
    clock_restore: str = CLOCKS_RESET


@dataclass(frozen=True, slots=True)
class AcceptedPart:
    """The last plan part this agent accepted."""

    seq: int
    digest: str
    plan_id: str
    expires_ns: int


def _atomic_write_json(path: Path, data: Any) -> None:
    write_private_atomic(path, json.dumps(data, indent=1, sort_keys=True))


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        log.error("cannot read %s (%s): ignoring it", path, e)
        return None


class LimitsState:
    """Saved pre-agent limits and the last accepted part, kept under ``state_dir``."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = Path(state_dir)
        self.limits_path = self.state_dir / SAVED_LIMITS_FILE
        self.state_path = self.state_dir / RECONCILER_STATE_FILE

    # --- saved limits ---------------------------------------------------------------------
    def load_limits(self) -> dict[str, SavedLimit]:
        """The saved limits by GPU UUID; entries that do not parse are skipped (logged)."""
        raw = _read_json(self.limits_path)
        out: dict[str, SavedLimit] = {}
        if not isinstance(raw, dict):
            return out
        for uuid, entry in (raw.get("gpus") or {}).items():
            try:
                w = float(entry["power_limit_w"])
                if not math.isfinite(w) or w <= 0:
                    raise ValueError(w)
                out[uuid] = SavedLimit(
                    gpu_uuid=uuid,
                    power_limit_w=w,
                    clocks_locked_by_agent=bool(entry.get("clocks_locked_by_agent", False)),
                    clock_restore=str(entry.get("clock_restore", CLOCKS_RESET)),
                )
            except (KeyError, TypeError, ValueError):
                log.error("%s: entry for %s is unusable; skipped", self.limits_path, uuid)
        return out

    def save_limits(self, limits: dict[str, SavedLimit]) -> None:
        """Write the saved limits (or remove the file when there are none)."""
        if not limits:
            with contextlib.suppress(FileNotFoundError):
                self.limits_path.unlink()
            return
        _atomic_write_json(
            self.limits_path,
            {
                "v": 1,
                "gpus": {
                    u: {
                        "power_limit_w": s.power_limit_w,
                        "clocks_locked_by_agent": s.clocks_locked_by_agent,
                        "clock_restore": s.clock_restore,
                    }
                    for u, s in sorted(limits.items())
                },
            },
        )

    # --- accepted part ---------------------------------------------------------------------
    def load_accepted(self) -> AcceptedPart | None:
        raw = _read_json(self.state_path)
        if not isinstance(raw, dict):
            return None
        try:
            return AcceptedPart(
                seq=int(raw["last_seq"]),
                digest=str(raw["digest"]),
                plan_id=str(raw.get("plan_id", "")),
                expires_ns=int(raw.get("expires_ns", 0)),
            )
        except (KeyError, TypeError, ValueError):
            log.error("%s is unusable; replay protection starts from zero", self.state_path)
            return None

    def save_accepted(self, accepted: AcceptedPart) -> None:
        _atomic_write_json(
            self.state_path,
            {
                "v": 1,
                "last_seq": accepted.seq,
                "digest": accepted.digest,
                "plan_id": accepted.plan_id,
                "expires_ns": accepted.expires_ns,
            },
        )
