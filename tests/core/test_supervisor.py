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
from edgeos.supervisor import Backoff, ConnectionSupervisor, ConnState
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


def _supervisor(port: int, **kw: float) -> ConnectionSupervisor:
    conn = ConnectionConfig(
        name="plc",
        driver="modbus_tcp",
        endpoint=f"tcp://127.0.0.1:{port}",
        options={"request_timeout_s": 5.0},
    )
    clock = SystemClock()
    driver = ModbusTcpDriver(conn, BINDINGS, clock=clock)
    return ConnectionSupervisor(
        "plc",
        driver,
        BINDINGS,
        clock=clock,
        request_timeout_s=kw.get("request_timeout_s", 1.0),
        connect_timeout_s=1.0,
        backoff=Backoff(base_s=0.02, cap_s=0.1, rng=random.Random(1)),
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
        sup = _supervisor(proxy.port, request_timeout_s=0.2)
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
    backoff = Backoff(base_s=0.5, cap_s=8.0, rng=random.Random(3))
    delays = [backoff.next_delay() for _ in range(12)]
    assert all(0.5 <= d <= 8.0 for d in delays)
    assert max(delays[6:]) > max(delays[:2])  # ceilings grow
    assert len(set(delays)) == len(delays)  # jittered, not a fixed ladder
    backoff.reset()
    assert backoff.next_delay() == 0.5
