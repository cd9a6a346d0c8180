"""The ``slurm_cluster`` fixture: a real single-node Slurm started for the session.

Without Slurm installed (or not as root) the tests skip, unless
``DCENERGY_REQUIRE_SLURM=1`` (set in CI), where they fail instead.

The cluster's ``Epilog`` is ``deploy/slurm/epilog.sh`` behind a wrapper that
does nothing until a test writes ``<root>/epilog.env`` (the settings the
epilog reads: which ``dcenergy``, which config, where to log), so every other
test's jobs end as they would without it.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.slurm_cluster import SlurmCluster, require_or_skip

REPO = Path(__file__).resolve().parents[2]
EPILOG = REPO / "deploy" / "slurm" / "epilog.sh"


def _write_epilog(cluster: SlurmCluster) -> Path:
    root = cluster.root
    shim = root / "dcenergy"  # the CLI of this checkout, whatever PATH the epilog gets
    shim.write_text(
        f"#!{sys.executable}\nimport sys\nsys.path.insert(0, {str(REPO)!r})\n"
        "from dcenergy.cli import main\nsys.exit(main())\n"
    )
    shim.chmod(0o755)
    wrapper = root / "epilog-wrapper.sh"
    wrapper.write_text(
        "#!/bin/bash\n"
        f"[ -f {root}/epilog.env ] || exit 0\n"
        f"set -a; . {root}/epilog.env; set +a\n"
        f"exec {EPILOG}\n"
    )
    wrapper.chmod(0o755)
    return wrapper


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    cluster = SlurmCluster()
    cluster.extra_conf += (f"Epilog={_write_epilog(cluster)}",)
    try:
        cluster.start()
    except RuntimeError as e:
        cluster.close()
        require_or_skip(f"cannot start a test Slurm cluster: {e}")
    yield cluster
    cluster.close()


@pytest.fixture
def slurm_env(slurm_cluster: SlurmCluster, monkeypatch: pytest.MonkeyPatch) -> SlurmCluster:
    """The cluster, with this process's Slurm clients (squeue, scontrol, ...) pointed at it."""
    for k, v in slurm_cluster.env.items():
        if k in ("SLURM_CONF", "PATH"):
            monkeypatch.setenv(k, v)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    return slurm_cluster
