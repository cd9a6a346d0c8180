"""JobResolver on fixture /proc trees (tests/fixtures/proc/<pid>/{cgroup,environ})."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from agent.jobs import JobRef, JobResolver, parse_cgroup, parse_environ

PROC = Path(__file__).parent.parent / "fixtures" / "proc"


@pytest.fixture
def resolver() -> JobResolver:
    return JobResolver(PROC)


@pytest.mark.parametrize(
    ("pid", "expected"),
    [
        # environ of 1001 says 9999: the cgroup is the stronger identity.
        pytest.param(1001, JobRef("1234", "slurm"), id="slurm-v2"),
        pytest.param(1002, JobRef("5678", "slurm"), id="slurm-v1"),
        pytest.param(1011, JobRef("777", "slurm"), id="slurm-v2-multiple-slurmd"),
        # captured from Debian 12's Slurm 22.05 (tests/slurm/): cgroup v1, task/cgroup
        pytest.param(1013, JobRef("3", "slurm"), id="slurm-v1-debian-node-prefix-srun"),
        pytest.param(1014, JobRef("1", "slurm"), id="slurm-v1-debian-node-prefix-batch"),
        # layouts from Slurm's cgroup v2 documentation (doc/html/cgroup_v2.shtml)
        pytest.param(1015, JobRef("42", "slurm"), id="slurm-v2-batch-step"),
        pytest.param(1016, JobRef("43", "slurm"), id="slurm-v2-extern-task-special"),
        pytest.param(1017, JobRef("3385", "slurm"), id="slurm-v2-sluid-numeric-from-environ"),
        pytest.param(1018, JobRef("s5K1KKYAYG5D00", "slurm"), id="slurm-v2-sluid-no-environ"),
        pytest.param(
            1003,
            JobRef("0f4c4a4e-6b1d-4c49-9a43-0d5f6e7a8b9c", "kubernetes"),
            id="k8s-systemd-pod-beats-container",
        ),
        pytest.param(
            1004, JobRef("7e5f1c2a-3b4d-4e6f-8a9b-0c1d2e3f4a5b", "kubernetes"), id="k8s-cgroupfs"
        ),
        pytest.param(1005, JobRef("3f1c2b9e8d7a", "container"), id="docker-systemd"),
        pytest.param(1006, JobRef("3f1c2b9e8d7a", "container"), id="docker-cgroupfs"),
        pytest.param(1007, JobRef("9b8a7c6d5e4f", "container"), id="containerd"),
        pytest.param(1008, JobRef("4242", "env"), id="environ-fallback"),
        pytest.param(1012, JobRef("31337", "env"), id="slurm-env-beats-container"),
        pytest.param(1009, None, id="no-job"),
        pytest.param(99999, None, id="vanished-pid"),
    ],
)
def test_job_for_pid(resolver: JobResolver, pid: int, expected: JobRef | None) -> None:
    assert resolver.job_for_pid(pid) == expected
    assert resolver.errors_total == 0


def test_unreadable_environ_is_none_not_a_crash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """environ of another user's process is root-only; tests run as root, so simulate it."""
    shutil.copytree(PROC / "1008", tmp_path / "1008")
    real = Path.read_bytes

    def deny(self: Path) -> bytes:
        if self.name == "environ":
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", deny)
    resolver = JobResolver(tmp_path)
    assert resolver.job_for_pid(1008) is None
    assert resolver.errors_total == 0  # expected, not an error


def test_pid_vanishing_between_files(tmp_path: Path) -> None:
    """cgroup readable, then the process exits before environ is read."""
    (tmp_path / "5").mkdir()
    (tmp_path / "5" / "cgroup").write_text("0::/user.slice\n")
    assert JobResolver(tmp_path).job_for_pid(5) is None


def test_other_oserror_is_counted(tmp_path: Path) -> None:
    (tmp_path / "6" / "cgroup").mkdir(parents=True)  # reading a directory: EISDIR
    resolver = JobResolver(tmp_path)
    assert resolver.job_for_pid(6) is None
    assert resolver.errors_total == 1


def test_parse_cgroup_ignores_job_lookalikes() -> None:
    assert parse_cgroup("0::/user.slice/job_12/step_0\n") is None  # no slurm in the path
    assert parse_cgroup("0::/system.slice/slurmstepd.scope/job_12x\n") is None
    assert parse_cgroup("garbage without colons\n") is None


def test_parse_environ_edge_cases() -> None:
    assert parse_environ(b"") is None
    assert parse_environ(b"SLURM_JOB_ID=\0") is None
    assert parse_environ(b"XSLURM_JOB_ID=1\0SLURM_JOB_ID=2\0") == JobRef("2", "env")


def test_attribute_first_resolvable_pid(resolver: JobResolver) -> None:
    gpus = {
        "GPU-a": [99999, 1009, 1002],  # vanished and jobless pids are skipped
        "GPU-b": [],
        "GPU-c": [99999],
    }
    assert resolver.attribute(gpus) == {"GPU-a": "5678", "GPU-b": None, "GPU-c": None}


def test_attribute_most_pids_wins(resolver: JobResolver) -> None:
    # Job 5678 comes first but job 1234 has two processes on the GPU.
    assert resolver.attribute({"GPU-a": [1002, 1001, 1010]}) == {"GPU-a": "1234"}


def test_attribute_tie_goes_to_first_seen(resolver: JobResolver) -> None:
    assert resolver.attribute({"GPU-a": [1002, 1001]}) == {"GPU-a": "5678"}
    assert resolver.attribute({"GPU-a": [1001, 1002]}) == {"GPU-a": "1234"}
