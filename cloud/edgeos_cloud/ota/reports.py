"""Authenticated update reports: the only input that moves or halts a campaign.

A gateway reports an outcome (``committed``, ``rolled_back``, ``rejected``) as a control
message of kind :attr:`~edgeos_protocol.control.ControlKind.OTA_REPORT`, sealed under its
device key exactly like a command result (per-message key from a fresh salt, AEAD over header
and body), and posts the sealed bytes to the repository server's ``POST /reports``.
:class:`ReportIntake` opens it with the device's key from the receiver's device registry and
accepts it only when

* the device is registered and active and the key id is one of its keys,
* the message authenticates, is of kind ``OTA_REPORT``, and names in its body the same
  device as in its authenticated header (a device reports only for itself),
* its counter is above the last one accepted from that device (persisted in
  ``<repo>/reports/counters.json``, so a captured report replayed later — also after a
  restart — is refused), and
* the body is well formed and bounded (known outcome, short strings).

Only then is a :class:`DeviceReport` built and given to the campaigns; every refusal raises
:class:`ReportRejected` with the HTTP status the server answers. A campaign keeps one report
per device (the latest), so a device cannot outvote others by repeating itself.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Any

from edgeos_cloud.ota.repository import ReportRefused
from edgeos_cloud.sealed import KeyLookup, open_sealed
from edgeos_protocol.control import MAX_CONTROL_BYTES, ControlKind
from edgeos_protocol.fsutil import atomic_write_json, read_json

__all__ = [
    "MAX_REPORT_BYTES",
    "OUTCOMES",
    "DeviceReport",
    "KeyLookup",
    "ReportIntake",
    "ReportRejected",
]

#: Largest sealed report accepted (a report is a few hundred bytes).
MAX_REPORT_BYTES = min(MAX_CONTROL_BYTES, 16 << 10)
OUTCOMES = ("committed", "rolled_back", "rejected")
_MAX_TEXT = {"group": 64, "hardware": 64, "version": 64, "reason": 64, "at": 40, "detail": 2048}


class ReportRejected(ReportRefused):
    """A report that is not accepted; ``status`` is the HTTP status the server answers."""


@dataclass(frozen=True, slots=True)
class DeviceReport:
    """An authenticated outcome report (built only by :meth:`ReportIntake.accept`)."""

    device: str
    group: str
    hardware: str
    outcome: str
    version: str
    reason: str | None
    detail: str
    at: str | None
    #: The sealed message's counter and key id: what authenticated it.
    counter: int
    key_id: int


class ReportIntake:
    """Authenticates sealed reports and hands them to the repository's campaigns."""

    def __init__(self, repo_dir: Path, keys: KeyLookup) -> None:
        self.repo_dir = Path(repo_dir)
        self._keys = keys
        self._dir = self.repo_dir / "reports"

    @classmethod
    def from_registry(cls, repo_dir: Path, registry_dir: Path) -> ReportIntake:
        """An intake that looks device keys up in the receiver's registry directory."""
        from edgeos_cloud.receiver.registry import DeviceRegistry

        registry = DeviceRegistry(registry_dir)
        return cls(repo_dir, registry.key_for)

    def open(self, sealed: bytes) -> DeviceReport:
        """Authenticate and check one sealed report (no state changes)."""
        control, _ = open_sealed(
            sealed,
            ControlKind.OTA_REPORT,
            self._keys,
            max_bytes=MAX_REPORT_BYTES,
            refused=ReportRejected,
            noun="report",
            what="a report",
        )
        return _report(control.payload, control.device, control.counter, control.key_id)

    def accept(self, sealed: bytes) -> list[str]:
        """Authenticate ``sealed``, refuse replays, record it; returns the campaigns it joined."""
        from edgeos_cloud.ota.campaign import record_report

        report = self.open(sealed)
        with self._counters() as counters:
            last = counters.get(report.device, 0)
            if not isinstance(last, int) or report.counter <= last:
                raise ReportRejected(
                    HTTPStatus.CONFLICT,
                    f"report counter {report.counter} of {report.device!r} is not above {last}",
                )
            counters[report.device] = report.counter
        return record_report(self.repo_dir, report)

    @contextlib.contextmanager
    def _counters(self) -> Iterator[dict[str, Any]]:
        """The per-device last counters, read-modify-written under a lock (threads, CLIs)."""
        self._dir.mkdir(exist_ok=True, mode=0o700)
        path = self._dir / "counters.json"
        fd = os.open(self._dir / ".lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                data: dict[str, Any] = read_json(path)
            except FileNotFoundError:
                data = {}
            before = dict(data)
            yield data
            if data != before:
                atomic_write_json(path, data, mode=0o600)
        finally:
            os.close(fd)


def _text(payload: dict[str, Any], key: str, *, required: bool = True) -> str | None:
    value = payload.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or len(value) > _MAX_TEXT[key]:
        raise ReportRejected(HTTPStatus.BAD_REQUEST, f"report field {key!r} is not a short string")
    return value


def _report(payload: dict[str, Any], device: str, counter: int, key_id: int) -> DeviceReport:
    if payload.get("device") != device:
        raise ReportRejected(
            HTTPStatus.FORBIDDEN, f"a report sealed by {device!r} names {payload.get('device')!r}"
        )
    outcome = payload.get("outcome")
    if outcome not in OUTCOMES:
        raise ReportRejected(HTTPStatus.BAD_REQUEST, f"unknown outcome {outcome!r}")
    return DeviceReport(
        device=device,
        group=_text(payload, "group") or "",
        hardware=_text(payload, "hardware", required=False) or "",
        outcome=str(outcome),
        version=_text(payload, "version") or "",
        reason=_text(payload, "reason", required=False),
        detail=_text(payload, "detail", required=False) or "",
        at=_text(payload, "at", required=False),
        counter=counter,
        key_id=key_id,
    )
