"""The command ledger: the highest command version taken per source, kept across restarts.

A command (``{"id", "version", "desired", …}``, sealed by the cloud) is applied at most once.
The in-memory counter guard of the publisher stops a replay within one process; this ledger
stops one after a restart, when that guard is empty again: a captured command re-published
after the gateway restarted carries a version this ledger has already taken.

File (``<state_dir>/commands.json``, written atomically and fsync-ed before the command runs,
so a kill -9 at any instant leaves either the old or the new ledger)::

    {"format": 1, "sources": {"<source>": {"version": 7, "id": "c7", "result": {…} | null}}}

The version is recorded *before* the handler runs (at most once): a crash while applying leaves
the version taken without a result, and the re-sent command is answered "interrupted" instead
of being applied a second time. ``source`` is the command's authenticated ``"source"`` field
(``"cloud"`` when absent), so independent senders keep their own version sequences.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from edgeos_protocol.fsutil import atomic_write_json, read_json

__all__ = ["DEFAULT_SOURCE", "CommandLedger", "Verdict"]

log = logging.getLogger(__name__)

DEFAULT_SOURCE = "cloud"
_FORMAT = 1


@dataclass(frozen=True, slots=True)
class Verdict:
    """What to do with a command: ``apply`` it, ``repeat`` the stored answer, or ``stale``."""

    action: Literal["apply", "repeat", "stale"]
    source: str
    version: int
    #: The highest version taken before this command (0: none).
    taken: int = 0
    #: For ``repeat``: the stored result (``None`` when the process died while applying it).
    result: dict[str, Any] | None = None


class CommandLedger:
    """Highest command version taken per source; persisted when ``path`` is given."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._sources: dict[str, dict[str, Any]] = {}
        if path is not None:
            self._sources = _load(path)

    def taken(self, source: str = DEFAULT_SOURCE) -> int:
        """The highest version taken from ``source`` (0 when none)."""
        with self._lock:
            return int(self._sources.get(source, {}).get("version", 0))

    def claim(self, command: dict[str, Any]) -> Verdict:
        """Decide about ``command``; an ``apply`` verdict is durably recorded before it returns.

        Raises ``TypeError`` for a command without an integer version (it is refused).
        """
        version = command.get("version")
        source = command.get("source", DEFAULT_SOURCE)
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise TypeError(f"command version must be a positive integer, got {version!r}")
        if not isinstance(source, str) or not source or len(source) > 64:
            raise TypeError("command source must be a short string")
        with self._lock:
            entry = self._sources.get(source, {})
            taken = int(entry.get("version", 0))
            if version < taken:
                return Verdict("stale", source, version, taken)
            if version == taken:
                return Verdict("repeat", source, version, taken, entry.get("result"))
            self._sources[source] = {"version": version, "id": command.get("id"), "result": None}
            self._save()
            return Verdict("apply", source, version, taken)

    def record_result(self, verdict: Verdict, result: dict[str, Any]) -> None:
        """Keep the answer of an applied command, to repeat it when the command comes again."""
        with self._lock:
            entry = self._sources.get(verdict.source)
            if entry is None or entry.get("version") != verdict.version:
                return  # a newer command was taken meanwhile
            entry["result"] = result
            try:
                self._save()
            except OSError as exc:
                # The version stays taken; a re-send is then answered "interrupted".
                log.warning("command result not recorded in %s: %s", self.path, exc)

    def _save(self) -> None:
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.path, {"format": _FORMAT, "sources": self._sources}, mode=0o600)


def _load(path: Path) -> dict[str, dict[str, Any]]:
    try:
        doc = read_json(path)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        # Never start with an empty ledger when one existed: that would accept every replay.
        raise RuntimeError(f"command ledger {path} is unreadable: {exc}") from exc
    sources = doc.get("sources") if isinstance(doc, dict) else None
    if doc.get("format") != _FORMAT or not isinstance(sources, dict):
        raise RuntimeError(f"command ledger {path} has an unknown format")
    out: dict[str, dict[str, Any]] = {}
    for source, entry in sources.items():
        if isinstance(entry, dict) and isinstance(entry.get("version"), int):
            out[str(source)] = dict(entry)
    return out
