"""GC policy: thresholds, freezing, idle-time collections and counting; the loop factory."""

from __future__ import annotations

import asyncio
import gc

import pytest

from edgeos.clock import VirtualClock
from edgeos.config import ScanGroupConfig
from edgeos.gcpolicy import GcPolicy, GcSettings, loop_kind, new_event_loop
from edgeos.scheduler import Scheduler


class Node:
    def __init__(self) -> None:
        self.me = self


def make_cycles(n: int) -> None:
    for _ in range(n):
        Node()


def test_start_freezes_and_stop_restores() -> None:
    before = gc.get_threshold()
    policy = GcPolicy(GcSettings(gen0_threshold=12_345, gen1_threshold=7, gen2_ceiling=999))
    with policy:
        assert gc.get_threshold() == (12_345, 7, 999)
        assert gc.get_freeze_count() > 0
        assert policy.frozen_objects >= gc.get_freeze_count() - 100
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0
    assert not policy.active


def test_idle_runs_young_and_full_collections_and_counts_them() -> None:
    settings = GcSettings(gen0_threshold=1000, gen1_threshold=5, full_after=2, margin=1.0)
    with GcPolicy(settings) as policy:
        start = list(policy.collections)
        assert policy.idle(0.0) is None  # no time, no work

        gc.collect(0)
        gc.collect(1)
        gc.collect(1)  # two gen-1 passes since the last full one
        assert policy.idle(10.0) == 2
        assert policy.collections[2] == start[2] + 1
        assert policy.idle_collections[2] >= 1

        gc.disable()  # keep the automatic trigger from racing the allocation below
        try:
            make_cycles(800)
            assert policy.idle(10.0) == 0
        finally:
            gc.enable()
        stats = policy.stats()
    assert stats["collections"][0] > start[0]
    assert stats["gen2_collections"] == policy.gen2_collections
    assert stats["max_pause_ms"][2] >= 0.0
    assert sum(stats["hot_collections"]) >= 0


def test_a_full_collection_is_due_after_full_every_s_even_without_young_passes() -> None:
    """Cyclic garbage (a dropped broker client and its TLS context) must not wait ~45 minutes
    for the gen-1 counter: the time bound alone makes a full pass due."""
    now = [100.0]
    settings = GcSettings(full_after=10_000, full_every_s=60.0, margin=1.0, min_idle_s=0.0)
    with GcPolicy(settings, monotonic=lambda: now[0]) as policy:
        gc.disable()  # no automatic pass may reset the counters under the test
        try:
            full_before = policy.collections[2]
            now[0] += 59.0
            assert policy.idle(10.0) != 2
            make_cycles(50)
            now[0] += 2.0
            assert policy.idle(10.0) == 2
            assert policy.collections[2] == full_before + 1
            # The clock restarts from that pass.
            assert policy.idle(10.0) != 2
            now[0] += 61.0
            assert policy.idle(10.0) == 2
        finally:
            gc.enable()


def test_idle_declines_when_the_gap_is_shorter_than_a_pause() -> None:
    with GcPolicy(GcSettings(full_after=1, min_idle_s=0.0, margin=1e9)) as policy:
        gc.collect(1)
        assert policy.idle(1.0) is None


async def test_scheduler_drives_idle_collections_in_virtual_time() -> None:
    clock = VirtualClock()
    settings = GcSettings(gen0_threshold=1000, young_fraction=0.01, margin=0.0, min_idle_s=0.0)
    policy = GcPolicy(settings)
    sched = Scheduler(clock, [ScanGroupConfig(name="g", period_ms=100)], gc_policy=policy)

    async def garbage() -> None:
        make_cycles(200)

    sched.add_job("g", "conn", garbage)
    task = asyncio.create_task(sched.run())
    await clock.advance(1.0)
    assert policy.active
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    stats = sched.stats()
    assert not policy.active
    assert sum(stats["gc"]["idle_collections"]) > 1


def test_new_event_loop_prefers_uvloop() -> None:
    loop = new_event_loop()
    try:
        kind = loop_kind(loop)
        try:
            import uvloop  # noqa: F401
        except ImportError:
            assert kind == "asyncio"
        else:
            assert kind == "uvloop"
        assert loop.run_until_complete(asyncio.sleep(0, result=42)) == 42
    finally:
        loop.close()
