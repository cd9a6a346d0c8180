"""Log a recurring failure once, not every cycle: the daemon's counters carry the rest.

A daemon that samples every second must not write the same warning every
second; each part counts every failure and logs the first of each kind.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable


class LogOnce:
    def __init__(self, logger: logging.Logger) -> None:
        self._log = logger
        self._seen: set[Hashable] = set()

    def __call__(
        self,
        key: Hashable,
        level: int,
        msg: str,
        *args: object,
        exc_info: BaseException | None = None,
    ) -> bool:
        """Log ``msg`` if ``key`` has not been logged yet; True when it was logged now."""
        if key in self._seen:
            return False
        self._seen.add(key)
        self._log.log(level, msg, *args, exc_info=exc_info)
        return True

    def forget(self, *keys: Hashable) -> None:
        """Log these keys again next time (a new outage after a recovery)."""
        self._seen.difference_update(keys)
