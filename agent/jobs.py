"""Which job a GPU process belongs to, from ``/proc/PID/cgroup`` (and ``environ``).

Schedulers put every job in its own cgroup, so the cgroup path names the job
without asking the scheduler:

* Slurm, cgroup v2: ``0::/system.slice/slurmstepd.scope/job_1234/step_0/user/task_0``
  (``<node>_slurmstepd.scope`` when built with ``--enable-multiple-slurmd``);
  from Slurm 26.05 the job folder is the job's SLUID (``s5K1KKYAYG5D00``, 14
  Crockford base-32 characters after an ``s``) unless ``CgroupJobIdPaths=yes``:
  the numeric id then comes from ``SLURM_JOB_ID`` in ``environ`` (the SLUID
  itself where that is unreadable)
* Slurm, cgroup v1: ``4:devices:/slurm/uid_1000/job_1234/step_0``, or
  ``/slurm_<node>/uid_0/job_1234/step_0/task_0`` as Debian's build writes it
  (multiple-slurmd enabled; seen on a real 22.05 in ``tests/slurm/``)
* Kubernetes, systemd driver: ``.../kubepods-burstable-pod<uid, '_' for '-'>.slice/...``
* Kubernetes, cgroupfs driver: ``/kubepods/burstable/pod<uid>/<container id>``
* Docker: ``docker-<64 hex>.scope`` or ``/docker/<64 hex>``
* containerd (and CRI-O, podman): ``cri-containerd-<id>.scope``, ``crio-<id>.scope``,
  ``libpod-<id>.scope``

Precedence, strongest identity first: a Slurm job, then a Kubernetes pod (a
pod's cgroup also names its container; the pod is the unit of work), then
``SLURM_JOB_ID`` from ``/proc/PID/environ`` (Slurm without the cgroup
plugin; also a container launched from a Slurm job that passed its
environment), then a bare container id. Kubernetes job ids are pod UIDs in
dashed form; container ids are shortened to 12 characters, as ``docker ps``
shows them.

A vanished pid or a file we may not read gives ``None``, never an exception:
``environ`` of another user's process is root-only, so that is expected.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from dcenergy.logonce import LogOnce

log = logging.getLogger(__name__)

JobKind = Literal["slurm", "kubernetes", "container", "env"]

_UID_GROUPS = (r"[0-9a-f]{8}", r"[0-9a-f]{4}", r"[0-9a-f]{4}", r"[0-9a-f]{4}", r"[0-9a-f]{12}")
_UID_DASHED = "-".join(_UID_GROUPS)
_UID_UNDERSCORED = "_".join(_UID_GROUPS)  # the systemd driver escapes '-' in slice names

_SLURM = re.compile(r"/[^/]*slurm[^/]*/(?:[^/]+/)*?job_(?P<id>\d+)(?:/|$)")
# Slurm >= 26.05, cgroup v2: .../slurmstepd.scope/<SLUID>/step_0/...
_SLURM_SLUID = re.compile(
    r"/(?:[^/]+_)?slurmstepd\.scope/(?P<sluid>s[0-9A-HJKMNP-TV-Z]{13})/(?:step_|system)"
)
_K8S_SYSTEMD = re.compile(rf"kubepods(?:-[a-z]+)?-pod(?P<id>{_UID_UNDERSCORED})\.slice")
_K8S_CGROUPFS = re.compile(rf"/kubepods(?:/[a-z]+)?/pod(?P<id>{_UID_DASHED})(?:/|$)")
_CONTAINER = re.compile(
    r"(?:(?:docker|cri-containerd|crio|libpod)-(?P<scope>[0-9a-f]{12,64})\.scope"
    r"|/docker/(?P<dir>[0-9a-f]{12,64}))(?:/|$)"
)
_SHORT_ID = 12


@dataclass(frozen=True, slots=True)
class JobRef:
    """A job as this host sees it: its id and how we learnt it."""

    job_id: str
    kind: JobKind


def parse_cgroup(text: str) -> JobRef | None:
    """The job named by a ``/proc/PID/cgroup`` file (v1 or v2), or ``None``.

    Each line is ``hierarchy-id:controllers:path``; only the paths matter.
    """
    paths = [line.split(":", 2)[2] for line in text.splitlines() if line.count(":") >= 2]
    for path in paths:
        if m := _SLURM.search(path):
            return JobRef(m.group("id"), "slurm")
    for path in paths:
        if m := _SLURM_SLUID.search(path):
            return JobRef(m.group("sluid"), "slurm")
    for path in paths:
        if m := _K8S_SYSTEMD.search(path):
            return JobRef(m.group("id").replace("_", "-"), "kubernetes")
        if m := _K8S_CGROUPFS.search(path):
            return JobRef(m.group("id"), "kubernetes")
    return None


def parse_container(text: str) -> JobRef | None:
    """The (12-character) container id named by a ``/proc/PID/cgroup`` file, or ``None``."""
    for line in text.splitlines():
        if line.count(":") < 2:
            continue
        if m := _CONTAINER.search(line.split(":", 2)[2]):
            cid = m.group("scope") or m.group("dir")
            return JobRef(cid[:_SHORT_ID], "container")
    return None


def _is_sluid(ref: JobRef) -> bool:
    return ref.kind == "slurm" and ref.job_id.startswith("s")


def parse_environ(data: bytes) -> JobRef | None:
    """``SLURM_JOB_ID`` from a NUL-separated ``/proc/PID/environ``, or ``None``."""
    for entry in data.split(b"\0"):
        if entry.startswith(b"SLURM_JOB_ID="):
            value = entry[len(b"SLURM_JOB_ID=") :].decode("ascii", "replace").strip()
            return JobRef(value, "env") if value else None
    return None


class JobResolver:
    """Maps process ids to jobs by reading files under an injectable ``/proc`` root."""

    def __init__(self, proc_root: Path = Path("/proc")) -> None:
        self.proc_root = proc_root
        self.errors_total = 0
        self._once = LogOnce(log)

    def job_for_pid(self, pid: int) -> JobRef | None:
        """The job ``pid`` belongs to; ``None`` if it has none, vanished, or is unreadable."""
        cgroup = self._read(pid, "cgroup")
        text = cgroup.decode("utf-8", "replace") if cgroup is not None else ""
        ref = parse_cgroup(text)
        if ref is not None and not _is_sluid(ref):
            return ref
        environ = self._read(pid, "environ")
        if ref is not None:  # a SLUID names the job; its numeric id is in the environment
            env = parse_environ(environ) if environ is not None else None
            return JobRef(env.job_id, "slurm") if env is not None else ref
        if environ is not None and (ref := parse_environ(environ)):
            return ref
        return parse_container(text)

    def attribute(self, gpu_pids: Mapping[str, list[int]]) -> dict[str, str | None]:
        """GPU uuid → job id of the processes on it (``None``: idle or unknown).

        Several jobs on one GPU (MPS, time slicing): the job with the most
        processes there wins, and a tie goes to the job of the first
        resolvable pid in the list, so the result is deterministic.
        """
        out: dict[str, str | None] = {}
        for uuid, pids in gpu_pids.items():
            counts: Counter[str] = Counter()
            for pid in pids:
                ref = self.job_for_pid(pid)
                if ref is not None:
                    counts[ref.job_id] += 1
            # Counter keeps insertion order and most_common is stable: ties → first seen.
            out[uuid] = counts.most_common(1)[0][0] if counts else None
        return out

    def _read(self, pid: int, name: str) -> bytes | None:
        path = self.proc_root / str(pid) / name
        try:
            return path.read_bytes()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            return None  # vanished between listing and reading, or another user's process
        except OSError as e:
            self.errors_total += 1
            self._once(name, logging.WARNING, "reading %s failed: %s (logged once)", path, e)
            return None
