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

    async def fast() -> None:
        nonlocal running, most
        running += 1
        most = max(most, running)
        starts.append(clock.monotonic())
        await asyncio.sleep(0)
        running -= 1

    async def slow() -> None:
        await asyncio.sleep(0.002)

    sched.add_job("fast", "conn", fast)
    sched.add_job("slow", "conn", slow)
    task = asyncio.create_task(sched.run())
    await asyncio.sleep(0.4)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    stats = sched.stats()
    print("real-clock jitter (fast group):", stats["groups"]["fast"]["jitter"])

    fast_stats = stats["groups"]["fast"]
    assert most == 1
    assert starts == sorted(starts)
    assert fast_stats["ticks"] == len(starts) > 5
    assert fast_stats["errors"] == fast_stats["timeouts"] == 0
    assert stats["groups"]["slow"]["ticks"] > 0
    assert not policy.active
