"""Scheduler behaviour in virtual time: exact deadlines, skips, priorities, stagger, timeouts."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import pytest

from edgeos.clock import VirtualClock
from edgeos.config import ScanGroupConfig
from edgeos.scheduler import Scheduler

START = 1000.0


def group(name: str, period_ms: float, **kw: object) -> ScanGroupConfig:
    return ScanGroupConfig(name=name, period_ms=period_ms, **kw)  # type: ignore[arg-type]


async def run_for(sched: Scheduler, clock: VirtualClock, seconds: float) -> None:
    """Run the scheduler for ``seconds`` of virtual time, then cancel it like the runtime would."""
    task = asyncio.create_task(sched.run())
    await clock.advance(seconds)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def recorder(clock: VirtualClock, log: list[float]) -> Callable[[], Awaitable[None]]:
    async def job() -> None:
        log.append(clock.monotonic())

    return job


async def test_deadlines_exact_and_no_drift_over_10000_ticks() -> None:
    clock = VirtualClock(start=START)
    sched = Scheduler(clock, [group("fast", 10)])
    starts: list[float] = []
    sched.add_job("fast", "conn", recorder(clock, starts))
    await run_for(sched, clock, 100.005)

    assert len(starts) == 10_001
    # Every start is exactly on its absolute deadline; nothing accumulates.
    assert starts == [START + k * 0.010 for k in range(10_001)]
    assert starts[-1] - starts[0] == pytest.approx(100.0, abs=1e-9)
    stats = sched.stats()["groups"]["fast"]
    assert stats["ticks"] == 10_001
    assert stats["skipped"] == stats["missed"] == stats["errors"] == 0
    assert stats["jitter"]["max_ms"] == 0.0


async def test_overrun_is_skipped_never_stacked() -> None:
    clock = VirtualClock(start=START)
    sched = Scheduler(clock, [group("g", 10, timeout_ms=1000)])
    starts: list[float] = []
    running = 0
    most = 0

    async def slow() -> None:
        nonlocal running, most
        running += 1
        most = max(most, running)
        starts.append(clock.monotonic())
        await clock.sleep_until(clock.monotonic() + 0.025)  # 2.5 periods
        running -= 1

    sched.add_job("g", "slow", slow)
    await run_for(sched, clock, 0.095)  # deadlines 0..9

    assert most == 1
    assert starts == pytest.approx([START + k * 0.010 for k in (0, 3, 6, 9)])
    stats = sched.group_stats("g")
    assert stats.ticks == 4
    assert stats.skipped == 6
    assert stats.timeouts == 0


async def test_higher_priority_starts_first_when_due_together() -> None:
    clock = VirtualClock(start=START)
    groups = [group("low", 100, priority=10), group("mid", 100), group("high", 100, priority=90)]
    sched = Scheduler(clock, groups, stagger=False)
    order: list[str] = []

    def job(name: str) -> Callable[[], Awaitable[None]]:
        async def fn() -> None:
            order.append(name)

        return fn

    for name in ("low", "mid", "high"):
        sched.add_job(name, "conn", job(name))
    await run_for(sched, clock, 0.25)

    assert order == ["high", "mid", "low"] * 3


async def test_slow_group_never_starves_a_fast_one() -> None:
    clock = VirtualClock(start=START)
    sched = Scheduler(clock, [group("fast", 10), group("slow", 100, timeout_ms=10_000)])
    fast: list[float] = []
    sched.add_job("fast", "conn", recorder(clock, fast))

    async def stuck_for_a_while() -> None:
        await clock.sleep_until(clock.monotonic() + 0.250)

    sched.add_job("slow", "conn", stuck_for_a_while)
    await run_for(sched, clock, 0.5)

    assert len(fast) == 51
    assert sched.group_stats("fast").skipped == 0
    assert sched.group_stats("slow").skipped > 0


async def test_phases_are_staggered_within_and_across_groups() -> None:
    clock = VirtualClock(start=START)
    sched = Scheduler(clock, [group("a", 1000), group("b", 1000)])
    first: dict[str, float] = {}

    def job(key: str) -> Callable[[], Awaitable[None]]:
        async def fn() -> None:
            first.setdefault(key, clock.monotonic() - START)

        return fn

    for j in range(4):
        sched.add_job("a", f"a{j}", job(f"a{j}"))
    for j in range(2):
        sched.add_job("b", f"b{j}", job(f"b{j}"))
    await run_for(sched, clock, 1.0)

    assert [first[f"a{j}"] for j in range(4)] == pytest.approx([0.0, 0.25, 0.5, 0.75])
    b = sorted(first[f"b{j}"] for j in range(2))
    assert b[1] - b[0] == pytest.approx(0.5)
    # Group b sits between group a's slots, not on them.
    assert all(min(abs(x - a) for a in (0.0, 0.25, 0.5, 0.75, 1.0)) > 0.05 for x in b)


async def test_timeout_shorter_than_period_cancels_the_scan() -> None:
    clock = VirtualClock(start=START)
    sched = Scheduler(clock, [group("g", 100, timeout_ms=40)])
    cancelled: list[float] = []
    never = asyncio.Event()

    async def hangs() -> None:
        try:
            await never.wait()
        except asyncio.CancelledError:
            cancelled.append(clock.monotonic())
            raise

    sched.add_job("g", "conn", hangs)
    await run_for(sched, clock, 0.35)

    stats = sched.group_stats("g")
    assert stats.ticks == 4
    assert stats.timeouts == 4
    assert stats.skipped == 0
    assert stats.errors == 0
    assert cancelled == pytest.approx([START + 0.04 + k * 0.1 for k in range(4)])


async def test_without_timeout_a_late_scan_is_never_cancelled_only_skipped() -> None:
    # Cancelling a scan mid-request forces a Modbus reconnect; by default the scheduler lets a
    # late scan finish (the supervisor's request timeout bounds the I/O) and skips ticks.
    clock = VirtualClock(start=START)
    sched = Scheduler(clock, [group("g", 100)])
    release = asyncio.Event()
    starts: list[float] = []

    async def slow() -> None:
        starts.append(clock.monotonic())
        if len(starts) == 1:
            await release.wait()

    sched.add_job("g", "conn", slow)
    task = asyncio.create_task(sched.run())
    await clock.advance(0.35)
    release.set()
    await clock.advance(0.10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    stats = sched.group_stats("g")
    assert stats.timeouts == 0
    assert stats.skipped == 3
    assert starts == pytest.approx([START, START + 0.4])


async def test_errors_are_counted_and_logged_on_change_only(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = VirtualClock(start=START)
    sched = Scheduler(clock, [group("g", 100)])
    calls = 0

    async def flaky() -> None:
        nonlocal calls
        calls += 1
        if calls <= 5:
            raise ConnectionResetError("peer went away")
        if calls == 6:
            # A job's own TimeoutError is an error, not a scheduler timeout.
            raise TimeoutError

    sched.add_job("g", "conn", flaky)
    with caplog.at_level(logging.INFO, logger="edgeos.scheduler"):
        await run_for(sched, clock, 0.75)

    stats = sched.group_stats("g")
    assert stats.ticks == 8
    assert stats.errors == 6
    assert stats.timeouts == 0
    messages = [r.getMessage() for r in caplog.records]
    assert len([m for m in messages if "failing" in m]) == 1
    assert len([m for m in messages if "recovered" in m]) == 1


class LateClock(VirtualClock):
    """A virtual clock whose sleeps overshoot, as if the event loop were blocked."""

    async def sleep_until(self, deadline: float) -> None:
        await super().sleep_until(deadline + 0.035)


async def test_late_dispatcher_counts_missed_ticks_and_starts_only_the_latest() -> None:
    clock = LateClock(start=START)
    sched = Scheduler(clock, [group("g", 10)])
    starts: list[float] = []
    sched.add_job("g", "conn", recorder(clock, starts))
    await run_for(sched, clock, 0.5)

    stats = sched.group_stats("g")
    assert stats.missed > 0
    assert stats.ticks == len(starts)
    assert stats.ticks + stats.missed == pytest.approx(51, abs=4)
    # Never more than one period behind the deadline it reports.
    assert stats.jitter.max < 0.010


async def test_jobs_can_be_added_and_removed_while_running() -> None:
    clock = VirtualClock(start=START)
    sched = Scheduler(clock, [group("g", 100)])
    a: list[float] = []
    b: list[float] = []
    sched.add_job("g", "a", recorder(clock, a))
    task = asyncio.create_task(sched.run())
    await clock.advance(0.25)
    sched.add_job("g", "b", recorder(clock, b))
    with pytest.raises(ValueError, match="already registered"):
        sched.add_job("g", "b", recorder(clock, b))
    await clock.advance(0.5)
    sched.remove_job("g", "a")
    count_a = len(a)
    await clock.advance(0.5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    assert len(a) == count_a
    assert len(b) >= 8
    assert sched.jobs("g") == ["b"]


async def test_unknown_group_is_named() -> None:
    sched = Scheduler(VirtualClock(), [group("fast", 10)])

    async def job() -> None:
        return None

    with pytest.raises(KeyError, match="unknown scan group 'slow'"):
        sched.add_job("slow", "x", job)


async def test_cancelling_run_cancels_scans_in_progress() -> None:
    clock = VirtualClock(start=START)
    sched = Scheduler(clock, [group("g", 100, timeout_ms=10_000)])
    cancelled = asyncio.Event()

    async def hangs() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    sched.add_job("g", "conn", hangs)
    task = asyncio.create_task(sched.run())
    await clock.advance(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert cancelled.is_set()


async def test_a_gated_job_starts_no_scan_before_it_is_ready_and_counts_no_skip() -> None:
    clock = VirtualClock(start=START)
    sched = Scheduler(clock, [group("g", 10)], skip_log=True)
    starts: list[float] = []
    ready_at = START + 0.035

    sched.add_job("g", "conn", recorder(clock, starts), ready=lambda: clock.monotonic() >= ready_at)
    await run_for(sched, clock, 0.095)  # deadlines 0..9; ready from deadline 4 on

    assert starts == pytest.approx([START + k * 0.010 for k in range(4, 10)])
    stats = sched.group_stats("g")
    # Ticks before the gate opened are not scans the runtime failed to run.
    assert stats.ticks == 6 and stats.skipped == stats.missed == 0
    assert sched.drain_skips() == []


async def test_skipped_ticks_are_kept_as_runs_with_wall_clock_deadlines() -> None:
    clock = VirtualClock(start=START)
    sched = Scheduler(clock, [group("g", 10)], skip_log=True)

    async def slow() -> None:
        await clock.sleep_until(clock.monotonic() + 0.025)  # 2.5 periods: skips 2 ticks

    sched.add_job("g", "plc", slow)
    await run_for(sched, clock, 0.095)  # starts at 0, 3, 6, 9; skips 1-2, 4-5, 7-8

    runs = sched.drain_skips()
    assert sched.group_stats("g").skipped == 6
    assert [(r.group, r.job, r.count) for r in runs] == [("g", "plc", 2)] * 3
    wall = clock.time() - clock.monotonic()
    firsts = [START + wall + k * 0.010 for k in (1, 4, 7)]
    assert [r.first_ts for r in runs] == pytest.approx(firsts)
    assert [r.last_ts - r.first_ts for r in runs] == pytest.approx([0.010] * 3)
    assert runs[0].wire() == ["g", "plc", round(firsts[0] * 1e6), round(runs[0].last_ts * 1e6), 2]
    # Drained once: the next batch does not announce them again.
    assert sched.drain_skips() == []


async def test_late_dispatcher_missed_ticks_are_kept_in_the_skip_log() -> None:
    clock = LateClock(start=START)
    sched = Scheduler(clock, [group("g", 10)], skip_log=True)
    sched.add_job("g", "conn", recorder(clock, []))
    await run_for(sched, clock, 0.5)

    stats = sched.group_stats("g")
    assert stats.missed > 0
    assert sum(r.count for r in sched.drain_skips()) == stats.missed + stats.skipped


async def test_without_skip_log_nothing_is_kept() -> None:
    clock = LateClock(start=START)
    sched = Scheduler(clock, [group("g", 10)])
    sched.add_job("g", "conn", recorder(clock, []))
    await run_for(sched, clock, 0.5)
    assert sched.group_stats("g").missed > 0 and sched.drain_skips() == []
