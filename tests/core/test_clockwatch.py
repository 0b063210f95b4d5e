"""Wall-clock steps are noticed once, counted, and become ``clock_step`` events."""

from __future__ import annotations

import asyncio
import logging

import pytest

from edgeos.clock import VirtualClock, wall_offset
from edgeos.clockwatch import ClockWatch


def test_a_step_is_reported_once_and_slewing_is_not() -> None:
    clock = VirtualClock()
    watch = ClockWatch(clock, threshold_s=1.0)
    assert watch.check() is None
    clock.jump_wall(0.2)  # what NTP slews: below the threshold
    assert watch.check() is None
    clock.jump_wall(3600.0)
    assert watch.check() == pytest.approx(3600.0)
    assert watch.check() is None  # the new offset is the reference now
    clock.jump_wall(-86400.0)
    assert watch.check() == pytest.approx(-86400.0)
    stats = watch.stats()
    assert stats["steps"] == 2
    assert stats["last_step_s"] == pytest.approx(-86400.0)
    assert stats["largest_step_s"] == pytest.approx(-86400.0)
    events = watch.drain_events()
    assert [e["type"] for e in events] == ["clock_step", "clock_step"]
    assert events[0]["step_s"] == pytest.approx(3600.0)
    assert events[1]["ts"] - events[1]["before"] == pytest.approx(-86400.0)
    assert watch.drain_events() == []


async def test_the_watch_task_finds_a_step_within_its_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = VirtualClock()
    watch = ClockWatch(clock, interval_s=1.0)
    task = asyncio.create_task(watch.run())
    await clock.advance(2.0)
    clock.jump_wall(-30.0)
    with caplog.at_level(logging.WARNING, logger="edgeos.clock"):
        await clock.advance(1.0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert watch.steps == 1
    assert "wall clock stepped by -30.000 s" in caplog.text


class _PreemptedClock(VirtualClock):
    """A virtual clock whose process is descheduled for ``stall`` seconds right after its first
    ``stalls`` wall-clock reads (what a CPU hog does to a pair of clock reads)."""

    def __init__(self, stall: float, stalls: int) -> None:
        super().__init__()
        self.stall = stall
        self.stalls = stalls

    def time(self) -> float:
        wall = super().time()
        if self.stalls > 0:
            self.stalls -= 1
            self._now += self.stall  # real time passes: the next read comes this much later
        return wall


def test_a_preemption_between_the_clock_reads_does_not_skew_the_wall_offset() -> None:
    clock = _PreemptedClock(stall=1.5, stalls=1)
    naive = clock.time() - clock.monotonic()  # stalled between the reads
    assert naive == pytest.approx(1_700_000_000.0 - 1.5)
    clock.stalls = 1
    # The first bracket holds the stall; a tight one follows and wins.
    assert wall_offset(clock) == pytest.approx(1_700_000_000.0, abs=1e-9)


def test_a_preemption_longer_than_the_threshold_is_not_taken_for_a_clock_step() -> None:
    clock = _PreemptedClock(stall=2.0, stalls=0)
    watch = ClockWatch(clock, threshold_s=1.0)
    clock.stalls = 1  # the next look is descheduled between its reads
    assert watch.check() is None
    assert watch.stats()["steps"] == 0
