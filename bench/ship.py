"""Shipping throughput and sample→queryable latency against a real influxd.

    python bench/ship.py --points 200000

Starts its own influxd (tests/influx_server.py), generates realistic GPU points
and measures, in the same run and against the same server:

* bare:      the same lines, pre-encoded, gzip'd and POSTed in batches (the ceiling);
* ship:      spool (already filled) → Shipper → InfluxStore, until the spool is empty;
* put+ship:  spool.put (encode + SQLite commit) then ship, i.e. the agent's whole path;
* latency:   one point put into the spool while a thread ships every ``--flush-s``;
             time until ``/query`` sees it (``--samples`` times, at random phases).

Targets: ship/bare >= 0.8; latency p99 <= flush interval + 1 s.
"""

from __future__ import annotations

import argparse
import gzip
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.shipper import Shipper
from agent.spool import Spool
from dcenergy.lineprotocol import encode
from dcenergy.schema import GPU, FieldValue, Point, point
from dcenergy.store import InfluxStore
from tests.influx_server import InfluxServer, influxd_path

GPUS_PER_HOST = 8
BATCH = 5000
T0 = 1_700_000_000_000_000_000


def gpu_points(n: int, seed: int = 1) -> list[Point]:
    """n GPU samples: 8 GPUs per host, 1 s apart, every numeric GPU field set."""
    rnd = random.Random(seed)
    hosts = max(1, n // (GPUS_PER_HOST * 100))  # about 100 samples per series
    out: list[Point] = []
    i = 0
    while len(out) < n:
        t = T0 + (i // (hosts * GPUS_PER_HOST)) * 1_000_000_000
        h, g = divmod(i % (hosts * GPUS_PER_HOST), GPUS_PER_HOST)
        tags = {
            "host": f"node-{h:04d}",
            "gpu": str(g),
            "gpu_uuid": f"GPU-{h:04d}{g:02d}-5e1f-4c3a-9b2d-00000000{g:04d}",
            "model": "NVIDIA H100 80GB HBM3",
        }
        power = rnd.uniform(80, 700)
        fields: dict[str, FieldValue] = {
            "power_w": power,
            "energy_j": 1e9 + i * 500.0,
            "energy_resets": 0,
            "power_limit_w": 700.0,
            "power_limit_default_w": 700.0,
            "power_limit_min_w": 200.0,
            "power_limit_max_w": 700.0,
            "power_limit_enforced_w": 700.0,
            "temp_c": rnd.uniform(30, 85),
            "mem_temp_c": rnd.uniform(30, 90),
            "mem_used_bytes": rnd.randrange(0, 80 * 2**30),
            "mem_total_bytes": 80 * 2**30,
            "util_gpu_pct": rnd.uniform(0, 100),
            "util_mem_pct": rnd.uniform(0, 100),
            "sm_clock_mhz": rnd.choice([1410.0, 1755.0, 1980.0]),
            "mem_clock_mhz": 2619.0,
            "throttle_reasons": rnd.choice([0, 1, 4]),
            "power_violation_s": i * 0.001,
            "thermal_violation_s": 0.0,
            "pstate": 0,
            "mig_mode": 0,
            "pci_bus_id": f"00000000:{g + 0x18:02X}:00.0",
            "job_id": f"job-{rnd.randrange(1000)}",
        }
        out.append(point(GPU, tags, fields, t))
        i += 1
    return out


def bare_post(url: str, db: str, lines: list[str]) -> float:
    """POST pre-encoded lines, gzip'd, BATCH at a time; return seconds."""
    with httpx.Client(base_url=url, timeout=60) as c:
        start = time.perf_counter()
        for i in range(0, len(lines), BATCH):
            body = gzip.compress("\n".join(lines[i : i + BATCH]).encode(), compresslevel=1)
            r = c.post(
                "/write",
                params={"db": db, "precision": "ns"},
                content=body,
                headers={"Content-Encoding": "gzip"},
            )
            r.raise_for_status()
        return time.perf_counter() - start


def count(server: InfluxServer, db: str) -> int:
    res: Any = server.query('SELECT count("power_w") FROM "gpu"', db=db)
    series = res["results"][0].get("series")
    return int(series[0]["values"][0][1]) if series else 0


def put_all(spool: Spool, points: list[Point]) -> None:
    for i in range(0, len(points), 1000):
        spool.put(points[i : i + 1000])


def ship_all(sh: Shipper) -> None:
    while sh.ship_once().depth:
        pass


def latency(server: InfluxServer, tmp: Path, samples: int, flush_s: float) -> list[float]:
    """Seconds from spool.put to visible in /query, with a shipper thread every flush_s."""
    db = "lat"
    server.create_database(db)
    spool = Spool(tmp / "lat.sqlite", max_bytes=10**9)
    store = InfluxStore(server.url, db)
    sh = Shipper(spool, store)
    stop = threading.Event()

    def flusher() -> None:
        next_t = time.monotonic()
        while not stop.is_set():
            sh.ship_once()
            next_t += flush_s
            stop.wait(max(0.0, next_t - time.monotonic()))

    th = threading.Thread(target=flusher, daemon=True)
    th.start()
    out: list[float] = []
    rnd = random.Random(7)
    with httpx.Client(base_url=server.url, timeout=10) as c:
        for k in range(samples):
            time.sleep(rnd.uniform(0, flush_s))  # land at a random phase of the flush loop
            t_ns = time.time_ns()
            p = Point("probe", {"host": "bench"}, {"k": k}, t_ns)
            start = time.perf_counter()
            spool.put([p])
            q = f'SELECT "k" FROM "probe" WHERE time = {t_ns}'
            while True:
                r = c.get("/query", params={"db": db, "q": q, "epoch": "ns"}).json()
                if r["results"][0].get("series"):
                    break
                time.sleep(0.005)
            out.append(time.perf_counter() - start)
    stop.set()
    th.join()
    store.close()
    spool.close()
    return out


def p99(xs: list[float]) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(0.99 * (len(s) - 1)))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--points", type=int, default=200_000)
    ap.add_argument("--samples", type=int, default=50, help="latency samples")
    ap.add_argument("--rounds", type=int, default=10, help="interleaved rounds")
    ap.add_argument("--flush-s", type=float, default=1.0, help="shipper period for latency")
    args = ap.parse_args()
    binary = influxd_path()
    if binary is None:
        print("influxd not installed", file=sys.stderr)
        return 2

    points = gpu_points(args.points)
    t = time.perf_counter()
    lines = [encode(p) for p in points]
    encode_s = time.perf_counter() - t
    avg_len = sum(map(len, lines)) / len(lines)

    with InfluxServer(binary) as server, tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        for db in ("warm", "bare", "ship", "e2e"):
            server.create_database(db)
        bare_post(server.url, "warm", lines[: min(len(lines), 20_000)])  # warm the server up

        # The paths run interleaved, in rounds with a rotating order, so the server's
        # background work (TSM compaction, WAL flushes) and other load on the machine
        # fall on all of them alike rather than on whichever ran second.
        ship_spool = Spool(tmp / "ship.sqlite", max_bytes=10**10)
        ship_store = InfluxStore(server.url, "ship")
        sh = Shipper(ship_spool, ship_store, batch_lines=BATCH)
        e2e_spool = Spool(tmp / "e2e.sqlite", max_bytes=10**10)
        e2e_store = InfluxStore(server.url, "e2e")
        sh2 = Shipper(e2e_spool, e2e_store, batch_lines=BATCH)
        spent = {"bare": 0.0, "ship": 0.0, "e2e": 0.0, "prefill": 0.0}
        step = -(-len(points) // args.rounds)
        for r, i in enumerate(range(0, len(points), step)):
            chunk_pts, chunk_lines = points[i : i + step], lines[i : i + step]
            t = time.perf_counter()
            put_all(ship_spool, chunk_pts)  # not timed as shipping: the spool fills first
            spent["prefill"] += time.perf_counter() - t

            def run_bare(lines_: list[str] = chunk_lines) -> None:
                spent["bare"] += bare_post(server.url, "bare", lines_)

            def run_ship() -> None:
                t = time.perf_counter()
                ship_all(sh)
                spent["ship"] += time.perf_counter() - t

            def run_e2e(pts: list[Point] = chunk_pts) -> None:
                t = time.perf_counter()
                put_all(e2e_spool, pts)
                ship_all(sh2)
                spent["e2e"] += time.perf_counter() - t

            order = [run_bare, run_ship, run_e2e]
            for fn in order[r % 3 :] + order[: r % 3]:
                fn()
        for c in (ship_store, ship_spool, e2e_store, e2e_spool):
            c.close()
        bare_s, ship_s, e2e_s, prefill_s = (spent[k] for k in ("bare", "ship", "e2e", "prefill"))

        counts = {db: count(server, db) for db in ("bare", "ship", "e2e")}
        lat = latency(server, tmp, args.samples, args.flush_s)

    n = len(points)
    rate = {k: n / v for k, v in (("bare", bare_s), ("ship", ship_s), ("e2e", e2e_s))}
    print(f"points: {n} GPU points, {len(GPU.fields)} fields max, {avg_len:.0f} B/line")
    print(f"encode alone: {n / encode_s:,.0f} points/s; spool.put alone: {n / prefill_s:,.0f}/s")
    print()
    print(f"{'path':<28}{'seconds':>10}{'points/s':>14}{'ratio':>8}{'stored':>10}")
    print(
        f"{'bare gzip POST (ceiling)':<28}{bare_s:>10.2f}{rate['bare']:>14,.0f}"
        f"{1.0:>8.2f}{counts['bare']:>10}"
    )
    print(
        f"{'spool -> Shipper -> Influx':<28}{ship_s:>10.2f}{rate['ship']:>14,.0f}"
        f"{rate['ship'] / rate['bare']:>8.2f}{counts['ship']:>10}"
    )
    print(
        f"{'put + ship (whole path)':<28}{e2e_s:>10.2f}{rate['e2e']:>14,.0f}"
        f"{rate['e2e'] / rate['bare']:>8.2f}{counts['e2e']:>10}"
    )
    print()
    print(
        f"sample -> queryable, flush every {args.flush_s:g} s, {len(lat)} samples: "
        f"p50 {statistics.median(lat):.3f} s, p99 {p99(lat):.3f} s, max {max(lat):.3f} s "
        f"(target p99 <= {args.flush_s + 1:g} s)"
    )
    ok = rate["ship"] / rate["bare"] >= 0.8 and p99(lat) <= args.flush_s + 1
    print("targets:", "met" if ok else "NOT met")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
