"""Desired changes are awaitable: ``await change.wait()`` returns the outcome, with no polling.

Everything runs in virtual time (:class:`~edgeos.clock.VirtualClock`); a waiter is a task that
the test checks right after the event that settles the change.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest

from edgeos.clock import VirtualClock
from edgeos.config import TwinConfig
from edgeos.driver import Quality, ReadResult
from edgeos.errors import ConnectError
from edgeos.twin import Twin
from edgeos_testing.twin_writes import RecordingWritePath, running_writes, setpoint


class Rig:
    def __init__(self) -> None:
        self.clock = VirtualClock()
        self.twin = Twin([setpoint()], TwinConfig(), clock=self.clock, confirm_timeout_s=5.0)
        self.path = RecordingWritePath()

    def read(self, value: float, quality: int = Quality.GOOD) -> None:
        result = ReadResult(
            np.array([0], dtype=np.int32),
            np.array([value]),
            np.array([quality], dtype=np.uint8),
            np.array([0.0]),
        )
        self.twin.apply(result, self.clock.time())


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    r = Rig()
    async with running_writes(r.twin, r.path):
        yield r


async def test_wait_returns_applied_when_the_confirming_read_arrives(rig: Rig) -> None:
    change = rig.twin.set_desired("oven.sp", 180, source="operator")
    waiter = asyncio.create_task(change.wait())
    await rig.clock.advance(0.1)
    assert rig.path.writes == [("oven.sp", 180.0)] and not waiter.done()
    rig.read(180.0)
    assert await waiter == "applied"
    assert rig.clock.pending == 0  # no timer left sleeping to the confirm deadline


async def test_wait_returns_at_once_for_a_change_refused_before_the_wire(rig: Rig) -> None:
    change = rig.twin.set_desired("oven.sp", 9999, source="operator")
    async with asyncio.timeout(0.1):  # already final: no clock needs to move
        assert await change.wait() == "refused"
    assert rig.path.writes == []


async def test_wait_returns_timed_out_at_the_confirm_deadline_in_virtual_time(rig: Rig) -> None:
    change = rig.twin.set_desired("oven.sp", 100, source="operator")
    waiter = asyncio.create_task(change.wait())
    await rig.clock.advance(4.9)
    assert not waiter.done()
    await rig.clock.advance(0.2)
    assert waiter.done() and waiter.result() == "timed_out"
    assert "within 5 s" in change.reason


async def test_wait_returns_superseded_when_a_newer_version_arrives(rig: Rig) -> None:
    rig.path.gate = asyncio.Event()
    first = rig.twin.set_desired("oven.sp", 10, source="operator")
    waiter = asyncio.create_task(first.wait())
    await rig.clock.advance(0.1)
    second = rig.twin.set_desired("oven.sp", 11, source="operator")
    assert await waiter == "superseded"
    rig.path.gate.set()
    await rig.clock.advance(0.1)
    rig.read(11.0)
    assert await second.wait() == "applied"


async def test_superseding_a_change_awaiting_its_read_ends_its_confirm_timer(rig: Rig) -> None:
    first = rig.twin.set_desired("oven.sp", 10, source="operator")
    await rig.clock.advance(0.1)  # written, waiting for a read
    assert rig.clock.pending == 1  # its confirm deadline
    await rig.clock.advance(1.0)
    second = rig.twin.set_desired("oven.sp", 20, source="operator")
    await rig.clock.advance(0.1)
    assert first.status == "superseded"
    assert rig.clock.pending == 1  # only the second change's deadline remains
    rig.read(20.0)
    assert await second.wait() == "applied"


async def test_wait_returns_failed_on_a_transport_error(rig: Rig) -> None:
    rig.path.error = ConnectError("connection refused")
    change = rig.twin.set_desired("oven.sp", 10, source="operator")
    waiter = asyncio.create_task(change.wait())
    await rig.clock.advance(0.1)
    assert waiter.done() and waiter.result() == "failed"


async def test_a_restored_final_change_is_already_waitable(tmp_path: Path, rig: Rig) -> None:
    change = rig.twin.set_desired("oven.sp", 9999, source="operator")
    assert change.done
    rig.twin.save_snapshot(tmp_path / "twin.snap")
    again = Rig()
    assert again.twin.restore(tmp_path / "twin.snap")
    restored = again.twin.desired("oven.sp")
    assert restored is not None and restored is not change
    async with asyncio.timeout(0.1):
        assert await restored.wait() == "refused"
