"""Fault-injection helpers: damaged spool files, a small full filesystem, a store that hangs."""

from __future__ import annotations

import os
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.spool import Spool
from dcenergy.schema import Point

T0 = 1_700_000_000_000_000_000
WAL_HEADER = 32
FRAME_HEADER = 24


def gpu_points(n: int, start: int = 0, pad: int = 200) -> list[Point]:
    """n GPU points, 8 series, 1 ns apart from ``start``; ``pad`` sizes the line like NVML's."""
    return [
        Point(
            "gpu",
            {"host": "n1", "gpu": str(i % 8)},
            {"power_w": float(i), "note": "x" * pad},
            T0 + i,
        )
        for i in range(start, start + n)
    ]


def filled_spool(path: Path, points: int = 5000, shipped: int = 700) -> int:
    """A closed spool of ``points - shipped`` rows (the oldest ``shipped`` acked); returns that."""
    s = Spool(path, max_bytes=10**8)
    for i in range(0, points, 100):
        s.put(gpu_points(100, i))
    s.ack([rid for rid, _ in s.peek(shipped)])
    depth = s.depth()
    s.close()
    return depth


def wal_frames(wal: Path, page_size: int = 4096) -> tuple[list[int], list[int]]:
    """(frames of the WAL's current generation, those that end a transaction)."""
    raw = wal.read_bytes()
    n = (len(raw) - WAL_HEADER) // (FRAME_HEADER + page_size)
    salts = raw[16:24]
    frames, commits = [], []
    for i in range(n):
        off = WAL_HEADER + i * (FRAME_HEADER + page_size)
        if raw[off + 8 : off + 16] != salts:
            continue
        frames.append(i)
        if raw[off + 4 : off + 8] != bytes(4):
            commits.append(i)
    return frames, commits


def garble_wal_frame(wal: Path, frame: int, page_size: int = 4096) -> None:
    off = WAL_HEADER + frame * (FRAME_HEADER + page_size) + FRAME_HEADER + 200
    with wal.open("r+b") as f:
        f.seek(off)
        f.write(os.urandom(64))


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs (root only), unmounted afterwards; skipped where it cannot be mounted."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
        check=False,
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip() or r.returncode}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, check=False)


def fill_disk(folder: Path) -> Path:
    """Write a file in ``folder`` until its filesystem is full; returns the file."""
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError:
        pass
    finally:
        os.close(fd)
    return filler


class HangingStore:
    """An HTTP server on loopback that accepts and, while ``hang`` is set, never answers.

    When ``hang`` is clear it answers every request ``204 No Content`` (an InfluxDB
    that took the write) and counts the lines written.
    """

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        self.hang = threading.Event()
        self.hang.set()
        self.accepted = 0
        self.writes = 0
        self._held: list[socket.socket] = []
        self._closed = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        if self.hang.is_set():
            self._held.append(conn)  # accepted, never read, never answered
            return
        try:
            conn.settimeout(10)
            buf = b""
            while True:
                while b"\r\n\r\n" not in buf:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    buf += chunk
                head, _, rest = buf.partition(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    k, _, v = line.partition(b":")
                    if k.strip().lower() == b"content-length":
                        length = int(v.strip())
                while len(rest) < length:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    rest += chunk
                buf = rest[length:]
                if head.startswith(b"POST /write"):
                    self.writes += 1
                conn.sendall(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n")
        except OSError:
            return
        finally:
            conn.close()

    def close(self) -> None:
        self._closed = True
        self._sock.close()
        for c in self._held:
            c.close()


@pytest.fixture
def hanging_store() -> Iterator[HangingStore]:
    server = HangingStore()
    yield server
    server.close()
