"""Connection supervision: the core, not the drivers, owns connecting, timeouts and backoff.

Each connection has one :class:`ConnectionSupervisor`. Its :meth:`~ConnectionSupervisor.run`
task (a child of the runtime's root TaskGroup) keeps the connection up; the scheduler calls
:meth:`~ConnectionSupervisor.read` on every tick. State machine::

    connecting ──ok──► up ◄──all good── degraded
        │               │  some tags bad ──►
        │ fail          │ transport error / lost
        └──────────► down ◄┘   (retries with backoff stay in down until one succeeds)

A read while the connection is not up never waits: it returns the group's tags with quality
``BAD_COMM`` at once, so a dead PLC costs nothing on the scan loop. State changes are logged
once ("up -> down (connection lost: the peer closed the connection)"); failed polls and
failed reconnect attempts are counted, not logged.

Deadlines (:class:`Timeouts`): a write is one request (``request_timeout_s`` of the driver's
options); a read of a scan group is a whole scan (``scan_timeout_s`` of the connection);
opening the connection has ``connect_timeout_s``. Reconnects follow the connection's
:class:`~edgeos_protocol.backoff.BackoffPolicy` (``[connections.reconnect]``): the first retry
after a connection that had been up is fast, repeated failures walk up the ladder.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgeos.clock import Clock
from edgeos.driver import Driver, Quality, ReadResult, TagBinding, Value, check_write
from edgeos.errors import TimeoutError_, TransportError
from edgeos.histogram import Histogram
from edgeos.logs import StateLog
from edgeos_protocol.backoff import Backoff, BackoffPolicy

__all__ = ["Backoff", "BackoffPolicy", "ConnState", "ConnectionSupervisor", "Timeouts"]

log = logging.getLogger("edgeos.supervisor")


class ConnState(enum.StrEnum):
    CONNECTING = "connecting"
    UP = "up"
    DEGRADED = "degraded"
    DOWN = "down"


@dataclass(frozen=True, slots=True)
class Timeouts:
    """The deadlines of one connection, read from its validated configuration."""

    #: One request on the wire (a write): the driver option ``request_timeout_s``.
    request_s: float
    #: One read of a whole scan group: the connection's ``scan_timeout_s``.
    scan_s: float
    #: Opening the connection: the driver option ``connect_timeout_s``.
    connect_s: float


class ConnectionSupervisor:
    """Keeps one driver connected and turns its failures into tag qualities and counters."""

    def __init__(
        self,
        name: str,
        driver: Driver,
        bindings: Sequence[TagBinding],
        *,
        clock: Clock,
        timeouts: Timeouts,
        backoff: Backoff,
        on_state: Callable[[str, ConnState], None] | None = None,
    ) -> None:
        self.name = name
        self.driver = driver
        self.clock = clock
        self.request_timeout_s = timeouts.request_s
        self.scan_timeout_s = timeouts.scan_s
        self.connect_timeout_s = timeouts.connect_s
        self.backoff = backoff
        self._on_state = on_state
        self.state = ConnState.CONNECTING
        self.since = clock.monotonic()
        self.last_error = ""
        self.reconnects = 0
        self.connects = 0
        self.errors: Counter[str] = Counter()
        self.latency = Histogram()
        self._lost = asyncio.Event()
        self._lost_reason = ""
        self._up = asyncio.Event()
        self._state_log = StateLog(log, repeat_s=3600)
        self._by_name = {b.tag.name: b for b in bindings}
        self._group_indices: dict[str, np.ndarray[Any, np.dtype[np.int32]]] = {}
        groups: dict[str, list[int]] = {}
        for b in bindings:
            groups.setdefault(b.tag.scan_group, []).append(b.index)
        for group, idx in groups.items():
            self._group_indices[group] = np.asarray(idx, dtype=np.int32)

    # ----------------------------------------------------------------- state

    @property
    def is_up(self) -> bool:
        return self.state in (ConnState.UP, ConnState.DEGRADED)

    def _set(self, state: ConnState, reason: str = "") -> None:
        if state == self.state and not reason:
            return
        level = logging.WARNING if state in (ConnState.DOWN, ConnState.DEGRADED) else logging.INFO
        if state != self.state:
            self.since = self.clock.monotonic()
        self.state = state
        if state in (ConnState.UP, ConnState.DEGRADED):
            self._up.set()
        else:
            self._up.clear()
        self._state_log.update(f"connection {self.name}", state.value, reason, level=level)
        if self._on_state is not None:
            self._on_state(self.name, state)

    def _mark_lost(self, exc: BaseException) -> None:
        kind = getattr(exc, "kind", type(exc).__name__)
        self.errors[kind] += 1
        self.last_error = f"{kind}: {exc}"
        if self.is_up and not self._lost.is_set():
            self._lost_reason = str(exc)
            self._lost.set()

    async def wait_up(self) -> None:
        """Wait until the connection is up (for start-up ordering and tests)."""
        await self._up.wait()

    # ------------------------------------------------------------------ loop

    async def run(self) -> None:
        """Connect, watch, reconnect with backoff — until cancelled."""
        try:
            while True:
                # Retries while down stay "down": a PLC that is off for a week must not log
                # two lines per attempt.
                if self.state != ConnState.DOWN:
                    self._set(ConnState.CONNECTING)
                try:
                    async with asyncio.timeout(self.connect_timeout_s):
                        await self.driver.connect()
                except (TransportError, TimeoutError) as exc:
                    if isinstance(exc, TimeoutError):
                        exc = TimeoutError_(f"connect took longer than {self.connect_timeout_s} s")
                    self.errors[getattr(exc, "kind", "connect")] += 1
                    self.last_error = str(exc)
                    await self.driver.close()
                    self._set(ConnState.DOWN, str(exc))
                    await self._pause()
                    continue
                self.connects += 1
                if self.connects > 1:
                    self.reconnects += 1
                self._lost.clear()
                connected_at = self.clock.monotonic()
                self._set(ConnState.UP)
                reason = await self._wait_lost()
                await self.driver.close()
                self._set(ConnState.DOWN, f"connection lost: {reason}")
                # A link that stayed up at least as long as the policy's first delay had
                # really been up: retry fast. One that dropped sooner (a peer that accepts and
                # closes at once) keeps climbing the ladder instead of being hammered.
                if self.clock.monotonic() - connected_at >= self.backoff.policy.initial_s:
                    self.backoff.lost()
                await self._pause()
        finally:
            await asyncio.shield(self.driver.close())

    async def _pause(self) -> None:
        await self.clock.sleep_until(self.clock.monotonic() + self.backoff.next_delay())

    async def _wait_lost(self) -> str:
        """Wait until a call failed or the driver saw the link die; say what happened."""
        driver_lost = self.driver.connection_lost
        waiters = {
            asyncio.ensure_future(self._lost.wait()),
            asyncio.ensure_future(driver_lost.wait()),
        }
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()
            await asyncio.gather(*waiters, return_exceptions=True)
        if driver_lost.is_set():
            # The driver's account is the cause; a read failing at the same moment with
            # "not connected" is only its consequence.
            if not self._lost.is_set():
                self.errors["lost"] += 1
            self.last_error = driver_lost.reason or "the driver reported the connection lost"
            return self.last_error
        return self._lost_reason

    # ------------------------------------------------------------ operations

    def bad_result(self, scan_group: str, quality: Quality = Quality.BAD_COMM) -> ReadResult:
        idx = self._group_indices.get(scan_group)
        if idx is None or len(idx) == 0:
            return ReadResult.empty()
        n = len(idx)
        now = self.clock.time()
        result = ReadResult(
            idx,
            np.full(n, np.nan),
            np.full(n, int(quality), dtype=np.uint8),
            np.full(n, now),
        )
        result.bad_reasons[self.state.value] = n
        return result

    def has_group(self, scan_group: str) -> bool:
        return scan_group in self._group_indices

    async def read(self, scan_group: str) -> ReadResult:
        """Read a scan group; never raises a transport error, never waits for a dead peer."""
        if not self.is_up:
            return self.bad_result(scan_group)
        start = self.clock.monotonic()
        try:
            async with asyncio.timeout(self.scan_timeout_s):
                result = await self.driver.read(scan_group)
        except TimeoutError:
            self._mark_lost(
                TimeoutError_(
                    f"a scan of {scan_group!r} took longer than scan_timeout_s "
                    f"({self.scan_timeout_s} s)"
                )
            )
            return self.bad_result(scan_group)
        except TransportError as exc:
            self._mark_lost(exc)
            return self.bad_result(scan_group)
        self.latency.record(self.clock.monotonic() - start)
        if result.bad_reasons:
            for reason, count in result.bad_reasons.items():
                self.errors[reason] += count
            if self.state == ConnState.UP:
                self._set(ConnState.DEGRADED, ", ".join(sorted(result.bad_reasons)))
        elif self.state == ConnState.DEGRADED:
            self._set(ConnState.UP)
        return result

    async def write(self, tag_name: str, value: Value) -> None:
        """Check type and hard limits, then write; raises WriteRefused or TransportError.

        ``max_rate`` is not checked here: the twin's desired state owns each tag's last write
        (:class:`edgeos.twin.WriteLog`, monotonic clock) and checks it before queuing a change.
        """
        binding = self._by_name[tag_name]
        checked = check_write(binding.tag, value)
        if not self.is_up:
            raise TransportError(f"connection {self.name} is {self.state.value}")
        try:
            async with asyncio.timeout(self.request_timeout_s):
                await self.driver.write(binding, checked)
        except TimeoutError as exc:
            err = TimeoutError_(f"write took longer than {self.request_timeout_s} s")
            self._mark_lost(err)
            raise err from exc
        except TransportError as exc:
            self._mark_lost(exc)
            raise

    def stats(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "state": self.state.value,
            "since_s": round(self.clock.monotonic() - self.since, 1),
            "connects": self.connects,
            "reconnects": self.reconnects,
            "errors": dict(self.errors),
            "last_error": self.last_error,
            "latency": self.latency.summary_ms(),
            "driver": self.driver.stats.as_dict(),
        }
