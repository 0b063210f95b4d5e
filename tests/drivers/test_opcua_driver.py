"""OPC UA driver against a real asyncua server on loopback: reads, writes, subscriptions."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import pytest
from asyncua.ua.status_codes import StatusCodes

from drivers.opcua import OpcUaDriver
from edgeos.clock import SystemClock
from edgeos.config import ConnectionConfig, TagConfig
from edgeos.driver import Quality, ReadResult, TagBinding
from edgeos.errors import ConnectError, WriteRefused
from edgeos_testing.net import free_port
from edgeos_testing.opcua_server import OpcUaServerThread, OpcUaTestServer, Variable

MANY = 2500

TYPED: dict[str, tuple[str, Any]] = {
    "i16": ("int16", -1234),
    "u16": ("uint16", 65000),
    "i32": ("int32", -70000),
    "u32": ("uint32", 4_000_000_000),
    "i64": ("int64", -(2**40)),
    "f32": ("float32", 1.5),
    "f64": ("float64", 2.25),
    "flag": ("bool", True),
    "label": ("string", "tyre-42"),
}


@pytest.fixture(scope="module")
def server() -> Iterator[OpcUaServerThread]:
    variables = [Variable(f"many{i}", "float64", float(i)) for i in range(MANY)]
    variables += [Variable(name, dtype, value) for name, (dtype, value) in TYPED.items()]
    variables += [
        Variable("sub_a", "float64", 0.0),
        Variable("sub_b", "int32", 0),
        Variable("readonly", "float64", 1.0, writable=False),
        Variable("status", "float64", 3.0),
    ]
    thread = OpcUaServerThread(OpcUaTestServer(variables)).start()
    yield thread
    thread.stop()


def _tag(name: str, node_id: str, dtype: str = "float64", **extra: Any) -> TagConfig:
    fields: dict[str, Any] = {"name": name, "connection": "plc"}
    if dtype in ("float32", "float64"):
        fields["resolution"] = 0.01
    opcua = {"node_id": node_id, "type": dtype}
    opcua.update(extra.pop("opcua", {}))
    fields["opcua"] = opcua
    fields.update(extra)
    return TagConfig(**fields)


def _driver(
    server: OpcUaServerThread, tags: Sequence[TagConfig], **options: Any
) -> tuple[OpcUaDriver, list[TagBinding]]:
    conn = ConnectionConfig(
        name="plc", driver="opcua", endpoint=server.server.endpoint, options=options
    )
    bindings = [TagBinding(i, tag) for i, tag in enumerate(tags)]
    return OpcUaDriver(conn.driver_context(bindings, clock=SystemClock())), bindings


@pytest.fixture
async def closing() -> AsyncIterator[list[OpcUaDriver]]:
    """Drivers appended here are closed after the test, whatever happens."""
    drivers: list[OpcUaDriver] = []
    yield drivers
    for driver in drivers:
        await driver.close()


def _by_index(result: ReadResult) -> dict[int, tuple[float, int]]:
    return {
        int(i): (float(v), int(q))
        for i, v, q in zip(result.indices, result.values, result.quality, strict=True)
    }


async def test_polled_reads_of_many_nodes_take_few_requests(
    server: OpcUaServerThread, closing: list[OpcUaDriver]
) -> None:
    node = server.server.node_id
    tags = [_tag(f"t{i}", node(f"many{i}")) for i in range(MANY)]
    driver, _ = _driver(server, tags, max_items_per_read=1000)
    closing.append(driver)
    await driver.connect()
    counters = server.server.counters
    reads_before, requests_before = counters.read_requests, driver.stats.requests

    result = await driver.read("default")

    assert len(result) == MANY
    assert sorted(result.indices.tolist()) == list(range(MANY))
    values = _by_index(result)
    assert all(values[i] == (float(i), Quality.GOOD) for i in range(MANY))
    # ceil(2500 / 1000) = 3 Read service calls, seen by both ends.
    assert driver.stats.requests - requests_before == 3
    assert counters.read_requests - reads_before == 3
    assert driver.latency.count >= 3


async def test_every_type_reads_with_its_value(
    server: OpcUaServerThread, closing: list[OpcUaDriver]
) -> None:
    node = server.server.node_id
    tags = [_tag(name, node(name), dtype) for name, (dtype, _) in TYPED.items()]
    driver, bindings = _driver(server, tags)
    closing.append(driver)
    await driver.connect()

    result = await driver.read("default")

    values = _by_index(result)
    for binding in bindings:
        dtype, expected = TYPED[binding.tag.name]
        value, quality = values[binding.index]
        assert quality == Quality.GOOD, binding.tag.name
        if dtype == "string":
            assert result.text[binding.index] == expected
        else:
            assert value == float(expected), binding.tag.name
    assert (result.source_ts > 1e9).all()


async def test_bad_node_ids_are_bad_config_only_for_those_tags(
    server: OpcUaServerThread, closing: list[OpcUaDriver]
) -> None:
    node = server.server.node_id
    tags = [
        _tag("good", node("f64")),
        _tag("unknown", node("does-not-exist")),
        _tag("unparseable", "ns=2;i=not-a-number"),
        _tag("also_good", node("many7")),
    ]
    driver, _ = _driver(server, tags)
    closing.append(driver)
    await driver.connect()

    result = await driver.read("default")

    values = _by_index(result)
    assert values[0] == (2.25, Quality.GOOD)
    assert values[3] == (7.0, Quality.GOOD)
    assert values[1][1] == Quality.BAD_CONFIG and math.isnan(values[1][0])
    assert values[2][1] == Quality.BAD_CONFIG and math.isnan(values[2][0])
    assert result.bad_reasons == {"BadNodeIdUnknown": 1, "BadNodeIdInvalid": 1}


async def test_server_status_codes_become_qualities(
    server: OpcUaServerThread, closing: list[OpcUaDriver]
) -> None:
    tags = [_tag("status", server.server.node_id("status"))]
    driver, _ = _driver(server, tags)
    closing.append(driver)
    await driver.connect()
    try:
        await server.call(
            lambda s: s.set_value("status", 4.0, status=StatusCodes.UncertainLastUsableValue)
        )
        uncertain = await driver.read("default")
        await server.call(lambda s: s.set_value("status", 0.0, status=StatusCodes.BadSensorFailure))
        bad = await driver.read("default")
    finally:
        await server.call(lambda s: s.set_value("status", 3.0))

    assert uncertain.quality.tolist() == [Quality.UNCERTAIN]
    assert uncertain.values.tolist() == [4.0]
    assert bad.quality.tolist() == [Quality.BAD_DEVICE]
    assert math.isnan(bad.values[0])
    assert bad.bad_reasons == {"BadSensorFailure": 1}


async def test_writes_use_the_tag_variant_type(
    server: OpcUaServerThread, closing: list[OpcUaDriver]
) -> None:
    node = server.server.node_id
    new_values: dict[str, Any] = {
        "i16": -300,
        "u16": 12,
        "i32": 123456,
        "u32": 3_000_000_000,
        "i64": 2**40,
        "f32": 0.5,
        "f64": -7.125,
        "flag": False,
        "label": "tyre-43",
    }
    tags = []
    for name, (dtype, _) in TYPED.items():
        limits = None if dtype in ("bool", "string") else {"min": -(2**41), "max": 2**41}
        tags.append(_tag(name, node(name), dtype, writable=True, limits=limits))
    driver, bindings = _driver(server, tags)
    closing.append(driver)
    await driver.connect()
    writes_before = server.server.counters.write_requests
    try:
        for binding in bindings:
            await driver.write(binding, new_values[binding.tag.name])
        writes_seen = server.server.counters.write_requests - writes_before
        stored = {name: server.call_sync(lambda s, name=name: s.value(name)) for name in new_values}
    finally:
        for name, (_, original) in TYPED.items():
            await server.call(lambda s, name=name, original=original: s.set_value(name, original))

    # The server checks the variant type against the variable's DataType on every write
    # (BadTypeMismatch otherwise), so equal values mean the types were right too.
    assert stored == new_values
    assert driver.stats.writes == len(TYPED)
    assert writes_seen == len(TYPED)  # one Write service call per value


async def test_refused_writes_never_reach_the_server(
    server: OpcUaServerThread, closing: list[OpcUaDriver]
) -> None:
    node = server.server.node_id
    tags = [
        _tag("not_writable", node("f64")),
        _tag("limited", node("f64"), writable=True, limits={"min": 0, "max": 10}),
        _tag("small", node("i16"), "int16", writable=True, limits={"min": 0, "max": 100_000}),
        _tag("flag", node("flag"), "bool", writable=True),
    ]
    driver, b = _driver(server, tags)
    closing.append(driver)
    await driver.connect()
    before = server.server.counters.write_requests

    attempts: list[tuple[TagBinding, Any, str]] = [
        (b[0], 1.0, "not writable"),
        (b[1], 11.0, "outside hard limits"),
        (b[1], math.nan, "not finite"),
        (b[1], "5", "expected a number"),
        (b[2], 70_000, "does not fit int16"),
        (b[3], 2, "expected a boolean"),
    ]
    for binding, value, reason in attempts:
        with pytest.raises(WriteRefused, match=reason):
            await driver.write(binding, value)

    assert driver.stats.writes_refused == len(attempts)
    assert driver.stats.writes == 0
    assert server.server.counters.write_requests == before


async def test_server_side_write_refusal_is_a_device_exception(
    server: OpcUaServerThread, closing: list[OpcUaDriver]
) -> None:
    from edgeos.errors import DeviceException

    tags = [
        _tag("ro", server.server.node_id("readonly"), writable=True, limits={"min": 0, "max": 9})
    ]
    driver, b = _driver(server, tags)
    closing.append(driver)
    await driver.connect()

    with pytest.raises(DeviceException, match=r"BadNotWritable|BadUserAccessDenied"):
        await driver.write(b[0], 2.0)
    assert driver.connected  # a refused write does not break the session


async def test_subscriptions_deliver_changes_to_the_sink_in_blocks(
    server: OpcUaServerThread, closing: list[OpcUaDriver]
) -> None:
    node = server.server.node_id
    sub = {"mode": "subscribe", "sampling_interval_ms": 50}
    tags = [
        _tag("a", node("sub_a"), opcua=sub),
        _tag("b", node("sub_b"), "int32", opcua=sub),
        _tag("missing", node("no-such-node"), opcua=sub),
        _tag("polled", node("f64")),
    ]
    driver, _ = _driver(server, tags, max_items_per_subscription=1)
    closing.append(driver)
    blocks: asyncio.Queue[ReadResult] = asyncio.Queue()
    driver.set_subscription_sink(blocks.put_nowait)
    await driver.connect()

    latest: dict[int, tuple[float, int]] = {}
    reasons: dict[str, int] = {}

    async def until(predicate: Any) -> None:
        async with asyncio.timeout(20):  # hang guard only; the test waits for the data
            while not predicate():
                block = await blocks.get()
                latest.update(_by_index(block))
                for reason, count in block.bad_reasons.items():
                    reasons[reason] = reasons.get(reason, 0) + count

    # Initial values of both items, and the refused one reported BAD_CONFIG.
    await until(lambda: 0 in latest and 1 in latest and 2 in latest)
    assert latest[2][1] == Quality.BAD_CONFIG
    assert reasons.get("BadNodeIdUnknown") == 1
    assert 3 not in latest  # polled tags are not subscribed

    await server.call(lambda s: s.set_value("sub_a", 12.5))
    await server.call(lambda s: s.set_value("sub_b", 99))
    await until(lambda: latest.get(0) == (12.5, Quality.GOOD) and latest.get(1) == (99.0, 0))

    assert driver.stats.subscriptions == 3  # split by max_items_per_subscription
    assert driver.stats.monitored_items == 2
    assert driver.stats.notifications >= 4
    assert driver.stats.publishes <= driver.stats.notifications


async def test_a_port_that_refuses_is_a_connect_error() -> None:
    conn = ConnectionConfig(
        name="plc", driver="opcua", endpoint=f"opc.tcp://127.0.0.1:{free_port()}/x"
    )
    tags = [TagBinding(0, _tag("t", "ns=2;s=x"))]
    driver = OpcUaDriver(conn.driver_context(tags, clock=SystemClock()))
    with pytest.raises(ConnectError, match="refused"):
        await driver.connect()
    assert driver.stats.errors["connect"] == 1
    with pytest.raises(ConnectError, match="not connected"):
        await driver.read("default")
    await driver.close()
    await driver.close()  # idempotent, never raises


async def test_subscriptions_and_reads_spread_over_several_sessions(
    server: OpcUaServerThread, closing: list[OpcUaDriver]
) -> None:
    node = server.server.node_id
    sub = {"mode": "subscribe", "sampling_interval_ms": 50}
    tags = [_tag(f"s{i}", node(f"many{i}"), opcua=sub) for i in range(4)]
    tags += [_tag(f"p{i}", node(f"many{100 + i}")) for i in range(4)]
    driver, _ = _driver(
        server, tags, sessions=2, max_items_per_subscription=2, max_items_per_read=2
    )
    closing.append(driver)
    seen: set[int] = set()
    all_seen = asyncio.Event()

    def sink(block: ReadResult) -> None:
        seen.update(int(i) for i in block.indices)
        if seen >= {0, 1, 2, 3}:
            all_seen.set()

    driver.set_subscription_sink(sink)
    await driver.connect()
    async with asyncio.timeout(20):  # hang guard only
        await all_seen.wait()
    result = await driver.read("default")

    assert driver.stats.subscriptions == 2
    assert sorted(result.indices.tolist()) == [4, 5, 6, 7]
    assert result.values.tolist() == [100.0, 101.0, 102.0, 103.0]
    assert driver.stats.connection_lost == 0
