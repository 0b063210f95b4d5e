"""The scheduler on the real clock and loop (counts and ordering only; jitter is printed)."""

from __future__ import annotations

import asyncio
import contextlib

from edgeos.clock import SystemClock
from edgeos.config import ScanGroupConfig
from edgeos.gcpolicy import GcPolicy
from edgeos.scheduler import Scheduler


async def test_real_clock_runs_groups_without_overlap() -> None:
    clock = SystemClock()
    groups = [
        ScanGroupConfig(name="fast", period_ms=10, priority=90),
        ScanGroupConfig(name="slow", period_ms=50),
    ]
    policy = GcPolicy()
    sched = Scheduler(clock, groups, gc_policy=policy)
    starts: list[float] = []
    running = 0
    most = 0
    # Run until both groups have done their share, not for a fixed time: on a loaded machine
    # 0.4 s of wall time held as few as 5 fast ticks.
    enough = asyncio.Event()
    slow_runs = 0

    async def fast() -> None:
        nonlocal running, most
        running += 1
        most = max(most, running)
        starts.append(clock.monotonic())
        await asyncio.sleep(0)
        running -= 1
        if len(starts) >= 20 and slow_runs >= 2:
            enough.set()

    async def slow() -> None:
        nonlocal slow_runs
        await asyncio.sleep(0.002)
        slow_runs += 1

    sched.add_job("fast", "conn", fast)
    sched.add_job("slow", "conn", slow)
    task = asyncio.create_task(sched.run())
    try:
        async with asyncio.timeout(30):
            await enough.wait()
    finally:
        task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    stats = sched.stats()
    print("real-clock jitter (fast group):", stats["groups"]["fast"]["jitter"])

    fast_stats = stats["groups"]["fast"]
    assert most == 1
    assert starts == sorted(starts)
    assert fast_stats["ticks"] == len(starts) >= 20
    assert fast_stats["errors"] == fast_stats["timeouts"] == 0
    assert stats["groups"]["slow"]["ticks"] > 0
    assert not policy.active
