"""The connection supervisor against a real Modbus server, through the fault proxy."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import numpy as np
import pytest

from drivers.modbus import ModbusTcpDriver
from edgeos.clock import SystemClock
from edgeos.config import ConnectionConfig, TagConfig
from edgeos.driver import Quality, TagBinding
from edgeos.errors import WriteRefused
from edgeos.supervisor import Backoff, BackoffPolicy, ConnectionSupervisor, ConnState, Timeouts
from edgeos_testing.faultproxy import FaultProxy
from edgeos_testing.modbus import ModbusTestServer, UnitSpec
from edgeos_testing.net import free_port

BINDINGS = [
    TagBinding(i, TagConfig(name=f"t{i}", connection="plc", modbus={"address": i}))
    for i in range(20)
] + [
    TagBinding(
        20,
        TagConfig(
            name="sp",
            connection="plc",
            writable=True,
            limits={"min": 0, "max": 100},
            modbus={"address": 50},
        ),
    )
]


class SteppedClock(SystemClock):
    """The system clock, whose monotonic time a test can move ahead (uptime without waiting)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def monotonic(self) -> float:
        return super().monotonic() + self.offset

    async def sleep_until(self, deadline: float) -> None:
        await super().sleep_until(deadline - self.offset)


def _supervisor(
    port: int,
    *,
    scan_timeout_s: float = 1.0,
    policy: BackoffPolicy | None = None,
    clock: SystemClock | None = None,
    on_state: Callable[[str, ConnState], None] | None = None,
) -> ConnectionSupervisor:
    conn = ConnectionConfig(
        name="plc",
        driver="modbus_tcp",
        endpoint=f"tcp://127.0.0.1:{port}",
        options={"request_timeout_s": 5.0},
    )
    clock = clock or SystemClock()
    driver = ModbusTcpDriver(conn.driver_context(BINDINGS, clock=clock))
    return ConnectionSupervisor(
        "plc",
        driver,
        BINDINGS,
        clock=clock,
        timeouts=Timeouts(request_s=5.0, scan_s=scan_timeout_s, connect_s=1.0),
        backoff=Backoff(policy or BackoffPolicy(initial_s=0.02, max_s=0.1), rng=random.Random(1)),
        on_state=on_state,
    )


@asynccontextmanager
async def running(sup: ConnectionSupervisor) -> AsyncIterator[ConnectionSupervisor]:
    task = asyncio.create_task(sup.run())
    try:
        yield sup
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def _until(predicate: Callable[[], bool]) -> None:
    async with asyncio.timeout(10):
        while not predicate():
            await asyncio.sleep(0.01)


async def test_refused_port_then_device_appears(caplog: pytest.LogCaptureFixture) -> None:
    port = free_port()
    sup = _supervisor(port)
    with caplog.at_level(logging.INFO, logger="edgeos.supervisor"):
        async with running(sup):
            await _until(lambda: sup.errors["connect"] >= 3)
            assert sup.state in (ConnState.DOWN, ConnState.CONNECTING)
            # A read while down answers at once with every tag BAD_COMM.
            result = await sup.read("default")
            assert len(result) == 21
            assert (result.quality == Quality.BAD_COMM).all()
            assert np.isnan(result.values).all()

            server = ModbusTestServer([UnitSpec(holding=100)])
            server.port = port
            async with server:
                async with asyncio.timeout(10):
                    await sup.wait_up()
                good = await sup.read("default")
                assert (good.quality == Quality.GOOD).all()
    # Many failed connects, but the state was logged only when it changed.
    lines = [r.getMessage() for r in caplog.records]
    assert sum("-> down" in line for line in lines) <= 2, lines
    assert any("-> up" in line for line in lines)


async def test_server_restart_reconnects_and_counts() -> None:
    async with ModbusTestServer([UnitSpec(holding=100)]) as server:
        sup = _supervisor(server.port)
        async with running(sup):
            async with asyncio.timeout(10):
                await sup.wait_up()
            assert (await sup.read("default")).quality.max() == Quality.GOOD
            await server.stop()
            bad = await sup.read("default")
            assert (bad.quality == Quality.BAD_COMM).all()
            await server.start()
            await _until(lambda: sup.reconnects >= 1 and sup.is_up)
            assert (await sup.read("default")).quality.max() == Quality.GOOD
            stats = sup.stats()
            assert stats["reconnects"] >= 1 and stats["state"] in ("up", "degraded")


async def test_stalled_peer_times_out_inside_the_scope_and_recovers() -> None:
    async with (
        ModbusTestServer([UnitSpec(holding=100)]) as server,
        FaultProxy("127.0.0.1", server.port) as proxy,
    ):
        sup = _supervisor(proxy.port, scan_timeout_s=0.2)
        async with running(sup):
            async with asyncio.timeout(10):
                await sup.wait_up()
            proxy.stall()
            async with asyncio.timeout(2.0):
                result = await sup.read("default")
            assert (result.quality == Quality.BAD_COMM).all()
            assert sup.errors["timeout"] == 1
            proxy.resume()
            proxy.cut()
            await _until(lambda: sup.reconnects >= 1 and sup.is_up)
            assert (await sup.read("default")).quality.max() == Quality.GOOD


async def test_exception_response_degrades_only_affected_tags() -> None:
    spec = UnitSpec(holding=100, holes=(("holding", 50, 1),))
    async with ModbusTestServer([spec]) as server:
        sup = _supervisor(server.port)
        async with running(sup):
            async with asyncio.timeout(10):
                await sup.wait_up()
            result = await sup.read("default")
            by_index = dict(zip(result.indices.tolist(), result.quality.tolist(), strict=True))
            assert by_index[20] == Quality.BAD_DEVICE
            assert all(by_index[i] == Quality.GOOD for i in range(20))
            assert sup.state == ConnState.DEGRADED


async def test_write_beyond_limits_never_reaches_the_wire() -> None:
    async with ModbusTestServer([UnitSpec(holding=100)]) as server:
        sup = _supervisor(server.port)
        async with running(sup):
            async with asyncio.timeout(10):
                await sup.wait_up()
            with pytest.raises(WriteRefused, match="outside hard limits"):
                await sup.write("sp", 150)
            assert server.writes() == []
            await sup.write("sp", 42)
            assert len(server.writes()) == 1


def test_backoff_grows_with_jitter_and_resets() -> None:
    backoff = Backoff(BackoffPolicy(initial_s=0.5, max_s=8.0), rng=random.Random(3))
    delays = [backoff.next_delay() for _ in range(12)]
    assert all(0.25 <= d <= 8.0 for d in delays)
    assert max(delays[6:]) > max(delays[:2])  # ceilings grow
    assert len(set(delays)) == len(delays)  # jittered, not a fixed ladder
    backoff.reset()
    assert backoff.next_delay() <= 0.5


async def test_peer_dropping_a_live_connection_is_logged_as_lost_and_retried_fast(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The ladder alone would wait 2 s before the first retry; the fast first retry after a
    # connection that had been up brings it back well inside that.
    policy = BackoffPolicy(initial_s=2.0, max_s=2.0, jitter=0.0, first_retry_s=0.05)
    clock = SteppedClock()
    states: asyncio.Queue[ConnState] = asyncio.Queue()
    async with (
        ModbusTestServer([UnitSpec(holding=100)]) as server,
        FaultProxy("127.0.0.1", server.port) as proxy,
    ):
        sup = _supervisor(
            proxy.port, policy=policy, clock=clock, on_state=lambda _, s: states.put_nowait(s)
        )
        with caplog.at_level(logging.INFO, logger="edgeos.supervisor"):
            async with running(sup):
                async with asyncio.timeout(10):
                    await sup.wait_up()
                clock.offset += policy.initial_s  # it has been up for a while
                proxy.cut()
                async with asyncio.timeout(10):
                    while await states.get() != ConnState.DOWN:
                        pass
                lost_at = clock.monotonic()
                async with asyncio.timeout(10):
                    await sup.wait_up()
                assert clock.monotonic() - lost_at < policy.initial_s
                assert sup.reconnects == 1
    downs = [r.getMessage() for r in caplog.records if "-> down" in r.getMessage()]
    assert len(downs) == 1, downs
    assert "(connection lost: " in downs[0] and "closed the connection" in downs[0], downs
    assert "not connected" not in downs[0]


async def test_connection_dropping_right_after_connect_keeps_climbing_the_ladder() -> None:
    # A peer that accepts and closes at once must not be hammered every first_retry_s.
    policy = BackoffPolicy(initial_s=0.5, max_s=0.5, jitter=0.0, first_retry_s=0.0)
    clock = SteppedClock()
    states: asyncio.Queue[ConnState] = asyncio.Queue()
    async with (
        ModbusTestServer([UnitSpec(holding=100)]) as server,
        FaultProxy("127.0.0.1", server.port) as proxy,
    ):
        sup = _supervisor(
            proxy.port, policy=policy, clock=clock, on_state=lambda _, s: states.put_nowait(s)
        )
        async with running(sup):
            async with asyncio.timeout(10):
                await sup.wait_up()
            proxy.cut()
            async with asyncio.timeout(10):
                while await states.get() != ConnState.DOWN:
                    pass
            lost_at = clock.monotonic()
            async with asyncio.timeout(10):
                await sup.wait_up()
            assert clock.monotonic() - lost_at >= policy.initial_s - 0.05
