"""Desired state of writable tags: versioned changes, their outcomes, the write path, rate limits.

:class:`DesiredState` is the twin's desired-state component. It owns:

* the latest :class:`DesiredChange` per tag (versioned; ``await change.wait()`` returns its
  final status);
* :class:`WriteLog`, the one record of *when each tag was last written and to what*, on the
  monotonic clock, against which ``max_rate`` is checked (the inference guard reads the same
  record, see :meth:`edgeos.inference.guard.ActuationGuard.share_write_log`);
* the write task (:meth:`DesiredState.run_writes`) and confirmation by the next read.

See ``docs/twin.md`` ("Desired state") for the statuses and the event format.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections import Counter, deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np
import numpy.typing as npt

from edgeos.clock import Clock
from edgeos.config import AnyTag
from edgeos.driver import Quality, TagBinding, Value, check_write
from edgeos.errors import EdgeosError, WriteRefused
from edgeos.twin.columns import Columns

__all__ = [
    "FINAL",
    "DesiredChange",
    "DesiredState",
    "LastWrite",
    "Status",
    "WriteLog",
    "WritePath",
]

log = logging.getLogger(__name__)

Status = Literal["pending", "applied", "refused", "timed_out", "failed", "superseded"]
#: Statuses after which a change never moves again.
FINAL: frozenset[str] = frozenset({"applied", "refused", "timed_out", "failed", "superseded"})
_BAD = int(Quality.BAD)


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
    ``await change.wait()`` returns that final status (put it under a timeout scope).
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
    _done: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    def __post_init__(self) -> None:
        if self.status in FINAL:  # restored from a snapshot
            self._done.set()

    @property
    def done(self) -> bool:
        return self.status in FINAL

    async def wait(self) -> Status:
        """Return the final status once the change has one (at once if it already has)."""
        await self._done.wait()
        return self.status

    def outcome(self) -> str:
        """``applied``, ``refused: <reason>``, ``timed out: <reason>``, ``pending``: for people."""
        text = self.status.replace("_", " ")
        return f"{text}: {self.reason}" if self.reason else text

    def _resolve(self, status: Status, reason: str, ts: float) -> None:
        self.status = status
        self.reason = reason
        self.done_ts = ts
        self._done.set()

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


# ---------------------------------------------------------------------------------- rate limits


@dataclass(frozen=True, slots=True)
class LastWrite:
    """A tag's last write: the value and when it completed, in ``clock.monotonic()`` seconds."""

    value: float
    at: float


class WriteLog:
    """When each tag was last written and to what: the one reference for ``max_rate``.

    Times are monotonic seconds (``clock.monotonic()``), so a wall-clock step (NTP, a dead RTC
    corrected at boot) can neither open the limit (+1 h makes any step look slow) nor refuse
    every write (a step backwards). Only numeric values are recorded (``max_rate`` is a rate of
    change). ``max_rate`` bounds how fast successive *writes* move a set-point; measuring
    against the last *read* would refuse every step (a read is always milliseconds old), so the
    first write after start is checked against the hard limits only.
    """

    def __init__(self) -> None:
        self._last: dict[str, LastWrite] = {}

    def __len__(self) -> int:
        return len(self._last)

    def last(self, name: str) -> LastWrite | None:
        return self._last.get(name)

    def record(self, name: str, value: Value, at: float) -> None:
        """``name`` was written with ``value`` at monotonic time ``at``."""
        if isinstance(value, int | float) and not isinstance(value, bool):
            self._last[name] = LastWrite(float(value), at)

    def check(self, tag: AnyTag, value: Value, now: float) -> Value:
        """:func:`~edgeos.driver.check_write` against this record; ``now`` is monotonic."""
        last = self._last.get(tag.name)
        return check_write(
            tag,
            value,
            last_value=None if last is None else last.value,
            last_time=None if last is None else last.at,
            now=now,
        )

    def ramp(self, tag: AnyTag, target: float, now: float) -> float:
        """The value closest to ``target`` that ``max_rate`` allows at monotonic ``now``."""
        last = self._last.get(tag.name)
        if last is None or tag.max_rate is None:
            return target
        # A hair under the limit, so that rounding cannot make check() refuse the ramped value.
        step = tag.max_rate * max(now - last.at, 0.0) * (1.0 - 1e-9)
        if abs(target - last.value) <= step:
            return target
        return last.value + math.copysign(step, target - last.value)


@contextlib.asynccontextmanager
async def _timeout_at(clock: Clock, deadline: float) -> AsyncIterator[None]:
    """``asyncio.timeout_at`` on ``clock.monotonic()`` (virtual in tests): raises TimeoutError."""
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(None) as scope:

        async def expire() -> None:
            await clock.sleep_until(deadline)
            scope.reschedule(loop.time())  # expire now: asyncio cancels the body for us

        timer = asyncio.create_task(expire(), name="desired:confirm-deadline")
        try:
            yield
        finally:
            timer.cancel()
            # Not `await timer`: that would re-raise the timer's own cancellation here.
            await asyncio.wait([timer])


# ---------------------------------------------------------------------------------- component


class DesiredState:
    """Desired changes per tag: checks, the write task, confirmation by reads, outcome events."""

    def __init__(
        self,
        columns: Columns,
        *,
        clock: Clock,
        confirm_timeout_s: float = 10.0,
        max_events: int = 10_000,
    ) -> None:
        self._cols = columns
        self._clock = clock
        self._confirm_timeout = confirm_timeout_s
        self._desired: dict[int, DesiredChange] = {}
        self._awaiting: dict[int, DesiredChange] = {}
        self._awaiting_mask = np.zeros(len(columns), dtype=bool)
        self._write_queue: asyncio.Queue[DesiredChange] = asyncio.Queue()
        self._write_locks: dict[int, asyncio.Lock] = {}
        self._events: deque[dict[str, Any]] = deque(maxlen=max_events)
        #: The one record of the last write per tag (``max_rate``); monotonic times.
        self.writes = WriteLog()
        self.events_dropped = 0
        self.outcomes: Counter[str] = Counter()

    # ------------------------------------------------------------------------------ requests

    def set(self, name: str, value: Value, *, source: str) -> DesiredChange:
        """Request ``value`` for a writable tag (see :meth:`edgeos.twin.Twin.set_desired`)."""
        i = self._cols.index(name)
        tag = self._cols.tags[i]
        previous = self._desired.get(i)
        version = (previous.version if previous is not None else 0) + 1
        change = DesiredChange(name, i, value, version, source, self._clock.time())
        if not tag.writable:
            self._finish(change, "refused", "tag is not writable")
            return change
        if previous is not None and not previous.done:
            self._finish(previous, "superseded", f"superseded by version {version}")
        self._desired[i] = change
        try:
            change.value = self.writes.check(tag, value, self._clock.monotonic())
        except WriteRefused as exc:
            self._finish(change, "refused", exc.reason)
            return change
        self._write_queue.put_nowait(change)
        return change

    def get(self, index: int) -> DesiredChange | None:
        return self._desired.get(index)

    @property
    def pending(self) -> int:
        return sum(1 for c in self._desired.values() if not c.done)

    # ------------------------------------------------------------------------------ writes

    async def run_writes(self, write_path: WritePath) -> None:
        """Carry queued desired changes to the device until cancelled (a root-TaskGroup child).

        Writes to one tag are serialised (a newer version never overtakes an older one on the
        wire); writes to different tags proceed concurrently.
        """
        async with asyncio.TaskGroup() as tg:
            while True:
                change = await self._write_queue.get()
                if not change.done:
                    tg.create_task(self._write_one(write_path, change), name=f"write:{change.name}")

    async def _write_one(self, write_path: WritePath, change: DesiredChange) -> None:
        i = change.index
        tag = self._cols.tags[i]
        lock = self._write_locks.setdefault(i, asyncio.Lock())
        async with lock:
            if change.done:
                return
            try:
                await write_path.write(TagBinding(i, tag), change.value)
            except WriteRefused as exc:
                self._finish(change, "refused", exc.reason)
                return
            except (EdgeosError, OSError, TimeoutError) as exc:
                self._finish(change, "failed", f"{type(exc).__name__}: {exc}".rstrip(": "))
                return
            self.writes.record(tag.name, change.value, self._clock.monotonic())
            if change.done:  # superseded while on the wire
                return
            change.written_ts = self._clock.time()
            self._awaiting[i] = change
            self._awaiting_mask[i] = True
        deadline = self._clock.monotonic() + self._confirm_timeout
        try:
            async with _timeout_at(self._clock, deadline):
                await change.wait()  # a confirming read, or a newer version superseding it
        except TimeoutError:
            last = "" if change.reported is None else f" (last read {change.reported!r})"
            self._finish(
                change,
                "timed_out",
                f"no read confirmed the value within {self._confirm_timeout:g} s{last}",
            )

    def confirm(
        self, idx: npt.NDArray[np.int32], vals: npt.NDArray[np.float64], qual: npt.NDArray[Any]
    ) -> None:
        """Settle changes waiting for a read that reports their value (called after apply)."""
        if not self._awaiting:
            return
        cols = self._cols
        for p in np.flatnonzero(self._awaiting_mask[idx]).tolist():
            i = int(idx[p])
            change = self._awaiting.get(i)
            if change is None or int(qual[p]) >= _BAD:
                continue
            if cols.is_string(i):
                text = cols.text(i) or ""
                change.reported = text
                ok = text == change.value
            else:
                reported = float(vals[p])
                target = float(change.value)
                tol = 0.5 * float(cols.resolution[i]) + 1e-9 * max(1.0, abs(target))
                change.reported = cols.format(i, reported)
                ok = abs(reported - target) <= tol
            if ok:
                self._finish(change, "applied")

    def _finish(self, change: DesiredChange, status: Status, reason: str = "") -> None:
        change._resolve(status, reason, self._clock.time())
        i = change.index
        if self._awaiting.get(i) is change:
            del self._awaiting[i]
            self._awaiting_mask[i] = False
        self.outcomes[status] += 1
        if len(self._events) == self._events.maxlen:
            self.events_dropped += 1
        self._events.append({"type": "desired", **change.as_dict()})
        if status in ("refused", "failed", "timed_out"):
            log.info("desired %s v%d %s: %s", change.name, change.version, status, reason)

    # ------------------------------------------------------------------------------ out

    def drain_events(self) -> list[dict[str, Any]]:
        """Outcome events (one per change reaching a final status) since the last drain."""
        events = list(self._events)
        self._events.clear()
        return events

    def state(self) -> dict[str, dict[str, Any]]:
        """Latest desired change per writable tag that has one, with the reported value."""
        out: dict[str, dict[str, Any]] = {}
        for i, change in sorted(self._desired.items()):
            entry = change.as_dict()
            entry["reported_now"] = self._cols.value(i)
            entry["quality"] = self._cols.quality_name(i)
            out[change.name] = entry
        return out

    def fields(self, index: int) -> dict[str, Any]:
        """The desired part of a query row of a writable tag: the last change and its outcome."""
        change = self._desired.get(index)
        if change is None:
            return {
                "desired": None,
                "version": 0,
                "desired_status": None,
                "desired_reason": None,
            }
        return {
            "desired": change.value,
            "version": change.version,
            "desired_status": change.status,
            "desired_reason": change.reason,
        }

    # ------------------------------------------------------------------------------ snapshots

    def saved(self) -> list[dict[str, Any]]:
        return [{**change.as_dict(), "index": i} for i, change in self._desired.items()]

    def check_saved(self, entries: list[dict[str, Any]]) -> str | None:
        """Why saved entries do not fit this twin, or None when they do."""
        names = self._cols.names
        for d in entries:
            if not 0 <= int(d["index"]) < len(names) or d["name"] != names[int(d["index"])]:
                return f"desired entry for unknown tag {d['name']!r}"
        return None

    def load(self, entries: list[dict[str, Any]]) -> None:
        """Restore saved changes; one still pending can no longer be confirmed: ``timed_out``."""
        for d in entries:
            i = int(d["index"])
            change = DesiredChange(
                d["name"],
                i,
                d["value"],
                int(d["version"]),
                str(d["source"]),
                float(d["requested_ts"]),
                status=d["status"],
                reason=str(d["reason"]),
                written_ts=d["written_ts"],
                done_ts=d["done_ts"],
                reported=d["reported"],
            )
            self._desired[i] = change
            if not change.done:
                self._finish(change, "timed_out", "the runtime restarted before a confirming read")

    @property
    def nbytes(self) -> int:
        return int(self._awaiting_mask.nbytes)
