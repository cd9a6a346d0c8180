"""Per-job GPU energy for Slurm users, on a real cluster with seeded telemetry.

* A running job: ``dcenergy job-energy JOB`` sums its GPUs' energy counters from
  the store over its time range from Slurm and writes ``dcenergy:gpu_kwh=…`` into
  its AdminComment (``scontrol update``), which ``squeue --json`` then shows.
* The epilog (``deploy/slurm/epilog.sh`` as this cluster's ``Epilog``): it runs
  when the job ends, computes the same figure, and logs it; Slurm refuses an
  AdminComment through scontrol once the job has finished (22.05: "Job has
  already finished"), so the epilog's write goes to ``sacctmgr``, which needs
  slurmdbd: this test cluster has none, and the log says so.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from dcenergy.cli import main
from dcenergy.store.embedded import EmbeddedStore
from optimizer.job_energy import J_PER_KWH
from tests.seed import gpu_point, job_point
from tests.slurm_cluster import SlurmCluster

pytestmark = pytest.mark.slurm
S = 10**9
W = 250.0  # each of the job's GPUs draws 250 W: its counter rises 250 J a second


def _epoch(text: str) -> int:
    return int(time.mktime(time.strptime(text, "%Y-%m-%dT%H:%M:%S")))


def _seed(db: Path, host: str, job: str, t0_s: int, t1_s: int) -> list[tuple[int, float]]:
    """Two GPUs of ``job`` (and one of another job) on ``host``, one reading a second."""
    pts = []
    readings = []
    for t in range(t0_s, t1_s + 1):
        e = 1.0e6 + W * (t - t0_s)
        readings.append((t, e))
        for i in (0, 1):
            pts.append(gpu_point(host, i, t * S, job=job, util=90.0, power_w=W, energy_j=e,
                                 energy_resets=0))  # fmt: skip
        pts.append(gpu_point(host, 2, t * S, job="other", energy_j=5e6 + 400 * t, energy_resets=0))
        pts.append(job_point(host, job, [f"GPU-{host}-0", f"GPU-{host}-1"], t * S))
    store = EmbeddedStore(db)
    store.write(pts)
    store.close()
    return readings


def _expected_j(readings: list[tuple[int, float]], start_s: int, end_s: int) -> float:
    """What the counters say between the job's first and last reading in [start, end + 1 s)."""
    inside = [e for t, e in readings if start_s <= t < end_s + 1]
    return 2 * (inside[-1] - inside[0])  # two GPUs


def test_running_job_gets_its_kwh_in_admin_comment(
    slurm_env: SlurmCluster, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    c = slurm_env
    job = c.sbatch(wrap="sleep 120")
    try:
        c.wait_job(job, ["RUNNING"])
        start = _epoch(c.job_field(job, "StartTime"))
        time.sleep(2.2)  # some readings inside the job
        now = int(time.time())
        db = tmp_path / "store.sqlite"
        readings = _seed(db, c.nodename, job, start - 10, now)
        cfg = tmp_path / "dcenergy.toml"
        cfg.write_text(f'[store]\nembedded_path = "{db}"\n')
        rc = main(["-c", str(cfg), "job-energy", job, "--json"])
        out, err = capsys.readouterr()
        assert rc == 0, err
        doc = json.loads(out)
        assert doc["written"] == "scontrol"
        assert [g["gpu_uuid"] for g in doc["gpus"]] == [
            f"GPU-{c.nodename}-0",
            f"GPU-{c.nodename}-1",
        ]
        expected = _expected_j(readings, start, now)
        assert expected >= 2 * 2 * W
        assert doc["gpu_energy_j"] == pytest.approx(expected)
        squeue = json.loads(c.run("squeue", "--json").stdout)
        comment = next(j["admin_comment"] for j in squeue["jobs"] if str(j["job_id"]) == job)
        assert comment == f"dcenergy:gpu_kwh={expected / J_PER_KWH:.4f},gpus=2"
    finally:
        c.run("scancel", job, check=False)


def test_epilog_computes_the_figure_and_says_why_slurm_keeps_no_comment(
    slurm_env: SlurmCluster, tmp_path: Path
) -> None:
    c = slurm_env
    db = tmp_path / "store.sqlite"
    cfg = tmp_path / "dcenergy.toml"
    cfg.write_text(f'[store]\nembedded_path = "{db}"\n')
    log = tmp_path / "epilog.log"
    env = c.root / "epilog.env"
    now = int(time.time())
    job = None
    try:
        # telemetry covering the job's whole life (the store keeps future points too)
        env.write_text(
            f"DCENERGY={c.root / 'dcenergy'}\nDCENERGY_CONFIG={cfg}\nDCENERGY_EPILOG_LOG={log}\n"
        )
        job = c.sbatch(wrap="sleep 3")
        readings = _seed(db, c.nodename, job, now - 5, now + 60)
        c.wait_job(job, ["COMPLETED"], timeout_s=60)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not (
            log.exists() and f"job {job}:" in log.read_text()
        ):
            time.sleep(0.2)
        text = log.read_text()
    finally:
        env.unlink(missing_ok=True)
    line = next(x for x in text.splitlines() if f"job {job}:" in x)
    start, end = _epoch(c.job_field(job, "StartTime")), _epoch(c.job_field(job, "EndTime"))
    kwh = _expected_j(readings, start, end) / J_PER_KWH
    assert f"{kwh:.4f} kWh of GPU energy on 2 GPU(s)" in line
    # Slurm 22.05 without slurmdbd: scontrol refuses a finished job, sacctmgr has no database
    assert "has finished" in line and "slurmdbd" in line and "(exit 69)" in line
    assert c.node_state() in ("idle", "mixed")  # the epilog never fails (no drained node)
