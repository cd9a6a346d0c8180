"""Which Kubernetes pod, namespace and container hold each GPU: the kubelet's pod-resources API.

The kubelet serves ``v1.PodResourcesLister/List`` over gRPC on a unix socket
(``/var/lib/kubelet/pod-resources/kubelet.sock``): every pod on the node with
its containers and the devices the device plugins allocated to each. A GPU
is joined to its pod by device id, the way dcgm-exporter does
(``internal/pkg/transformation/kubernetes.go``, ``toDeviceToPod``): devices of
resource ``nvidia.com/gpu`` (also ``nvidia.com/gpu.shared`` and
``nvidia.com/mig-*``), whose ids are what the NVIDIA device plugin advertised:

* a GPU UUID, ``GPU-<uuid>`` (the plugin's default ``DEVICE_ID_STRATEGY=uuid``);
* the same with a sharing replica, ``GPU-<uuid>::<n>`` (time-slicing, MPS);
* a MIG device, ``MIG-<uuid>`` (joined to its parent GPU through ``mig_parents``,
  which a backend that lists MIG instances provides) or the older
  ``MIG-GPU-<uuid>/<gi>/<ci>``, which names its parent;
* a GPU index, ``0``, ``1``, … (``DEVICE_ID_STRATEGY=index``).

A pod's job id is ``<namespace>:<pod>``: ``/`` (kubectl's spelling) is not
allowed in job ids, which name the job report files
(``dcenergy.report.JOB_ID_PATTERN``); a namespace is a DNS label, so the first
``:`` always splits it off.

The client is optional: it is used when ``agent.kubelet_socket`` names a socket
or the default one exists, and ``grpc`` is imported only then (the
``kubernetes`` extra). The messages are classes generated from the published
``api.proto`` (``agent/kube_pb/``); the one call is made through grpc's generic
``unary_unary``, so no generated service stub (and no grpcio-tools version pin)
is needed at run time.

The map is refreshed at most every ``refresh_s`` from the sampling thread (a
call takes about a millisecond; ``timeout_s`` bounds a hung kubelet). A failed
refresh keeps the last map for ``stale_s``, then drops it: a pod that ended
must not keep its GPUs. Failures are counted (``errors_total``) and logged
once per outage.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from agent.jobs import JobResolver
from dcenergy.errors import ConfigError
from dcenergy.logonce import LogOnce
from dcenergy.report import JOB_ID_PATTERN

if TYPE_CHECKING:
    from agent.devices.base import GpuIdentity
    from agent.kube_pb.podresources_v1_pb2 import ListPodResourcesResponse
    from dcenergy.config import Config

log = logging.getLogger(__name__)

DEFAULT_SOCKET = Path("/var/lib/kubelet/pod-resources/kubelet.sock")
LIST_METHOD = "/v1.PodResourcesLister/List"
GPU_RESOURCE = "nvidia.com/gpu"
GPU_RESOURCE_PREFIXES = ("nvidia.com/gpu.", "nvidia.com/mig-")  # gpu.shared, mig-1g.10gb
DEFAULT_TIMEOUT_S = 1.0
DEFAULT_REFRESH_S = 5.0
MAX_MESSAGE_BYTES = 16 * 1024 * 1024  # a node with many pods; dcgm-exporter allows the same
REPLICA_SEP = "::"

_OLD_MIG = re.compile(r"^MIG-(?P<gpu>GPU-[0-9A-Fa-f-]+)/\d+/\d+$")
_HASH_CHARS = 8


@dataclass(frozen=True, slots=True, order=True)
class PodRef:
    """The pod, its namespace and the container that holds a GPU."""

    namespace: str
    pod: str
    container: str

    @property
    def job_id(self) -> str:
        return pod_job_id(self.namespace, self.pod)


def pod_job_id(namespace: str, pod: str) -> str:
    """``<namespace>:<pod>``, shortened with a hash suffix past the job-id length limit."""
    job = f"{namespace}:{pod}"
    if JOB_ID_PATTERN.match(job):
        return job
    digest = hashlib.sha256(job.encode()).hexdigest()[:_HASH_CHARS]
    keep = 200 - _HASH_CHARS - 1
    short = re.sub(r"[^A-Za-z0-9._:+-]", "-", job)[:keep].lstrip("._:+-") or "pod"
    return f"{short}-{digest}"


def is_gpu_resource(name: str) -> bool:
    return name == GPU_RESOURCE or name.startswith(GPU_RESOURCE_PREFIXES)


def gpu_for_device_id(
    device_id: str,
    gpus: Sequence[GpuIdentity],
    mig_parents: Mapping[str, str] | None = None,
) -> str | None:
    """The UUID of the GPU a device-plugin device id names, or ``None`` (not on this node)."""
    did = device_id.strip().split(REPLICA_SEP, 1)[0]
    by_uuid = {g.uuid.lower(): g.uuid for g in gpus}
    if did.lower() in by_uuid:
        return by_uuid[did.lower()]
    if did.startswith("MIG-"):
        if mig_parents and did in mig_parents:
            return mig_parents[did]
        if m := _OLD_MIG.match(did):
            return by_uuid.get(m.group("gpu").lower())
        return None
    if did.isdigit():
        return next((g.uuid for g in gpus if g.index == int(did)), None)
    return None


def gpu_pods(
    response: ListPodResourcesResponse,
    gpus: Sequence[GpuIdentity],
    mig_parents: Mapping[str, str] | None = None,
) -> dict[str, PodRef]:
    """GPU UUID → the pod holding it, from a ``List`` answer.

    A GPU several pods share (time slicing, MPS, several MIG instances) goes
    to the first of them in (namespace, pod, container) order, so the answer
    does not depend on the kubelet's ordering.
    """
    out: dict[str, PodRef] = {}
    for pod in response.pod_resources:
        for container in pod.containers:
            ref = PodRef(pod.namespace, pod.name, container.name)
            for dev in container.devices:
                if not is_gpu_resource(dev.resource_name):
                    continue
                for device_id in dev.device_ids:
                    uuid = gpu_for_device_id(device_id, gpus, mig_parents)
                    if uuid is not None and (uuid not in out or ref < out[uuid]):
                        out[uuid] = ref
    return out


class PodLister(Protocol):
    def list(self) -> ListPodResourcesResponse: ...
    def close(self) -> None: ...


class PodResourcesClient:
    """``List`` on the kubelet's pod-resources socket; the channel opens on the first call."""

    def __init__(self, socket_path: Path, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.socket_path = socket_path
        self.timeout_s = timeout_s
        self._channel: Any = None
        self._call: Callable[..., ListPodResourcesResponse] | None = None
        self._request: Any = None

    def list(self) -> ListPodResourcesResponse:
        """Every pod with its devices; raises ``grpc.RpcError`` (or ``ImportError``)."""
        if self._call is None:
            import grpc

            from agent.kube_pb import podresources_v1_pb2 as pb

            self._channel = grpc.insecure_channel(
                f"unix://{self.socket_path.resolve()}",
                options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)],
            )
            self._call = self._channel.unary_unary(
                LIST_METHOD,
                request_serializer=pb.ListPodResourcesRequest.SerializeToString,
                response_deserializer=pb.ListPodResourcesResponse.FromString,
            )
            self._request = pb.ListPodResourcesRequest()
        return self._call(self._request, timeout=self.timeout_s)

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
        self._channel = self._call = None

    def __repr__(self) -> str:
        return f"PodResourcesClient({str(self.socket_path)!r})"


class KubeJobResolver(JobResolver):
    """``JobResolver`` whose GPUs held by a pod belong to ``<namespace>:<pod>``.

    GPUs the kubelet did not allocate to a pod keep what ``/proc/PID/cgroup``
    says (a Slurm job, a pod UID, a container). ``pods()`` is the last map,
    for the ``/metrics`` labels; it never calls the kubelet.
    """

    def __init__(
        self,
        proc_root: Path,
        gpus: Sequence[GpuIdentity],
        lister: PodLister,
        *,
        refresh_s: float = DEFAULT_REFRESH_S,
        stale_s: float | None = None,
        mig_parents: Mapping[str, str] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(proc_root)
        self.gpus = list(gpus)
        self.lister = lister
        self.refresh_s = refresh_s
        self.stale_s = 3 * refresh_s if stale_s is None else stale_s
        self.mig_parents = mig_parents
        self._clock = clock
        self._pods: dict[str, PodRef] = {}
        self._fetched_at: float | None = None  # last successful List
        self._tried_at: float | None = None
        self._kube_once = LogOnce(log)
        self._failing = False
        self.refreshes_total = 0

    def pods(self) -> dict[str, PodRef]:
        """GPU UUID → pod, as of the last successful ``List`` (replaced whole, never mutated)."""
        return self._pods

    def refresh(self) -> None:
        """Ask the kubelet now; on failure keep the last map until it is ``stale_s`` old."""
        now = self._clock()
        self._tried_at = now
        try:
            response = self.lister.list()
        except Exception as e:  # grpc.RpcError, ImportError, OSError: counted, logged once
            self.errors_total += 1
            self._kube_once(
                "kubelet",
                logging.WARNING,
                "kubelet pod-resources %r failed: %s (logged once; counted in errors_total)",
                self.lister,
                _short(e),
            )
            self._failing = True
            if self._fetched_at is None or now - self._fetched_at > self.stale_s:
                self._pods = {}
            return
        self._pods = gpu_pods(response, self.gpus, self.mig_parents)
        self._fetched_at = now
        self.refreshes_total += 1
        if self._failing or self.refreshes_total == 1:
            log.info(
                "kubelet pod-resources answers: %d of %d GPUs held by pods",
                len(self._pods),
                len(self.gpus),
            )
        self._failing = False
        self._kube_once.forget("kubelet")  # the next outage is logged again

    def attribute(self, gpu_pids: Mapping[str, list[int]]) -> dict[str, str | None]:
        if self._tried_at is None or self._clock() - self._tried_at >= self.refresh_s:
            self.refresh()
        out = super().attribute(gpu_pids)
        pods = self._pods
        for uuid in gpu_pids:
            if (ref := pods.get(uuid)) is not None:
                out[uuid] = ref.job_id
        return out

    def close(self) -> None:
        self.lister.close()


def _short(err: BaseException) -> str:
    """One line for a gRPC error (its details), or the exception's text."""
    details = getattr(err, "details", None)
    if callable(details):
        try:
            text = details()
        except Exception:  # not a grpc.Call after all
            text = None
        if text:
            return str(text)
    return str(err) or type(err).__name__


def kubelet_socket(config: Config) -> Path | None:
    """The socket to use: ``agent.kubelet_socket``, else the default one if it exists."""
    if config.agent.kubelet_socket:
        return Path(config.agent.kubelet_socket)
    return DEFAULT_SOCKET if DEFAULT_SOCKET.exists() else None


def job_resolver_from_config(
    config: Config, proc_root: Path, gpus: Sequence[GpuIdentity]
) -> JobResolver:
    """A ``KubeJobResolver`` on a Kubernetes node (``kubelet_socket``), else a ``JobResolver``."""
    socket_path = kubelet_socket(config)
    if socket_path is None:
        return JobResolver(proc_root)
    try:
        import grpc  # noqa: F401  (only to say at start that the extra is missing)
    except ImportError:
        if config.agent.kubelet_socket:  # asked for: a configuration the node cannot serve
            raise ConfigError(
                "agent.kubelet_socket",
                config.agent.kubelet_socket,
                "a socket the agent can query, which needs grpcio",
                source=config.source_of("agent.kubelet_socket"),
                hint="pip install 'dcenergy[kubernetes]', or unset agent.kubelet_socket",
            ) from None
        log.warning(
            "kubelet socket %s found but grpcio is not installed (pip install "
            "'dcenergy[kubernetes]'): pods are not named",
            socket_path,
        )
        return JobResolver(proc_root)
    log.info("naming the pods of the GPUs through the kubelet at %s", socket_path)
    return KubeJobResolver(proc_root, gpus, PodResourcesClient(socket_path))
