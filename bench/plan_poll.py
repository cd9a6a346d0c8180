"""What the agents' plan poll puts on InfluxDB at fleet size, measured on a real influxd.

    python bench/plan_poll.py --hosts 1250 --history 288 --seconds 10

Fills a real influxd (tests/influx_server.py) with ``--history`` signed plan
parts per host (288 = a day of plans every 5 minutes, 8 setpoints each),
then polls it the way every agent does (``fetch_latest_part``: one
``ORDER BY time DESC LIMIT 1`` query for its own host) from ``--threads``
threads for ``--seconds``, and reads influxd's own CPU time from /proc.

It prints queries per second, influxd CPU-ms per poll, the rate that
``--agents`` agents put on the store at ``--interval`` s between polls, and
the influxd cores that rate costs; the same for the old poll (every part of
the last 24 h, raw) as the baseline, measured in the same run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from dcenergy import schema
from dcenergy.plan import PlanPart, Setpoint, sign_part
from dcenergy.publish import DEFAULT_LOOKBACK_S, fetch_latest_part, part_point
from dcenergy.store import InfluxStore
from tests.influx_server import InfluxServer, influxd_path

S = 1_000_000_000
PLAN_EVERY_S = 300


def _cpu_s(pid: int) -> float:
    """influxd's user + system CPU seconds so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def fill(store: InfluxStore, hosts: int, history: int, now_ns: int) -> None:
    key = Ed25519PrivateKey.generate()
    t0 = time.perf_counter()
    batch: list[schema.Point] = []
    for i in range(history):
        created = now_ns - (history - i) * PLAN_EVERY_S * S
        for h in range(hosts):
            host = f"node-{h:05d}"
            sps = tuple(Setpoint(f"GPU-{h:05d}-{g}", 500.0 + g, None) for g in range(8))
            part = PlanPart(host, f"plan-{i}", created, created, created + 900 * S, "", sps)
            batch.append(part_point(sign_part(part, key), created))
            if len(batch) >= 5000:
                store.write(batch)
                batch.clear()
    store.write(batch)
    n = hosts * history
    print(f"filled {n:,} parts ({hosts:,} hosts × {history}) in {time.perf_counter() - t0:.1f} s")


def old_poll(store: InfluxStore, host: str, now_ns: int) -> str | None:
    """The poll before this change: the field types, then every part of the last 24 h
    (raw), the newest picked in Python: two queries."""
    store._query(f"SHOW FIELD KEYS FROM {schema.PLAN_PART.name}")
    points = store.read(
        schema.PLAN_PART.name,
        start_ns=now_ns - int(DEFAULT_LOOKBACK_S * S),
        tags={schema.TAG_HOST: host},
    )
    best = max(points, key=lambda p: p.time_ns, default=None)
    return None if best is None else str(best.fields["payload"])


def measure(
    name: str, poll: object, url: str, db: str, pid: int, args: argparse.Namespace, now_ns: int
) -> tuple[float, float]:
    """(queries/s, influxd CPU-ms per poll) over ``args.seconds`` from ``args.threads`` threads."""
    done = [0] * args.threads
    stop = threading.Event()

    def worker(k: int) -> None:
        store = InfluxStore(url, db)
        i = k
        while not stop.is_set():
            payload = poll(store, f"node-{i % args.hosts:05d}", now_ns)  # type: ignore[operator]
            assert payload is not None
            done[k] += 1
            i += args.threads
        store.close()

    cpu0, t0 = _cpu_s(pid), time.perf_counter()
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(args.threads)]
    for t in threads:
        t.start()
    time.sleep(args.seconds)
    stop.set()
    for t in threads:
        t.join()
    wall, cpu = time.perf_counter() - t0, _cpu_s(pid) - cpu0
    n = sum(done)
    qps, ms = n / wall, 1000 * cpu / max(n, 1)
    print(f"  {name:<8} {n:>7,} polls  {qps:>8.0f} polls/s  influxd {ms:6.3f} CPU-ms/poll")
    return qps, ms


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--hosts", type=int, default=1250, help="hosts in the store (8 GPUs each)")
    ap.add_argument("--history", type=int, default=288, help="parts per host (288 = one day)")
    ap.add_argument("--seconds", type=float, default=10.0, help="polling time per variant")
    ap.add_argument("--threads", type=int, default=4, help="concurrent pollers")
    ap.add_argument("--agents", type=int, default=10_000, help="agents to extrapolate to")
    ap.add_argument("--interval", type=float, default=10.0, help="reconciler.interval_s")
    ap.add_argument("--repeats", type=int, default=3, help="measurements per variant (median)")
    args = ap.parse_args()
    binary = influxd_path()
    if binary is None:
        print("influxd not installed (apt-get install influxdb)")
        return 1
    now_ns = time.time_ns()
    with InfluxServer(binary) as server:
        server.create_database("bench")
        assert server._proc is not None
        pid = server._proc.pid
        fill(InfluxStore(server.url, "bench", timeout_s=60), args.hosts, args.history, now_ns)
        print(f"polling for {args.seconds:g} s × {args.repeats} from {args.threads} threads:")
        figures = {}
        for name, poll in (("newest", fetch_latest_part), ("old", old_poll)):
            runs = [
                measure(name, poll, server.url, "bench", pid, args, now_ns)
                for _ in range(args.repeats)
            ]
            figures[name] = (
                statistics.median(r[0] for r in runs),
                statistics.median(r[1] for r in runs),
            )
    rate = args.agents / args.interval
    print(f"\n{args.agents:,} agents polling every {args.interval:g} s: {rate:,.0f} queries/s")
    for name, (qps, ms) in figures.items():
        cores = rate * ms / 1000
        print(
            f"  {name:<8} median {qps:8.0f} polls/s on this box, {ms:6.3f} influxd CPU-ms/poll "
            f"-> {cores:5.2f} influxd cores for the fleet"
        )
    ratio = figures["old"][1] / max(figures["newest"][1], 1e-9)
    print(f"  CPU per poll, old/newest: {ratio:.1f}×")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
