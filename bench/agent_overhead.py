"""Agent overhead: CPU time per sampling cycle and resident memory, 8 simulated GPUs.

One cycle is what the daemon's sampling job does: ``Sampler.sample()`` (8 GPU
points, the host point with real psutil, job points) and ``Spool.put()`` (one
SQLite transaction). CPU time is ``time.process_time`` over all cycles, so it
counts what the agent takes from the node, not how long it waited. Targets:
<= 2 ms CPU per cycle, <= 60 MB RSS.

    python bench/agent_overhead.py [--cycles 500] [--gpus 8]

Prints figures; asserts nothing (benchmarks are not tests).
"""

from __future__ import annotations

import argparse
import gc
import itertools
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.devices.simulated import SimulatedBackend
from agent.host import HostCollector
from agent.jobs import JobResolver
from agent.rapl import RaplReader
from agent.sampler import Sampler
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
    if args.daemon_s > 0:
        daemon_rss_mb = _daemon_rss_mb(args.gpus, args.daemon_s)
        print(
            f"  RSS of a running `dcenergy agent run --simulate {args.gpus}` after "
            f"{args.daemon_s:g} s: {daemon_rss_mb:.1f} MB "
            f"{'OK' if daemon_rss_mb <= TARGET_RSS_MB else 'OVER'}"
        )
    return 0


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
