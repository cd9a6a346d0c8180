"""The setpoint reconciler: fetch this host's signed plan part, verify, clamp, apply, audit.

Each ``reconcile_once`` (the daemon calls it every ``reconciler.interval_s``):

1. reads this host's newest ``plan_part`` from the store and verifies it
   (``dcenergy.plan.verify_part``). A part that is unsigned, signed by another
   key, replayed, expired, dated in the future beyond the allowed skew,
   malformed, carries NaN/negative values or names a GPU this host does not
   have is refused as a whole: an audit record, and not one set call. A
   refused part does not end a lease that is still valid;
2. moves each GPU of the lease one step towards its setpoint: clamped to the
   local policy (``min_w``/``max_w``), then to the hardware range, then to at
   most ``max_step_w`` away from the current limit; in ``dvfs`` mode the SM
   clock is locked to [lowest supported, planned maximum]. Every change is read
   back (requested and enforced limit); an enforced limit more than 1 W away
   from what was applied is reported as ``drift``;
3. restores GPUs the agent changed when the lease is over (expired, or the GPU
   left the plan): to ``safe_cap_w`` when configured, otherwise to the limit
   saved before the agent's first change, and resets clocks it locked;
4. applies the thermal guard on every GPU, plan or not: at ``thermal_limit_c``
   or hotter the cap drops by ``thermal_step_w`` per cycle; once the GPU is
   ``THERMAL_HYSTERESIS_C`` cooler, the guard lifts by the same step per cycle.

Every action is an ``AuditRecord``; ``reconcile_once`` returns all of the
cycle's records, but writes to the audit sink and logs only those that differ
from the previous record for the same GPU (a stale bad part is reported once,
not every ten seconds).

Before its first change to a GPU the agent saves the GPU's pre-agent limit in
``<state_dir>/saved_limits.json`` (``agent.limits_state``); if that write
fails, it changes nothing. ``on_start`` undoes a crashed run's changes unless
a valid lease still holds; ``restore_all`` is the shutdown path (SIGTERM).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from agent.devices.base import GpuDevice, PowerLimits
from agent.limits_state import AcceptedPart, LimitsState, SavedLimit
from dcenergy import schema
from dcenergy.errors import DeviceError, StoreError
from dcenergy.plan import (
    PartRefused,
    PlanPart,
    Refusal,
    Setpoint,
    payload_digest,
    verify_part,
)
from dcenergy.publish import DEFAULT_LOOKBACK_S, fetch_latest_part

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    from dcenergy.config import Config, ReconcilerConfig
    from dcenergy.store.base import Store

log = logging.getLogger(__name__)

ALL_GPUS = "all"  # gpu_uuid tag of host-wide records (a refused part)
CHANGE_EPS_W = 0.5  # differences below this are not worth a set call
DRIFT_W = 1.0  # enforced vs applied beyond this is reported
THERMAL_HYSTERESIS_C = 5.0

APPLIED = "applied"
CLAMPED = "clamped"
REFUSED = "refused"
RESTORED = "restored"
ERROR = "error"
THERMAL = "thermal"
DRIFT = "drift"
REVERTED = "reverted"  # a revert part (dcenergy revert) put the GPU back at its saved limit
PROBE = "probe"  # a probe setpoint in force (until its probe_until_ns; then the plan's limit)


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """One thing the reconciler did or refused; becomes one ``audit`` point."""

    action: str
    gpu_uuid: str
    reason: str = ""
    plan_id: str = ""
    seq: int | None = None
    requested_w: float | None = None
    applied_w: float | None = None
    enforced_w: float | None = None
    sm_clock_max_mhz: int | None = None
    time_ns: int = 0

    def to_point(self, host: str) -> schema.Point:
        return schema.point(
            schema.AUDIT,
            {
                schema.TAG_HOST: host,
                schema.TAG_GPU_UUID: self.gpu_uuid,
                schema.TAG_ACTION: self.action,
            },
            {
                "reason": self.reason,
                "plan_id": self.plan_id,
                "seq": self.seq,
                "requested_w": self.requested_w,
                "applied_w": self.applied_w,
                "enforced_w": self.enforced_w,
                "sm_clock_max_mhz": (
                    None if self.sm_clock_max_mhz is None else float(self.sm_clock_max_mhz)
                ),
            },
            self.time_ns,
        )

    def dedupe_key(self) -> tuple[object, ...]:
        """What makes a record news: the same key twice in a row is logged once."""
        return (
            self.action,
            self.reason,
            self.plan_id,
            self.seq,
            None if self.applied_w is None else round(self.applied_w),
            None if self.enforced_w is None else round(self.enforced_w),
        )


class Reconciler:
    """Applies this host's signed plan part to its GPUs, safely (see the module docstring)."""

    def __init__(
        self,
        devices: Sequence[GpuDevice],
        host: str,
        store: Store,
        public_key: Ed25519PublicKey,
        config: ReconcilerConfig,
        state_dir: Path,
        clock_ns: Callable[[], int] = time.time_ns,
        *,
        audit_sink: Callable[[Sequence[schema.Point]], object] | None = None,
        lookback_s: float = DEFAULT_LOOKBACK_S,
    ) -> None:
        self._devices = {d.identity.uuid: d for d in devices}
        self.host = host
        self._store = store
        self._public_key = public_key
        self.config = config
        self._clock_ns = clock_ns
        self._sink = audit_sink if audit_sink is not None else store.write
        self._lookback_s = lookback_s
        self._state = LimitsState(state_dir)
        self._saved: dict[str, SavedLimit] = self._state.load_limits()
        self._accepted: AcceptedPart | None = self._state.load_accepted()
        self._lease: PlanPart | None = None
        self._lease_end_reason = "no_lease"
        self._locked_mhz: dict[str, int] = {}  # NVML cannot read locked clocks back
        self._thermal_cap_w: dict[str, float] = {}
        self._last_key: dict[str, tuple[object, ...]] = {}
        self._lock = threading.RLock()  # the scheduler thread vs the shutdown path
        self.audit_errors_total = 0
        self.polls_skipped_total = 0
        self._last_poll_ns: int | None = None

    # --- public API -------------------------------------------------------------------------
    @property
    def lease(self) -> PlanPart | None:
        """The plan part in force, if any."""
        return self._lease

    def tick(self) -> list[AuditRecord]:
        """``reconcile_once`` at the injected clock's now: the daemon's periodic job."""
        return self.reconcile_once(self._clock_ns())

    def reconcile_once(self, now_ns: int) -> list[AuditRecord]:
        """One fetch → verify → clamp → apply → read back cycle; returns every record."""
        with self._lock:
            records: list[AuditRecord] = []
            if self._poll_can_wait(now_ns):
                part = self._poll_for_news(now_ns, records)
            else:
                part = self._fetch_and_verify(now_ns, records)
            if part is not None:
                if part.revert and (self._lease is None or self._lease.seq != part.seq):
                    records.append(
                        AuditRecord(
                            REVERTED,
                            ALL_GPUS,
                            "revert",
                            part.plan_id,
                            part.seq,
                            time_ns=now_ns,
                        )
                    )
                self._lease = part
            elif self._lease is not None and self._lease.expires_ns <= now_ns:
                log.warning(
                    "plan %s (seq %d) expired: restoring saved limits",
                    self._lease.plan_id,
                    self._lease.seq,
                )
                self._lease = None
                self._lease_end_reason = "lease_expired"
            for dev in self._devices.values():
                records.extend(self._reconcile_gpu(dev, now_ns))
            self._emit(records)
            return records

    def on_start(self, now_ns: int) -> list[AuditRecord]:
        """After a (re)start: keep a still-valid lease, else undo what a previous run left."""
        with self._lock:
            records: list[AuditRecord] = []
            if not self._saved:
                return records
            part = self._fetch_and_verify(now_ns, records)
            if part is not None:
                self._lease = part
                log.info("restart within the lease of plan %s (seq %d)", part.plan_id, part.seq)
            else:
                records.extend(self._restore_all("restart_without_lease", now_ns))
            self._emit(records)
            return records

    def restore_all(self, reason: str, now_ns: int | None = None) -> list[AuditRecord]:
        """Put every GPU the agent changed back (shutdown, SIGTERM); ends the lease."""
        with self._lock:
            now = self._clock_ns() if now_ns is None else now_ns
            records = self._restore_all(reason, now)
            self._emit(records)
            return records

    # --- fetch and verify ---------------------------------------------------------------------
    def _poll_can_wait(self, now_ns: int) -> bool:
        """With ``poll_when_due``: the lease holds and its part says the next plan is not due.

        The lease is still checked on every tick (its expiry needs no fetch), and
        a fetch happens at the latest one interval before the lease would lapse.
        """
        lease = self._lease
        if not self.config.poll_when_due or lease is None or lease.next_plan_ns is None:
            return False
        margin_ns = int(self.config.interval_s * 1e9)
        if now_ns < lease.next_plan_ns and now_ns < lease.expires_ns - margin_ns:
            self.polls_skipped_total += 1
            return True
        return False

    def _poll_for_news(self, now_ns: int, records: list[AuditRecord]) -> PlanPart | None:
        """While a poll can wait: only ask whether a part arrived since the last poll.

        An emergency revert (``dcenergy revert``) must not wait for the next plan's
        due time, so even with ``poll_when_due`` every tick asks the store for a
        part written since the previous poll (less the allowed clock skew and one
        interval, for a publisher whose clock runs behind ours). Normally the
        answer is empty: no payload, no signature check. A new part goes through
        the whole verification; the part in force needs nothing.
        """
        cfg = self.config
        since = (self._last_poll_ns if self._last_poll_ns is not None else now_ns) - int(
            (cfg.interval_s + cfg.max_clock_skew_s) * 1e9
        )
        self._last_poll_ns = now_ns
        try:
            payload = fetch_latest_part(self._store, self.host, now_ns, (now_ns - since) / 1e9)
        except StoreError as e:
            records.append(AuditRecord(ERROR, ALL_GPUS, f"store: {e}", time_ns=now_ns))
            return None
        acc = self._accepted
        if payload is None or (acc is not None and payload_digest(payload) == acc.digest):
            return None  # nothing new: the lease in force goes on
        return self._fetch_and_verify(now_ns, records, payload=payload)

    def _fetch_and_verify(
        self, now_ns: int, records: list[AuditRecord], *, payload: str | None = None
    ) -> PlanPart | None:
        """This host's newest part if acceptable (new, or the one already in force).

        ``payload``: one already fetched (by ``_poll_for_news``).
        """
        if payload is None:
            self._last_poll_ns = now_ns
            try:
                payload = fetch_latest_part(self._store, self.host, now_ns, self._lookback_s)
            except StoreError as e:
                records.append(AuditRecord(ERROR, ALL_GPUS, f"store: {e}", time_ns=now_ns))
                return None
            if payload is None:
                return None
        digest = payload_digest(payload)
        acc = self._accepted
        same = acc is not None and acc.digest == digest
        last_seq = None if acc is None else (acc.seq - 1 if same else acc.seq)
        try:
            part = verify_part(
                payload,
                self._public_key,
                now_ns=now_ns,
                last_seq=last_seq,
                max_skew_s=self.config.max_clock_skew_s,
                host=self.host,
            )
        except PartRefused as e:
            if not (same and e.reason is Refusal.EXPIRED):  # our own lease ending is no refusal
                plan_id, seq = _peek(payload)
                reason = f"{e.reason.value}: {e.detail}"
                records.append(AuditRecord(REFUSED, ALL_GPUS, reason, plan_id, seq, time_ns=now_ns))
            return None
        unknown = [s.gpu_uuid for s in part.setpoints if s.gpu_uuid not in self._devices]
        if unknown:
            reason = f"{Refusal.UNKNOWN_GPU.value}: not a GPU of host {self.host}"
            records.extend(
                AuditRecord(REFUSED, u, reason, part.plan_id, part.seq, time_ns=now_ns)
                for u in unknown
            )
            return None
        if not same:
            accepted = AcceptedPart(part.seq, digest, part.plan_id, part.expires_ns)
            try:
                self._state.save_accepted(accepted)
            except OSError as e:
                records.append(
                    AuditRecord(
                        ERROR,
                        ALL_GPUS,
                        f"cannot save state: {e}",
                        part.plan_id,
                        part.seq,
                        time_ns=now_ns,
                    )
                )
                return None
            self._accepted = accepted
            self._last_key.pop(ALL_GPUS, None)
            log.info(
                "accepted plan %s seq %d (%d setpoints, %s mode)",
                part.plan_id,
                part.seq,
                len(part.setpoints),
                part.mode,
            )
        return part

    # --- one GPU ---------------------------------------------------------------------------
    def _reconcile_gpu(self, dev: GpuDevice, now_ns: int) -> list[AuditRecord]:
        uuid = dev.identity.uuid
        lease = self._lease
        sp = lease.setpoint(uuid) if lease is not None else None
        ctx = (lease.plan_id, lease.seq) if lease is not None and sp is not None else ("", None)
        if dev.lost:
            return [_rec(ERROR, uuid, "gpu_lost", ctx, now_ns)]
        records: list[AuditRecord] = []
        try:
            limits = dev.power_limits()
            current = dev.power_limit_w()
            self._thermal_guard(dev, limits, current)
            cap = self._thermal_cap_w.get(uuid)
            if sp is not None and lease is not None:
                records.extend(self._apply_clocks(dev, sp, lease, now_ns))
                records.extend(
                    self._apply_power(
                        dev, sp, lease, limits=limits, current=current, cap=cap, now_ns=now_ns
                    )
                )
            elif uuid in self._saved and lease is not None and lease.revert:
                records.extend(
                    self._restore_gpu(
                        dev,
                        "revert",
                        now_ns,
                        cap=cap,
                        action=REVERTED,
                        ctx=(lease.plan_id, lease.seq),
                    )
                )
            elif uuid in self._saved:
                reason = "not_in_plan" if lease is not None else self._lease_end_reason
                records.extend(self._restore_gpu(dev, reason, now_ns, cap=cap))
            elif cap is not None and current - cap >= CHANGE_EPS_W:
                records.extend(
                    self._set(
                        dev,
                        cap,
                        None,
                        action=THERMAL,
                        reason="thermal",
                        ctx=("", None),
                        now_ns=now_ns,
                    )
                )
        except DeviceError as e:
            records.append(_rec(ERROR, uuid, f"device: {e}", ctx, now_ns))
        except OSError as e:  # the state dir: saved limits could not be updated
            records.append(_rec(ERROR, uuid, f"state: {e}", ctx, now_ns))
        return records

    def _thermal_guard(self, dev: GpuDevice, limits: PowerLimits, current: float) -> None:
        """Lower this GPU's thermal cap while it is too hot; lift it slowly once cool."""
        uuid = dev.identity.uuid
        temp = dev.sample().temp_c
        if temp is None or not math.isfinite(temp):
            return
        cfg = self.config
        cap = self._thermal_cap_w.get(uuid)
        if temp >= cfg.thermal_limit_c:
            new = max(
                limits.min_w, min(current, cap if cap is not None else current) - cfg.thermal_step_w
            )
            self._thermal_cap_w[uuid] = new
            log.debug("GPU %s at %.0f °C: thermal guard caps it at %.0f W", uuid, temp, new)
            return
        if cap is not None and temp <= cfg.thermal_limit_c - THERMAL_HYSTERESIS_C:
            lifted = cap + cfg.thermal_step_w
            if lifted >= limits.max_w:
                del self._thermal_cap_w[uuid]
            else:
                self._thermal_cap_w[uuid] = lifted

    def _clamp(
        self, requested: float, limits: PowerLimits, current: float
    ) -> tuple[float, list[str]]:
        """Policy, then hardware (which wins), then the per-change step limit."""
        cfg = self.config
        reasons: list[str] = []
        target = requested
        if cfg.max_w > 0 and target > cfg.max_w:
            target = cfg.max_w
            reasons.append("policy_max")
        if cfg.min_w > 0 and target < cfg.min_w:
            target = cfg.min_w
            reasons.append("policy_min")
        if target > limits.max_w:
            target = limits.max_w
            reasons.append("hw_max")
        if target < limits.min_w:
            target = limits.min_w
            reasons.append("hw_min")
        if abs(target - current) > cfg.max_step_w:
            target = current + math.copysign(cfg.max_step_w, target - current)
            reasons.append("max_step")
        return target, reasons

    def _apply_power(
        self,
        dev: GpuDevice,
        sp: Setpoint,
        lease: PlanPart,
        *,
        limits: PowerLimits,
        current: float,
        cap: float | None,
        now_ns: int,
    ) -> list[AuditRecord]:
        ctx = (lease.plan_id, lease.seq)
        probing = sp.probe_w is not None and now_ns < (sp.probe_until_ns or 0)
        if sp.power_limit_w is None:
            target, reasons, requested = current, list[str](), None
        else:
            requested = sp.probe_w if probing and sp.probe_w is not None else sp.power_limit_w
            target, reasons = self._clamp(requested, limits, current)
        action = CLAMPED if reasons else PROBE if probing else APPLIED
        if probing and reasons:
            reasons.append("probe")  # a probe ramping in max_step_w steps, or clamped
        if cap is not None and target > cap:
            target, action = cap, THERMAL
            reasons.append("thermal")
        if abs(target - current) < CHANGE_EPS_W:
            return self._check_drift(dev, current, ctx, now_ns)
        return self._set(
            dev, target, requested, action=action, reason=",".join(reasons), ctx=ctx, now_ns=now_ns
        )

    def _apply_clocks(
        self, dev: GpuDevice, sp: Setpoint, lease: PlanPart, now_ns: int
    ) -> list[AuditRecord]:
        """Lock [lowest supported, planned max] in dvfs mode; undo our lock otherwise."""
        uuid = dev.identity.uuid
        ctx = (lease.plan_id, lease.seq)
        if lease.mode != "dvfs" or sp.sm_clock_max_mhz is None:
            if uuid in self._locked_mhz or self._saved_flag(uuid):
                dev.reset_sm_clocks()
                self._locked_mhz.pop(uuid, None)
                self._mark_locked(uuid, False)
                return [_rec(APPLIED, uuid, "clocks_reset", ctx, now_ns)]
            return []
        supported = sorted(dev.supported_sm_clocks_mhz())
        if not supported:
            return [_rec(ERROR, uuid, "no supported SM clocks", ctx, now_ns)]
        wanted = sp.sm_clock_max_mhz
        fitting = [c for c in supported if c <= wanted]
        target = fitting[-1] if fitting else supported[0]
        if self._locked_mhz.get(uuid) == target:
            return []
        if not self._save_before_change(dev):
            return [_rec(ERROR, uuid, "cannot save pre-agent limits", ctx, now_ns)]
        self._mark_locked(uuid, True)
        dev.lock_sm_clocks_mhz(supported[0], target)
        self._locked_mhz[uuid] = target
        action, reason = (APPLIED, "clocks") if target == wanted else (CLAMPED, "clocks_hw")
        return [_rec(action, uuid, reason, ctx, now_ns, sm_clock_max_mhz=target)]

    def _set(
        self,
        dev: GpuDevice,
        target: float,
        requested: float | None,
        *,
        action: str,
        reason: str,
        ctx: Ctx,
        now_ns: int,
    ) -> list[AuditRecord]:
        """Save the pre-agent limit if needed, set, read back, report drift."""
        uuid = dev.identity.uuid
        if not self._save_before_change(dev):
            return [_rec(ERROR, uuid, "cannot save pre-agent limits", ctx, now_ns)]
        target = round(target, 3)
        dev.set_power_limit_w(target)
        enforced = dev.enforced_power_limit_w()
        records = [
            _rec(
                action,
                uuid,
                reason,
                ctx,
                now_ns,
                requested_w=requested,
                applied_w=target,
                enforced_w=enforced,
            )
        ]
        records.extend(self._check_drift(dev, target, ctx, now_ns, enforced=enforced))
        return records

    def _check_drift(
        self,
        dev: GpuDevice,
        applied: float,
        ctx: Ctx,
        now_ns: int,
        *,
        enforced: float | None = None,
    ) -> list[AuditRecord]:
        uuid = dev.identity.uuid
        if uuid not in self._saved:
            return []
        current = dev.power_limit_w()
        enforced = dev.enforced_power_limit_w() if enforced is None else enforced
        if abs(current - applied) > DRIFT_W:
            reason = f"requested limit reads back {current:g} W, applied {applied:g} W"
        elif abs(enforced - applied) > DRIFT_W:
            reason = f"enforced {enforced:g} W, applied {applied:g} W"
        else:
            return []
        return [_rec(DRIFT, uuid, reason, ctx, now_ns, applied_w=applied, enforced_w=enforced)]

    # --- saving and restoring ---------------------------------------------------------------
    def _save_before_change(self, dev: GpuDevice) -> bool:
        """Record the pre-agent limit once, durably, before the first change; False if not."""
        uuid = dev.identity.uuid
        if uuid in self._saved:
            return True
        saved = dict(self._saved)
        saved[uuid] = SavedLimit(uuid, dev.power_limit_w())
        try:
            self._state.save_limits(saved)
        except OSError as e:
            log.error("cannot save pre-agent limits to %s: %s", self._state.limits_path, e)
            return False
        self._saved = saved
        return True

    def _saved_flag(self, uuid: str) -> bool:
        s = self._saved.get(uuid)
        return s is not None and s.clocks_locked_by_agent

    def _mark_locked(self, uuid: str, locked: bool) -> None:
        s = self._saved.get(uuid)
        if s is None or s.clocks_locked_by_agent == locked:
            return
        saved = dict(self._saved)
        saved[uuid] = replace(s, clocks_locked_by_agent=locked)
        self._state.save_limits(saved)
        self._saved = saved

    def _restore_value(self, saved: SavedLimit, limits: PowerLimits) -> float:
        w = self.config.safe_cap_w if self.config.safe_cap_w > 0 else saved.power_limit_w
        return min(max(w, limits.min_w), limits.max_w)

    def _restore_gpu(
        self,
        dev: GpuDevice,
        reason: str,
        now_ns: int,
        *,
        cap: float | None = None,
        action: str = RESTORED,
        ctx: Ctx = ("", None),
    ) -> list[AuditRecord]:
        """Put one GPU back; its saved entry goes once nothing of ours (thermal aside) is left.

        ``action`` names the record (``restored``, or ``reverted`` under a revert part,
        whose plan id and seq ``ctx`` carries); the thermal guard's cap makes it ``thermal``.
        """
        uuid = dev.identity.uuid
        saved = self._saved[uuid]
        limits = dev.power_limits()
        target = self._restore_value(saved, limits)
        if cap is not None and target > cap:
            target, reason = cap, f"{reason},thermal"
        current = dev.power_limit_w()
        records: list[AuditRecord] = []
        if abs(target - current) >= CHANGE_EPS_W:
            dev.set_power_limit_w(round(target, 3))
        if saved.clocks_locked_by_agent or uuid in self._locked_mhz:
            dev.reset_sm_clocks()
            self._locked_mhz.pop(uuid, None)
            reason += ",clocks_reset"
        enforced = dev.enforced_power_limit_w()
        if cap is not None:
            action = THERMAL
        records.append(
            AuditRecord(
                action,
                uuid,
                reason,
                ctx[0],
                ctx[1],
                requested_w=saved.power_limit_w,
                applied_w=target,
                enforced_w=enforced,
                time_ns=now_ns,
            )
        )
        if cap is None:
            remaining = {u: s for u, s in self._saved.items() if u != uuid}
            self._state.save_limits(remaining)
            self._saved = remaining
        else:
            self._mark_locked(uuid, False)
        return records

    def _restore_all(self, reason: str, now_ns: int) -> list[AuditRecord]:
        self._lease = None
        self._lease_end_reason = reason
        self._thermal_cap_w.clear()
        records: list[AuditRecord] = []
        for uuid in list(self._saved):
            dev = self._devices.get(uuid)
            if dev is None or dev.lost:
                records.append(
                    AuditRecord(ERROR, uuid, f"{reason}: GPU not present", time_ns=now_ns)
                )
                continue
            try:
                records.extend(self._restore_gpu(dev, reason, now_ns))
            except (DeviceError, OSError) as e:
                records.append(AuditRecord(ERROR, uuid, f"{reason}: {e}", time_ns=now_ns))
        return records

    # --- reporting --------------------------------------------------------------------------
    def _emit(self, records: Sequence[AuditRecord]) -> None:
        """Log and write the records that are news; never raise (count, log once)."""
        fresh: list[AuditRecord] = []
        for r in records:
            key = r.dedupe_key()
            if self._last_key.get(r.gpu_uuid) == key:
                continue
            self._last_key[r.gpu_uuid] = key
            fresh.append(r)
            level = (
                logging.WARNING if r.action in (REFUSED, ERROR, DRIFT, THERMAL) else logging.INFO
            )
            log.log(
                level,
                "%s %s: %s (plan %s seq %s, applied %s W)",
                r.action,
                r.gpu_uuid,
                r.reason,
                r.plan_id or "-",
                r.seq,
                r.applied_w,
            )
        if not fresh:
            return
        try:
            self._sink([r.to_point(self.host) for r in fresh])
        except Exception as e:  # an audit write must never stop the reconciler
            self.audit_errors_total += 1
            if self.audit_errors_total == 1:
                log.error("cannot write audit records (counting further failures): %s", e)


def reconciler_from_config(
    config: Config,
    devices: Sequence[GpuDevice],
    store: Store,
    *,
    audit_sink: Callable[[Sequence[schema.Point]], object] | None = None,
    clock_ns: Callable[[], int] = time.time_ns,
) -> Reconciler:
    """The daemon's reconciler: public key from ``reconciler.public_key``, state in state_dir.

    Raises ``ConfigError`` when the public key is missing or not an Ed25519 key.
    """
    from dcenergy.plan import load_public_key

    return Reconciler(
        devices,
        config.host,
        store,
        load_public_key(config.reconciler.public_key),
        config.reconciler,
        config.state_dir,
        clock_ns,
        audit_sink=audit_sink,
    )


Ctx = tuple[str, int | None]  # (plan_id, seq) an action relates to


def _rec(
    action: str,
    uuid: str,
    reason: str,
    ctx: Ctx,
    now_ns: int,
    *,
    requested_w: float | None = None,
    applied_w: float | None = None,
    enforced_w: float | None = None,
    sm_clock_max_mhz: int | None = None,
) -> AuditRecord:
    return AuditRecord(
        action,
        uuid,
        reason,
        ctx[0],
        ctx[1],
        requested_w=requested_w,
        applied_w=applied_w,
        enforced_w=enforced_w,
        sm_clock_max_mhz=sm_clock_max_mhz,
        time_ns=now_ns,
    )


def _peek(payload: str) -> tuple[str, int | None]:
    """Plan id and seq of an (unverified) payload, for the refusal record only."""
    import json

    try:
        part = json.loads(payload).get("part", {})
        plan_id = part.get("plan_id")
        seq = part.get("seq")
        return (
            plan_id if isinstance(plan_id, str) else "",
            seq if isinstance(seq, int) and not isinstance(seq, bool) else None,
        )
    except (ValueError, AttributeError, TypeError):
        return "", None
