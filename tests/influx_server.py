"""A real ``influxd`` (1.x) on a free loopback port with its own data folder, for tests and benches.

Every InfluxDB version speaks the v1 HTTP API we use, so a 1.x server from
Debian's ``influxdb`` package is a faithful peer; ``stop()``/``start()`` let a
test take the database away mid-run and bring it back on the same port.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import httpx

from tests.local_server import LocalServer, terminate

REQUIRE_ENV = "DCENERGY_REQUIRE_INFLUXDB"


def influxd_path() -> str | None:
    return shutil.which("influxd") or (
        "/usr/bin/influxd" if os.access("/usr/bin/influxd", os.X_OK) else None
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class InfluxServer(LocalServer):
    def __init__(self, binary: str, root: Path | None = None) -> None:
        self.binary = binary
        self._own_root = root is None
        self.root = root or Path(tempfile.mkdtemp(prefix="dcenergy-influxd-"))
        self.port = free_port()
        self.rpc_port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._proc: subprocess.Popen[bytes] | None = None
        self._log = self.root / "influxd.log"
        self._conf = self.root / "influxd.conf"
        self._write_config()

    def _write_config(self) -> None:
        r = self.root
        self._conf.write_text(
            f"""reporting-disabled = true
bind-address = "127.0.0.1:{self.rpc_port}"
[meta]
  dir = "{r}/meta"
[data]
  dir = "{r}/data"
  wal-dir = "{r}/wal"
  query-log-enabled = false
[coordinator]
  log-queries-after = "0s"
[monitor]
  store-enabled = false
[http]
  enabled = true
  bind-address = "127.0.0.1:{self.port}"
  log-enabled = false
  max-body-size = 0
[continuous_queries]
  enabled = false
"""
        )

    def start(self, timeout_s: float = 30.0) -> None:
        if self._proc is not None:
            return
        with self._log.open("ab") as log:  # the child keeps its own descriptor
            self._proc = subprocess.Popen(
                [self.binary, "-config", str(self._conf)], stdout=log, stderr=log
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"influxd exited early: {self._log.read_text()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/ping", timeout=0.5).status_code == 204:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"influxd did not answer /ping within {timeout_s} s")

    def stop(self) -> None:
        if self._proc is None:
            return
        terminate(self._proc)
        self._proc = None

    def query(self, q: str, db: str | None = None) -> dict[str, object]:
        params = {"q": q, "epoch": "ns"}
        if db:
            params["db"] = db
        r = httpx.post(f"{self.url}/query", params=params, timeout=30)
        r.raise_for_status()
        out: dict[str, object] = r.json()
        return out

    def create_database(self, name: str) -> None:
        self.query(f'CREATE DATABASE "{name}"')
