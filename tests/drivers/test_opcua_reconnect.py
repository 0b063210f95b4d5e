"""OPC UA driver: a subscription survives a server restart on the same port."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from drivers.opcua import OpcUaDriver
from edgeos.clock import SystemClock
from edgeos.config import ConnectionConfig, TagConfig
from edgeos.driver import Quality, ReadResult, TagBinding
from edgeos.errors import TransportError
from edgeos_testing.opcua_server import OpcUaTestServer, Variable

VARIABLES = [Variable("speed", "float64", 1.0), Variable("count", "int32", 0)]


class Latest:
    """A subscription sink remembering the newest (value, quality) per twin index."""

    def __init__(self) -> None:
        self.values: dict[int, tuple[float, int]] = {}
        self._changed = asyncio.Event()

    def __call__(self, block: ReadResult) -> None:
        for i, v, q in zip(block.indices, block.values, block.quality, strict=True):
            self.values[int(i)] = (float(v), int(q))
        self._changed.set()

    async def until(self, predicate: Any) -> None:
        async with asyncio.timeout(30):  # hang guard only
            while not predicate(self.values):
                self._changed.clear()
                await self._changed.wait()


async def test_subscription_survives_a_server_restart() -> None:
    first = OpcUaTestServer(VARIABLES)
    await first.start()
    port = first.port
    second: OpcUaTestServer | None = None
    conn = ConnectionConfig(
        name="plc",
        driver="opcua",
        endpoint=first.endpoint,
        # A fast watchdog keeps the test short; loss by socket close is seen at once anyway.
        options={"watchdog_interval_s": 0.5},
    )
    sub = {"mode": "subscribe", "sampling_interval_ms": 50}
    tags = [
        TagConfig(
            name="speed",
            connection="plc",
            resolution=0.1,
            opcua={"node_id": first.node_id("speed"), **sub},
        ),
        TagConfig(
            name="count",
            connection="plc",
            opcua={"node_id": first.node_id("count"), "type": "int32", **sub},
        ),
        TagConfig(
            name="polled", connection="plc", resolution=0.1, opcua={"node_id": "ns=2;s=speed"}
        ),
    ]
    driver = OpcUaDriver(
        conn.driver_context([TagBinding(i, t) for i, t in enumerate(tags)], clock=SystemClock())
    )
    latest = Latest()
    driver.set_subscription_sink(latest)
    losses: list[TransportError] = []
    driver.on_connection_lost = losses.append
    try:
        await driver.connect()
        await first.set_value("speed", 10.0)
        await latest.until(lambda v: v.get(0) == (10.0, Quality.GOOD))

        await first.stop()
        async with asyncio.timeout(30):  # hang guard only
            await driver.connection_lost.wait()
        assert len(losses) == 1
        assert not driver.connected
        with pytest.raises(TransportError):
            await driver.read("default")

        second = OpcUaTestServer(VARIABLES, port=port)
        await second.start()
        assert second.port == port

        # What the supervisor does after a TransportError.
        await driver.close()
        await driver.connect()
        assert not driver.connection_lost.is_set()
        assert driver.stats.subscriptions == 1
        assert driver.stats.monitored_items == 2

        await second.set_value("speed", 20.0)
        await second.set_value("count", 7)
        await latest.until(lambda v: v.get(0) == (20.0, 0) and v.get(1) == (7.0, 0))
        polled = await driver.read("default")
        assert polled.values.tolist() == [20.0]
        assert driver.stats.connection_lost == 1
    finally:
        await driver.close()
        await first.stop()
        if second is not None:
            await second.stop()
