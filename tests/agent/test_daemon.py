"""The daemon end to end: simulated GPUs → spool → store, signals, crash safety, sd_notify.

No wall-clock assertions: runs are bounded by counting cycles (``on_spooled``)
or by what a child process logs, with generous time-outs only as a safety net.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from agent.daemon import AgentDaemon, PeriodicJob
from agent.devices.simulated import SimulatedBackend
from agent.notify import Notifier
from agent.spool import Spool
from dcenergy.config import AgentConfig, Config, StoreConfig
from dcenergy.errors import DeviceError
from dcenergy.schema import AUDIT, HOST, point
from dcenergy.store.embedded import EmbeddedStore
from tests.influx_server import InfluxServer

SAFETY_S = 60.0  # only ever reached when something is broken
SPOOLED = re.compile(r"spooled (\d+) points at (\d+)")


def _config(tmp_path: Path, **agent: object) -> Config:
    values: dict[str, object] = {
        "host": "testnode",
        "state_dir": tmp_path / "state",
        "runtime_dir": tmp_path / "run",
        "simulate": 2,
        "backend": "simulated",
        "interval_s": 0.05,
        "ship_interval_s": 0.2,
        **agent,
    }
    return Config(agent=AgentConfig(**values), store=StoreConfig())  # type: ignore[arg-type]


def _stop_after(daemon: AgentDaemon, cycles: int) -> list[tuple[int, int]]:
    """Make the daemon stop itself after ``cycles`` committed sampling cycles."""
    seen: list[tuple[int, int]] = []

    def on_spooled(time_ns: int, n: int) -> None:
        seen.append((time_ns, n))
        if len(seen) >= cycles:
            daemon.stop()

    daemon._on_spooled = on_spooled
    return seen


def _points_by_time(store: EmbeddedStore, measurements: tuple[str, ...]) -> Counter[int]:
    times: Counter[int] = Counter()
    for m in measurements:
        for p in store.read(m, start_ns=0):
            times[p.time_ns] += 1
    return times


# --- in-process ------------------------------------------------------------------------


def test_run_puts_points_in_the_embedded_store(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    daemon = AgentDaemon(cfg)
    committed = _stop_after(daemon, 6)
    assert daemon.run(duration_s=SAFETY_S) == 0
    assert len(committed) >= 6

    spool = Spool(cfg.state_dir / "spool.sqlite", 1 << 20)
    assert spool.depth() == 0  # the shutdown flush shipped everything
    spool.close()
    store = EmbeddedStore(cfg.embedded_store_path)
    try:
        by_time = _points_by_time(store, ("gpu", "gpu_health", "host", "job"))
        for time_ns, n in committed:
            assert by_time[time_ns] == n  # every committed point, once
        gpus = store.read("gpu", start_ns=0)
        assert {p.tags["gpu"] for p in gpus} == {"0", "1"}
        assert all(p.tags["host"] == "testnode" for p in gpus)
        agents = store.read("agent", start_ns=0)
        assert agents, "a self-stats point per ship cycle and one at shutdown"
        last = agents[-1].fields
        assert last["samples_total"] == len(committed)
        assert int(last["points_spooled_total"]) >= sum(n for _, n in committed)
    finally:
        store.close()


def test_backend_and_store_given_by_the_caller_stay_open(tmp_path: Path) -> None:
    backend = SimulatedBackend(3, host="testnode")
    store = EmbeddedStore(tmp_path / "given.sqlite")
    daemon = AgentDaemon(_config(tmp_path), backend=backend, store=store)
    _stop_after(daemon, 3)
    daemon.run(duration_s=SAFETY_S)
    assert len(backend.devices()) == 3  # still open: the caller's to close
    assert {p.tags["gpu"] for p in store.read("gpu", start_ns=0)} == {"0", "1", "2"}
    store.close()
    backend.close()


def test_extra_jobs_run_and_their_errors_are_counted(tmp_path: Path) -> None:
    daemon = AgentDaemon(_config(tmp_path))
    calls: list[str] = []
    done = threading.Event()

    def good() -> None:
        calls.append("good")
        if calls.count("good") >= 2 and "bad" in calls:
            done.set()

    def bad() -> None:
        calls.append("bad")
        raise RuntimeError("reconciler exploded")

    daemon.add_job(good, 0.05, "good")
    daemon.add_job(bad, 0.05, "bad")
    runner = threading.Thread(target=daemon.run, kwargs={"duration_s": SAFETY_S})
    runner.start()
    assert done.wait(SAFETY_S)
    daemon.stop()
    runner.join(SAFETY_S)
    assert not runner.is_alive()
    assert daemon.errors_total >= 1
    assert "reconciler exploded" in daemon.last_error
    assert PeriodicJob(good, 0.05, "good") in daemon._jobs


def test_start_and_stop_hooks(tmp_path: Path) -> None:
    """The reconciler's lifecycle: act with the backend open, spool at stop, get flushed."""
    cfg = _config(tmp_path)
    daemon = AgentDaemon(cfg)
    seen: list[str] = []

    def on_start(d: AgentDaemon) -> None:
        seen.append(f"start {len(d.backend.devices())} GPUs")

    def on_stop(d: AgentDaemon) -> None:
        seen.append("stop")
        audit = point(AUDIT, {"host": d.host, "gpu_uuid": "GPU-x", "action": "restored"},
                      {"reason": "shutdown"}, 1_000)  # fmt: skip
        d.spool.put([audit])

    def broken(d: AgentDaemon) -> None:
        raise RuntimeError("hook exploded")

    daemon.add_start_hook(on_start)
    daemon.add_start_hook(broken)
    daemon.add_stop_hook(on_stop)
    _stop_after(daemon, 2)
    assert daemon.run(duration_s=SAFETY_S) == 0
    assert seen == ["start 2 GPUs", "stop"]
    assert "hook exploded" in daemon.last_error
    store = EmbeddedStore(cfg.embedded_store_path)
    assert [p.fields for p in store.read("audit", start_ns=0)] == [{"reason": "shutdown"}]
    store.close()


def test_embedded_store_retention(tmp_path: Path) -> None:
    now_ns = 1_900_000_000 * 10**9
    quiet = {"interval_s": 3600.0, "ship_interval_s": 3600.0}  # no cycle runs during the test
    daemon = AgentDaemon(_config(tmp_path, retention_days=1.0, **quiet), clock=lambda: now_ns)
    daemon.start()
    try:
        assert any(j.name == "retention" for j in daemon._jobs)
        store = daemon.store
        assert isinstance(store, EmbeddedStore)
        old = point(HOST, {"host": "testnode"}, {"load1": 1.0}, now_ns - 2 * 86400 * 10**9)
        new = point(HOST, {"host": "testnode"}, {"load1": 2.0}, now_ns - 3600 * 10**9)
        store.write([old, new])
        daemon._prune()
        assert [p.time_ns for p in store.read("host", start_ns=0)] == [new.time_ns]
    finally:
        daemon.shutdown()


def test_interval_trigger_does_not_drift() -> None:
    """What the daemon's schedule relies on: next = previous *scheduled* time + interval."""
    from apscheduler.triggers.interval import IntervalTrigger

    start = datetime(2030, 1, 1, tzinfo=UTC)
    trigger = IntervalTrigger(seconds=1, start_date=start, timezone="UTC")
    late_now = start + timedelta(seconds=0.9)  # the previous run finished 0.9 s late
    nxt = trigger.get_next_fire_time(start, late_now)
    assert nxt == start + timedelta(seconds=1)


def test_nvml_failure_raises_a_device_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import agent.daemon as daemon_mod

    def no_driver(config: Config) -> SimulatedBackend:
        raise DeviceError("NVML could not be initialised")

    monkeypatch.setattr(daemon_mod, "open_agent_backend", no_driver)
    daemon = AgentDaemon(_config(tmp_path, simulate=0, backend="nvml"))
    with pytest.raises(DeviceError):
        daemon.run(duration_s=SAFETY_S)


# --- sd_notify -------------------------------------------------------------------------


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[str, list[str]]]:
    """A NOTIFY_SOCKET like systemd's; yields its path and the messages it got."""
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(0.05)
    got: list[str] = []
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            try:
                got.append(sock.recv(4096).decode())
            except TimeoutError:
                continue

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    yield path, got
    stop.set()
    t.join()
    sock.close()


def _drain(got: list[str], until: str) -> None:
    deadline = time.monotonic() + SAFETY_S
    while not any(until in m for m in got) and time.monotonic() < deadline:
        time.sleep(0.01)


def test_ready_watchdog_stopping(tmp_path: Path, notify_socket: tuple[str, list[str]]) -> None:
    path, got = notify_socket
    daemon = AgentDaemon(_config(tmp_path), notifier=Notifier({"NOTIFY_SOCKET": path}))
    _stop_after(daemon, 4)
    daemon.run(duration_s=SAFETY_S)
    _drain(got, "STOPPING=1")
    kinds = [m.splitlines()[0] for m in got]
    assert kinds[0] == "READY=1"
    assert kinds[-1] == "STOPPING=1"
    assert kinds.count("WATCHDOG=1") >= 4  # one per healthy cycle
    assert "STATUS=sampling 2 GPUs" in got[0]


def test_no_watchdog_when_no_gpu_can_be_read(
    tmp_path: Path, notify_socket: tuple[str, list[str]]
) -> None:
    path, got = notify_socket
    backend = SimulatedBackend(2, host="testnode")
    backend.open()
    for gpu in backend.gpus():
        gpu.sample = lambda: (_ for _ in ()).throw(DeviceError("wedged"))  # type: ignore[method-assign]
    daemon = AgentDaemon(
        _config(tmp_path), backend=backend, notifier=Notifier({"NOTIFY_SOCKET": path})
    )
    _stop_after(daemon, 4)  # the host point is still spooled every cycle
    daemon.run(duration_s=SAFETY_S)
    _drain(got, "STOPPING=1")
    kinds = [m.splitlines()[0] for m in got]
    assert kinds[0] == "READY=1" and kinds[-1] == "STOPPING=1"
    assert "WATCHDOG=1" not in kinds  # systemd will restart a wedged agent


def test_notifier_abstract_namespace_and_no_socket() -> None:
    name = f"dcenergy-test-{os.getpid()}"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind("\0" + name)
    server.settimeout(SAFETY_S)
    try:
        n = Notifier({"NOTIFY_SOCKET": "@" + name})
        assert n.address == "\0" + name
        assert n.ready("up")
        assert server.recv(4096) == b"READY=1\nSTATUS=up"
    finally:
        server.close()
    quiet = Notifier({})
    assert not quiet.enabled and not quiet.watchdog() and quiet.watchdog_s is None
    assert Notifier({"WATCHDOG_USEC": "30000000"}).watchdog_s == 30.0
    broken = Notifier({"NOTIFY_SOCKET": "/nonexistent/notify.sock"})
    assert not broken.watchdog() and not broken.watchdog()
    assert broken.errors_total == 2


# --- child processes -------------------------------------------------------------------


def _child_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DCENERGY_", "NOTIFY_"))}
    env.update(
        DCENERGY_CONFIG=str(tmp_path / "absent.toml"),
        DCENERGY_AGENT_HOST="childnode",
        DCENERGY_AGENT_STATE_DIR=str(tmp_path / "state"),
        DCENERGY_AGENT_RUNTIME_DIR=str(tmp_path / "run"),
        DCENERGY_AGENT_INTERVAL_S="0.05",
        DCENERGY_AGENT_SHIP_INTERVAL_S="0.3",
    )
    env.update(extra)
    (tmp_path / "absent.toml").write_text("")
    return env


def _agent(env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    code = "import sys; from dcenergy.cli import main; sys.exit(main())"
    return subprocess.Popen(
        [sys.executable, "-c", code, "--debug", "agent", "run", "--simulate", "2", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )


class _Committed:
    """Reads the child's log in a thread; collects 'spooled N points at T' lines."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self._proc = proc
        self.lines: list[str] = []
        self.spooled: list[tuple[int, int]] = []
        self._cv = threading.Condition()
        self._t = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self._t.start()

    def _read(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            with self._cv:
                self.lines.append(line)
                if m := SPOOLED.search(line):
                    self.spooled.append((int(m.group(2)), int(m.group(1))))
                self._cv.notify_all()

    def wait_for(self, n: int) -> None:
        with self._cv:
            assert self._cv.wait_for(lambda: len(self.spooled) >= n, SAFETY_S), "".join(self.lines)

    def join(self) -> None:
        self._t.join(SAFETY_S)
        if self._proc.stdout is not None:
            self._proc.stdout.close()


def test_sigterm_exits_0_and_flushes_the_spool(tmp_path: Path) -> None:
    env = _child_env(tmp_path, DCENERGY_AGENT_SHIP_INTERVAL_S="3600")  # ship only at exit
    proc = _agent(env)
    log = _Committed(proc)
    log.wait_for(5)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(SAFETY_S) == 0, "".join(log.lines)
    log.join()
    assert "Traceback" not in "".join(log.lines)
    spool = Spool(tmp_path / "state" / "spool.sqlite", 1 << 20)
    assert spool.depth() == 0
    spool.close()
    store = EmbeddedStore(tmp_path / "state" / "dcenergy.sqlite")
    by_time = _points_by_time(store, ("gpu", "gpu_health", "host", "job"))
    for time_ns, n in log.spooled:
        assert by_time[time_ns] == n
    assert store.count("agent") >= 1
    store.close()


@pytest.mark.slow
def test_sigkill_loses_nothing_committed_to_the_spool(tmp_path: Path) -> None:
    env = _child_env(tmp_path)
    first = _agent(env)
    log1 = _Committed(first)
    log1.wait_for(12)  # several ship cycles too: some shipped, some waiting
    first.kill()
    first.wait(SAFETY_S)
    log1.join()
    committed = list(log1.spooled)
    assert committed

    second = _agent(env, "--duration", "0")  # start, flush the spool, stop
    log2 = _Committed(second)
    assert second.wait(SAFETY_S) == 0, "".join(log2.lines)
    log2.join()
    store = EmbeddedStore(tmp_path / "state" / "dcenergy.sqlite")
    by_time = _points_by_time(store, ("gpu", "gpu_health", "host", "job"))
    missing = [(t, n, by_time[t]) for t, n in committed if by_time[t] != n]
    assert missing == []
    store.close()


@pytest.mark.influxdb
@pytest.mark.slow
def test_agent_run_ships_to_influxdb(tmp_path: Path, influxd: InfluxServer, influx_db: str) -> None:
    env = _child_env(
        tmp_path,
        DCENERGY_STORE_INFLUX_URL=influxd.url,
        DCENERGY_STORE_DATABASE=influx_db,
        DCENERGY_AGENT_INTERVAL_S="0.2",
        DCENERGY_AGENT_SHIP_INTERVAL_S="1",
    )
    env.pop("DCENERGY_CONFIG")
    code = "import sys; from dcenergy.cli import main; sys.exit(main())"
    proc = subprocess.run(
        [sys.executable, "-c", code, "-c", str(tmp_path / "absent.toml"), "agent", "run",
         "--simulate", "2", "--duration", "3"],
        env=env, capture_output=True, text=True, timeout=SAFETY_S, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    counts = {}
    for m in ("gpu", "host", "agent"):
        res = influxd.query(f'SELECT count("{_a_field(m)}") FROM "{m}"', db=influx_db)
        series = res["results"][0].get("series")  # type: ignore[index]
        counts[m] = series[0]["values"][0][1] if series else 0
    assert counts["gpu"] > 0 and counts["host"] > 0 and counts["agent"] > 0
    assert counts["gpu"] == 2 * counts["host"]  # two GPUs per cycle, all shipped
    res = influxd.query('SHOW TAG VALUES FROM "gpu" WITH KEY = "host"', db=influx_db)
    assert res["results"][0]["series"][0]["values"] == [["host", "childnode"]]  # type: ignore[index]


def _a_field(measurement: str) -> str:
    return {"gpu": "power_w", "host": "mem_total_bytes", "agent": "samples_total"}[measurement]
