"""deploy/kubernetes/: the DaemonSet and the Deployment, read as Kubernetes would read them.

PyYAML checks the structure (capabilities, mounts, secrets, probes) and the
configuration they carry is loaded by dcenergy's own readers. Every object is
validated, strictly (unknown fields refused), against the Kubernetes API's JSON
schemas of the oldest and the newest release ``kubernetes-validate`` ships.
``kubectl apply --dry-run=client`` then reads them as an operator's kubectl
would (YAML, kinds, metadata); kubectl asks an API server for discovery even in
a client dry run, so the test serves a minimal discovery API on loopback and
never reaches a real cluster.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path, PurePosixPath
from typing import Any

import kubernetes_validate
import pytest
import yaml

from dcenergy.config import load_config
from optimizer.topology import parse_topology

DEPLOY = Path(__file__).resolve().parent.parent / "deploy" / "kubernetes"
MANIFESTS = sorted(DEPLOY.glob("*.yaml"))


def _docs() -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for path in MANIFESTS:
        out += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return out


def _one(kind: str, name: str) -> dict[str, Any]:
    found = [d for d in _docs() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, (kind, name)
    return found[0]


def _pod(kind: str, name: str) -> dict[str, Any]:
    spec: dict[str, Any] = _one(kind, name)["spec"]["template"]["spec"]
    return spec


def _env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def _mount_of(container: dict[str, Any], pod: dict[str, Any], path: str) -> tuple[dict, dict]:
    """The volume mount (and its volume) under which ``path`` lies."""
    p = PurePosixPath(path)
    for m in container["volumeMounts"]:
        if p == PurePosixPath(m["mountPath"]) or PurePosixPath(m["mountPath"]) in p.parents:
            (vol,) = [v for v in pod["volumes"] if v["name"] == m["name"]]
            return m, vol
    raise AssertionError(f"{path} is not under any volume mount")


def _config_from(configmap: str, tmp_path: Path, env: dict[str, str]) -> Any:
    toml = _one("ConfigMap", configmap)["data"]["dcenergy.toml"]
    path = tmp_path / "dcenergy.toml"
    path.write_text(toml)
    return load_config(path, env=env)


def test_every_manifest_is_in_the_namespace_with_labels() -> None:
    assert [p.name for p in MANIFESTS] == ["agent.yaml", "namespace.yaml", "optimizer.yaml"]
    for doc in _docs():
        meta = doc["metadata"]
        if doc["kind"] != "Namespace":
            assert meta["namespace"] == "dcenergy", meta
        assert meta["labels"]["app.kubernetes.io/part-of"] == "dcenergy"


def test_mounts_and_volumes_match() -> None:
    for kind, name in (("DaemonSet", "dcenergy-agent"), ("Deployment", "dcenergy-optimizer")):
        pod = _pod(kind, name)
        declared = {v["name"] for v in pod["volumes"]}
        mounted = {m["name"] for c in pod["containers"] for m in c["volumeMounts"]}
        assert declared == mounted, (name, declared ^ mounted)
        selector = _one(kind, name)["spec"]["selector"]["matchLabels"]
        labels = _one(kind, name)["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= labels.items()


# --- the agent ---------------------------------------------------------------------------------
def test_agent_runs_as_root_with_cap_sys_admin_only() -> None:
    pod = _pod("DaemonSet", "dcenergy-agent")
    (c,) = pod["containers"]
    sc = c["securityContext"]
    assert sc["capabilities"] == {"drop": ["ALL"], "add": ["SYS_ADMIN"]}
    assert sc["privileged"] is False
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["hostPID"] is True  # /proc of the GPU processes
    assert not pod.get("hostNetwork")
    assert pod["automountServiceAccountToken"] is False
    assert c["command"] == ["dcenergy", "agent", "run"]


def test_agent_sees_the_gpus_without_taking_one() -> None:
    pod = _pod("DaemonSet", "dcenergy-agent")
    (c,) = pod["containers"]
    assert pod["runtimeClassName"] == "nvidia"
    env = _env(c)
    assert env["NVIDIA_VISIBLE_DEVICES"] == "all"
    assert env["NVIDIA_DRIVER_CAPABILITIES"] == "utility"
    resources = json.dumps(c.get("resources", {}))
    assert "nvidia.com/gpu" not in resources  # asks for no GPU of the node's workloads


def test_agent_state_run_and_pod_resources_are_on_the_node() -> None:
    pod = _pod("DaemonSet", "dcenergy-agent")
    (c,) = pod["containers"]
    state_m, state_v = _mount_of(c, pod, "/var/lib/dcenergy")
    assert state_v["hostPath"] == {"path": "/var/lib/dcenergy", "type": "DirectoryOrCreate"}
    assert not state_m.get("readOnly")
    _, run_v = _mount_of(c, pod, "/run/dcenergy/jobs")
    assert run_v["hostPath"]["path"] == "/run/dcenergy"
    sock_m, sock_v = _mount_of(c, pod, "/var/lib/kubelet/pod-resources/kubelet.sock")
    assert sock_v["hostPath"] == {"path": "/var/lib/kubelet/pod-resources", "type": "Directory"}
    assert sock_m["readOnly"] is True
    host_paths = {v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v}
    assert host_paths == {"/var/lib/dcenergy", "/run/dcenergy", "/var/lib/kubelet/pod-resources"}


def test_agent_config_names_the_mounted_secrets_and_paths(tmp_path: Path) -> None:
    pod = _pod("DaemonSet", "dcenergy-agent")
    (c,) = pod["containers"]
    env = _env(c)
    assert env["POD_IP"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    assert env["NODE_NAME"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    assert env["DCENERGY_AGENT_METRICS_LISTEN"] == "$(POD_IP):9400"
    assert env["DCENERGY_AGENT_HOST"] == "$(NODE_NAME)"
    assert env["DCENERGY_CONFIG"] == "/etc/dcenergy/dcenergy.toml"
    # What the kubelet hands the process once it has expanded $(POD_IP) and $(NODE_NAME).
    cfg = _config_from(
        "dcenergy-agent",
        tmp_path,
        {"DCENERGY_AGENT_METRICS_LISTEN": "10.1.2.3:9400", "DCENERGY_AGENT_HOST": "gpu-node-1"},
    )
    assert cfg.host == "gpu-node-1"
    assert cfg.agent.metrics_listen == "10.1.2.3:9400"
    assert cfg.agent.metrics_dcgm_compat is True
    _, token = _mount_of(c, pod, cfg.store.token_file)
    assert token["secret"]["secretName"] == "dcenergy-influx-token"
    assert token["secret"]["defaultMode"] == 0o400  # read_secret refuses anything looser
    assert [i["path"] for i in token["secret"]["items"]] == [Path(cfg.store.token_file).name]
    _, pub = _mount_of(c, pod, cfg.reconciler.public_key)
    assert pub["secret"]["secretName"] == "dcenergy-plan-public"
    assert [i["path"] for i in pub["secret"]["items"]] == [Path(cfg.reconciler.public_key).name]
    assert _mount_of(c, pod, str(cfg.state_dir))[1]["hostPath"]["path"] == "/var/lib/dcenergy"
    assert _mount_of(c, pod, cfg.agent.kubelet_socket)[0]["readOnly"] is True
    (cm_mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == env["DCENERGY_CONFIG"]]
    assert cm_mount["subPath"] == "dcenergy.toml"


def test_agent_probes_ask_the_metrics_port() -> None:
    pod = _pod("DaemonSet", "dcenergy-agent")
    (c,) = pod["containers"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"metrics": 9400}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"] == {"path": "/metrics", "port": "metrics"}, probe
    annotations = _one("DaemonSet", "dcenergy-agent")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == "9400"
    assert pod["terminationGracePeriodSeconds"] >= 20  # the last flush and the restores


# --- the optimizer -----------------------------------------------------------------------------
def test_optimizer_holds_no_capability_and_no_host_access() -> None:
    dep = _one("Deployment", "dcenergy-optimizer")
    assert dep["spec"]["replicas"] == 1
    assert dep["spec"]["strategy"] == {"type": "Recreate"}  # never two publishing at once
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    sc = c["securityContext"]
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert not pod.get("hostPID") and not pod.get("hostNetwork")
    assert not [v for v in pod["volumes"] if "hostPath" in v]
    assert "runtimeClassName" not in pod
    assert c["command"] == ["dcenergy", "optimizer", "run"]
    assert "ports" not in c  # it serves nothing


def test_optimizer_signing_key_from_a_secret(tmp_path: Path) -> None:
    pod = _pod("Deployment", "dcenergy-optimizer")
    (c,) = pod["containers"]
    cfg = _config_from("dcenergy-optimizer", tmp_path, {})
    mount, key = _mount_of(c, pod, cfg.optimizer.signing_key)
    assert mount["readOnly"] is True
    assert key["secret"]["secretName"] == "dcenergy-plan-key"
    assert key["secret"]["defaultMode"] == 0o400
    assert [i["path"] for i in key["secret"]["items"]] == ["plan.key"]
    _, token = _mount_of(c, pod, cfg.store.token_file)
    assert token["secret"]["secretName"] == "dcenergy-influx-token"
    assert cfg.store.influx_url  # the service needs InfluxDB
    # The topology it points at is in the ConfigMap and is a valid topology file.
    (topo_mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == cfg.optimizer.topology]
    text = _one("ConfigMap", "dcenergy-optimizer")["data"][topo_mount["subPath"]]
    topology = parse_topology(json.loads(text), source="optimizer.yaml")
    assert topology.domains


# --- the Kubernetes API's schemas --------------------------------------------------------------
@pytest.mark.parametrize("version", ["1.29.0", kubernetes_validate.latest_version()])
def test_every_object_validates_strictly_against_the_api_schema(version: str) -> None:
    for doc in _docs():
        kubernetes_validate.validate(doc, version, strict=True)


def test_the_schema_check_is_real() -> None:
    (c,) = _pod("DaemonSet", "dcenergy-agent")["containers"]
    c["securityContext"]["readOnlyRootFs"] = True  # a misspelt field
    ds = _one("DaemonSet", "dcenergy-agent")
    ds["spec"]["template"]["spec"]["containers"] = [c]
    with pytest.raises(kubernetes_validate.ValidationError, match="readOnlyRootFs"):
        kubernetes_validate.validate(ds, kubernetes_validate.latest_version(), strict=True)


# --- kubectl -----------------------------------------------------------------------------------
_RESOURCES = {
    "v1": [("namespaces", "Namespace", False), ("configmaps", "ConfigMap", True)],
    "apps/v1": [("daemonsets", "DaemonSet", True), ("deployments", "Deployment", True)],
}


class _Discovery(BaseHTTPRequestHandler):
    """Just enough of an API server for ``kubectl apply --dry-run=client``: discovery, 404s."""

    def _json(self, code: int, obj: object) -> None:
        body = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        path = self.path.split("?")[0]
        if path == "/api":
            return self._json(200, {"kind": "APIVersions", "versions": ["v1"]})
        if path == "/apis":
            gv = {"groupVersion": "apps/v1", "version": "v1"}
            group = {"name": "apps", "versions": [gv], "preferredVersion": gv}
            return self._json(200, {"kind": "APIGroupList", "apiVersion": "v1", "groups": [group]})
        for gv, resources in _RESOURCES.items():
            if path == ("/api/v1" if gv == "v1" else f"/apis/{gv}"):
                listed = [
                    {"name": n, "namespaced": ns, "kind": k, "verbs": ["create", "get", "patch"]}
                    for n, k, ns in resources
                ]
                body = {"kind": "APIResourceList", "groupVersion": gv, "resources": listed}
                return self._json(200, body)
        status = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 404}
        return self._json(404, {**status, "reason": "NotFound", "message": "not found"})

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def discovery() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Discovery)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _kubectl_apply(
    kubectl: str, server: str, path: Path, home: Path
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            kubectl,
            "--kubeconfig=/dev/null",
            f"--server={server}",
            "apply",
            "--dry-run=client",
            # Schema validation would download the server's OpenAPI document, which a
            # stub cannot honestly serve; decoding into the Go types still checks each field.
            "--validate=false",
            "-f",
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={"HOME": str(home), "PATH": "/usr/bin:/bin"},
        check=False,
    )


def test_kubectl_client_dry_run_accepts_the_manifests(discovery: str, tmp_path: Path) -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed: the dry run is skipped (PyYAML checks ran)")
    proc = _kubectl_apply(kubectl, discovery, DEPLOY, tmp_path)
    assert proc.returncode == 0, proc.stderr
    created = sorted(line.split()[0] for line in proc.stdout.splitlines())
    assert created == [
        "configmap/dcenergy-agent",
        "configmap/dcenergy-optimizer",
        "daemonset.apps/dcenergy-agent",
        "deployment.apps/dcenergy-optimizer",
        "namespace/dcenergy",
    ]
    # The check is real: a namespace YAML reads as a boolean no longer decodes.
    broken = tmp_path / "broken.yaml"
    broken.write_text(
        (DEPLOY / "agent.yaml").read_text().replace("namespace: dcenergy", "namespace: yes")
    )
    bad = _kubectl_apply(kubectl, discovery, broken, tmp_path)
    assert bad.returncode != 0
    assert "namespace" in bad.stderr
