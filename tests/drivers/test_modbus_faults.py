"""ModbusTcpDriver through the fault proxy: every failure is a TransportError, then recovery."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import numpy as np
import pytest

from drivers.modbus import ModbusTcpDriver
from edgeos.clock import SystemClock
from edgeos.config import ConnectionConfig, TagConfig
from edgeos.driver import Quality, TagBinding
from edgeos.errors import ConnectError, ProtocolError, TimeoutError_, TransportError
from edgeos_testing.faultproxy import FaultProxy
from edgeos_testing.modbus import ModbusTestServer, UnitSpec

TAGS = [
    TagBinding(i, TagConfig(name=f"t{i}", connection="plc", modbus={"address": i}))
    for i in range(200)
]


@pytest.fixture
async def server() -> AsyncIterator[ModbusTestServer]:
    async with ModbusTestServer([UnitSpec(holding=500)]) as s:
        yield s


@pytest.fixture
async def proxy(server: ModbusTestServer) -> AsyncIterator[FaultProxy]:
    async with FaultProxy("127.0.0.1", server.port, seed=7) as p:
        yield p


def make(port: int, **options: Any) -> ModbusTcpDriver:
    options.setdefault("request_timeout_s", 5.0)
    conn = ConnectionConfig(
        name="plc", driver="modbus_tcp", endpoint=f"tcp://127.0.0.1:{port}", options=options
    )
    return ModbusTcpDriver(conn.driver_context(TAGS, clock=SystemClock()))


async def until(cond: Callable[[], bool], limit: float = 5.0) -> None:
    """Wait for a condition; the limit is a safety net, not a timing assertion."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    while not cond():
        assert loop.time() < deadline, "condition not reached"
        await asyncio.sleep(0.002)


async def assert_recovers(d: ModbusTcpDriver, proxy: FaultProxy) -> None:
    proxy.heal()
    await d.close()
    await d.connect()
    result = await d.read("default")
    assert len(result) == len(TAGS)
    assert np.all(result.quality == Quality.GOOD)


def rewrite_tid(chunk: bytes) -> bytes:
    return bytes([chunk[0] ^ 0x55, chunk[1]]) + chunk[2:] if len(chunk) >= 2 else chunk


@pytest.mark.parametrize(
    ("fault", "error"),
    [
        (lambda p: p.set_transform(lambda b: b"\x00\x01\xde\xad" + b[4:], "down"), ProtocolError),
        (lambda p: p.set_transform(rewrite_tid, "down"), ProtocolError),
        (lambda p: p.set_transform(lambda b: b[:7] + b"\x99" + b[8:], "down"), ProtocolError),
    ],
    ids=["garbage_header", "wrong_transaction_id", "wrong_function_code"],
)
async def test_bad_frames_raise_protocol_error_fast(
    proxy: FaultProxy, fault: Callable[[FaultProxy], None], error: type[TransportError]
) -> None:
    # request_timeout_s=5 but the test finishes quickly: the header check fails the request.
    d = make(proxy.port, request_timeout_s=30)
    await d.connect()
    try:
        await d.read("default")
        fault(proxy)
        async with asyncio.timeout(10):
            with pytest.raises(error):
                await d.read("default")
        with pytest.raises(TransportError):
            await d.read("default")  # the link stays broken until reconnected
        assert d.stats.errors["protocol"] >= 1
        await assert_recovers(d, proxy)
    finally:
        await d.close()


async def test_unsolicited_garbage_between_scans(proxy: FaultProxy) -> None:
    d = make(proxy.port)
    await d.connect()
    try:
        await d.read("default")
        proxy.inject(b"\xff" * 11)
        await until(lambda: d.stats.errors["protocol"] == 0 and proxy.counts["injected"] == 1)
        with pytest.raises(TransportError):
            async with asyncio.timeout(10):
                # Either the garbage arrived first (ProtocolError now) or it corrupts the reply.
                await d.read("default")
                await d.read("default")
        await assert_recovers(d, proxy)
    finally:
        await d.close()


async def test_short_frame_times_out_on_the_backstop(proxy: FaultProxy) -> None:
    d = make(proxy.port, request_timeout_s=0.3)
    await d.connect()
    try:
        proxy.set_truncate(6, "down")
        with pytest.raises(TimeoutError_):
            await d.read("default")
        assert d.stats.errors["timeout"] == 1
        await assert_recovers(d, proxy)
    finally:
        await d.close()


async def test_stall_under_caller_timeout_then_recovers(proxy: FaultProxy) -> None:
    d = make(proxy.port, request_timeout_s=30)
    await d.connect()
    try:
        proxy.stall("down")
        with pytest.raises(TimeoutError):  # the caller's own asyncio.timeout fired
            async with asyncio.timeout(0.2):
                await d.read("default")
        # The interrupted link was closed: a late answer cannot pass for the next one.
        with pytest.raises(ConnectError):
            await d.read("default")
        await assert_recovers(d, proxy)
    finally:
        await d.close()


async def test_stall_without_caller_timeout_hits_the_backstop(proxy: FaultProxy) -> None:
    d = make(proxy.port, request_timeout_s=0.3, connections=2)
    await d.connect()
    try:
        proxy.stall("down")
        with pytest.raises(TimeoutError_):
            await d.read("default")
        await assert_recovers(d, proxy)
    finally:
        await d.close()


async def test_cut_connection_fails_the_request_in_flight(proxy: FaultProxy) -> None:
    d = make(proxy.port, request_timeout_s=30)
    await d.connect()
    try:
        proxy.stall("down")
        task = asyncio.create_task(d.read("default"))
        await until(lambda: proxy.counts["stalled"] >= 1)
        proxy.cut()
        async with asyncio.timeout(10):  # far below request_timeout_s: the hook failed it
            with pytest.raises(ConnectError):
                await task
        await assert_recovers(d, proxy)
    finally:
        await d.close()


async def test_cut_between_scans(proxy: FaultProxy) -> None:
    d = make(proxy.port, connections=3)
    await d.connect()
    try:
        await d.read("default")
        proxy.cut()
        await until(lambda: proxy.connections == 0)
        with pytest.raises(ConnectError):
            await d.read("default")
        await assert_recovers(d, proxy)
    finally:
        await d.close()


async def test_partition_refuses_reconnect_until_healed(proxy: FaultProxy) -> None:
    d = make(proxy.port, request_timeout_s=1)
    await d.connect()
    try:
        proxy.partition()
        with pytest.raises(TransportError):
            await d.read("default")
        await d.close()
        with pytest.raises(TransportError):
            await d.connect()
            await d.read("default")  # connect may win the race with the reset
        await assert_recovers(d, proxy)
    finally:
        await d.close()


async def test_server_restart(server: ModbusTestServer) -> None:
    d = make(server.port)
    await d.connect()
    try:
        await d.read("default")
        await server.stop()
        with pytest.raises(ConnectError):
            async with asyncio.timeout(10):
                await d.read("default")
        await d.close()
        with pytest.raises(ConnectError):
            await d.connect()
        await server.start()
        await d.connect()
        result = await d.read("default")
        assert np.all(result.quality == Quality.GOOD)
    finally:
        await d.close()


async def test_random_corruption_never_leaks_foreign_exceptions(proxy: FaultProxy) -> None:
    # Two registers: an 11-byte answer, so most flipped bytes hit the header. Modbus TCP has
    # no checksum, so a flipped data byte is (unavoidably) read as a value.
    conn = ConnectionConfig(
        name="plc",
        driver="modbus_tcp",
        endpoint=f"tcp://127.0.0.1:{proxy.port}",
        options={"request_timeout_s": 0.2},
    )
    d = ModbusTcpDriver(conn.driver_context(TAGS[:2], clock=SystemClock()))
    await d.connect()
    outcomes: list[str] = []
    try:
        proxy.set_corrupt(1.0, "down")
        for _ in range(15):
            try:
                result = await d.read("default")
                outcomes.append("read")
                assert len(result) == 2
            except TransportError as exc:
                outcomes.append(exc.kind)
                await d.close()
                await d.connect()
        assert "protocol" in outcomes
        assert set(outcomes) <= {"read", "protocol", "timeout", "connect"}
        proxy.heal()
        await d.close()
        await d.connect()
        assert list((await d.read("default")).quality) == [Quality.GOOD] * 2
    finally:
        await d.close()


async def test_peer_dropping_an_idle_connection_sets_connection_lost_with_the_reason(
    proxy: FaultProxy,
) -> None:
    d = make(proxy.port)
    await d.connect()
    try:
        assert not d.connection_lost.is_set()
        proxy.cut()  # between scans: no request in flight would notice
        async with asyncio.timeout(5):
            reason = await d.connection_lost.wait()
        assert "closed the connection" in reason
        await assert_recovers(d, proxy)
        assert not d.connection_lost.is_set()  # connect() starts a fresh session
    finally:
        await d.close()


async def test_closing_the_driver_is_not_a_loss(proxy: FaultProxy) -> None:
    d = make(proxy.port)
    await d.connect()
    await d.close()
    assert not d.connection_lost.is_set()
