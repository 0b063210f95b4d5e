"""The health-gated end of a trial: commit after a healthy window, fail after a timeout."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from enum import StrEnum
from typing import TYPE_CHECKING

from edgeos.clock import Clock, SystemClock
from edgeos.ota.health import HealthReport
from edgeos_protocol.outcome import Reason

if TYPE_CHECKING:
    from edgeos.ota.slots import SlotManager

__all__ = ["TrialMonitor", "TrialOutcome"]


class TrialOutcome(StrEnum):
    """How :meth:`TrialMonitor.run` ended."""

    COMMITTED = "committed"
    FAILED = "failed"
    NOT_ON_TRIAL = "not_on_trial"


class TrialMonitor:
    """Commits the trial slot once it has been healthy for ``health_window_s`` without a break.

    Health comes from :meth:`report` (the runtime, in process) and/or a ``poll`` callable
    (e.g. :meth:`HealthFile.read` in a watcher process). A report older than
    ``stale_after_s`` counts as unhealthy (a hung runtime stops reporting). If the slot is not
    committed within ``trial_timeout_s`` the trial fails, :meth:`SlotManager.fail_trial`
    records why, and :meth:`run` returns ``FAILED``; the caller then exits non-zero so the
    supervisor restarts into the previous slot.
    """

    def __init__(
        self,
        slots: SlotManager,
        *,
        health_window_s: float,
        trial_timeout_s: float | None = None,
        stale_after_s: float = 15.0,
        clock: Clock | None = None,
        poll: Callable[[], HealthReport | None] | None = None,
        poll_interval_s: float = 1.0,
        why_not: Callable[[], str] | None = None,
    ) -> None:
        self._slots = slots
        self._window = health_window_s
        self._timeout = trial_timeout_s if trial_timeout_s is not None else 3 * health_window_s
        self._stale = stale_after_s
        self._clock = clock or SystemClock()
        self._poll = poll
        #: Why ``poll`` last returned None (e.g. :attr:`HealthFile.refused`), for the verdict.
        self._why_not = why_not
        self._interval = min(poll_interval_s, health_window_s / 4)
        self._healthy_since: float | None = None
        self._last_report: float | None = None
        self._last_problems: list[str] = ["no health report yet"]

    def report(self, health: HealthReport) -> None:
        """Feed one health observation (cheap; call on every change or periodically)."""
        now = self._clock.monotonic()
        self._last_report = now
        if health.healthy:
            if self._healthy_since is None:
                self._healthy_since = now
        else:
            self._healthy_since = None
            self._last_problems = health.problems()

    async def run(self) -> TrialOutcome:
        """Watch the trial until it commits or fails; returns at once when not on trial."""
        if self._slots.read_state().trial is None:
            return TrialOutcome.NOT_ON_TRIAL
        start = self._clock.monotonic()
        while True:
            if self._poll is not None:
                observed = self._poll()
                if observed is None:
                    self._healthy_since = None
                    why = self._why_not() if self._why_not is not None else ""
                    self._last_problems = [
                        why or "health file missing, stale, or its writer is dead"
                    ]
                else:
                    self.report(observed)
            now = self._clock.monotonic()
            if self._last_report is not None and now - self._last_report > self._stale:
                self._healthy_since = None
                self._last_problems = [f"no health report for {now - self._last_report:.0f} s"]
            if self._healthy_since is not None and now - self._healthy_since >= self._window:
                await asyncio.to_thread(self._slots.commit)
                return TrialOutcome.COMMITTED
            if now - start >= self._timeout:
                detail = (
                    f"not healthy for {self._window:g} s within {self._timeout:g} s: "
                    + "; ".join(self._last_problems)
                )
                await asyncio.to_thread(self._slots.fail_trial, Reason.HEALTH, detail)
                return TrialOutcome.FAILED
            await self._clock.sleep_until(now + self._interval)
