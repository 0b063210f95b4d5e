"""Virtual time, the latency histogram and state-change logging."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import random

import pytest

from edgeos.clock import SystemClock, VirtualClock
from edgeos.histogram import Histogram
from edgeos.logs import JsonFormatter, StateLog, setup_logging


async def test_virtual_clock_wakes_sleepers_in_deadline_order() -> None:
    clock = VirtualClock(start=0.0)
    woke: list[tuple[str, float]] = []

    async def sleeper(name: str, deadline: float) -> None:
        await clock.sleep_until(deadline)
        woke.append((name, clock.monotonic()))

    async with asyncio.TaskGroup() as tg:
        tg.create_task(sleeper("late", 5.0))
        tg.create_task(sleeper("early", 1.5))
        tg.create_task(sleeper("past", -1.0))
        await clock.advance(0.0)
        assert woke == [("past", 0.0)]
        await clock.advance(2.0)
        assert woke[-1] == ("early", 1.5)
        assert clock.monotonic() == 2.0
        await clock.advance(10.0)
    assert woke[-1] == ("late", 5.0)
    assert clock.monotonic() == 12.0


async def test_virtual_wall_clock_jumps_without_moving_deadlines() -> None:
    clock = VirtualClock(start=0.0, wall_offset=100.0)
    clock.jump_wall(-50.0)
    assert clock.time() == 50.0
    assert clock.monotonic() == 0.0


async def test_system_clock_sleep_until_reaches_the_deadline() -> None:
    clock = SystemClock()
    deadline = clock.monotonic() + 0.02
    await clock.sleep_until(deadline)
    assert clock.monotonic() >= deadline


def test_histogram_percentiles_within_bucket_error() -> None:
    rng = random.Random(7)
    samples = [rng.uniform(0.0001, 0.01) for _ in range(20_000)]
    hist = Histogram()
    for s in samples:
        hist.record(s)
    samples.sort()
    for q in (50, 90, 99):
        exact = samples[int(len(samples) * q / 100) - 1]
        assert hist.percentile(q) == pytest.approx(exact, rel=0.11)
    assert hist.max == max(samples)
    assert hist.summary_ms()["count"] == 20_000
    hist.reset()
    assert hist.percentile(99) == 0.0


def test_state_log_logs_only_changes(caplog: pytest.LogCaptureFixture) -> None:
    states = StateLog(logging.getLogger("t.state"))
    with caplog.at_level(logging.INFO, logger="t.state"):
        assert states.update("plc", "down", "refused", level=logging.WARNING)
        for _ in range(100):
            assert not states.update("plc", "down", "refused", level=logging.WARNING)
        assert states.update("plc", "up")
    assert [r.getMessage() for r in caplog.records] == [
        "plc: new -> down (refused)",
        "plc: down -> up",
    ]


def test_json_logging_is_one_object_per_line() -> None:
    stream = io.StringIO()
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    setup_logging("json", "INFO", stream=stream)
    try:
        logging.getLogger("t.json").info("hello %s", "plant", extra={"fields": {"nest": 4}})
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    doc = json.loads(stream.getvalue().strip())
    assert doc["msg"] == "hello plant" and doc["nest"] == 4 and doc["level"] == "INFO"
    assert isinstance(JsonFormatter().format(logging.makeLogRecord({"msg": "x"})), str)
