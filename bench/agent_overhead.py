"""Agent overhead: CPU time per sampling cycle and resident memory, 8 simulated GPUs.

One cycle is what the daemon's sampling job does: ``Sampler.sample()`` (8 GPU
points, the host point with real psutil, job points) and ``Spool.put()`` (one
SQLite transaction). CPU time is ``time.process_time`` over all cycles, so it
counts what the agent takes from the node, not how long it waited. Targets:
<= 2 ms CPU per cycle, <= 60 MB RSS.

With ``/metrics`` on, each cycle is also scraped once (Prometheus every second
at a 1 s sampling interval): a scraper thread GETs ``/metrics`` from the
agent's real server after every cycle, and the CPU it spends as the client
(its own ``thread_time``) is taken out, so what is left is the agent's share:
rendering the snapshot in the server thread. On and off alternate within each
repeat; the figure is the median per-cycle CPU over repeats and their ratio.

    python bench/agent_overhead.py [--cycles 500] [--gpus 8] [--metrics-repeats 5]

Prints figures; asserts nothing (benchmarks are not tests).
"""

from __future__ import annotations

import argparse
import gc
import itertools
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.devices.simulated import SimulatedBackend
from agent.host import HostCollector
from agent.jobs import JobResolver
from agent.metrics import AgentCollector, MetricsServer, Snapshot
from agent.rapl import RaplReader
from agent.sampler import Sampler
from agent.selfstats import agent_point
from agent.shipper import ShipperCounters
from agent.spool import Spool
from agent.throughput import ThroughputTracker
from dcenergy.report import report_progress

TARGET_CPU_MS = 2.0
TARGET_RSS_MB = 60.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cycles", type=int, default=500)
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--daemon-s", type=float, default=10.0, help="0: skip the daemon RSS run")
    ap.add_argument(
        "--metrics-repeats", type=int, default=5, help="/metrics on vs off repeats (0: skip)"
    )
    args = ap.parse_args()

    proc = psutil.Process()
    rss_start = proc.memory_info().rss
    t = itertools.count(start=1000.0, step=1.0)  # simulated time: one second per cycle
    backend = SimulatedBackend(args.gpus, seed=1, host="bench", clock=lambda: next(t))
    backend.open()

    with tempfile.TemporaryDirectory() as tmp:
        jobs_dir = Path(tmp) / "jobs"
        jobs_dir.mkdir()
        # A busy node: two Slurm jobs on six GPUs, two GPUs idle; one job reports progress.
        proc_root = Path(tmp) / "proc"
        for i, gpu in enumerate(backend.gpus()):
            if i < 6:
                pid, job = 1000 + i, f"{4000 + i // 3}"
                (proc_root / str(pid)).mkdir(parents=True)
                (proc_root / str(pid) / "cgroup").write_text(
                    f"0::/system.slice/slurmstepd.scope/job_{job}/step_0/task_0\n"
                )
                gpu.set_workload(0.9, pids=[pid])
        report_progress("4000", 1e6, "tokens", jobs_dir)
        spool = Spool(Path(tmp) / "spool.sqlite", 256 * 1024 * 1024)
        sampler = Sampler(
            backend,
            "bench",
            HostCollector(rapl=RaplReader()),
            JobResolver(proc_root),
            ThroughputTracker(jobs_dir),
        )
        for _ in range(10):  # warm-up: imports, SQLite statement cache, first psutil calls
            spool.put(sampler.sample())
        gc.collect()

        per_cycle: list[float] = []
        points = 0
        cpu0 = time.process_time()
        for _ in range(args.cycles):
            c0 = time.process_time()
            batch = sampler.sample()
            spool.put(batch)
            per_cycle.append(time.process_time() - c0)
            points += len(batch)
        cpu_total = time.process_time() - cpu0
        spool_bytes = spool.size_bytes()
        spool.close()
    rss = proc.memory_info().rss
    backend.close()

    cpu_ms = cpu_total / args.cycles * 1e3
    rss_mb = rss / 2**20
    print(
        f"agent overhead: {args.gpus} simulated GPUs, {args.cycles} cycles, "
        f"{points / args.cycles:.0f} points/cycle, Python {sys.version.split()[0]}"
    )
    print(
        f"  CPU per cycle (sample + spool.put): mean {cpu_ms:.3f} ms, "
        f"median {statistics.median(per_cycle) * 1e3:.3f} ms, "
        f"p95 {sorted(per_cycle)[int(0.95 * len(per_cycle))] * 1e3:.3f} ms "
        f"(target <= {TARGET_CPU_MS} ms) {'OK' if cpu_ms <= TARGET_CPU_MS else 'OVER'}"
    )
    print(f"  at 1 s interval: {cpu_ms / 10:.3f} % of one core")
    print(
        f"  RSS: {rss_mb:.1f} MB (at start {rss_start / 2**20:.1f} MB; "
        f"target <= {TARGET_RSS_MB} MB) {'OK' if rss_mb <= TARGET_RSS_MB else 'OVER'}"
    )
    print(f"  spool: {spool_bytes / 2**20:.2f} MB for {points} points")
    if args.metrics_repeats > 0:
        _print_metrics_overhead(args.gpus, min(args.cycles, 200), args.metrics_repeats)
    if args.daemon_s > 0:
        daemon_rss_mb = _daemon_rss_mb(args.gpus, args.daemon_s)
        print(
            f"  RSS of a running `dcenergy agent run --simulate {args.gpus}` after "
            f"{args.daemon_s:g} s: {daemon_rss_mb:.1f} MB "
            f"{'OK' if daemon_rss_mb <= TARGET_RSS_MB else 'OVER'}"
        )
    return 0


def _busy_node(tmp: Path, gpus: int) -> tuple[SimulatedBackend, Sampler, Spool]:
    """The main run's node again: 8 simulated GPUs, two Slurm jobs on six, one reporting."""
    t = itertools.count(start=1000.0, step=1.0)
    backend = SimulatedBackend(gpus, seed=1, host="bench", clock=lambda: next(t))
    backend.open()
    jobs_dir, proc_root = tmp / "jobs", tmp / "proc"
    jobs_dir.mkdir()
    for i, gpu in enumerate(backend.gpus()):
        if i < 6:
            pid, job = 1000 + i, f"{4000 + i // 3}"
            (proc_root / str(pid)).mkdir(parents=True)
            (proc_root / str(pid) / "cgroup").write_text(
                f"0::/system.slice/slurmstepd.scope/job_{job}/step_0/task_0\n"
            )
            gpu.set_workload(0.9, pids=[pid])
    report_progress("4000", 1e6, "tokens", jobs_dir)
    sampler = Sampler(
        backend,
        "bench",
        HostCollector(rapl=RaplReader()),
        JobResolver(proc_root),
        ThroughputTracker(jobs_dir),
    )
    return backend, sampler, Spool(tmp / "spool.sqlite", 256 * 1024 * 1024)


class _Scraper(threading.Thread):
    """GETs /metrics each time it is asked; counts the CPU it spends itself, as the client."""

    def __init__(self, port: int) -> None:
        super().__init__(name="scraper", daemon=True)
        self.port = port
        self.go = threading.Event()
        self.done = threading.Event()
        self.stop = False
        self.client_cpu_s = 0.0
        self.bytes = 0

    def run(self) -> None:
        request = (  # what Prometheus sends (it offers OpenMetrics first; the agent answers text)
            f"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n"
            "Accept: application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5\r\n"
            "Accept-Encoding: gzip\r\n\r\n"
        ).encode()
        while True:
            self.go.wait()
            self.go.clear()
            if self.stop:
                return
            c0 = time.thread_time()
            with socket.create_connection(("127.0.0.1", self.port)) as s:
                s.sendall(request)
                n = 0
                while chunk := s.recv(65536):  # the server closes after the answer (HTTP/1.0)
                    n += len(chunk)
            self.bytes = n
            self.client_cpu_s += time.thread_time() - c0
            self.done.set()

    def scrape(self) -> None:
        self.done.clear()
        self.go.set()
        self.done.wait()


def _run_cycles(sampler: Sampler, spool: Spool, cycles: int, scraper: _Scraper | None) -> float:
    """Agent CPU per cycle (s): sample + spool.put (+ one scrape served), client CPU excluded."""
    gc.collect()
    client0 = scraper.client_cpu_s if scraper else 0.0
    cpu0 = time.process_time()
    for _ in range(cycles):
        spool.put(sampler.sample())
        if scraper is not None:
            scraper.scrape()
    cpu = time.process_time() - cpu0
    if scraper is not None:
        cpu -= scraper.client_cpu_s - client0
    return cpu / cycles


def _print_metrics_overhead(gpus: int, cycles: int, repeats: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        backend, sampler, spool = _busy_node(Path(tmp), gpus)
        shipper = ShipperCounters()
        last: list[tuple] = []

        def sample_and_keep() -> list:  # what the daemon does: keep the cycle's points
            points = real_sample()
            last[:] = [tuple(points)]
            return points

        real_sample = sampler.sample
        sampler.sample = sample_and_keep  # type: ignore[method-assign]

        def snapshot() -> Snapshot:
            stats = agent_point(
                host="bench",
                time_ns=time.time_ns(),
                sampler=sampler,
                spool=spool.counters(),
                shipper=shipper,
            )
            return Snapshot(host="bench", points=last[0] if last else (), agent=stats)

        servers = {
            compat: MetricsServer("127.0.0.1:0", AgentCollector(snapshot, dcgm_compat=compat))
            for compat in (False, True)
        }
        scrapers: dict[bool, _Scraper] = {}
        for compat, server in servers.items():
            server.start()
            scrapers[compat] = _Scraper(server.address[1])
            scrapers[compat].start()
        modes: list[tuple[str, _Scraper | None]] = [
            ("off", None),
            ("on", scrapers[False]),
            ("on+dcgm", scrapers[True]),
        ]
        per_mode: dict[str, list[float]] = {name: [] for name, _ in modes}
        try:
            for _ in range(10):  # warm-up of every path
                spool.put(sampler.sample())
                for scraper in scrapers.values():
                    scraper.scrape()
            for r in range(repeats):  # rotate the order: drift hits every mode alike
                for name, scraper in modes[r % 3 :] + modes[: r % 3]:
                    per_mode[name].append(_run_cycles(sampler, spool, cycles, scraper))
        finally:
            for scraper in scrapers.values():
                scraper.stop = True
                scraper.go.set()
                scraper.join(5)
            for server in servers.values():
                server.close()
            spool.close()
            backend.close()
    med = {name: statistics.median(v) * 1e3 for name, v in per_mode.items()}
    off = med["off"]
    print(
        f"  /metrics scraped once per cycle (Prometheus every 1 s at agent.interval_s = 1 s), "
        f"{repeats} repeats x {cycles} cycles, medians of CPU per cycle:"
    )
    print(f"    off      {off:.3f} ms")
    for name, compat in (("on", False), ("on+dcgm", True)):
        runs = per_mode[name]
        print(
            f"    {name:<8} {med[name]:.3f} ms (runs {min(runs) * 1e3:.3f}-{max(runs) * 1e3:.3f}), "
            f"{scrapers[compat].bytes / 1024:.0f} KiB per scrape: ratio on/off "
            f"{med[name] / off:.2f}, a scrape costs {med[name] - off:.3f} ms"
        )


def _daemon_rss_mb(gpus: int, seconds: float) -> float:
    """Peak RSS of the real daemon (scheduler, store, httpx loaded) with an embedded store."""
    with tempfile.TemporaryDirectory() as tmp:
        env = {k: v for k, v in os.environ.items() if not k.startswith("DCENERGY_")}
        env.update(
            DCENERGY_CONFIG=str(Path(tmp) / "none.toml"),
            DCENERGY_AGENT_STATE_DIR=tmp,
            DCENERGY_AGENT_RUNTIME_DIR=str(Path(tmp) / "run"),
            DCENERGY_AGENT_SHIP_INTERVAL_S="1",
        )
        (Path(tmp) / "none.toml").write_text("")
        code = "import sys; from dcenergy.cli import main; sys.exit(main())"
        child = subprocess.Popen(
            [sys.executable, "-c", code, "agent", "run", "--simulate", str(gpus)],
            env=env,
            stderr=subprocess.DEVNULL,
        )
        peak = 0
        deadline = time.monotonic() + seconds
        try:
            p = psutil.Process(child.pid)
            while time.monotonic() < deadline and child.poll() is None:
                peak = max(peak, p.memory_info().rss)
                time.sleep(0.2)
        finally:
            child.terminate()
            child.wait(30)
    return peak / 2**20


if __name__ == "__main__":
    raise SystemExit(main())
