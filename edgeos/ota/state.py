"""The OTA root's state file and the records the slot manager hands back.

``state.json`` is replaced atomically on every change (see :mod:`edgeos.ota.slots` for the
state machine); :class:`SlotState` is its contents.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

__all__ = ["BootDecision", "InstallResult", "SlotName", "SlotState"]

SlotName = Literal["a", "b"]
STATE_FORMAT = 1
#: How many history events and failed versions the state keeps.
HISTORY = 20


def other_slot(slot: SlotName) -> SlotName:
    """The slot that is not ``slot``."""
    return "b" if slot == "a" else "a"


def now_iso() -> str:
    """Wall time, UTC, to the second, as written in the state's events and outcomes."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True, slots=True)
class SlotState:
    """Contents of ``state.json``; every change is one atomic replace of the whole file."""

    active: SlotName = "a"
    trial: SlotName | None = None
    attempts: int = 0
    trial_version: str | None = None
    committed_version: str | None = None
    #: Lowest version each kind may still have (``full``, ``config``, ``models``); only rises.
    floors: dict[str, str] = field(default_factory=dict)
    #: ``kind:version`` pairs that failed a trial here; not installed again unless forced.
    failed: tuple[str, ...] = ()
    last_failure: str | None = None
    #: Latest outcome for the campaign report: ``{"outcome", "version", "reason", "at"}``.
    last_outcome: dict[str, str] | None = None
    outcome_reported: bool = True
    models_version: str | None = None
    history: tuple[dict[str, str], ...] = ()

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["format"] = STATE_FORMAT
        out["failed"] = list(self.failed)
        out["history"] = list(self.history)
        return out

    @classmethod
    def from_json(cls, raw: Any) -> SlotState:
        if not isinstance(raw, dict) or raw.get("format") != STATE_FORMAT:
            raise ValueError("not an OTA state file")
        if raw["active"] not in ("a", "b") or raw.get("trial") not in (None, "a", "b"):
            raise ValueError("bad slot name in state")
        return cls(
            active=raw["active"],
            trial=raw.get("trial"),
            attempts=int(raw.get("attempts", 0)),
            trial_version=raw.get("trial_version"),
            committed_version=raw.get("committed_version"),
            floors={str(k): str(v) for k, v in dict(raw.get("floors") or {}).items()},
            failed=tuple(str(x) for x in raw.get("failed") or ()),
            last_failure=raw.get("last_failure"),
            last_outcome=raw.get("last_outcome"),
            outcome_reported=bool(raw.get("outcome_reported", True)),
            models_version=raw.get("models_version"),
            history=tuple(raw.get("history") or ()),
        )

    def with_event(self, event: str, **fields: str | None) -> SlotState:
        record = {"at": now_iso(), "event": event}
        record.update({k: v for k, v in fields.items() if v is not None})
        return replace(self, history=(*self.history, record)[-HISTORY:])


@dataclass(frozen=True, slots=True)
class BootDecision:
    """What the boot check decided: which slot to start, and what happened on the way."""

    ok: bool
    slot: SlotName | None
    path: Path | None
    version: str | None
    trial: bool
    attempt: int
    entry: str | None
    #: Human-readable account: "booting b on trial (attempt 2/3)", "rolled back: …".
    events: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class InstallResult:
    """Outcome of a successful install."""

    kind: str
    version: str
    slot: SlotName | None
    path: Path
    restart_required: bool
