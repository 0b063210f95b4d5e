"""Logging that suits journald: plain lines by default, JSON lines on request.

journald adds its own timestamp and unit name, so plain lines carry only level, logger and
message. :class:`StateLog` logs a thing's state on *change* ("lost", "recovered") and never once
per failed poll: a PLC that is down for a week must not wear out the gateway's flash.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any, Literal

__all__ = ["JsonFormatter", "StateLog", "setup_logging"]


class JsonFormatter(logging.Formatter):
    """One JSON object per line; extra fields passed with ``extra={"fields": {...}}``."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            doc.update(fields)
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str, separators=(",", ":"))


def setup_logging(
    fmt: Literal["plain", "json"] = "plain", level: str = "INFO", *, stream: Any = None
) -> None:
    """Configure the root logger once for the process."""
    handler = logging.StreamHandler(stream or sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        # Under systemd (JOURNAL_STREAM set) journald stamps time itself.
        stamp = "" if os.environ.get("JOURNAL_STREAM") else "%(asctime)s "
        handler.setFormatter(logging.Formatter(f"{stamp}%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # Libraries log every failed poll at WARNING/ERROR; our supervisor reports state changes.
    for noisy in ("pymodbus", "asyncua", "aiomqtt", "paho"):
        logging.getLogger(noisy).setLevel(logging.CRITICAL if level != "DEBUG" else logging.INFO)


class StateLog:
    """Remembers the last state per key and logs only when it changes.

    ``repeat_s`` optionally re-logs an unchanged *bad* state at most that often, so an operator
    tailing the journal after a week still sees that a connection is down.
    """

    def __init__(self, logger: logging.Logger, *, repeat_s: float | None = None) -> None:
        self._logger = logger
        self._state: dict[str, str] = {}
        self._logged_at: dict[str, float] = {}
        self._repeat_s = repeat_s

    def update(self, key: str, state: str, message: str = "", *, level: int = logging.INFO) -> bool:
        """Record ``state`` for ``key``; log and return True when it changed."""
        now = time.monotonic()
        previous = self._state.get(key)
        changed = previous != state
        due = (
            self._repeat_s is not None
            and not changed
            and level >= logging.WARNING
            and now - self._logged_at.get(key, now) >= self._repeat_s
        )
        if changed or due:
            self._state[key] = state
            self._logged_at[key] = now
            text = f"{key}: {previous or 'new'} -> {state}" if changed else f"{key}: still {state}"
            if message:
                text += f" ({message})"
            self._logger.log(level, text, extra={"fields": {"key": key, "state": state}})
        return changed

    def get(self, key: str) -> str | None:
        return self._state.get(key)
