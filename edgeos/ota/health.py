"""Runtime health for the trial of a new slot: the report, and the file a watcher reads.

The runtime reports :class:`HealthReport` s to a :class:`HealthSink`: a
:class:`~edgeos.ota.trial.TrialMonitor` in process, or a :class:`HealthFile` that the
``edgeos-commit`` watcher reads from another process.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

from edgeos_protocol.fsutil import atomic_write_json, read_json

__all__ = ["HealthFile", "HealthReport", "HealthSink"]


@dataclass(frozen=True, slots=True)
class HealthReport:
    """One snapshot of runtime health, fed to :meth:`TrialMonitor.report`.

    A slot is healthy when the service said it is ready, the watchdog task is alive, every
    enabled driver is connected and the receiver acknowledges batches (``acks_flowing``;
    the runtime passes ``True`` when the uplink is disabled).
    """

    service_ready: bool
    watchdog_alive: bool
    drivers_connected: int = 0
    drivers_total: int = 0
    acks_flowing: bool = True
    detail: str = ""

    @property
    def healthy(self) -> bool:
        return not self.problems()

    def problems(self) -> list[str]:
        out = []
        if not self.service_ready:
            out.append("service not ready")
        if not self.watchdog_alive:
            out.append("watchdog not alive")
        if self.drivers_connected < self.drivers_total:
            out.append(f"{self.drivers_connected}/{self.drivers_total} drivers connected")
        if not self.acks_flowing:
            out.append("receiver not acknowledging batches")
        return out


class HealthSink(Protocol):
    """What the runtime feeds health into (a :class:`TrialMonitor` or a :class:`HealthFile`)."""

    def report(self, health: HealthReport) -> None: ...


def _boot_id() -> str:
    """This boot's id (32 hex digits), or ``""`` when it cannot be told.

    The kernel's ``/proc/sys/kernel/random/boot_id`` first. A unit hardened with
    ``ProcSubset=pid`` (edgeos.service, edgeos-commit.service) cannot see ``/proc/sys``: the
    unit hands the same id over as ``EDGEOS_BOOT_ID=%b`` (systemd's boot id specifier, written
    without dashes). Without it a hardened writer would stamp ``""`` and an unconfined reader
    (the image's root-slot mark-good) would take every report for one of another boot.
    """
    try:
        raw = Path("/proc/sys/kernel/random/boot_id").read_text()
    except OSError:
        raw = os.environ.get("EDGEOS_BOOT_ID", "")
    return raw.strip().replace("-", "").lower()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class HealthFile:
    """Health written to a file by the runtime and read by a separate watcher.

    The file carries the writer's pid, boot id and ``CLOCK_MONOTONIC`` time. A reader treats
    it as unhealthy when the pid is gone or the stamp is older than ``max_age_s``, so a
    runtime that crashed or hung cannot leave a "healthy" file behind that keeps counting.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        #: Why the last :meth:`read` returned ``None`` (for the watcher's log line), else "".
        self.refused = ""

    def report(self, health: HealthReport) -> None:
        """Write one report atomically (call every few seconds from the runtime)."""
        atomic_write_json(
            self.path,
            {
                "pid": os.getpid(),
                "boot_id": _boot_id(),
                "monotonic": time.monotonic(),
                "health": asdict(health),
            },
            # Rewritten every few seconds: no fsync (flash wear), the rename keeps it whole.
            durable=False,
        )

    def _written_this_boot(self) -> bool:
        booted_at = time.time() - time.clock_gettime(time.CLOCK_BOOTTIME)
        return self.path.stat().st_mtime >= booted_at

    def read(self, *, max_age_s: float) -> HealthReport | None:
        """The latest report, or ``None`` when missing, stale, or its writer is dead (which
        of them: :attr:`refused`)."""
        self.refused = ""
        try:
            raw = read_json(self.path)
            stamped, mine = str(raw["boot_id"]).replace("-", "").lower(), _boot_id()
            if stamped != mine:
                if stamped and mine:
                    return self._refuse(f"health file written in another boot ({stamped[:8]}…)")
                # One side could not tell (sandboxed without EDGEOS_BOOT_ID: code or a unit
                # from before it, e.g. an application slot older than the root reading it):
                # the file's own time must then be from this boot.
                if not self._written_this_boot():
                    return self._refuse("health file written before this boot")
            pid = int(raw["pid"])
            if not _pid_alive(pid):
                return self._refuse(f"health file's writer (pid {pid}) is gone")
            age = time.monotonic() - float(raw["monotonic"])
            if age > max_age_s:
                return self._refuse(f"last health report {age:.0f} s old (limit {max_age_s:g} s)")
            return HealthReport(**raw["health"])
        except FileNotFoundError:
            return self._refuse("no health file yet (the runtime has not reported)")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            return self._refuse(f"health file unreadable: {type(exc).__name__}: {exc}")

    def _refuse(self, why: str) -> HealthReport | None:
        """Record why and return None (what :meth:`read` returns then)."""
        self.refused = why
        return None
