"""Injectable time: a monotonic clock for deadlines and a wall clock for timestamps.

Every part that waits or stamps takes a :class:`Clock`. Production uses :class:`SystemClock`;
tests use :class:`VirtualClock`, whose time moves only when the test advances it, so deadline,
skip and timeout logic is tested exactly and without sleeping.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import time
from typing import Protocol, runtime_checkable

__all__ = ["Clock", "SystemClock", "VirtualClock", "wall_offset"]


@runtime_checkable
class Clock(Protocol):
    def monotonic(self) -> float:
        """Seconds on a clock that never jumps (deadlines, durations)."""
        ...

    def time(self) -> float:
        """Seconds since the Unix epoch (timestamps on samples and batches)."""
        ...

    async def sleep_until(self, deadline: float) -> None:
        """Sleep until ``monotonic() >= deadline``; returns at once when it is already past."""
        ...


def wall_offset(clock: Clock, *, tries: int = 4) -> float:
    """``time() − monotonic()`` measured so that a preemption between the two reads does not
    skew it: each try brackets the wall read between two monotonic reads and the tightest
    bracket wins. On a busy machine one naive pair can be off by tens of milliseconds — a
    large part of a 100 ms scan period — which moved every deadline converted with it
    (scheduler's skipped-scan announcements) off its grid."""
    best_span = math.inf
    best = 0.0
    for _ in range(tries):
        m0 = clock.monotonic()
        w = clock.time()
        m1 = clock.monotonic()
        span = m1 - m0
        if span < best_span:
            best_span, best = span, w - (m0 + m1) / 2
        if span < 1e-4:
            break
    return best


class SystemClock:
    """The real clocks of the machine."""

    def monotonic(self) -> float:
        return time.monotonic()

    def time(self) -> float:
        return time.time()

    async def sleep_until(self, deadline: float) -> None:
        delay = deadline - time.monotonic()
        # asyncio's timer resolution is ~1 ms; sleep coarse, then yield until the deadline so a
        # 100 Hz group does not carry the timer's rounding as jitter.
        if delay > 0.002:
            await asyncio.sleep(delay - 0.001)
        while time.monotonic() < deadline:  # noqa: ASYNC110 - a deliberate sub-ms spin
            await asyncio.sleep(0)


class VirtualClock:
    """A clock that stands still until :meth:`advance` moves it.

    ``wall_offset`` maps monotonic to wall time and can be changed with :meth:`jump_wall`
    to test wall-clock steps (NTP corrections) without disturbing deadlines.
    """

    def __init__(self, start: float = 1000.0, wall_offset: float = 1_700_000_000.0) -> None:
        self._now = start
        self._wall_offset = wall_offset
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._counter = itertools.count()

    def monotonic(self) -> float:
        return self._now

    def time(self) -> float:
        return self._now + self._wall_offset

    def jump_wall(self, seconds: float) -> None:
        self._wall_offset += seconds

    async def sleep_until(self, deadline: float) -> None:
        if deadline <= self._now:
            await asyncio.sleep(0)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (deadline, next(self._counter), fut))
        await fut

    @property
    def pending(self) -> int:
        """Number of tasks currently sleeping on this clock."""
        return sum(1 for _, _, fut in self._sleepers if not fut.done())

    async def advance(self, seconds: float, *, step: float | None = None) -> None:
        """Move time forward, waking sleepers in deadline order.

        Between wake-ups the event loop runs until quiet so woken tasks can act (and schedule
        new sleeps) before time moves on. ``step`` bounds how far time jumps at once.
        """
        target = self._now + seconds
        while True:
            await _settle()
            next_deadline = self._sleepers[0][0] if self._sleepers else None
            limit = target if step is None else min(target, self._now + step)
            if next_deadline is not None and next_deadline <= limit:
                deadline, _, fut = heapq.heappop(self._sleepers)
                self._now = max(self._now, deadline)
                if not fut.done():
                    fut.set_result(None)
                continue
            self._now = limit
            if limit >= target:
                await _settle()
                return


async def _settle(rounds: int = 20) -> None:
    for _ in range(rounds):
        await asyncio.sleep(0)
