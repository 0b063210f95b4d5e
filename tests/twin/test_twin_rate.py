"""``max_rate`` has one reference, the twin's write log, on the monotonic clock; the guard reads it."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from edgeos.clock import VirtualClock
from edgeos.config import GuardConfig, TwinConfig
from edgeos.inference.guard import ActuationGuard
from edgeos.twin import LastWrite, Twin, WriteLog
from edgeos_testing.twin_writes import RecordingWritePath, running_writes, setpoint

SP = "nest01.heater.sp"


class Rig:
    def __init__(self) -> None:
        self.clock = VirtualClock()
        self.tag = setpoint(SP)
        self.twin = Twin([self.tag], TwinConfig(), clock=self.clock)
        self.path = RecordingWritePath()


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    r = Rig()
    async with running_writes(r.twin, r.path):
        yield r


async def test_the_write_log_records_a_completed_write_on_the_monotonic_clock(rig: Rig) -> None:
    assert rig.twin.writes.last(SP) is None
    rig.twin.set_desired(SP, 150, source="operator")
    assert rig.twin.writes.last(SP) is None  # queued, not yet written
    await rig.clock.advance(0.1)
    written = rig.twin.writes.last(SP)
    assert written == LastWrite(150.0, rig.clock.monotonic() - 0.1)
    rig.clock.jump_wall(-86400.0)
    assert rig.twin.writes.last(SP) == written


def test_write_log_ignores_booleans_and_strings() -> None:
    log = WriteLog()
    log.record("a", True, 1.0)
    log.record("b", "AUTO", 1.0)
    log.record("c", 3, 1.0)
    assert (log.last("a"), log.last("b"), log.last("c")) == (None, None, LastWrite(3.0, 1.0))


def test_write_log_ramp_is_the_largest_step_max_rate_allows() -> None:
    log = WriteLog()
    tag = setpoint(SP)
    assert log.ramp(tag, 200.0, now=5.0) == 200.0  # no reference: limits only
    log.record(SP, 150.0, 10.0)
    assert log.ramp(tag, 200.0, now=10.2) == pytest.approx(160.0)
    assert log.ramp(tag, 100.0, now=10.2) == pytest.approx(140.0)
    assert log.ramp(tag, 155.0, now=10.2) == 155.0
    log.check(tag, log.ramp(tag, 200.0, now=10.2), now=10.2)  # does not raise


async def test_guard_sharing_the_twins_write_log_ramps_from_an_operator_write(rig: Rig) -> None:
    """The guard and the desired-state check measure max_rate from the same last write, so a
    value the guard emits right after an operator's write is not refused by the twin."""
    rig.twin.set_desired(SP, 150, source="operator")
    await rig.clock.advance(0)  # written now
    guard = ActuationGuard(GuardConfig(enabled=True), {SP: rig.tag}, target=6.6)
    guard.share_write_log(rig.twin.writes)
    await rig.clock.advance(0.2)
    decision = guard.decide(
        "nest01",
        baseline={"heater.sp": 200.0},
        proposal=None,
        predicted_default=6.3,
        sigma_default=0.1,
        predicted_learned=6.3,
        sigma_learned=0.1,
        now=rig.clock.monotonic(),
    )
    assert decision.writes[SP] == pytest.approx(160.0)  # 150 + 50/s · 0.2 s
    assert guard.counts["default_ramped"] == 1
    assert rig.twin.writes.last(SP) == LastWrite(150.0, rig.clock.monotonic() - 0.2)
    change = rig.twin.set_desired(SP, decision.writes[SP], source="guard")
    assert change.status == "pending", change.reason


async def test_a_standalone_guard_keeps_its_own_record_of_decisions() -> None:
    tag = setpoint(SP)
    guard = ActuationGuard(GuardConfig(enabled=True), {SP: tag}, target=6.6)
    kw = {
        "proposal": None,
        "predicted_default": 6.3,
        "sigma_default": 0.1,
        "predicted_learned": 6.3,
        "sigma_learned": 0.1,
    }
    first = guard.decide("nest01", baseline={"heater.sp": 150.0}, now=0.0, **kw)  # type: ignore[arg-type]
    second = guard.decide("nest01", baseline={"heater.sp": 200.0}, now=0.5, **kw)  # type: ignore[arg-type]
    assert first.writes[SP] == 150.0
    assert second.writes[SP] == pytest.approx(175.0)
    assert guard.writes.last(SP) == LastWrite(pytest.approx(175.0), 0.5)  # type: ignore[arg-type]
