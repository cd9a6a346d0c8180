"""The telemetry store: one interface (``Store``), two implementations, one factory.

``open_store`` picks InfluxDB when a URL is configured and the embedded SQLite
file otherwise, so callers never branch on the kind of store.
"""

from __future__ import annotations

from pathlib import Path

from dcenergy.lineprotocol import LineSink, WriteOutcome, WriteResult
from dcenergy.store.base import Store
from dcenergy.store.embedded import EmbeddedStore
from dcenergy.store.influx import InfluxStore

__all__ = [
    "EmbeddedStore",
    "InfluxStore",
    "LineSink",
    "Store",
    "WriteOutcome",
    "WriteResult",
    "open_store",
]


def open_store(
    url: str | None,
    database: str,
    *,
    embedded_path: Path,
    token: str | None = None,
    username: str | None = None,
    password: str | None = None,
    ca_file: str | None = None,
    verify_tls: bool = True,
    timeout_s: float = 10,
    create_database: bool = False,
) -> InfluxStore | EmbeddedStore:
    """InfluxStore for a URL, else EmbeddedStore at ``embedded_path`` (both are a Store)."""
    if url:
        return InfluxStore(
            url,
            database,
            token=token or None,
            username=username or None,
            password=password or None,
            ca_file=ca_file or None,
            verify_tls=verify_tls,
            timeout_s=timeout_s,
            create_database=create_database,
        )
    return EmbeddedStore(embedded_path)
