"""Who gets a shared GPU's power: the split rules on hand-computed cases, then the whole
cycle (NVML through the fake pynvml, jobs from the fixture /proc tree) for a MIG GPU and a
time-sliced GPU: instance and job points, estimates labelled with their rule."""

from __future__ import annotations

import itertools
from pathlib import Path

import pynvml
import pytest

from agent import attribution
from agent.devices.base import MigInstance
from agent.devices.nvml import NvmlBackend
from agent.devices.simulated import SimulatedBackend, SimWork
from agent.jobs import JobResolver
from agent.sampler import Sampler
from dcenergy.schema import GPU, GPU_INSTANCE, JOB, Point
from tests.agent.fake_pynvml import FakeGpm, FakeGpu, FakeMig, FakeNvml

PROC = Path(__file__).resolve().parent.parent / "fixtures" / "proc"
SM = pynvml.NVML_GPM_METRIC_SM_UTIL
T0_NS = 1_700_000_000_000_000_000
# the fixture tree's jobs (tests/fixtures/proc/<pid>/cgroup)
SLURM_1234 = (1001, 1010)  # two tasks of Slurm job 1234
DOCKER = 1005  # docker container 3f1c2b9e8d7a
DOCKER_2 = 1007  # containerd container 9b8a7c6d5e4f
POD = 1003  # a Kubernetes pod (systemd driver)
SLURM_5678 = 1002
NO_JOB = 1009  # a login session


def _inst(uuid: str, active: float | None, sms: int | None, *pids: int) -> MigInstance:
    return MigInstance("GPU-p", uuid, 1, 0, "1g.10gb", sms, sm_active_pct=active, pids=pids)


# -- the rules, by hand -----------------------------------------------------------------------
def test_instances_share_by_activity_times_sms() -> None:
    # 75 % of 16 SMs, 37.5 % of 32, 37.5 % of 16: 12, 12 and 6 busy SMs of 30
    shares, rule = attribution.instance_shares(
        [_inst("a", 75.0, 16), _inst("b", 37.5, 32), _inst("c", 37.5, 16)]
    )
    assert rule == "activity"
    assert shares == pytest.approx([0.4, 0.4, 0.2])


@pytest.mark.parametrize(
    "instances",
    [
        [_inst("a", 75.0, 16), _inst("b", None, 32)],  # one unknown: all equal
        [_inst("a", 0.0, 16), _inst("b", 0.0, 32)],  # all idle
    ],
    ids=["unknown", "idle"],
)
def test_instances_split_equally_when_activity_is_unknown(instances: list[MigInstance]) -> None:
    assert attribution.instance_shares(instances) == ([0.5, 0.5], "equal")


def test_mig_split_gives_jobs_their_instances_and_splits_a_shared_instance() -> None:
    instances = [_inst("a", 75.0, 16, 1, 2), _inst("b", 37.5, 32, 3), _inst("c", 37.5, 16, 4, 5)]
    jobs = {1: "j1", 2: "j1", 3: "j2", 4: "j3", 5: "j4"}
    s = attribution.mig_split(instances, jobs, main="j1")
    assert s.rule == "activity"
    assert dict(s.shares) == pytest.approx({"j1": 0.4, "j2": 0.4, "j3": 0.1, "j4": 0.1})
    assert s.jobs[0] == "j1" and set(s.jobs) == {"j1", "j2", "j3", "j4"}
    assert s.instance_jobs == (("j1",), ("j2",), ("j3", "j4"))
    assert dict(s.job_instances) == {"j1": (0,), "j2": (1,), "j3": (2,), "j4": (2,)}


def test_process_split_by_utilization_and_unattributed_processes_keep_their_part() -> None:
    pids = [1, 2, 3, 4]
    jobs = {1: "a", 2: "a", 3: "b"}  # pid 4: no job
    s = attribution.process_split(pids, jobs, {1: 30.0, 2: 10.0, 3: 40.0, 4: 20.0}, main="a")
    assert s.rule == "process_util"
    assert dict(s.shares) == pytest.approx({"a": 0.4, "b": 0.4})  # 20 % went to nobody
    assert s.jobs == ("a", "b")


def test_process_split_equal_without_utilization() -> None:
    s = attribution.process_split([1, 2, 3], {1: "a", 2: "b", 3: "c"}, {}, main="b")
    assert s.rule == "equal" and s.jobs[0] == "b"
    assert dict(s.shares) == pytest.approx({"a": 1 / 3, "b": 1 / 3, "c": 1 / 3})


def test_one_job_is_sole_and_the_least_informed_rule_wins() -> None:
    assert attribution.process_split([1, 2], {1: "a", 2: "a"}, {}, "a") == attribution.sole("a")
    assert attribution.sole(None).jobs == ()
    assert attribution.least_informed(["sole", "activity", "equal"]) == "equal"
    assert attribution.least_informed([]) == "sole"


# -- the whole cycle: a MIG GPU -------------------------------------------------------------
def _mig_fake() -> FakeNvml:
    def mig(uuid: str, gi: int, sms: int, active: float, pids: list[int]) -> FakeMig:
        return FakeMig(uuid, gi_id=gi, sm_count=sms, pids=pids, gpm=FakeGpm(rates={SM: active}))

    parent = FakeGpu(
        uuid="GPU-11111111-0000-4000-8000-000000000000",
        mig_mode=pynvml.NVML_DEVICE_MIG_ENABLE,
        power_instant_mw=500_000,
        energy_mj=1_000_000,
        mig=[
            mig("MIG-aaaa", 1, 16, 75.0, list(SLURM_1234)),
            mig("MIG-bbbb", 2, 32, 37.5, [DOCKER]),
            mig("MIG-cccc", 3, 16, 37.5, [DOCKER_2, POD]),
        ],
    )
    return FakeNvml([parent])


def _sampler(backend: object) -> Sampler:
    clock = itertools.count(T0_NS, 1_000_000_000)
    return Sampler(
        backend,  # type: ignore[arg-type]
        "n1",
        None,
        JobResolver(PROC),
        None,
        clock=lambda: next(clock),
    )


def _by(points: list[Point], measurement: str) -> list[Point]:
    return [p for p in points if p.measurement == measurement]


def test_mig_gpu_jobs_get_their_instances_power_as_estimates() -> None:
    fake = _mig_fake()
    with NvmlBackend(fake) as backend:
        sampler = _sampler(backend)
        sampler.sample()
        fake.gpus[0].energy_mj += 100_000  # 100 J in the next interval
        points = sampler.sample()
    (gpu,) = _by(points, GPU.name)
    assert gpu.fields["job_id"] == "1234"  # the GPU's main job: most processes
    assert gpu.fields["job_count"] == 4
    pod = "0f4c4a4e-6b1d-4c49-9a43-0d5f6e7a8b9c"
    # main job first, then by share (ties by name)
    assert gpu.fields["job_ids"] == f"1234,3f1c2b9e8d7a,{pod},9b8a7c6d5e4f"
    inst = {p.tags["mig_uuid"]: p.fields for p in _by(points, GPU_INSTANCE.name)}
    assert set(inst) == {"MIG-aaaa", "MIG-bbbb", "MIG-cccc"}
    assert all(set(f) <= GPU_INSTANCE.field_names for f in inst.values())
    assert _by(points, GPU_INSTANCE.name)[0].tags["gpu_uuid"] == gpu.tags["gpu_uuid"]
    a, c = inst["MIG-aaaa"], inst["MIG-cccc"]
    assert (a["power_share"], a["power_est_w"], a["power_split"]) == pytest.approx(
        (0.4, 200.0, "activity")
    )
    assert a["energy_est_j"] == pytest.approx(40.0)  # 0.4 of the 100 J
    assert (a["job_id"], a["job_count"], a["profile"], a["sm_active_pct"]) == (
        "1234",
        1,
        "1g.10gb",
        75.0,
    )
    assert (c["power_est_w"], c["job_count"]) == (pytest.approx(100.0), 2)
    jobs = {p.tags["job_id"]: p.fields for p in _by(points, JOB.name)}
    assert set(jobs) == {"1234", "3f1c2b9e8d7a", "9b8a7c6d5e4f", pod}
    j = jobs["1234"]
    assert set(j) <= JOB.field_names
    assert j["gpu_uuids"] == gpu.tags["gpu_uuid"]  # the parent: where the cap is
    assert j["mig_uuids"] == "MIG-aaaa"
    assert (j["power_est_w"], j["gpu_share"], j["power_split"]) == pytest.approx(
        (200.0, 0.4, "activity")
    )
    assert j["energy_est_j"] == pytest.approx(40.0)
    assert j["sharing_jobs"] == 4
    assert j["power_w"] == pytest.approx(500.0)  # the whole GPU's, as before
    assert j["sm_active_pct"] == pytest.approx(75.0)  # its instance's, not the GPU's
    # the two jobs of one instance split it equally: 0.2 / 2
    assert jobs["9b8a7c6d5e4f"]["power_est_w"] == pytest.approx(50.0)


def test_mig_gpu_without_activity_splits_equally() -> None:
    fake = _mig_fake()
    fake.fail("nvmlGpmMigSampleGet", code=pynvml.NVML_ERROR_NOT_SUPPORTED)
    with NvmlBackend(fake) as backend:
        points = _sampler(backend).sample()
    inst = {p.tags["mig_uuid"]: p.fields for p in _by(points, GPU_INSTANCE.name)}
    assert {f["power_split"] for f in inst.values()} == {"equal"}
    assert inst["MIG-bbbb"]["power_est_w"] == pytest.approx(500.0 / 3)
    jobs = {p.tags["job_id"]: p.fields for p in _by(points, JOB.name)}
    assert jobs["1234"]["power_split"] == "equal"


# -- the whole cycle: a time-sliced GPU ------------------------------------------------------
def _shared_fake(proc_util: dict[int, tuple[int, int]]) -> FakeNvml:
    g = FakeGpu(
        power_instant_mw=500_000, pids=[*SLURM_1234, SLURM_5678, NO_JOB], proc_util=proc_util
    )
    return FakeNvml([g, FakeGpu(uuid="GPU-22222222-0000-4000-8000-000000000000", pids=[DOCKER])])


def test_time_sliced_gpu_split_by_process_utilization() -> None:
    # 1234: 30 + 30, 5678: 20, the login session's process: 20 (nobody's)
    fake = _shared_fake({1001: (30, 0), 1010: (30, 0), SLURM_5678: (20, 0), NO_JOB: (20, 0)})
    with NvmlBackend(fake) as backend:
        points = _sampler(backend).sample()
    gpus = {p.tags["gpu"]: p.fields for p in _by(points, GPU.name)}
    assert (gpus["0"]["job_id"], gpus["0"]["job_count"], gpus["0"]["job_ids"]) == (
        "1234",
        2,
        "1234,5678",
    )
    assert gpus["1"]["job_count"] == 1 and "job_ids" not in gpus["1"]  # not shared
    jobs = {p.tags["job_id"]: p.fields for p in _by(points, JOB.name)}
    assert (jobs["1234"]["power_est_w"], jobs["1234"]["power_split"]) == pytest.approx(
        (300.0, "process_util")
    )
    assert jobs["5678"]["power_est_w"] == pytest.approx(100.0)
    assert jobs["5678"]["sharing_jobs"] == jobs["1234"]["sharing_jobs"] == 2
    assert jobs["5678"]["gpu_uuids"] == jobs["1234"]["gpu_uuids"]  # both list the GPU
    # the container has its GPU to itself: the estimate is the measurement
    other = jobs["3f1c2b9e8d7a"]
    assert (other["power_split"], other["sharing_jobs"], other["gpu_share"]) == ("sole", 1, 1.0)
    assert other["power_est_w"] == other["power_w"]
    assert len(fake.calls_to("nvmlDeviceGetProcessUtilization")) == 1  # only the shared GPU


def test_time_sliced_gpu_split_equally_without_samples() -> None:
    fake = _shared_fake({})  # NVML: NOT_FOUND, no sample since
    with NvmlBackend(fake) as backend:
        points = _sampler(backend).sample()
    jobs = {p.tags["job_id"]: p.fields for p in _by(points, JOB.name)}
    assert jobs["1234"]["power_split"] == jobs["5678"]["power_split"] == "equal"
    assert jobs["1234"]["power_est_w"] == jobs["5678"]["power_est_w"] == pytest.approx(250.0)


def test_simulated_shared_gpu_gives_the_same_fields(tmp_path: Path) -> None:
    t = itertools.count(1000.0, 1.0)
    backend = SimulatedBackend(1, seed=1, clock=lambda: next(t))
    backend.open()
    backend.gpus()[0].set_shared_workloads(
        [SimWork(1.0, pids=[SLURM_1234[0]], share=0.75), SimWork(1.0, pids=[DOCKER], share=0.25)]
    )
    points = _sampler(backend).sample()
    jobs = {p.tags["job_id"]: p.fields for p in _by(points, JOB.name)}
    assert jobs["1234"]["power_split"] == "process_util"
    assert jobs["1234"]["gpu_share"] == pytest.approx(0.75)
    assert jobs["3f1c2b9e8d7a"]["gpu_share"] == pytest.approx(0.25)
