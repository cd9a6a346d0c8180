"""Kubernetes: GPUs joined to pods by device id, through a real gRPC ``List`` on a unix socket.

The kubelet is played by a gRPC server in the test, on a socket in a temporary
folder, answering ``/v1.PodResourcesLister/List`` with the messages of
``agent/kube_pb`` (the published pod-resources API).
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

import agent.kube as kube
from agent.daemon import AgentDaemon
from agent.devices.base import GpuIdentity
from agent.devices.simulated import SimulatedBackend
from agent.jobs import JobResolver
from agent.kube import (
    KubeJobResolver,
    PodRef,
    PodResourcesClient,
    gpu_for_device_id,
    gpu_pods,
    job_resolver_from_config,
    pod_job_id,
)
from agent.kube_pb import podresources_v1_pb2 as pb
from dcenergy.config import AgentConfig, Config, StoreConfig
from dcenergy.errors import ConfigError
from dcenergy.report import JOB_ID_PATTERN

SAFETY_S = 60.0
U0 = "GPU-7ec46904-1d35-4900-827f-8915edc77c77"
U1 = "GPU-e28f7e19-800a-4d7d-a86a-0ef8eaf7d680"
GPUS = [
    GpuIdentity(0, U0, "NVIDIA H100 80GB HBM3", "00000000:18:00.0", False),
    GpuIdentity(1, U1, "NVIDIA H100 80GB HBM3", "00000000:2A:00.0", True),
]


def _pod(ns: str, name: str, *containers: tuple[str, str, list[str]]) -> pb.PodResources:
    return pb.PodResources(
        name=name,
        namespace=ns,
        containers=[
            pb.ContainerResources(
                name=c, devices=[pb.ContainerDevices(resource_name=res, device_ids=ids)]
            )
            for c, res, ids in containers
        ],
    )


# --- the join --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("device_id", "expected"),
    [
        (U0, U0),
        ("GPU-" + U0[4:].upper(), U0),  # hex case does not matter
        (f"{U1}::3", U1),  # a time-slicing replica of GPU 1
        (f"MIG-{U1}/1/0", U1),  # the old MIG form names its parent
        ("MIG-0b8f1ea2-9b7a-5ef3-8a4e-8a9c3c1d2e3f", None),  # new form: needs the parent map
        ("1", U1),  # DEVICE_ID_STRATEGY=index
        ("7", None),
        ("GPU-99999999-9999-9999-9999-999999999999", None),  # another node's GPU
        ("", None),
    ],
)
def test_device_ids_name_gpus(device_id: str, expected: str | None) -> None:
    assert gpu_for_device_id(device_id, GPUS) == expected


def test_new_mig_ids_join_through_the_parent_map() -> None:
    mig = "MIG-0b8f1ea2-9b7a-5ef3-8a4e-8a9c3c1d2e3f"
    assert gpu_for_device_id(mig, GPUS, {mig: U1}) == U1


def test_gpu_pods_keeps_gpu_resources_and_is_deterministic() -> None:
    response = pb.ListPodResourcesResponse(
        pod_resources=[
            _pod("zeta", "b", ("c", "nvidia.com/gpu.shared", [f"{U1}::1"])),
            _pod("ml", "train-0", ("trainer", "nvidia.com/gpu", [U0])),
            _pod("alpha", "a", ("c", "nvidia.com/gpu.shared", [f"{U1}::0"])),
            _pod("net", "sriov", ("c", "intel.com/sriov", [U1])),  # not a GPU resource
            _pod("mig", "m", ("c", "nvidia.com/mig-1g.10gb", [f"MIG-{U1}/2/0"])),
        ]
    )
    pods = gpu_pods(response, GPUS)
    assert pods == {U0: PodRef("ml", "train-0", "trainer"), U1: PodRef("alpha", "a", "c")}
    reordered = pb.ListPodResourcesResponse(pod_resources=list(reversed(response.pod_resources)))
    assert gpu_pods(reordered, GPUS) == pods


def test_pod_job_ids_are_valid_job_ids() -> None:
    assert pod_job_id("ml", "train-0") == "ml:train-0"
    assert PodRef("ml", "train-0", "x").job_id == "ml:train-0"
    long = pod_job_id("n" * 63, "p" * 253)  # the longest names Kubernetes allows
    assert JOB_ID_PATTERN.match(long)
    assert long != pod_job_id("n" * 63, "p" * 252)  # still one id per pod


# --- a kubelet on a unix socket ----------------------------------------------------------------
class FakeKubelet:
    """``v1.PodResourcesLister/List`` over gRPC, answering whatever ``pods`` holds."""

    def __init__(self, socket_path: Path) -> None:
        self.socket_path = socket_path
        self.pods: list[pb.PodResources] = []
        self.calls = 0
        self.fail_with: grpc.StatusCode | None = None
        self._server: Any = None

    def _list(self, request: pb.ListPodResourcesRequest, context: Any) -> Any:
        self.calls += 1
        if self.fail_with is not None:
            context.abort(self.fail_with, "kubelet says no")
        return pb.ListPodResourcesResponse(pod_resources=self.pods)

    def start(self) -> None:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        handler = grpc.method_handlers_generic_handler(
            "v1.PodResourcesLister",
            {
                "List": grpc.unary_unary_rpc_method_handler(
                    self._list,
                    request_deserializer=pb.ListPodResourcesRequest.FromString,
                    response_serializer=pb.ListPodResourcesResponse.SerializeToString,
                )
            },
        )
        server.add_generic_rpc_handlers((handler,))
        server.add_insecure_port(f"unix:{self.socket_path}")
        server.start()
        self._server = server

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(grace=None).wait()
            self._server = None


@pytest.fixture
def kubelet() -> Iterator[FakeKubelet]:
    # A short folder: a unix socket path is limited to 107 bytes.
    folder = Path(tempfile.mkdtemp(prefix="kubelet-", dir="/tmp"))
    fake = FakeKubelet(folder / "kubelet.sock")
    fake.start()
    yield fake
    fake.stop()
    shutil.rmtree(folder, ignore_errors=True)


def test_client_lists_over_the_socket(kubelet: FakeKubelet) -> None:
    kubelet.pods = [_pod("ml", "train-0", ("trainer", "nvidia.com/gpu", [U0]))]
    client = PodResourcesClient(kubelet.socket_path)
    try:
        response = client.list()
    finally:
        client.close()
    assert [(p.namespace, p.name) for p in response.pod_resources] == [("ml", "train-0")]
    assert response.pod_resources[0].containers[0].devices[0].device_ids == [U0]


def _slurm_proc(root: Path, pid: int, job: str) -> None:
    (root / str(pid)).mkdir(parents=True)
    (root / str(pid) / "cgroup").write_text(
        f"0::/system.slice/slurmstepd.scope/job_{job}/step_0/task_0\n"
    )


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_resolver_names_pod_gpus_and_keeps_cgroups_for_the_rest(
    kubelet: FakeKubelet, tmp_path: Path
) -> None:
    kubelet.pods = [_pod("ml", "train-0", ("trainer", "nvidia.com/gpu", [U0]))]
    _slurm_proc(tmp_path, 10, "555")
    clock = Clock()
    resolver = KubeJobResolver(
        tmp_path, GPUS, PodResourcesClient(kubelet.socket_path), refresh_s=5, clock=clock
    )
    try:
        # GPU 0 is the pod's even with no process on it yet; GPU 1 runs a Slurm job.
        assert resolver.attribute({U0: [], U1: [10]}) == {U0: "ml:train-0", U1: "555"}
        assert resolver.pods() == {U0: PodRef("ml", "train-0", "trainer")}
        assert kubelet.calls == 1
        clock.now += 4
        resolver.attribute({U0: [], U1: []})
        assert kubelet.calls == 1  # within refresh_s: no call
        clock.now += 1
        kubelet.pods = []  # the pod ended
        assert resolver.attribute({U0: [], U1: []}) == {U0: None, U1: None}
        assert kubelet.calls == 2
        assert resolver.errors_total == 0
    finally:
        resolver.close()


def test_an_unreachable_kubelet_is_counted_and_its_map_expires(
    kubelet: FakeKubelet, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    kubelet.pods = [_pod("ml", "train-0", ("trainer", "nvidia.com/gpu", [U0]))]
    clock = Clock()
    resolver = KubeJobResolver(
        tmp_path,
        GPUS,
        PodResourcesClient(kubelet.socket_path, timeout_s=2),
        refresh_s=5,
        stale_s=15,
        clock=clock,
    )
    try:
        assert resolver.attribute({U0: []}) == {U0: "ml:train-0"}
        kubelet.fail_with = grpc.StatusCode.UNAVAILABLE
        for _ in range(2):  # t = 1005, 1010: failed, the last map still holds
            clock.now += 5
            assert resolver.attribute({U0: []}) == {U0: "ml:train-0"}
        clock.now += 10  # t = 1020: 20 s after the last answer, past stale_s
        assert resolver.attribute({U0: []}) == {U0: None}
        assert resolver.errors_total == 3
        warnings = [r for r in caplog.records if "kubelet pod-resources" in r.getMessage()]
        assert len([r for r in warnings if r.levelname == "WARNING"]) == 1  # logged once
        assert "kubelet says no" in warnings[-1].getMessage()
        kubelet.fail_with = None
        clock.now += 5
        assert resolver.attribute({U0: []}) == {U0: "ml:train-0"}  # back
    finally:
        resolver.close()


def test_no_kubelet_socket_gives_the_plain_resolver(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(kube, "DEFAULT_SOCKET", tmp_path / "absent.sock")
    cfg = Config(agent=AgentConfig(host="n"))
    resolver = job_resolver_from_config(cfg, tmp_path, GPUS)
    assert type(resolver) is JobResolver
    (tmp_path / "present.sock").touch()
    monkeypatch.setattr(kube, "DEFAULT_SOCKET", tmp_path / "present.sock")
    assert isinstance(job_resolver_from_config(cfg, tmp_path, GPUS), KubeJobResolver)


def test_a_configured_socket_without_grpcio_is_a_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "grpc", None)  # import grpc raises ImportError
    cfg = Config(agent=AgentConfig(host="n", kubelet_socket=str(tmp_path / "k.sock")))
    with pytest.raises(ConfigError, match=r"agent\.kubelet_socket"):
        job_resolver_from_config(cfg, tmp_path, GPUS)
    monkeypatch.setattr(kube, "DEFAULT_SOCKET", tmp_path)  # found, not asked for: a warning
    assert type(job_resolver_from_config(Config(), tmp_path, GPUS)) is JobResolver


# --- the daemon on a Kubernetes node -----------------------------------------------------------
def test_daemon_attributes_pods_and_labels_dcgm_series(
    kubelet: FakeKubelet, tmp_path: Path
) -> None:
    backend = SimulatedBackend(2, seed=1, host="testnode")
    backend.open()
    u0 = backend.gpus()[0].identity.uuid
    kubelet.pods = [_pod("ml", "train-0", ("trainer", "nvidia.com/gpu", [u0]))]
    backend.gpus()[0].set_workload(0.8)
    cfg = Config(
        agent=AgentConfig(
            host="testnode",
            state_dir=tmp_path / "state",
            runtime_dir=tmp_path / "run",
            simulate=2,
            backend="simulated",
            interval_s=0.05,
            ship_interval_s=0.2,
            metrics_listen="127.0.0.1:0",
            metrics_dcgm_compat=True,
            kubelet_socket=str(kubelet.socket_path),
        ),
        store=StoreConfig(),
    )
    daemon = AgentDaemon(cfg, backend=backend, proc_root=tmp_path / "proc")
    daemon.start()
    try:
        deadline = time.monotonic() + SAFETY_S
        while not any(p.measurement == "job" for p in daemon.last_points):
            assert time.monotonic() < deadline, "no job point"
            time.sleep(0.02)
        points = daemon.last_points
        gpu_jobs = {p.tags["gpu"]: p.fields.get("job_id") for p in points if p.measurement == "gpu"}
        assert gpu_jobs == {"0": "ml:train-0", "1": ""}
        assert [p.tags["job_id"] for p in points if p.measurement == "job"] == ["ml:train-0"]
        assert daemon.metrics_url is not None
        text = httpx.get(daemon.metrics_url, timeout=10).text
        fams = {f.name: f for f in text_string_to_metric_families(text)}
        (power0,) = [s for s in fams["DCGM_FI_DEV_POWER_USAGE"].samples if s.labels["gpu"] == "0"]
        assert (power0.labels["pod"], power0.labels["namespace"], power0.labels["container"]) == (
            "train-0",
            "ml",
            "trainer",
        )
        info = fams["dcenergy_gpu_job_info"].samples
        assert [(s.labels["job_id"], s.labels["pod"]) for s in info] == [("ml:train-0", "train-0")]
    finally:
        daemon.shutdown()
        backend.close()
