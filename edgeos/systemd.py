"""sd_notify: READY, STATUS and WATCHDOG, driven by real health rather than a timer.

READY is sent once the configuration is loaded and the scan loop has completed its first ticks.
WATCHDOG pings come from :meth:`Notifier.watchdog_task`, which pings only while the health
check says the scan loop is alive (it made progress since the last ping). A stalled loop stops
pinging and systemd restarts the service after ``WatchdogSec``. Outside systemd
(``NOTIFY_SOCKET`` unset) every call is a no-op.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable

import sdnotify

__all__ = ["Notifier", "watchdog_interval_s"]

log = logging.getLogger("edgeos.systemd")


def watchdog_interval_s() -> float | None:
    """Half of systemd's watchdog timeout (``WATCHDOG_USEC``), or None when it is off."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid.isdigit() and int(pid) != os.getpid()):
        return None
    try:
        return max(int(usec) / 1e6 / 2, 0.05)
    except ValueError:
        return None


class Notifier:
    """Thin wrapper over :mod:`sdnotify` that remembers what it last said."""

    def __init__(self) -> None:
        self.enabled = bool(os.environ.get("NOTIFY_SOCKET"))
        self._sd = sdnotify.SystemdNotifier()
        self.last_status = ""
        self.pings = 0
        self.missed = 0

    def _send(self, message: str) -> None:
        if self.enabled:
            self._sd.notify(message)

    def ready(self, status: str = "") -> None:
        self._send("READY=1" + (f"\nSTATUS={status}" if status else ""))
        if status:
            self.last_status = status

    def status(self, text: str) -> None:
        if text != self.last_status:
            self.last_status = text
            self._send(f"STATUS={text}")

    def stopping(self) -> None:
        self._send("STOPPING=1")

    def ping(self) -> None:
        self.pings += 1
        self._send("WATCHDOG=1")

    async def watchdog_task(self, healthy: Callable[[], bool], interval_s: float) -> None:
        """Ping every ``interval_s`` while ``healthy()``; stop pinging when it is not."""
        was_healthy = True
        while True:
            await asyncio.sleep(interval_s)
            if healthy():
                self.ping()
                if not was_healthy:
                    log.warning("scan loop healthy again; watchdog pings resumed")
                was_healthy = True
            else:
                self.missed += 1
                if was_healthy:
                    log.error("scan loop unhealthy; withholding watchdog pings")
                was_healthy = False
