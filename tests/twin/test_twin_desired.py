"""Desired state: versions, checks before the wire, confirmation by the next read, outcomes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import numpy as np
import pytest

from edgeos.clock import VirtualClock
from edgeos.config import TagConfig, TwinConfig
from edgeos.driver import Quality, ReadResult
from edgeos.errors import ConnectError, WriteRefused
from edgeos.twin import Twin
from edgeos_testing.twin_writes import RecordingWritePath, running_writes, setpoint


def reading(index: int, value: float, quality: int = Quality.GOOD) -> ReadResult:
    return ReadResult(
        np.array([index], dtype=np.int32),
        np.array([value]),
        np.array([quality], dtype=np.uint8),
        np.array([0.0]),
    )


class Rig:
    def __init__(self) -> None:
        self.clock = VirtualClock()
        tags = [
            setpoint(),
            setpoint("oven.mode", modbus={"address": 2, "type": "string", "length": 4}),
            TagConfig.model_validate(
                {
                    "name": "oven.temp",
                    "connection": "plc",
                    "resolution": 0.1,
                    "modbus": {"address": 4, "type": "float32"},
                }
            ),
        ]
        self.twin = Twin(tags, TwinConfig(), clock=self.clock, confirm_timeout_s=5.0)
        self.path = RecordingWritePath()

    def read(self, index: int, value: float, quality: int = Quality.GOOD) -> None:
        self.twin.apply(reading(index, value, quality), self.clock.time())


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    r = Rig()
    async with running_writes(r.twin, r.path):
        yield r


async def test_write_is_applied_when_a_read_reports_it(rig: Rig) -> None:
    change = rig.twin.set_desired("oven.sp", 180, source="cloud")
    assert (change.version, change.status, change.value) == (1, "pending", 180.0)
    await rig.clock.advance(0.1)
    assert rig.path.writes == [("oven.sp", 180.0)]
    assert change.status == "pending"  # written, not yet confirmed

    rig.read(0, 179.0)  # not (yet) the value: keep waiting
    assert change.status == "pending"
    rig.read(0, 180.04)  # within half a resolution step
    assert change.status == "applied"
    assert change.reported == pytest.approx(180.04)
    await rig.clock.advance(0.1)
    assert rig.clock.pending == 0  # the confirmation wait ended with the confirmation

    (event,) = rig.twin.drain_events()
    assert event["type"] == "desired"
    assert (event["name"], event["version"], event["status"]) == ("oven.sp", 1, "applied")
    state = rig.twin.desired_state()["oven.sp"]
    assert state["status"] == "applied" and state["reported_now"] == pytest.approx(180.04)
    assert rig.twin.query("oven.sp")[0]["version"] == 1


async def test_refused_before_the_wire(rig: Rig) -> None:
    too_high = rig.twin.set_desired("oven.sp", 300, source="operator")
    not_writable = rig.twin.set_desired("oven.temp", 1.0, source="operator")
    await rig.clock.advance(0.1)
    assert too_high.status == "refused" and "outside hard limits" in too_high.reason
    assert not_writable.status == "refused" and "not writable" in not_writable.reason
    assert rig.path.writes == []
    assert [e["status"] for e in rig.twin.drain_events()] == ["refused", "refused"]
    with pytest.raises(KeyError, match="unknown tag 'nope'"):
        rig.twin.set_desired("nope", 1, source="x")


async def test_rate_limit_is_measured_from_the_last_write(rig: Rig) -> None:
    rig.read(0, 20.0)
    first = rig.twin.set_desired("oven.sp", 150, source="operator")  # limits only: no write yet
    await rig.clock.advance(0.1)
    assert first.status != "refused" and len(rig.path.writes) == 1
    fast = rig.twin.set_desired("oven.sp", 200, source="model")  # 50 in 0.1 s = 500/s > 50/s
    assert fast.status == "refused" and "max_rate" in fast.reason
    await rig.clock.advance(1.0)
    ok = rig.twin.set_desired("oven.sp", 190, source="model")  # 40 in 1.1 s ≈ 36/s
    assert ok.status != "refused", ok.reason


@pytest.mark.parametrize("step_s", [3600.0, -86400.0])
async def test_rate_limit_ignores_wall_clock_steps(rig: Rig, step_s: float) -> None:
    """NTP stepping the wall clock (+1 h after a boot without RTC, or back a day) must neither
    open the set-point rate limit nor refuse every later write."""
    rig.read(0, 20.0)
    first = rig.twin.set_desired("oven.sp", 150, source="operator")
    await rig.clock.advance(0.1)
    assert first.status != "refused" and len(rig.path.writes) == 1
    rig.clock.jump_wall(step_s)
    fast = rig.twin.set_desired("oven.sp", 200, source="model")  # still 50 in ~0.1 s
    assert fast.status == "refused" and "max_rate" in fast.reason
    await rig.clock.advance(1.0)
    ok = rig.twin.set_desired("oven.sp", 190, source="model")  # 40 in 1.1 s
    assert ok.status != "refused", ok.reason


async def test_transport_error_is_failed_and_driver_refusal_is_refused(rig: Rig) -> None:
    rig.path.error = ConnectError("connection refused")
    failed = rig.twin.set_desired("oven.sp", 10, source="cloud")
    await rig.clock.advance(0.1)
    assert failed.status == "failed" and "connection refused" in failed.reason

    rig.path.error = WriteRefused("oven.sp", "device is in local mode")
    refused = rig.twin.set_desired("oven.sp", 11, source="cloud")
    await rig.clock.advance(0.1)
    assert refused.status == "refused" and refused.reason == "device is in local mode"
    assert rig.twin.outcomes == {"failed": 1, "refused": 1}


async def test_no_confirming_read_times_out(rig: Rig) -> None:
    change = rig.twin.set_desired("oven.sp", 100, source="cloud")
    await rig.clock.advance(1.0)
    rig.read(0, 90.0)
    rig.read(0, 90.0, Quality.BAD_COMM)
    await rig.clock.advance(3.0)
    assert change.status == "pending"
    await rig.clock.advance(2.0)
    assert change.status == "timed_out"
    assert "within 5 s" in change.reason and "90.0" in change.reason


async def test_a_read_before_the_write_completed_does_not_confirm(rig: Rig) -> None:
    rig.path.gate = asyncio.Event()
    change = rig.twin.set_desired("oven.sp", 50, source="cloud")
    await rig.clock.advance(0.1)
    rig.read(0, 50.0)  # the device happened to be at 50 already; the write is still out
    assert change.status == "pending"
    rig.path.gate.set()
    await rig.clock.advance(0.1)
    assert change.status == "pending"
    rig.read(0, 50.0)
    assert change.status == "applied"


async def test_a_newer_version_supersedes_and_writes_stay_in_order(rig: Rig) -> None:
    rig.path.gate = asyncio.Event()
    first = rig.twin.set_desired("oven.sp", 10, source="cloud")
    await rig.clock.advance(0.1)  # first is on the wire (held)
    second = rig.twin.set_desired("oven.sp", 12, source="cloud")
    third = rig.twin.set_desired("oven.sp", 14, source="cloud")
    assert first.status == "superseded" and "version 2" in first.reason
    assert second.status == "superseded"
    rig.path.gate.set()
    await rig.clock.advance(0.1)
    # First finished on the wire before third started; second never went out.
    assert rig.path.writes == [("oven.sp", 10.0), ("oven.sp", 14.0)]
    rig.read(0, 14.0)
    assert (third.version, third.status) == (3, "applied")


async def test_string_setpoints_confirm_by_equality(rig: Rig) -> None:
    change = rig.twin.set_desired("oven.mode", "AUTO", source="operator")
    await rig.clock.advance(0.1)
    rig.twin.apply(
        ReadResult(
            np.array([1], dtype=np.int32),
            np.array([np.nan]),
            np.array([Quality.GOOD], dtype=np.uint8),
            np.array([0.0]),
            text={1: "AUTO"},
        ),
        rig.clock.time(),
    )
    assert change.status == "applied"
