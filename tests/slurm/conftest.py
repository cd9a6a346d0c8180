"""The ``slurm_cluster`` fixture: a real single-node Slurm started for the session.

Without Slurm installed (or not as root) the tests skip, unless
``DCENERGY_REQUIRE_SLURM=1`` (set in CI), where they fail instead.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.slurm_cluster import SlurmCluster, require_or_skip


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    cluster = SlurmCluster()
    try:
        cluster.start()
    except RuntimeError as e:
        cluster.close()
        require_or_skip(f"cannot start a test Slurm cluster: {e}")
    yield cluster
    cluster.close()
