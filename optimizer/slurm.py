"""Slurm, read and acted on through its client commands (the central side applies policy).

Reads:

* **Job facts** (partition, QOS, account, user, name, comment, state, times)
  from ``squeue --json`` where the Slurm has it (21.08 and later; Debian 12's
  22.05 has it, but not ``scontrol show job --json``, which came in 23.02),
  else from the text form ``scontrol show job -o`` (one job per line). Both list
  every job slurmctld holds, so one call serves a whole solve; the result is
  cached for ``cache_ttl_s`` (``SlurmJobFacts``) so a service polling every
  few minutes costs one call per TTL. JSON layouts differ between releases
  (22.05: ``"job_state": "RUNNING"``, ``"start_time": 1700000000``; 23.02+: a
  list of states and ``{"set": true, "number": …}``): both are read.
* **Node states** from ``sinfo --json`` (else ``scontrol show node -o``):
  state, flags (``DRAIN``), reason.

Actions (``SlurmClient.drain``, ``resume``, ``set_admin_comment``) run
``scontrol update``; each raises ``SlurmError`` with Slurm's own message.

Slurm refuses ``scontrol update job=… admincomment=…`` once a job has
finished ("Job has already finished"), which is the state a job is in while
its epilog runs (seen on 22.05 in ``tests/slurm/``). ``set_admin_comment``
then falls back to the accounting database (``sacctmgr -i update job where
jobid=… set AdminComment=…``, needs slurmdbd), as Slurm sites do for
epilog-written summaries; without slurmdbd the comment cannot be stored and
the error says so.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from dcenergy import schema
from dcenergy.errors import EX_UNAVAILABLE, DcenergyError
from optimizer.policy import Policy, SchedulerPolicy, SlurmSource

log = logging.getLogger(__name__)


class SlurmError(DcenergyError):
    """A Slurm command could not be run or refused what was asked (exit 69)."""

    exit_code = EX_UNAVAILABLE


Runner = Callable[[Sequence[str], float], "subprocess.CompletedProcess[str]"]


def run_command(argv: Sequence[str], timeout_s: float) -> subprocess.CompletedProcess[str]:
    """Run one client command; a missing binary or a timeout becomes a ``SlurmError``."""
    if shutil.which(argv[0]) is None:
        raise SlurmError(
            f"{argv[0]} not found: is this host a Slurm client?",
            hint="install slurm-client, or set slurm.squeue / slurm.scontrol in the policy file",
        )
    try:
        return subprocess.run(
            list(argv), capture_output=True, text=True, timeout=timeout_s, check=False
        )
    except subprocess.TimeoutExpired:
        raise SlurmError(f"{' '.join(argv[:3])} did not answer within {timeout_s:g} s") from None
    except OSError as e:
        raise SlurmError(f"cannot run {argv[0]}: {e.strerror or e}") from None


def _failed(argv: Sequence[str], p: subprocess.CompletedProcess[str]) -> SlurmError:
    msg = " ".join((p.stderr or p.stdout or "").split())[:300] or f"exit {p.returncode}"
    return SlurmError(f"{' '.join(argv[:3])} failed: {msg}")


def _unsupported(p: subprocess.CompletedProcess[str]) -> bool:
    """The command does not know ``--json`` (an older Slurm, or no serializer plugin)."""
    text = (p.stderr or "") + (p.stdout or "")
    return p.returncode != 0 and bool(
        re.search(r"unrecognized option|invalid option|unknown option|serializer", text, re.I)
    )


# --- values of either JSON generation --------------------------------------------------------


def _value(v: Any) -> Any:
    """23.02+ wraps numbers as ``{"set": bool, "infinite": bool, "number": n}``."""
    if isinstance(v, dict) and "number" in v:
        return v["number"] if v.get("set", True) and not v.get("infinite", False) else None
    return v


def _text(v: Any) -> str:
    v = _value(v)
    if v is None:
        return ""
    if isinstance(v, list):
        return ",".join(str(x) for x in v)
    return str(v)


def _epoch(v: Any) -> int | None:
    v = _value(v)
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        return None
    return v


def _none_if_null(s: str) -> str:
    return "" if s in ("(null)", "N/A", "None", "Unknown") else s


@dataclass(frozen=True)
class SlurmJob:
    """What the optimizer reads about a job."""

    job_id: str
    state: str
    partition: str = ""
    qos: str = ""
    account: str = ""
    user: str = ""
    name: str = ""
    comment: str = ""
    admin_comment: str = ""
    nodes: str = ""
    start_time: int | None = None  # s since the epoch
    end_time: int | None = None
    sluid: str = ""

    def facts(self) -> dict[str, str]:
        """The policy matcher's view (``optimizer.policy``): empty facts are left out."""
        out = {
            "scheduler": "slurm",
            "partition": self.partition,
            "qos": self.qos,
            "account": self.account,
            "user": self.user,
            "job_name": self.name,
            "comment": self.comment,
        }
        return {k: v for k, v in out.items() if v}


def _json_list(text: str, command: str, key: str) -> list[Any]:
    """The list under ``key`` in a Slurm command's JSON output, or a SlurmError saying why not."""
    try:
        doc = json.loads(text)
    except ValueError as e:
        raise SlurmError(f"{command} printed no JSON: {e}") from None
    items = doc.get(key) if isinstance(doc, dict) else None
    if not isinstance(items, list):
        raise SlurmError(f"{command}: no {key!r} list in its output")
    return items


def parse_squeue_json(text: str) -> list[SlurmJob]:
    """Jobs from ``squeue --json`` (any of the OpenAPI generations 0.0.37 and later)."""
    jobs = _json_list(text, "squeue --json", "jobs")
    out = []
    for j in jobs:
        if not isinstance(j, dict) or _value(j.get("job_id")) is None:
            continue
        out.append(
            SlurmJob(
                job_id=_text(j.get("job_id")),
                state=_text(j.get("job_state")),
                partition=_text(j.get("partition")),
                qos=_text(j.get("qos")),
                account=_text(j.get("account")),
                user=_text(j.get("user_name")),
                name=_text(j.get("name")),
                comment=_text(j.get("comment")),
                admin_comment=_text(j.get("admin_comment")),
                nodes=_text(j.get("nodes")),
                start_time=_epoch(j.get("start_time")),
                end_time=_epoch(j.get("end_time")),
                sluid=_text(j.get("sluid")),
            )
        )
    return out


# ``Key=value`` fields of scontrol's one-line form; a value runs to the next `` Key=``.
_KV = re.compile(r"(?:^|\s)([A-Z][A-Za-z0-9_:/]*)=(.*?)(?=\s+[A-Z][A-Za-z0-9_:/]*=|\s*$)")


def parse_scontrol_line(line: str) -> dict[str, str]:
    """One ``scontrol show … -o`` line as a dict (a value with `` Key=`` in it splits)."""
    return {m.group(1): m.group(2).strip() for m in _KV.finditer(line.strip())}


def _local_epoch(text: str) -> int | None:
    """``2026-12-01T23:44:22`` (slurmctld's local time, no zone) -> s since the epoch."""
    try:
        return int(time.mktime(time.strptime(text, "%Y-%m-%dT%H:%M:%S")))
    except ValueError:
        return None


def parse_scontrol_jobs(text: str) -> list[SlurmJob]:
    """Jobs from ``scontrol show job -o`` (the text form, for Slurm without ``--json``)."""
    out = []
    for line in text.splitlines():
        f = parse_scontrol_line(line)
        if "JobId" not in f:
            continue
        user = f.get("UserId", "")
        out.append(
            SlurmJob(
                job_id=f["JobId"],
                state=f.get("JobState", ""),
                partition=_none_if_null(f.get("Partition", "")),
                qos=_none_if_null(f.get("QOS", "")),
                account=_none_if_null(f.get("Account", "")),
                user=user.split("(", 1)[0],
                name=_none_if_null(f.get("JobName", "")),
                comment=_none_if_null(f.get("Comment", "")),
                admin_comment=_none_if_null(f.get("AdminComment", "")),
                nodes=_none_if_null(f.get("NodeList", "")),
                start_time=_local_epoch(f.get("StartTime", "")),
                end_time=_local_epoch(f.get("EndTime", "")),
            )
        )
    return out


@dataclass(frozen=True)
class SlurmNode:
    name: str
    state: str  # lower case base state: idle, mixed, allocated, down, ...
    flags: frozenset[str]  # DRAIN, POWERED_DOWN, ... (upper case)
    reason: str = ""

    @property
    def drained(self) -> bool:
        return "DRAIN" in self.flags or self.state in ("drained", "draining")


def parse_sinfo_json(text: str) -> list[SlurmNode]:
    nodes = _json_list(text, "sinfo --json", "nodes")
    out = []
    for n in nodes:
        if not isinstance(n, dict) or not n.get("name"):
            continue
        state = n.get("state")
        flags = {str(x).upper() for x in n.get("state_flags") or []}
        if isinstance(state, list):  # 23.02+: ["IDLE", "DRAIN"]
            flags |= {str(x).upper() for x in state[1:]}
            state = state[0] if state else ""
        out.append(
            SlurmNode(str(n["name"]), str(state).lower(), frozenset(flags), _text(n.get("reason")))
        )
    return out


def parse_scontrol_nodes(text: str) -> list[SlurmNode]:
    out = []
    for line in text.splitlines():
        f = parse_scontrol_line(line)
        if "NodeName" not in f:
            continue
        base, *flags = f.get("State", "").split("+")
        reason = re.sub(r"\s*\[[^\]]*@[^\]]*\]\s*$", "", f.get("Reason", ""))  # "[root@time]"
        out.append(
            SlurmNode(
                f["NodeName"],
                base.lower().rstrip("*~#!%$@^-"),
                frozenset(x.upper().rstrip("*") for x in flags),
                _none_if_null(reason),
            )
        )
    return out


# --- the client ----------------------------------------------------------------------------


class SlurmClient:
    """Slurm's client commands; ``runner`` is injectable for tests without a cluster."""

    def __init__(self, source: SlurmSource | None = None, runner: Runner = run_command) -> None:
        self.source = source or SlurmSource()
        self.runner = runner
        self._json: dict[str, bool] = {}  # command -> knows --json (learnt on first use)

    def _run(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return self.runner(list(argv), self.source.timeout_s)

    def _json_or_text(
        self, kind: str, json_argv: Sequence[str], text_argv: Sequence[str]
    ) -> tuple[bool, str]:
        if self._json.get(kind, True):
            p = self._run(*json_argv)
            if p.returncode == 0:
                self._json[kind] = True
                return True, p.stdout
            if not _unsupported(p):
                raise _failed(json_argv, p)
            self._json[kind] = False
            log.info("%s has no --json here: reading %s", json_argv[0], " ".join(text_argv))
        p = self._run(*text_argv)
        if p.returncode != 0:
            raise _failed(text_argv, p)
        return False, p.stdout

    def jobs(self) -> list[SlurmJob]:
        """Every job slurmctld holds (pending, running, recently finished)."""
        s = self.source
        is_json, out = self._json_or_text(
            "jobs", [s.squeue, "--json"], [s.scontrol, "-a", "-o", "show", "job"]
        )
        if is_json:
            return parse_squeue_json(out)
        if out.strip().startswith("No jobs"):
            return []
        return parse_scontrol_jobs(out)

    def job(self, job_id: str) -> SlurmJob:
        """One job (text form: ``scontrol show job -o ID``, whatever the version)."""
        p = self._run(self.source.scontrol, "-o", "show", "job", job_id)
        if p.returncode != 0:
            raise _failed([self.source.scontrol, "show", "job"], p)
        jobs = parse_scontrol_jobs(p.stdout)
        if not jobs:
            raise SlurmError(f"scontrol show job {job_id}: no such job")
        return jobs[0]

    def nodes(self) -> list[SlurmNode]:
        is_json, out = self._json_or_text(
            "nodes", [self.source.sinfo, "--json"], [self.source.scontrol, "-o", "show", "node"]
        )
        nodes = parse_sinfo_json(out) if is_json else parse_scontrol_nodes(out)
        return list({n.name: n for n in nodes}.values())  # one per node, not per partition

    def drain(self, node: str, reason: str) -> None:
        self._update("nodename=" + node, "state=drain", f"reason={reason}")

    def resume(self, node: str) -> None:
        self._update("nodename=" + node, "state=resume")

    def _update(self, *args: str) -> None:
        argv = [self.source.scontrol, "update", *args]
        p = self._run(*argv)
        if p.returncode != 0:
            raise _failed(argv, p)

    def set_admin_comment(self, job_id: str, text: str) -> str:
        """Store ``text`` as the job's AdminComment; returns how (``scontrol`` or ``sacctmgr``)."""
        argv = [self.source.scontrol, "update", f"job={job_id}", f"admincomment={text}"]
        p = self._run(*argv)
        if p.returncode == 0:
            return "scontrol"
        first = " ".join((p.stderr or p.stdout).split())
        if "finished" not in first.lower():
            raise _failed(argv, p)
        acct = [
            self.source.sacctmgr,
            "-i",
            "update",
            "job",
            "where",
            f"jobid={job_id}",
            "set",
            f"AdminComment={text}",
        ]
        try:
            q = self._run(*acct)
        except SlurmError as e:
            raise SlurmError(
                f"job {job_id} has finished (scontrol: {first}) and the accounting database "
                f"cannot take it either: {e}"
            ) from None
        if q.returncode != 0:
            second = " ".join((q.stderr or q.stdout).split())[:300]
            raise SlurmError(
                f"job {job_id} has finished (scontrol: {first}) and sacctmgr refused it: {second}",
                hint="a finished job's AdminComment lives in slurmdbd (AccountingStorageType="
                "accounting_storage/slurmdbd)",
            )
        return "sacctmgr"


# --- consolidation, acted through Slurm ------------------------------------------------------

DRAIN_MARK = "dcenergy:"  # reasons dcenergy writes start so: its drains, and only those, it resumes


@dataclass(frozen=True)
class NodeAction:
    """One thing to do to a node, or a reason not to."""

    node: str
    action: str  # schema.AUDIT_DRAIN, schema.AUDIT_RESUME, or "skip"
    reason: str


def plan_node_actions(
    nodes_freed: Sequence[str],
    slurm_nodes: Sequence[SlurmNode],
    drain_reason: str,
) -> list[NodeAction]:
    """Drain the nodes a plan frees; resume the ones dcenergy drained that it no longer frees.

    A node drained by someone else (its reason does not start ``dcenergy:``)
    is left alone either way; a freed node Slurm does not know is skipped
    (telemetry host names must be Slurm node names).
    """
    known = {n.name: n for n in slurm_nodes}
    freed = set(nodes_freed)
    out: list[NodeAction] = []
    for name in sorted(freed):
        n = known.get(name)
        if n is None:
            out.append(NodeAction(name, "skip", "not a Slurm node"))
        elif n.drained and n.reason.startswith(DRAIN_MARK):
            out.append(NodeAction(name, "skip", "already drained by dcenergy"))
        elif n.drained:
            out.append(NodeAction(name, "skip", f"drained by someone else: {n.reason or '?'}"))
        elif n.state in ("down", "future"):
            out.append(NodeAction(name, "skip", f"node is {n.state}"))
        else:
            out.append(NodeAction(name, schema.AUDIT_DRAIN, drain_reason))
    for n in sorted(slurm_nodes, key=lambda n: n.name):
        if n.name not in freed and n.drained and n.reason.startswith(DRAIN_MARK):
            out.append(NodeAction(n.name, schema.AUDIT_RESUME, "the latest plan needs it"))
    return out


@dataclass(frozen=True)
class ActionOutcome:
    action: NodeAction
    done: bool
    error: str = ""


def apply_node_actions(client: SlurmClient, actions: Sequence[NodeAction]) -> list[ActionOutcome]:
    """Run each drain/resume; one failure does not stop the others."""
    out = []
    for a in actions:
        if a.action not in (schema.AUDIT_DRAIN, schema.AUDIT_RESUME):
            continue
        try:
            if a.action == schema.AUDIT_DRAIN:
                client.drain(a.node, a.reason)
            else:
                client.resume(a.node)
            out.append(ActionOutcome(a, True))
        except SlurmError as e:
            out.append(ActionOutcome(a, False, e.message))
    return out


def audit_points(
    outcomes: Sequence[ActionOutcome], plan_id: str, now_ns: int
) -> list[schema.Point]:
    """One ``audit`` point per action taken (``action`` drain/resume, or error)."""
    return [
        schema.point(
            schema.AUDIT,
            {
                schema.TAG_HOST: o.action.node,
                schema.TAG_GPU_UUID: schema.AUDIT_ALL_GPUS,
                schema.TAG_ACTION: o.action.action if o.done else schema.AUDIT_ERROR,
            },
            {
                "reason": o.action.reason if o.done else f"{o.action.action} failed: {o.error}",
                "plan_id": plan_id,
            },
            now_ns + i,  # distinct times: two actions on one node in one run both stay
        )
        for i, o in enumerate(outcomes)
    ]


class SlurmJobFacts:
    """``optimizer.policy.FactSource`` for Slurm: every job's facts, cached ``ttl_s``.

    One ``squeue --json`` per TTL, whatever the number of jobs or solves; a job
    is found by its numeric id or (Slurm 26.05+, cgroup v2 without
    ``CgroupJobIdPaths``) its SLUID.
    """

    def __init__(
        self,
        client: SlurmClient,
        ttl_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client = client
        self.ttl_s = client.source.cache_ttl_s if ttl_s is None else ttl_s
        self.clock = clock
        self.calls = 0
        self._at: float | None = None
        self._jobs: dict[str, SlurmJob] = {}

    def refresh(self) -> None:
        jobs = self.client.jobs()
        self.calls += 1
        index: dict[str, SlurmJob] = {}
        for j in jobs:
            index[j.job_id] = j
            if j.sluid:
                index[j.sluid] = j
        self._jobs, self._at = index, self.clock()

    def jobs(self, job_ids: Iterable[str]) -> dict[str, SlurmJob]:
        if self._at is None or self.clock() - self._at >= self.ttl_s:
            self.refresh()
        return {j: self._jobs[j] for j in job_ids if j in self._jobs}

    def facts(self, job_ids: Sequence[str]) -> Mapping[str, Mapping[str, str]]:
        return {j: job.facts() for j, job in self.jobs(job_ids).items()}


__all__ = [
    "DRAIN_MARK",
    "ActionOutcome",
    "NodeAction",
    "SlurmClient",
    "SlurmError",
    "SlurmJob",
    "SlurmJobFacts",
    "SlurmNode",
    "apply_node_actions",
    "audit_points",
    "parse_scontrol_jobs",
    "parse_scontrol_line",
    "parse_scontrol_nodes",
    "parse_sinfo_json",
    "parse_squeue_json",
    "plan_node_actions",
    "policy_resolver",
    "run_command",
]


def policy_resolver(
    policy: Policy,
    default_slowdown: float,
    *,
    facts: SlurmJobFacts | None = None,
) -> SchedulerPolicy:
    """The policy joined with Slurm's job facts when the file has a ``slurm`` section."""
    if facts is None and policy.slurm is not None:
        facts = SlurmJobFacts(SlurmClient(policy.slurm))
    return SchedulerPolicy(policy, facts, default_slowdown=default_slowdown)
