"""Desired state of writable tags: versioned changes, their outcomes, and the write path."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from edgeos.driver import TagBinding, Value

__all__ = ["FINAL", "DesiredChange", "Status", "WritePath"]

Status = Literal["pending", "applied", "refused", "timed_out", "failed", "superseded"]
#: Statuses after which a change never moves again.
FINAL: frozenset[str] = frozenset({"applied", "refused", "timed_out", "failed", "superseded"})


class WritePath(Protocol):
    """How the twin reaches the device: the runtime backs it with the connection's driver
    through the supervisor (which owns the transport's timeouts and reconnects).

    Raise :class:`~edgeos.errors.TransportError` when the write did not reach the device and
    :class:`~edgeos.errors.WriteRefused` when the driver refused it.
    """

    async def write(self, binding: TagBinding, value: Value) -> None: ...


@dataclass(slots=True, eq=False)
class DesiredChange:
    """One requested value of a writable tag and what became of it.

    ``status`` starts ``pending`` and ends in one of :data:`FINAL`: ``applied`` (a read after the
    write reported the value within half a resolution step), ``refused`` (limits, rate,
    type — before the wire, or by the driver), ``failed`` (transport error), ``timed_out`` (no
    confirming read in time) or ``superseded`` (a newer version for the same tag arrived first).
    """

    name: str
    index: int
    value: Value
    version: int
    source: str
    requested_ts: float
    status: Status = "pending"
    reason: str = ""
    written_ts: float | None = None
    done_ts: float | None = None
    #: The read that confirmed (or last contradicted) the write.
    reported: Value | None = None
    _waiter: Any = field(default=None, repr=False)

    @property
    def done(self) -> bool:
        return self.status in FINAL

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "value": self.value,
            "version": self.version,
            "source": self.source,
            "status": self.status,
            "reason": self.reason,
            "requested_ts": self.requested_ts,
            "written_ts": self.written_ts,
            "done_ts": self.done_ts,
            "reported": self.reported,
        }
