"""optimizer/slurm.py without a cluster: outputs captured from a real Slurm 22.05
(tests/fixtures/slurm, made by tests/slurm_cluster.py), the 23.02+ JSON layout, the
text form, the facts cache, the node actions and the AdminComment fallback."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest

from dcenergy import schema
from optimizer.policy import SlurmSource, parse_policy
from optimizer.slurm import (
    SlurmClient,
    SlurmError,
    SlurmJobFacts,
    SlurmNode,
    apply_node_actions,
    audit_points,
    parse_scontrol_jobs,
    parse_scontrol_line,
    parse_scontrol_nodes,
    parse_sinfo_json,
    parse_squeue_json,
    plan_node_actions,
    policy_resolver,
)

FIX = Path(__file__).parents[1] / "fixtures" / "slurm"


def test_squeue_json_22_05() -> None:
    jobs = {j.job_id: j for j in parse_squeue_json((FIX / "squeue-22.05.json").read_text())}
    a, b = jobs["1"], jobs["2"]
    assert (a.state, a.partition, a.account, a.name, a.user) == (
        "RUNNING",
        "debug",
        "ml-vision",
        "trainer",
        "root",
    )
    assert a.comment == "nightly run; dcenergy:weight=2,slowdown=0.05"
    assert (b.state, b.partition) == ("COMPLETED", "batch")
    assert b.start_time is not None and b.end_time is not None and b.end_time >= b.start_time
    assert a.facts() == {
        "scheduler": "slurm",
        "partition": "debug",
        "account": "ml-vision",
        "user": "root",
        "job_name": "trainer",
        "comment": "nightly run; dcenergy:weight=2,slowdown=0.05",
    }


def test_text_form_gives_the_same_facts() -> None:
    text = parse_scontrol_jobs((FIX / "scontrol-show-job-22.05.txt").read_text())
    js = parse_squeue_json((FIX / "squeue-22.05.json").read_text())
    assert {j.job_id: j.facts() for j in text} == {j.job_id: j.facts() for j in js}
    by = {j.job_id: j for j in text}
    assert by["1"].end_time is None  # a running job's EndTime is its time limit: Unknown here
    assert by["2"].start_time == {j.job_id: j for j in js}["2"].start_time


def test_squeue_json_23_02_layout() -> None:
    doc = {
        "jobs": [
            {
                "job_id": 7,
                "job_state": ["RUNNING"],
                "partition": "gpu",
                "qos": "high",
                "account": "a",
                "user_name": "u",
                "name": "n",
                "comment": "",
                "admin_comment": "",
                "start_time": {"set": True, "infinite": False, "number": 1700000000},
                "end_time": {"set": True, "infinite": True, "number": 0},
                "sluid": "s5K1KKYAYG5D00",
            }
        ]
    }
    (j,) = parse_squeue_json(json.dumps(doc))
    assert (j.job_id, j.state, j.qos, j.start_time, j.end_time, j.sluid) == (
        "7",
        "RUNNING",
        "high",
        1700000000,
        None,
        "s5K1KKYAYG5D00",
    )


def test_nodes_from_sinfo_json_and_text_agree() -> None:
    (a,) = parse_sinfo_json((FIX / "sinfo-22.05.json").read_text())
    (b,) = parse_scontrol_nodes((FIX / "scontrol-show-node-22.05.txt").read_text())
    assert a.name == b.name
    assert a.drained and b.drained
    assert a.reason == b.reason == "dcenergy: consolidation frees this node"
    assert "DRAIN" in b.flags and b.state == "mixed"
    new = json.dumps({"nodes": [{"name": "n1", "state": ["IDLE", "DRAIN"], "reason": "r"}]})
    (c,) = parse_sinfo_json(new)
    assert c.state == "idle" and c.drained


def test_scontrol_line_values_with_spaces() -> None:
    f = parse_scontrol_line("JobId=3 Comment=a b c  StdErr=/x Reason=None")
    assert f == {"JobId": "3", "Comment": "a b c", "StdErr": "/x", "Reason": "None"}


class _Runner:
    """A fake of Slurm's clients: argv -> (rc, stdout, stderr); records every call."""

    def __init__(self, answers: dict[str, tuple[int, str, str]]) -> None:
        self.answers = answers
        self.calls: list[list[str]] = []

    def __call__(self, argv: Sequence[str], timeout_s: float) -> subprocess.CompletedProcess[str]:
        self.calls.append(list(argv))
        key = " ".join(argv)
        for prefix, (rc, out, err) in self.answers.items():
            if key.startswith(prefix):
                return subprocess.CompletedProcess(list(argv), rc, out, err)
        return subprocess.CompletedProcess(list(argv), 0, "", "")


def test_older_slurm_without_json_falls_back_to_the_text_form_once() -> None:
    r = _Runner(
        {
            "squeue --json": (1, "", "squeue: unrecognized option '--json'"),
            "scontrol -a -o show job": (0, (FIX / "scontrol-show-job-22.05.txt").read_text(), ""),
        }
    )
    c = SlurmClient(runner=r)
    assert {j.job_id for j in c.jobs()} == {"1", "2"}
    assert {j.job_id for j in c.jobs()} == {"1", "2"}
    assert [x[0] for x in r.calls] == ["squeue", "scontrol", "scontrol"]


def test_a_real_failure_is_an_error_not_a_fallback() -> None:
    r = _Runner(
        {"squeue --json": (1, "", "slurm_load_jobs error: Unable to contact slurm controller")}
    )
    with pytest.raises(SlurmError, match="Unable to contact"):
        SlurmClient(runner=r).jobs()


def test_facts_are_cached_for_the_ttl() -> None:
    r = _Runner({"squeue --json": (0, (FIX / "squeue-22.05.json").read_text(), "")})
    now = [0.0]
    facts = SlurmJobFacts(SlurmClient(SlurmSource(cache_ttl_s=60), runner=r), clock=lambda: now[0])
    assert set(facts.facts(["1", "2", "k8s-pod"])) == {"1", "2"}
    now[0] = 59.0
    facts.facts(["1"])
    assert facts.calls == 1
    now[0] = 60.0
    facts.facts(["1"])
    assert facts.calls == 2


def test_policy_resolver_reads_slurm_facts_through_the_policy() -> None:
    pol = parse_policy(
        {
            "version": 1,
            "rules": [{"match": {"account": "ml-*"}, "allowed_slowdown": 0.2}],
            "job_comment": {"allow": ["weight", "slowdown"]},
            "slurm": {},
        }
    )
    r = _Runner({"squeue --json": (0, (FIX / "squeue-22.05.json").read_text(), "")})
    facts = SlurmJobFacts(SlurmClient(pol.slurm, runner=r))
    out = policy_resolver(pol, 0.1, facts=facts).resolve(["1", "2", "99"])
    assert (out["1"].weight, out["1"].allowed_slowdown) == (2.0, 0.05)  # the comment wins
    assert out["1"].sources["allowed_slowdown"] == "comment"
    assert out["2"].describe() == "default"
    assert not out["99"].known


def test_node_actions() -> None:
    nodes = [
        SlurmNode("a", "idle", frozenset()),
        SlurmNode("b", "idle", frozenset({"DRAIN"}), "dcenergy: consolidation frees this node"),
        SlurmNode("c", "mixed", frozenset({"DRAIN"}), "dcenergy: earlier plan"),
        SlurmNode("d", "idle", frozenset({"DRAIN"}), "bad DIMM"),
        SlurmNode("e", "down", frozenset()),
    ]
    acts = {
        (a.node, a.action)
        for a in plan_node_actions(["a", "b", "d", "e", "x"], nodes, "dcenergy: r")
    }
    assert acts == {
        ("a", "drain"),
        ("b", "skip"),
        ("c", "resume"),  # dcenergy drained it, the new plan keeps it on
        ("d", "skip"),  # someone else's drain: left alone
        ("e", "skip"),
        ("x", "skip"),  # not a Slurm node
    }


def test_apply_actions_audits_each_and_goes_on_after_a_refusal() -> None:
    r = _Runner({"scontrol update nodename=a": (1, "", "Invalid node name specified")})
    client = SlurmClient(runner=r)
    acts = plan_node_actions(
        ["a", "b"],
        [SlurmNode("a", "idle", frozenset()), SlurmNode("b", "idle", frozenset())],
        "dcenergy: r",
    )
    outcomes = apply_node_actions(client, acts)
    assert [(o.action.node, o.done) for o in outcomes] == [("a", False), ("b", True)]
    assert r.calls[-1] == ["scontrol", "update", "nodename=b", "state=drain", "reason=dcenergy: r"]
    pts = audit_points(outcomes, "consolidation-1", 10)
    assert [(p.tags[schema.TAG_HOST], p.tags[schema.TAG_ACTION]) for p in pts] == [
        ("a", "error"),
        ("b", "drain"),
    ]
    assert pts[0].fields["reason"].startswith("drain failed: ")
    assert {p.tags[schema.TAG_GPU_UUID] for p in pts} == {"all"}
    assert len({p.time_ns for p in pts}) == 2


def test_admin_comment_of_a_finished_job_goes_to_the_accounting_database() -> None:
    finished = (1, "", "Job has already finished for job 5")
    r = _Runner({"scontrol update job=5": finished})
    assert SlurmClient(runner=r).set_admin_comment("5", "dcenergy:gpu_kwh=1") == "sacctmgr"
    assert r.calls[-1][:3] == ["sacctmgr", "-i", "update"]
    assert "AdminComment=dcenergy:gpu_kwh=1" in r.calls[-1]
    no_dbd = (1, "", "You are not running a supported accounting_storage plugin")
    r2 = _Runner({"scontrol update job=5": finished, "sacctmgr": no_dbd})
    with pytest.raises(SlurmError, match="sacctmgr refused") as e:
        SlurmClient(runner=r2).set_admin_comment("5", "x")
    assert e.value.hint is not None and "slurmdbd" in e.value.hint
