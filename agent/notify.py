"""sd_notify: tell systemd we are ready, alive, stopping, and what we are doing.

Written with the stdlib on purpose: the protocol is one datagram of
``KEY=VALUE`` lines on the ``AF_UNIX`` socket named by ``$NOTIFY_SOCKET``
(a leading ``@`` means Linux's abstract namespace), about twenty lines. The
``systemd`` / ``sdnotify`` packages would add a C build or an unmaintained
dependency to every GPU node for that. Outside systemd (no
``$NOTIFY_SOCKET``) every call is a silent no-op, so the daemon calls it
unconditionally; a send that fails is counted and logged once, never raised.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger(__name__)


class Notifier:
    """Sends sd_notify messages to ``$NOTIFY_SOCKET`` (read from ``env`` at construction)."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        raw = env.get("NOTIFY_SOCKET", "")
        # "@name" is the abstract namespace: the kernel wants a leading NUL byte instead.
        self.address: str | None = ("\0" + raw[1:]) if raw.startswith("@") else (raw or None)
        # WatchdogSec= as systemd exports it; None when the watchdog is off.
        usec = env.get("WATCHDOG_USEC", "")
        self.watchdog_s: float | None = int(usec) / 1e6 if usec.isdigit() else None
        self.errors_total = 0
        self._logged = False

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, **state: str) -> bool:
        """Send ``KEY=VALUE`` lines (e.g. ``READY="1"``); True when a datagram was sent."""
        if self.address is None or not state:
            return False
        message = "\n".join(f"{k}={v}" for k, v in state.items()).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.connect(self.address)
                sock.sendall(message)
        except OSError as e:
            self.errors_total += 1
            if not self._logged:
                self._logged = True
                log.warning("sd_notify to %r failed: %s (logged once)", self.address, e)
            return False
        return True

    def ready(self, status: str = "") -> bool:
        return self.notify(READY="1", **({"STATUS": status} if status else {}))

    def watchdog(self) -> bool:
        return self.notify(WATCHDOG="1")

    def stopping(self, status: str = "") -> bool:
        return self.notify(STOPPING="1", **({"STATUS": status} if status else {}))

    def status(self, text: str) -> bool:
        return self.notify(STATUS=text)
