"""A real single-node Slurm cluster (munged, slurmctld, slurmd) in a temporary folder.

Like ``tests/influx_server.py`` for InfluxDB: Debian's packages (``slurmctld
slurmd slurm-client munge``, 22.05 on Debian 12) run as child processes with
their own configuration, state, spool, logs, ports and MUNGE key and socket,
so nothing of the machine's own Slurm or MUNGE set-up is used or touched.
Clients reach this cluster through ``cluster.env`` (``SLURM_CONF``).

Process tracking: ``proctrack/cgroup`` where the kernel and the container let
slurmd make cgroups (cgroup v1 controllers mounted writable at
``/sys/fs/cgroup/<controller>``, or a pure, writable cgroup v2 mount, then
with ``IgnoreSystemd=yes`` since there is no systemd to ask), else
``proctrack/linuxproc``; ``cluster.proctrack`` says which and
``cluster.cgroup_note`` why. Slurm refuses cgroup v2 in *hybrid* mode (v1
controllers plus an empty v2 mount at ``/sys/fs/cgroup/unified``): that
machine gets cgroup v1, which is what the plugin then uses anyway.

Needs root (slurmd runs jobs as their users, and SlurmUser=root here).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from tests.local_server import LocalServer

REQUIRE_ENV = "DCENERGY_REQUIRE_SLURM"
BINARIES = ("munged", "slurmctld", "slurmd", "scontrol", "sbatch", "srun", "squeue", "sinfo")
CGROUP_ROOT = Path("/sys/fs/cgroup")


def missing_binaries() -> list[str]:
    """The programs the cluster needs that are not installed (searched in PATH and sbin)."""
    return [b for b in BINARIES if _which(b) is None]


def _which(name: str) -> str | None:
    path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin:/usr/local/sbin"
    return shutil.which(name, path=path)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cgroup_support() -> tuple[str | None, str]:
    """Which cgroup plugin slurmd can use here (``cgroup/v1``, ``cgroup/v2`` or None) and why."""
    mounts = Path("/proc/self/mounts").read_text().splitlines()
    v1 = {m.split()[1] for m in mounts if m.split()[2:3] == ["cgroup"]}
    v2 = {m.split()[1] for m in mounts if m.split()[2:3] == ["cgroup2"]}
    if str(CGROUP_ROOT / "freezer") in v1:
        probe = CGROUP_ROOT / "freezer" / f"dcenergy-probe-{os.getpid()}"
        try:
            probe.mkdir()
            probe.rmdir()
        except OSError as e:
            return None, f"cgroup v1 freezer is mounted but not writable here ({e.strerror})"
        hybrid = " (hybrid: Slurm refuses its v2 plugin there)" if v2 else ""
        return "cgroup/v1", f"cgroup v1 controllers mounted writable at {CGROUP_ROOT}{hybrid}"
    if str(CGROUP_ROOT) in v2:
        if not os.access(CGROUP_ROOT / "cgroup.subtree_control", os.W_OK):
            return None, f"cgroup v2 at {CGROUP_ROOT} is read-only in this container"
        return "cgroup/v2", f"pure cgroup v2 at {CGROUP_ROOT}, writable"
    return None, "no cgroup v1 freezer and no cgroup v2 mount at /sys/fs/cgroup"


class SlurmCluster(LocalServer):
    """One slurmctld + one slurmd (this host as node ``nodename``) + a private munged.

    ``partitions``: partition name -> extra options; the first is the default.
    ``extra_conf``: more slurm.conf lines (``Epilog=...``).
    ``proctrack``: ``"auto"`` (cgroup where usable), ``"cgroup"`` or ``"linuxproc"``.
    """

    def __init__(
        self,
        root: Path | None = None,
        *,
        partitions: Sequence[str] = ("debug", "batch"),
        extra_conf: Sequence[str] = (),
        proctrack: str = "auto",
        cluster_name: str = "dctest",
    ) -> None:
        self._own_root = root is None
        # munged wants every folder above its socket searchable by all: not pytest's 0700 tmp
        self.root = root or Path(tempfile.mkdtemp(prefix="dcenergy-slurm-", dir="/tmp"))
        self.root.chmod(0o755)
        self.nodename = socket.gethostname().split(".")[0]
        self.partitions = tuple(partitions)
        self.extra_conf = tuple(extra_conf)
        self.cluster_name = cluster_name
        self.ctld_port = free_port()
        self.slurmd_port = free_port()
        self.conf = self.root / "etc" / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket"
        self.log_dir = self.root / "log"
        self.proctrack = "linuxproc"
        self.cgroup_plugin: str | None = None
        plugin, self.cgroup_note = cgroup_support()
        if proctrack == "cgroup" and plugin is None:
            raise RuntimeError(f"proctrack/cgroup asked for, but {self.cgroup_note}")
        if proctrack != "linuxproc" and plugin is not None:
            self.proctrack, self.cgroup_plugin = "cgroup", plugin
        elif proctrack == "linuxproc":
            self.cgroup_note = "proctrack/linuxproc asked for"
        self._procs: dict[str, subprocess.Popen[bytes]] = {}

    # --- configuration -------------------------------------------------------------------
    @property
    def env(self) -> dict[str, str]:
        """Environment for client commands (scontrol, sbatch, ...) that talk to this cluster."""
        env = dict(os.environ)
        env["SLURM_CONF"] = str(self.conf)
        env["PATH"] = env.get("PATH", "/usr/bin:/bin") + ":/usr/sbin:/sbin"
        for k in [k for k in env if k.startswith(("SLURM_JOB", "SLURM_STEP"))]:
            del env[k]  # a test run inside a Slurm job must not target that job
        return env

    def _real_memory_mb(self) -> int:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        return max(100, min(1000, pages // (1024 * 1024) // 2))

    def _write_config(self) -> None:
        r = self.root
        for d in ("etc", "state", "spool", "log", "munge"):
            (r / d).mkdir(exist_ok=True)
        (r / "munge").chmod(0o711)
        cpus = os.cpu_count() or 1
        lines = [
            f"ClusterName={self.cluster_name}",
            "SlurmctldHost=localhost",
            f"SlurmctldPort={self.ctld_port}",
            f"SlurmdPort={self.slurmd_port}",
            "AuthType=auth/munge",
            f"AuthInfo=socket={self.munge_socket}",
            "CredType=cred/munge",
            "SlurmUser=root",
            "SlurmdUser=root",
            f"StateSaveLocation={r / 'state'}",
            f"SlurmdSpoolDir={r / 'spool'}",
            f"SlurmctldPidFile={r / 'slurmctld.pid'}",
            f"SlurmdPidFile={r / 'slurmd.pid'}",
            f"SlurmctldLogFile={self.log_dir / 'slurmctld.log'}",
            f"SlurmdLogFile={self.log_dir / 'slurmd.log'}",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            f"ProctrackType=proctrack/{self.proctrack}",
            f"TaskPlugin={'task/cgroup' if self.proctrack == 'cgroup' else 'task/none'}",
            "SchedulerType=sched/backfill",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "ReturnToService=2",
            "MpiDefault=none",
            "JobCompType=jobcomp/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "MinJobAge=600",
            "KillWait=2",
            *self.extra_conf,
            f"NodeName={self.nodename} NodeAddr=127.0.0.1 CPUs={cpus} "
            f"RealMemory={self._real_memory_mb()} State=UNKNOWN",
        ]
        for i, p in enumerate(self.partitions):
            default = " Default=YES" if i == 0 else ""
            lines.append(f"PartitionName={p} Nodes=ALL{default} MaxTime=INFINITE State=UP")
        self.conf.write_text("\n".join(lines) + "\n")
        cgroup = ["CgroupMountpoint=/sys/fs/cgroup"]
        if self.cgroup_plugin is not None:
            cgroup.append(f"CgroupPlugin={self.cgroup_plugin}")
        if self.cgroup_plugin == "cgroup/v2":
            cgroup.append("IgnoreSystemd=yes")
        cgroup += ["ConstrainCores=yes", "ConstrainRAMSpace=no", "ConstrainDevices=no"]
        (r / "etc" / "cgroup.conf").write_text("\n".join(cgroup) + "\n")
        key = r / "munge" / "munge.key"
        if not key.exists():
            key.write_bytes(os.urandom(1024))
            key.chmod(0o600)

    # --- life cycle ----------------------------------------------------------------------
    def start(self, timeout_s: float = 60.0) -> None:
        """Start munged, slurmctld and slurmd; return once the node is schedulable."""
        if self._procs:
            return
        missing = missing_binaries()
        if missing:
            raise RuntimeError(
                "Slurm not installed: missing " + ", ".join(missing) + " "
                "(apt-get install slurmctld slurmd slurm-client munge)"
            )
        if os.geteuid() != 0:
            raise RuntimeError("a test Slurm cluster needs root (slurmd runs jobs as their users)")
        try:
            self._start(timeout_s)
        except RuntimeError as e:
            if self.proctrack != "cgroup":
                self.stop()
                raise
            # cgroup looked usable but slurmd would not have it: say why, run without it
            note = f"proctrack/cgroup failed ({e}); fell back to proctrack/linuxproc"
            self.stop()
            self.proctrack, self.cgroup_plugin, self.cgroup_note = "linuxproc", None, note
            self._start(timeout_s)

    def _start(self, timeout_s: float) -> None:
        self._write_config()
        m = self.root / "munge"
        self._spawn(
            "munged",
            [
                _which("munged") or "munged",
                "--foreground",
                "--force",
                f"--socket={self.munge_socket}",
                f"--key-file={m / 'munge.key'}",
                f"--pid-file={m / 'munged.pid'}",
                f"--log-file={m / 'munged.log'}",
                f"--seed-file={m / 'munged.seed'}",
            ],
        )
        self._wait(self.munge_socket.exists, timeout_s, "munged socket")
        self._spawn("slurmctld", [_which("slurmctld") or "slurmctld", "-D", "-f", str(self.conf)])
        self._wait(self._sinfo_ok, timeout_s, "slurmctld answering sinfo")
        self._spawn(
            "slurmd",
            [_which("slurmd") or "slurmd", "-D", "-f", str(self.conf), "-N", self.nodename],
        )
        self._wait(lambda: self.node_state() == "idle", timeout_s, "the node to be idle")

    def _spawn(self, name: str, argv: list[str]) -> None:
        with (self.log_dir / f"{name}.out").open("ab") as log:  # the child keeps its own fd
            self._procs[name] = subprocess.Popen(
                argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL, env=self.env
            )

    def _wait(self, ready: Callable[[], bool], timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for name, p in self._procs.items():
                if p.poll() is not None:
                    raise RuntimeError(f"{name} exited ({p.returncode}): {self.log_tail(name)}")
            if ready():
                return
            time.sleep(0.2)
        raise RuntimeError(f"timed out after {timeout_s:g} s waiting for {what}")

    def _sinfo_ok(self) -> bool:
        return self.run("sinfo", "-h", check=False, timeout=10).returncode == 0

    def log_tail(self, name: str, chars: int = 1500) -> str:
        text = ""
        for f in (self.log_dir / f"{name}.out", self.log_dir / f"{name}.log"):
            with contextlib.suppress(OSError):
                text += f.read_text(errors="replace")
        return " | ".join(text[-chars:].splitlines())

    def stop(self) -> None:
        """Cancel every job, stop the daemons (their children too), remove nothing."""
        if "slurmctld" in self._procs and self._procs["slurmctld"].poll() is None:
            self.run("scancel", "--full", "--quiet", *self.job_ids(), check=False, timeout=15)
            self._wait_no_jobs(10.0)
            self.run("scontrol", "shutdown", check=False, timeout=15)
        for name in ("slurmd", "slurmctld", "munged"):
            p = self._procs.pop(name, None)
            if p is None:
                continue
            if p.poll() is None:
                p.terminate()
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self._procs.clear()
        self._remove_cgroups()

    def _wait_no_jobs(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self.job_ids(active_only=True):
            time.sleep(0.2)

    def _remove_cgroups(self) -> None:
        """Slurm leaves its empty ``slurm_<node>`` cgroups behind (v1): remove the empty ones."""
        if self.cgroup_plugin != "cgroup/v1":
            return
        for top in CGROUP_ROOT.glob(f"*/slurm_{self.nodename}"):
            for d in sorted(top.rglob("*"), key=lambda p: -len(p.parts)):
                if d.is_dir():
                    with contextlib.suppress(OSError):
                        d.rmdir()
            with contextlib.suppress(OSError):
                top.rmdir()

    # --- clients -------------------------------------------------------------------------
    def run(
        self, *argv: str, check: bool = True, timeout: float = 30.0
    ) -> subprocess.CompletedProcess[str]:
        """Run a Slurm client against this cluster; ``check`` raises with its stderr."""
        p = subprocess.run(
            list(argv), env=self.env, capture_output=True, text=True, timeout=timeout, check=False
        )
        if check and p.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed ({p.returncode}): {p.stderr.strip()}")
        return p

    def sbatch(self, *options: str, wrap: str) -> str:
        """Submit ``wrap`` as a batch job; returns the job id."""
        out = self.run("sbatch", "--parsable", "-o", "/dev/null", *options, "--wrap", wrap)
        return out.stdout.strip().split(";")[0]

    def job_ids(self, *, active_only: bool = False) -> list[str]:
        active = "--states=PENDING,RUNNING,SUSPENDED,COMPLETING,CONFIGURING"
        states = [active] if active_only else []
        p = self.run("squeue", "-h", "-o", "%i", *states, check=False, timeout=15)
        return p.stdout.split() if p.returncode == 0 else []

    def job_field(self, job_id: str, field: str) -> str:
        """One ``Key=value`` of ``scontrol show job -o`` (values up to the next key)."""
        text = self.run("scontrol", "show", "job", "-o", job_id).stdout
        m = re.search(rf"(?:^|\s){re.escape(field)}=(.*?)(?=\s[A-Za-z/:]+=|\s*$)", text)
        return m.group(1) if m else ""

    def wait_job(self, job_id: str, states: Sequence[str], timeout_s: float = 30.0) -> str:
        """Wait until the job's JobState is one of ``states``; returns it."""
        deadline = time.monotonic() + timeout_s
        state = ""
        while time.monotonic() < deadline:
            state = self.job_field(job_id, "JobState")
            if state in states:
                return state
            time.sleep(0.2)
        raise RuntimeError(f"job {job_id} still {state!r} after {timeout_s:g} s")

    def node_state(self) -> str:
        """``sinfo -h -o %T`` of the node ('' when slurmctld does not answer)."""
        p = self.run("sinfo", "-h", "-o", "%T", check=False, timeout=10)
        return p.stdout.strip() if p.returncode == 0 else ""

    def node_field(self, field: str) -> str:
        text = self.run("scontrol", "show", "node", "-o", self.nodename).stdout
        m = re.search(rf"(?:^|\s){re.escape(field)}=(.*?)(?=\s[A-Za-z/:]+=|\s*$)", text)
        return m.group(1) if m else ""

    def wait_node(self, states: Sequence[str], timeout_s: float = 30.0) -> str:
        deadline = time.monotonic() + timeout_s
        state = ""
        while time.monotonic() < deadline:
            state = self.node_state()
            if state in states:
                return state
            time.sleep(0.2)
        raise RuntimeError(f"node {self.nodename} still {state!r} after {timeout_s:g} s")


def require_or_skip(reason: str, env: Mapping[str, str] | None = None) -> None:
    """Skip a test that cannot get its cluster, or fail it under ``DCENERGY_REQUIRE_SLURM=1``."""
    import pytest

    if (env if env is not None else os.environ).get(REQUIRE_ENV) == "1":
        pytest.fail(f"{reason}, and {REQUIRE_ENV}=1")
    pytest.skip(reason)
