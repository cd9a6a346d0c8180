"""The store interface: where telemetry, plan parts and audit records go and come from.

Two implementations: ``InfluxStore`` (v1-compatible HTTP API, every InfluxDB
speaks it) and ``EmbeddedStore`` (SQLite, the default with no server).
Readers ask for points, not query strings, so both answer the same calls.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol, runtime_checkable

from dcenergy.schema import Point


@runtime_checkable
class Store(Protocol):
    def write(self, points: Sequence[Point]) -> None:
        """Write points; the same series + time overwrites (idempotent retries).

        Raises ``StoreUnavailable`` when the caller should keep the data and retry,
        ``StoreError`` when the data was refused for good.
        """
        ...

    def read(
        self,
        measurement: str,
        *,
        start_ns: int,
        end_ns: int | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> list[Point]:
        """Points of one measurement in [start_ns, end_ns), optionally filtered by tag
        equality, oldest first."""
        ...

    def close(self) -> None: ...
