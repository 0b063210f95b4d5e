"""Wall-clock steps: noticed, logged, counted and sent to the cloud as an event.

Gateways often have no battery-backed clock: a Raspberry Pi boots at the time it last shut down
(or 1970) and NTP steps it forward minutes to days later; an operator may set it by hand; NTP
may step it back. The runtime never waits on the wall clock (deadlines, timeouts, rate limits
and ages use the monotonic clock), but it stamps samples with it, so a step moves every later
timestamp. :class:`ClockWatch` compares ``time() - monotonic()`` between looks: a change larger
than ``threshold_s`` is a step (NTP's slewing is far below it). Each step is logged once, counted
in ``edgeos status`` and carried to the receiver as a ``clock_step`` event, so the cloud knows
where a device's time axis jumped and by how much — samples are never re-stamped.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Any

from edgeos.clock import Clock, wall_offset

__all__ = ["ClockWatch"]

log = logging.getLogger("edgeos.clock")


class ClockWatch:
    """Detects steps of ``clock.time()`` against ``clock.monotonic()``."""

    def __init__(self, clock: Clock, *, threshold_s: float = 1.0, interval_s: float = 1.0) -> None:
        self.clock = clock
        self.threshold_s = threshold_s
        self.interval_s = interval_s
        self._offset = wall_offset(clock)
        self.steps = 0
        self.last_step_s: float | None = None
        self.largest_step_s = 0.0
        self._events: deque[dict[str, Any]] = deque(maxlen=100)

    def check(self) -> float | None:
        """Look once; return the step in seconds (+ forward) when the wall clock jumped."""
        # Bracketed (edgeos.clock.wall_offset): a preemption between the two reads on a busy
        # machine must not look like a step.
        offset = wall_offset(self.clock)
        wall = self.clock.time()
        step = offset - self._offset
        self._offset = offset
        if abs(step) < self.threshold_s:
            return None
        self.steps += 1
        self.last_step_s = step
        if abs(step) > abs(self.largest_step_s):
            self.largest_step_s = step
        log.warning(
            "wall clock stepped by %+.3f s (NTP correction, RTC or manual change); samples "
            "from now on carry the new time, earlier ones are not re-stamped",
            step,
        )
        self._events.append(
            {"type": "clock_step", "ts": wall, "step_s": round(step, 6), "before": wall - step}
        )
        return step

    def drain_events(self) -> list[dict[str, Any]]:
        events = list(self._events)
        self._events.clear()
        return events

    def stats(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "last_step_s": None if self.last_step_s is None else round(self.last_step_s, 3),
            "largest_step_s": round(self.largest_step_s, 3),
        }

    async def run(self) -> None:
        """Look every ``interval_s`` until cancelled."""
        while True:
            await self.clock.sleep_until(self.clock.monotonic() + self.interval_s)
            self.check()
