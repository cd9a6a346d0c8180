"""``/metrics``: the exposition of a known sample, the HTTP rules, the daemon wiring, and a
real Prometheus scraping a running agent and answering PromQL with what the agent sampled.

Without ``prometheus`` installed the Prometheus test skips, unless
``DCENERGY_REQUIRE_PROMETHEUS=1`` (set in CI), where it fails instead.
"""

from __future__ import annotations

import math
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

import agent.metrics as metrics_mod
from agent.daemon import AgentDaemon
from agent.devices.base import (
    THROTTLE_HW_THERMAL,
    THROTTLE_SW_POWER_CAP,
    GpuIdentity,
    GpuSample,
)
from agent.devices.simulated import SimulatedBackend
from agent.kube import PodRef
from agent.metrics import (
    DCGM_LABELS,
    THROTTLE_REASONS,
    AgentCollector,
    MetricsServer,
    Snapshot,
    parse_listen,
)
from dcenergy.config import AgentConfig, Config, StoreConfig, load_config
from dcenergy.errors import ConfigError
from dcenergy.plan import PlanPart, Setpoint
from dcenergy.schema import AGENT, GPU, HOST, JOB, point
from tests.influx_server import free_port
from tests.prometheus_server import REQUIRE_ENV, PrometheusServer, prometheus_path

SAFETY_S = 60.0  # only ever reached when something is broken
T_NS = 1_780_000_000_000_000_000
HOSTNAME = "node7"
UUID0 = "GPU-00000000-0000-0000-0000-000000000000"
UUID1 = "GPU-11111111-1111-1111-1111-111111111111"
UUID2 = "GPU-22222222-2222-2222-2222-222222222222"
MODEL = "NVIDIA H100 80GB HBM3"


# --- a known sample ----------------------------------------------------------------------------
def _gpu_point(index: int, uuid: str, job: str, **fields: Any) -> Any:
    ident = GpuIdentity(index, uuid, MODEL, f"00000000:{0x18 + index:02X}:00.0", False)
    sample = GpuSample(ident, **fields)
    tags = {"host": HOSTNAME, "gpu": str(index), "gpu_uuid": uuid, "model": MODEL}
    values = dict(sample.fields())
    values["job_id"] = None if sample.lost else job
    return point(GPU, tags, values, T_NS)


GPU0 = {
    "power_w": 612.5,
    "energy_j": 123456.75,
    "energy_resets": 1,
    "power_limit_w": 650.0,
    "power_limit_default_w": 700.0,
    "power_limit_min_w": 200.0,
    "power_limit_max_w": 700.0,
    "power_limit_enforced_w": 640.0,
    "temp_c": 71.0,
    "mem_temp_c": 80.5,
    "util_gpu_pct": 97.0,
    "util_mem_pct": 41.0,
    "sm_clock_mhz": 1755.0,
    "mem_clock_mhz": 2619.0,
    "power_violation_s": 12.5,
    "thermal_violation_s": 0.25,
    "mem_used_bytes": 60 * 2**30 + 5 * 2**20 + 17,
    "mem_total_bytes": 80 * 2**30,
    "throttle_reasons": THROTTLE_SW_POWER_CAP | THROTTLE_HW_THERMAL,
    "pstate": 0,
}


def _snapshot(**kw: Any) -> Snapshot:
    points = [
        _gpu_point(0, UUID0, "4242", **GPU0),
        _gpu_point(1, UUID1, "", power_w=70.0, energy_j=5.0, temp_c=33.0, throttle_reasons=1),
        _gpu_point(2, UUID2, "", lost=True),
        point(
            HOST,
            {"host": HOSTNAME},
            {"cpu_pct": 25.0, "mem_used_bytes": 10, "mem_total_bytes": 100, "load1": 1.5},
            T_NS,
        ),
        point(
            JOB,
            {"host": HOSTNAME, "job_id": "4242"},
            {
                "power_w": 612.5,
                "gpu_count": 1,
                "sm_util_pct": 97.0,
                "throughput": 1500.0,
                "throughput_unit": "tokens",
                "throughput_source": "report",
            },
            T_NS,
        ),
    ]
    agent = point(
        AGENT,
        {"host": HOSTNAME},
        {
            "samples_total": 41,
            "points_spooled_total": 300,
            "points_shipped_total": 280,
            "dropped_overflow_total": 3,
            "dropped_rejected_total": 0,
            "dropped_partial_total": 0,
            "dropped_corrupt_total": 0,
            "dropped_disk_full_total": 2,
            "errors_total": 5,
            "spool_depth": 20,
            "spool_bytes": 4096,
            "spool_file_bytes": 65536,
            "cycle_s": 0.0015,
            "last_error": "x",
        },
        T_NS,
    )
    values: dict[str, Any] = {"host": HOSTNAME, "points": points, "agent": agent, **kw}
    return Snapshot(**values)


def _families(collector: AgentCollector) -> dict[str, Any]:
    """The exposition, parsed back by prometheus_client's own text parser."""
    text = generate_latest(_Registry(collector)).decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


class _Registry:
    def __init__(self, collector: AgentCollector) -> None:
        self.collector = collector

    def collect(self) -> Iterator[Any]:
        return self.collector.collect()


def _samples(fams: dict[str, Any], name: str, **labels: str) -> list[tuple[dict[str, str], float]]:
    """Samples named ``name`` (``…_total``, ``…_info`` included) whose labels match."""
    return [
        (s.labels, s.value)
        for fam in fams.values()
        for s in fam.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    ]


def _value(fams: dict[str, Any], name: str, **labels: str) -> float:
    found = _samples(fams, name, **labels)
    assert len(found) == 1, (name, labels, found)
    return found[0][1]


def test_gpu_families_carry_units_and_labels() -> None:
    fams = _families(AgentCollector(_snapshot))
    g0 = {"gpu": "0", "uuid": UUID0}
    labels, _ = _samples(fams, "dcenergy_gpu_power_watts", **g0)[0]
    assert labels == {"host": HOSTNAME, "gpu": "0", "uuid": UUID0, "model": MODEL}
    assert _value(fams, "dcenergy_gpu_power_watts", **g0) == 612.5
    assert fams["dcenergy_gpu_energy_joules"].type == "counter"
    assert _value(fams, "dcenergy_gpu_energy_joules_total", **g0) == 123456.75
    assert _value(fams, "dcenergy_gpu_energy_counter_resets_total", **g0) == 1
    limits = {lab["kind"]: v for lab, v in _samples(fams, "dcenergy_gpu_power_limit_watts", **g0)}
    assert limits == {
        "current": 650.0,
        "default": 700.0,
        "min": 200.0,
        "max": 700.0,
        "enforced": 640.0,
    }
    assert _value(fams, "dcenergy_gpu_temperature_celsius", sensor="gpu", **g0) == 71.0
    assert _value(fams, "dcenergy_gpu_temperature_celsius", sensor="memory", **g0) == 80.5
    assert _value(fams, "dcenergy_gpu_clock_hertz", clock="sm", **g0) == 1755e6
    assert _value(fams, "dcenergy_gpu_clock_hertz", clock="mem", **g0) == 2619e6
    assert _value(fams, "dcenergy_gpu_utilization_ratio", engine="gpu", **g0) == pytest.approx(0.97)
    assert _value(fams, "dcenergy_gpu_utilization_ratio", engine="memory", **g0) == pytest.approx(
        0.41
    )
    assert _value(fams, "dcenergy_gpu_memory_used_bytes", **g0) == GPU0["mem_used_bytes"]
    assert _value(fams, "dcenergy_gpu_memory_total_bytes", **g0) == 80 * 2**30
    assert _value(fams, "dcenergy_gpu_pstate", **g0) == 0
    assert fams["dcenergy_gpu_violation_seconds"].type == "counter"
    assert _value(fams, "dcenergy_gpu_violation_seconds_total", reason="power", **g0) == 12.5
    assert _value(fams, "dcenergy_gpu_violation_seconds_total", reason="thermal", **g0) == 0.25
    # GPU 1 reads no memory clock etc.: absent, never 0
    assert not _samples(fams, "dcenergy_gpu_clock_hertz", gpu="1")


def test_throttle_reasons_one_series_per_named_bit() -> None:
    fams = _families(AgentCollector(_snapshot))
    got = {lab["reason"]: v for lab, v in _samples(fams, "dcenergy_gpu_throttle_reason", gpu="0")}
    assert set(got) == {name for name, _ in THROTTLE_REASONS}
    assert {r for r, v in got.items() if v == 1} == {"sw_power_cap", "hw_thermal_slowdown"}
    idle = {lab["reason"]: v for lab, v in _samples(fams, "dcenergy_gpu_throttle_reason", gpu="1")}
    assert {r for r, v in idle.items() if v == 1} == {"gpu_idle"}


def test_a_lost_gpu_reports_only_that_it_is_lost() -> None:
    fams = _families(AgentCollector(_snapshot))
    assert _value(fams, "dcenergy_gpu_lost", gpu="2") == 1
    assert _value(fams, "dcenergy_gpu_lost", gpu="0") == 0
    for name, fam in fams.items():
        if name != "dcenergy_gpu_lost":
            assert all(s.labels.get("uuid") != UUID2 for s in fam.samples), name


def test_the_job_is_a_label_only_on_the_info_metric() -> None:
    fams = _families(AgentCollector(_snapshot))
    info = _samples(fams, "dcenergy_gpu_job_info")
    assert info == [({"host": HOSTNAME, "gpu": "0", "uuid": UUID0, "job_id": "4242"}, 1.0)]
    for name, fam in fams.items():
        if name.startswith("dcenergy_gpu_") and not name.startswith("dcenergy_gpu_job"):
            assert all("job_id" not in s.labels for s in fam.samples), name


def test_host_job_and_agent_families() -> None:
    fams = _families(AgentCollector(_snapshot))
    assert _value(fams, "dcenergy_host_cpu_utilization_ratio") == 0.25
    assert _value(fams, "dcenergy_host_load_average", window="1m") == 1.5
    assert not _samples(fams, "dcenergy_host_load_average", window="5m")
    assert _value(fams, "dcenergy_job_power_watts", job_id="4242") == 612.5
    assert _value(fams, "dcenergy_job_gpus", job_id="4242") == 1
    tput = _samples(fams, "dcenergy_job_throughput_per_second")
    assert tput == [
        ({"host": HOSTNAME, "job_id": "4242", "unit": "tokens", "source": "report"}, 1500.0)
    ]
    assert fams["dcenergy_agent_samples"].type == "counter"
    assert _value(fams, "dcenergy_agent_samples_total") == 41
    assert _value(fams, "dcenergy_agent_errors_total") == 5
    dropped = {lab["reason"]: v for lab, v in _samples(fams, "dcenergy_agent_points_dropped_total")}
    assert dropped == {"overflow": 3, "rejected": 0, "partial": 0, "corrupt": 0, "disk_full": 2}
    assert _value(fams, "dcenergy_agent_spool_points") == 20
    assert _value(fams, "dcenergy_agent_cycle_seconds") == 0.0015
    assert _value(fams, "dcenergy_agent_last_sample_timestamp_seconds") == T_NS / 1e9
    assert _samples(fams, "dcenergy_agent_info")[0][0]["version"]
    # every agent series is per host only
    for name, fam in fams.items():
        if name.startswith("dcenergy_agent_") and not name.startswith("dcenergy_agent_info"):
            assert all(set(s.labels) <= {"host", "reason"} for s in fam.samples), name


def test_plan_families_show_the_setpoint_and_the_lease() -> None:
    lease = PlanPart(
        host=HOSTNAME,
        plan_id="plan-abc",
        seq=17,
        created_ns=T_NS - 60 * 10**9,
        expires_ns=T_NS + 840 * 10**9,
        key_id="k1",
        setpoints=(Setpoint(UUID0, 450.0, 1410),),
        mode="dvfs",
    )
    fams = _families(AgentCollector(lambda: _snapshot(reconciling=True, lease=lease)))
    assert _value(fams, "dcenergy_gpu_setpoint_watts", gpu="0") == 450.0
    assert _value(fams, "dcenergy_gpu_setpoint_sm_clock_max_hertz", gpu="0") == 1410e6
    assert not _samples(fams, "dcenergy_gpu_setpoint_watts", gpu="1")  # not in the plan
    assert _value(fams, "dcenergy_plan_lease_active") == 1
    assert _value(fams, "dcenergy_plan_lease_expiry_timestamp_seconds") == lease.expires_ns / 1e9
    assert _value(fams, "dcenergy_plan_sequence") == 17
    info = _samples(fams, "dcenergy_plan_info")
    assert info == [({"host": HOSTNAME, "plan_id": "plan-abc", "mode": "dvfs"}, 1.0)]

    no_lease = _families(AgentCollector(lambda: _snapshot(reconciling=True)))
    assert _value(no_lease, "dcenergy_plan_lease_active") == 0
    assert "dcenergy_plan_lease_expiry_timestamp_seconds" not in no_lease
    telemetry_only = _families(AgentCollector(_snapshot))
    assert not [n for n in telemetry_only if n.startswith("dcenergy_plan")]


def test_dcgm_compat_names_units_and_labels() -> None:
    assert not [n for n in _families(AgentCollector(_snapshot)) if n.startswith("DCGM_")]
    fams = _families(AgentCollector(_snapshot, dcgm_compat=True))
    labels, watts = _samples(fams, "DCGM_FI_DEV_POWER_USAGE", gpu="0")[0]
    assert watts == 612.5
    assert labels == {
        "gpu": "0",
        "UUID": UUID0,
        "pci_bus_id": "00000000:18:00.0",
        "device": "nvidia0",
        "modelName": MODEL,
        "Hostname": HOSTNAME,
        "hpc_job": "4242",
    }
    assert set(DCGM_LABELS) <= set(labels)
    assert _value(fams, "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION", gpu="0") == 123456750.0  # mJ
    assert fams["DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION"].type == "gauge"
    assert _value(fams, "DCGM_FI_DEV_GPU_TEMP", gpu="0") == 71.0
    assert _value(fams, "DCGM_FI_DEV_MEMORY_TEMP", gpu="0") == 80.5
    assert _value(fams, "DCGM_FI_DEV_SM_CLOCK", gpu="0") == 1755.0  # MHz
    assert _value(fams, "DCGM_FI_DEV_MEM_CLOCK", gpu="0") == 2619.0
    assert _value(fams, "DCGM_FI_DEV_GPU_UTIL", gpu="0") == 97.0  # %
    assert _value(fams, "DCGM_FI_DEV_FB_USED", gpu="0") == 60 * 1024 + 5  # MiB
    assert _value(fams, "DCGM_FI_DEV_FB_FREE", gpu="0") == 20 * 1024 - 6
    assert _value(fams, "DCGM_FI_DEV_POWER_MGMT_LIMIT", gpu="0") == 650.0
    # an idle GPU has no job: the label is empty, which Prometheus stores as absent
    idle, _ = _samples(fams, "DCGM_FI_DEV_POWER_USAGE", gpu="1")[0]
    assert idle["hpc_job"] == ""
    assert not _samples(fams, "DCGM_FI_DEV_POWER_USAGE", gpu="2")  # lost


def test_dcgm_compat_pod_labels_from_kubernetes() -> None:
    pods = {UUID0: PodRef("ml", "train-0", "trainer")}
    snap = _snapshot(pods=pods)
    fams = _families(AgentCollector(lambda: snap, dcgm_compat=True))
    labels, _ = _samples(fams, "DCGM_FI_DEV_POWER_USAGE", gpu="0")[0]
    assert (labels["namespace"], labels["pod"], labels["container"]) == ("ml", "train-0", "trainer")
    assert "hpc_job" not in labels  # a pod is not an HPC job (and no GPU runs a Slurm job here)
    idle, _ = _samples(fams, "DCGM_FI_DEV_POWER_USAGE", gpu="1")[0]
    assert idle["pod"] == ""
    info = _samples(fams, "dcenergy_gpu_job_info", gpu="0")[0][0]
    assert (info["namespace"], info["pod"], info["container"]) == ("ml", "train-0", "trainer")


# --- configuration -----------------------------------------------------------------------------
@pytest.mark.parametrize("listen", ["127.0.0.1:9400", "[::1]:9400", "localhost:0", "0.0.0.0:1"])
def test_metrics_listen_accepts_host_port(listen: str) -> None:
    env = {"DCENERGY_CONFIG": os.devnull, "DCENERGY_AGENT_METRICS_LISTEN": listen}
    cfg = load_config(env=env)
    assert cfg.agent.metrics_listen == listen
    assert parse_listen(listen)[1] == int(listen.rsplit(":", 1)[1])


@pytest.mark.parametrize("listen", ["9400", ":9400", "host:", "host:port", "h:70000", "[::1"])
def test_metrics_listen_refuses_what_is_no_address(listen: str) -> None:
    env = {"DCENERGY_CONFIG": os.devnull, "DCENERGY_AGENT_METRICS_LISTEN": listen}
    with pytest.raises(ConfigError, match=r"agent\.metrics_listen"):
        load_config(env=env)


def test_the_require_switch_is_no_config_override() -> None:
    env = {"DCENERGY_CONFIG": os.devnull, REQUIRE_ENV: "1"}
    assert load_config(env=env).agent.metrics_listen == ""


# --- the HTTP server ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server() -> Iterator[MetricsServer]:
    srv = MetricsServer("127.0.0.1:0", AgentCollector(_snapshot, dcgm_compat=True))
    srv.start()
    yield srv
    srv.close()


def test_get_serves_the_exposition(server: MetricsServer) -> None:
    r = httpx.get(server.url, timeout=10)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    names = {f.name for f in text_string_to_metric_families(r.text)}
    assert {"dcenergy_gpu_power_watts", "DCGM_FI_DEV_POWER_USAGE"} <= names


def test_the_text_format_whatever_accept_says(server: MetricsServer) -> None:
    # Prometheus's own Accept header: OpenMetrics first, the text format as a fallback.
    accept = (
        "application/openmetrics-text;version=1.0.0,application/openmetrics-text;"
        "version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
    )
    r = httpx.get(server.url, headers={"Accept": accept}, timeout=10)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert int(r.headers["content-length"]) == len(r.content)


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"])
def test_anything_but_get_is_405(server: MetricsServer, method: str) -> None:
    r = httpx.request(method, server.url, content=b"x", timeout=10)
    assert r.status_code == 405
    assert r.headers["allow"] == "GET"


def test_other_paths_are_404(server: MetricsServer) -> None:
    for path in ("/", "/metricsx", "/api/v1/write"):
        assert httpx.get(server.url.replace("/metrics", path), timeout=10).status_code == 404


def test_binds_only_the_configured_address(server: MetricsServer) -> None:
    host, port = server.address
    assert host == "127.0.0.1"
    # 127.0.0.2 is this machine too (the whole 127/8 is loopback), but not the bound address.
    with socket.socket() as s, pytest.raises(ConnectionRefusedError):
        s.settimeout(5)
        s.connect(("127.0.0.2", port))


def test_ipv6_listen_address() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    srv = MetricsServer("[::1]:0", AgentCollector(_snapshot))
    try:
        srv.start()
    except OSError as e:
        pytest.skip(f"cannot bind ::1: {e}")
    try:
        assert srv.url.startswith("http://[::1]:")
        assert httpx.get(srv.url, timeout=10).status_code == 200
    finally:
        srv.close()


# --- the daemon --------------------------------------------------------------------------------
def _config(tmp_path: Path, **agent: object) -> Config:
    values: dict[str, object] = {
        "host": "testnode",
        "state_dir": tmp_path / "state",
        "runtime_dir": tmp_path / "run",
        "simulate": 2,
        "backend": "simulated",
        "interval_s": 0.1,
        "ship_interval_s": 0.3,
        **agent,
    }
    return Config(agent=AgentConfig(**values), store=StoreConfig())  # type: ignore[arg-type]


def _listening() -> set[tuple[str, int]]:
    conns = psutil.Process().net_connections(kind="inet")
    return {(c.laddr.ip, c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN}


def _wait_cycles(daemon: AgentDaemon, n: int) -> None:
    deadline = time.monotonic() + SAFETY_S
    while daemon.sampler is None or daemon.sampler.samples_total < n:
        assert time.monotonic() < deadline, "the daemon did not sample"
        time.sleep(0.02)


def test_no_port_when_unset(tmp_path: Path) -> None:
    before = _listening()
    daemon = AgentDaemon(_config(tmp_path))
    daemon.start()
    try:
        _wait_cycles(daemon, 2)
        assert daemon.metrics_url is None
        assert _listening() <= before
    finally:
        daemon.shutdown()


def test_daemon_serves_its_last_sample_without_touching_the_gpus_from_http(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = SimulatedBackend(2, seed=3, host="testnode")
    gpu_threads: set[int] = set()
    backend.open()
    for gpu in backend.gpus():
        for name in ("sample", "power_limit_w", "power_limits", "compute_pids"):
            original = getattr(gpu, name)

            def spy(*a: Any, _orig: Any = original, **kw: Any) -> Any:
                gpu_threads.add(threading.get_ident())
                return _orig(*a, **kw)

            monkeypatch.setattr(gpu, name, spy)
    scrape_threads: set[int] = set()
    real_snapshot = metrics_mod.daemon_snapshot

    def snapshot(d: AgentDaemon) -> Snapshot:
        scrape_threads.add(threading.get_ident())
        return real_snapshot(d)

    monkeypatch.setattr(metrics_mod, "daemon_snapshot", snapshot)
    cfg = _config(tmp_path, metrics_listen="127.0.0.1:0", interval_s=0.05)
    daemon = AgentDaemon(cfg, backend=backend)
    daemon.start()
    try:
        assert daemon.metrics_url is not None
        _wait_cycles(daemon, 3)
        for _ in range(5):
            text = httpx.get(daemon.metrics_url, timeout=10).text
        fams = {f.name: f for f in text_string_to_metric_families(text)}
        assert "DCGM_FI_DEV_POWER_USAGE" not in fams  # compat off by default
        served = {s.labels["gpu"]: s.value for s in fams["dcenergy_gpu_power_watts"].samples}
        assert set(served) == {"0", "1"}
        assert _value(fams, "dcenergy_agent_samples_total") >= 3
        assert scrape_threads and not scrape_threads & gpu_threads
    finally:
        daemon.shutdown()
    backend.close()


def test_a_port_in_use_is_counted_and_sampling_goes_on(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        daemon = AgentDaemon(_config(tmp_path, metrics_listen=f"127.0.0.1:{port}"))
        daemon.start()
        try:
            _wait_cycles(daemon, 2)
            assert daemon.metrics_url is None
            assert daemon.errors_total == 1
            assert "serving /metrics" in daemon.last_error
        finally:
            daemon.shutdown()


def test_agent_run_logs_the_address_once(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DCENERGY_")}
    (tmp_path / "c.toml").write_text("")
    env.update(
        DCENERGY_CONFIG=str(tmp_path / "c.toml"),
        DCENERGY_AGENT_STATE_DIR=str(tmp_path / "state"),
        DCENERGY_AGENT_RUNTIME_DIR=str(tmp_path / "run"),
        DCENERGY_AGENT_METRICS_LISTEN="127.0.0.1:0",
    )
    code = "import sys; from dcenergy.cli import main; sys.exit(main())"
    proc = subprocess.run(
        [sys.executable, "-c", code, "agent", "run", "--simulate", "2", "--duration", "1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=SAFETY_S,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "serving Prometheus metrics" in line]
    assert len(lines) == 1, proc.stderr
    assert re.search(r"on http://127\.0\.0\.1:\d+/metrics$", lines[0]), lines[0]


# --- a real Prometheus -------------------------------------------------------------------------
@pytest.fixture
def prometheus_binary() -> str:
    binary = prometheus_path()
    if binary is None:
        msg = "prometheus not installed (apt-get install prometheus)"
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{msg}, and {REQUIRE_ENV}=1")
        pytest.skip(msg)
    return binary


def _slurm_proc(root: Path, pid: int, job: str) -> None:
    (root / str(pid)).mkdir(parents=True)
    (root / str(pid) / "cgroup").write_text(
        f"0::/system.slice/slurmstepd.scope/job_{job}/step_0/task_0\n"
    )


@pytest.mark.slow
def test_real_prometheus_scrapes_the_agent(tmp_path: Path, prometheus_binary: str) -> None:
    proc_root = tmp_path / "proc"
    _slurm_proc(proc_root, 4321, "777")
    backend = SimulatedBackend(2, seed=5, host="testnode")
    backend.open()
    backend.gpus()[0].set_workload(0.9, pids=[4321])
    sampled: list[tuple[int, dict[str, float]]] = []  # (time, gpu index → power)
    holder: dict[str, AgentDaemon] = {}

    def on_spooled(time_ns: int, _n: int) -> None:
        powers = {
            p.tags["gpu"]: float(p.fields["power_w"])
            for p in holder["d"].last_points
            if p.measurement == "gpu" and "power_w" in p.fields
        }
        sampled.append((time_ns, powers))

    port = free_port()
    cfg = _config(
        tmp_path,
        metrics_listen=f"127.0.0.1:{port}",
        metrics_dcgm_compat=True,
        interval_s=0.25,
    )
    daemon = AgentDaemon(cfg, backend=backend, proc_root=proc_root, on_spooled=on_spooled)
    holder["d"] = daemon
    prom = PrometheusServer(prometheus_binary, [f"127.0.0.1:{port}"], root=tmp_path / "prom")
    daemon.start()
    try:
        try:
            prom.start()
        except RuntimeError as e:
            if os.environ.get(REQUIRE_ENV) == "1":
                pytest.fail(str(e))
            pytest.skip(str(e))
        up = prom.wait_for('up{job="dcenergy"}', lambda r: bool(r) and r[0]["value"][1] == "1")
        assert up[0]["metric"]["instance"] == f"127.0.0.1:{port}"
        # two scrapes at least, so that rate() has two points
        prom.wait_for(
            'count_over_time(dcenergy_gpu_power_watts{gpu="0"}[1m])',
            lambda r: bool(r) and float(r[0]["value"][1]) >= 3,
        )

        # The power Prometheus holds for GPU 0 is one the agent sampled (float-exact).
        result = prom.query('dcenergy_gpu_power_watts{gpu="0", host="testnode"}')
        assert len(result) == 1
        metric = result[0]["metric"]
        assert metric["uuid"] == backend.gpus()[0].identity.uuid
        assert metric["model"] == backend.gpus()[0].identity.name
        stored = float(result[0]["value"][1])
        agent_values = [powers["0"] for _, powers in sampled if "0" in powers]
        assert any(math.isclose(stored, v, rel_tol=1e-12) for v in agent_values), (
            stored,
            agent_values[-5:],
        )

        # The DCGM series of the same scrape carry the same reading under dcgm-exporter's labels.
        dcgm = prom.query('DCGM_FI_DEV_POWER_USAGE{gpu="0"}')
        assert len(dcgm) == 1
        labels = dcgm[0]["metric"]
        assert labels["UUID"] == backend.gpus()[0].identity.uuid
        assert labels["device"] == "nvidia0"
        assert labels["modelName"] == backend.gpus()[0].identity.name
        assert labels["Hostname"] == "testnode"
        assert labels["hpc_job"] == "777"
        idle = prom.query('DCGM_FI_DEV_POWER_USAGE{gpu="1"}')[0]["metric"]
        assert "hpc_job" not in idle  # an empty label is no label
        diff = prom.query(
            'DCGM_FI_DEV_POWER_USAGE{gpu="0"} - on(gpu) dcenergy_gpu_power_watts{gpu="0"}'
        )
        assert float(diff[0]["value"][1]) == 0.0
        mj = prom.query(
            'DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION{gpu="0"} / 1000'
            ' - on(gpu) dcenergy_gpu_energy_joules_total{gpu="0"}'
        )
        assert abs(float(mj[0]["value"][1])) < 1e-6

        # The job is joined through the info metric, as an operator would in a dashboard.
        joined = prom.query(
            "dcenergy_gpu_power_watts"
            " * on(host, gpu, uuid) group_left(job_id) dcenergy_gpu_job_info"
        )
        assert [(r["metric"]["gpu"], r["metric"]["job_id"]) for r in joined] == [("0", "777")]
        rate = prom.query('rate(dcenergy_gpu_energy_joules_total{gpu="0"}[1m])')
        assert float(rate[0]["value"][1]) > 0
        samples = prom.query('dcenergy_agent_samples_total{host="testnode"}')
        assert float(samples[0]["value"][1]) >= 3
    finally:
        prom.close()
        daemon.shutdown()
        backend.close()
