"""A real Prometheus on a free loopback port with its own config and data folder, for tests.

Debian's ``prometheus`` package gives the server binary; the tests write a
config that scrapes the targets they name every ``scrape_interval`` and ask
the HTTP API (``/api/v1/query``) what it stored, as an operator would.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx

from tests.influx_server import free_port
from tests.local_server import LocalServer, terminate

REQUIRE_ENV = "DCENERGY_REQUIRE_PROMETHEUS"


def prometheus_path() -> str | None:
    return shutil.which("prometheus") or (
        "/usr/bin/prometheus" if os.access("/usr/bin/prometheus", os.X_OK) else None
    )


class PrometheusServer(LocalServer):
    """``prometheus`` scraping ``targets`` (``host:port``) at ``metrics_path``."""

    def __init__(
        self,
        binary: str,
        targets: Sequence[str],
        *,
        root: Path | None = None,
        scrape_interval: str = "1s",
        metrics_path: str = "/metrics",
        job: str = "dcenergy",
    ) -> None:
        self.binary = binary
        self._own_root = root is None
        self.root = root or Path(tempfile.mkdtemp(prefix="dcenergy-prometheus-"))
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.job = job
        self._proc: subprocess.Popen[bytes] | None = None
        self._log = self.root / "prometheus.log"
        self.config_path = self.root / "prometheus.yml"
        targets_yaml = ", ".join(f"'{t}'" for t in targets)
        self.config_path.write_text(
            f"""global:
  scrape_interval: {scrape_interval}
  scrape_timeout: {scrape_interval}
  evaluation_interval: {scrape_interval}
scrape_configs:
  - job_name: '{job}'
    metrics_path: '{metrics_path}'
    static_configs:
      - targets: [{targets_yaml}]
"""
        )

    def start(self, timeout_s: float = 60.0) -> None:
        if self._proc is not None:
            return
        args = [
            self.binary,
            f"--config.file={self.config_path}",
            f"--storage.tsdb.path={self.root / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--log.level=warn",
        ]
        with self._log.open("ab") as log:  # the child keeps its own descriptor
            self._proc = subprocess.Popen(args, stdout=log, stderr=log, cwd=self.root)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"prometheus exited early: {self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/-/ready", timeout=0.5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"prometheus not ready within {timeout_s} s: {self.log_tail()}")

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self._log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def query(self, promql: str, at: float | None = None) -> list[dict[str, Any]]:
        """An instant query's result vector: ``[{"metric": {...}, "value": [t, "v"]}, ...]``."""
        params = {"query": promql}
        if at is not None:
            params["time"] = f"{at:.3f}"
        r = httpx.get(f"{self.url}/api/v1/query", params=params, timeout=10)
        r.raise_for_status()
        body = r.json()
        if body.get("status") != "success":
            raise RuntimeError(f"query {promql!r} failed: {body}")
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def wait_for(
        self,
        promql: str,
        ready: Callable[[list[dict[str, Any]]], bool] = bool,
        timeout_s: float = 60.0,
    ) -> list[dict[str, Any]]:
        """Query until ``ready(result)``; the last result, or ``AssertionError`` at the timeout."""
        deadline = time.monotonic() + timeout_s
        result: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            result = self.query(promql)
            if ready(result):
                return result
            time.sleep(0.25)
        raise AssertionError(
            f"{promql!r} not ready after {timeout_s} s: {result}; targets: {self.targets()}"
        )

    def targets(self) -> list[dict[str, Any]]:
        r = httpx.get(f"{self.url}/api/v1/targets", timeout=10)
        r.raise_for_status()
        active: list[dict[str, Any]] = r.json()["data"]["activeTargets"]
        return active

    def stop(self) -> None:
        if self._proc is None:
            return
        terminate(self._proc)
        self._proc = None
