"""Per-job policy from a real Slurm: jobs submitted with partitions, accounts and comments;
their facts read through squeue --json and scontrol -o; recommend --policy on telemetry
of those very jobs shows each job's policy and where it came from, and leaves the
exempt one at its default cap."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from dcenergy.cli import main
from dcenergy.store.embedded import EmbeddedStore
from optimizer.policy import parse_policy
from optimizer.slurm import SlurmClient, SlurmJobFacts, policy_resolver
from tests.seed import gpu_point, job_point
from tests.slurm_cluster import SlurmCluster

pytestmark = pytest.mark.slurm

POLICY = {
    "version": 1,
    "rules": [
        {"name": "batch", "match": {"partition": "batch"}, "exempt": True},
        {"match": {"account": "ml-*"}, "allowed_slowdown": 0.2},
        {"match": {"comment.class": "critical"}, "weight": 3},
    ],
    "job_comment": {"key": "dcenergy", "allow": ["weight", "slowdown"], "weight_max": 2},
    "slurm": {"cache_ttl_s": 60},
}


@pytest.fixture(scope="module")
def jobs(slurm_cluster: SlurmCluster) -> dict[str, str]:
    c = slurm_cluster
    ids = {
        "ml": c.sbatch(
            "-A",
            "ml-vision",
            "--comment",
            "nightly; dcenergy:weight=2,slowdown=0.05",
            wrap="sleep 120",
        ),
        "batch": c.sbatch("-p", "batch", "-J", "etl", wrap="sleep 120"),
        "critical": c.sbatch("--comment", "dcenergy:class=critical", wrap="sleep 120"),
    }
    yield ids
    c.run("scancel", *ids.values(), check=False)


def test_facts_from_real_slurm_json_and_text_agree(
    slurm_env: SlurmCluster, jobs: dict[str, str]
) -> None:
    js = SlurmClient()
    text = SlurmClient()
    text._json["jobs"] = False  # as on a Slurm without squeue --json
    a = {j.job_id: j.facts() for j in js.jobs() if j.job_id in jobs.values()}
    b = {j.job_id: j.facts() for j in text.jobs() if j.job_id in jobs.values()}
    assert a == b and set(a) == set(jobs.values())
    assert a[jobs["ml"]]["account"] == "ml-vision"
    assert a[jobs["batch"]]["partition"] == "batch"


def test_policy_resolves_each_job_from_its_scheduler_facts(
    slurm_env: SlurmCluster, jobs: dict[str, str]
) -> None:
    facts = SlurmJobFacts(SlurmClient())
    r = policy_resolver(parse_policy(POLICY), 0.1, facts=facts)
    out = r.resolve([*jobs.values(), "k8s-pod-uid"])
    ml, batch, crit = out[jobs["ml"]], out[jobs["batch"]], out[jobs["critical"]]
    assert (ml.weight, ml.allowed_slowdown) == (2.0, 0.05)  # the comment beats the account rule
    assert batch.exempt and "rules[0] batch (partition=batch)" in batch.describe()
    assert crit.weight == 3.0 and "comment.class=critical" in crit.describe()
    assert not out["k8s-pod-uid"].known
    r.resolve(list(jobs.values()))
    assert facts.calls == 1  # cached between solves


def _seed(store: EmbeddedStore, host: str, jobs: dict[str, str], now_ns: int) -> None:
    pts = []
    for i, job in enumerate(sorted(jobs.values())):
        uuid = f"GPU-{host}-{i}"
        for t in range(0, 300, 2):
            ts = now_ns - (300 - t) * 10**9
            cap = 700.0 if t < 150 else 450.0
            pts.append(
                gpu_point(host, i, ts, job=job, util=90.0, power_w=min(cap, 600.0) - 20,
                          power_limit_w=cap)
            )  # fmt: skip
            rate = 100.0 * (min(cap, 600.0) / 600.0) ** 0.5
            pts.append(
                job_point(host, job, [uuid], ts, throughput=rate, throughput_unit="samples",
                          power_limit_w=cap, power_w=min(cap, 600.0) - 20)
            )  # fmt: skip
    store.write(pts)


def test_recommend_with_policy_shows_sources_and_keeps_the_exempt_job_at_default(
    slurm_env: SlurmCluster,
    jobs: dict[str, str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    db = tmp_path / "store.sqlite"
    store = EmbeddedStore(db)
    _seed(store, slurm_env.nodename, jobs, time.time_ns())
    store.close()
    cfg = tmp_path / "dcenergy.toml"
    pol = tmp_path / "policy.json"
    pol.write_text(json.dumps(POLICY))
    cfg.write_text(
        f'[store]\nembedded_path = "{db}"\n[optimizer]\nwindow_s = 400\npolicy = "{pol}"\n'
    )
    saved = tmp_path / "problem.json"
    rc = main(
        ["-c", str(cfg), "recommend", "--budget", "1500", "--save-problem", str(saved), "-o",
         str(tmp_path / "plan.json")]
    )  # fmt: skip
    out, err = capsys.readouterr()
    assert rc in (0, 3), err
    rows = {line.split()[0]: line for line in out.splitlines() if line.split()[:1]}
    assert "exempt" in rows[jobs["batch"]] and "rules[0] batch" in rows[jobs["batch"]]
    assert "comment: weight=2, allowed_slowdown=0.05" in rows[jobs["ml"]]
    assert "comment.class=critical" in rows[jobs["critical"]]
    problem = json.loads(saved.read_text())
    exempt = {j["id"]: j.get("exempt", False) for j in problem["jobs"]}
    assert exempt == {jobs["ml"]: False, jobs["batch"]: True, jobs["critical"]: False}
    plan = json.loads((tmp_path / "plan.json").read_text())
    batch_gpu = next(j["gpus"][0] for j in problem["jobs"] if j["id"] == jobs["batch"])
    cap = next(s["power_limit_w"] for s in plan["setpoints"] if s["gpu"] == batch_gpu)
    assert cap == pytest.approx(700.0)
    others = [s["power_limit_w"] for s in plan["setpoints"] if s["gpu"] != batch_gpu]
    assert sum(others) + cap <= 1500 + 1e-6  # the others made room for it
