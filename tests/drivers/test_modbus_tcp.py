"""ModbusTcpDriver against an in-process pymodbus server on 127.0.0.1:0."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest
from pymodbus.client import AsyncModbusTcpClient

from drivers.modbus import ModbusTcpDriver, ReadbackMismatch
from edgeos.clock import VirtualClock
from edgeos.config import ConnectionConfig, TagConfig
from edgeos.driver import Driver, Quality, ReadResult, TagBinding, load_driver_class
from edgeos.errors import (
    ConnectError,
    DeviceException,
    WriteRefused,
)
from edgeos_testing.modbus import ModbusTestServer, UnitSpec


def tag(i: int, **modbus: Any) -> TagBinding:
    extra = {
        k: modbus.pop(k) for k in ("writable", "limits", "max_rate", "scan_group") if k in modbus
    }
    if modbus.get("type") in ("float32", "float64"):
        extra.setdefault("resolution", 0.001)
    return TagBinding(i, TagConfig(name=f"t{i}", connection="plc", modbus=modbus, **extra))


def driver(endpoint: str, tags: list[TagBinding], **options: Any) -> ModbusTcpDriver:
    conn = ConnectionConfig(name="plc", driver="modbus_tcp", endpoint=endpoint, options=options)
    return ModbusTcpDriver(conn.driver_context(tags, clock=VirtualClock()))


def by_index(result: ReadResult) -> dict[int, tuple[float, int]]:
    return {
        int(i): (float(v), int(q))
        for i, v, q in zip(result.indices, result.values, result.quality, strict=True)
    }


@pytest.fixture
async def server() -> AsyncIterator[ModbusTestServer]:
    spec = UnitSpec(holding=2000, coils=2500, holes=(("holding", 1500, 10),), clamp_holding=None)
    async with ModbusTestServer([spec, UnitSpec(unit=2, holding=100, clamp_holding=1000)]) as s:
        yield s


async def raw_write(port: int, address: int, registers: list[int], unit: int = 1) -> None:
    client = AsyncModbusTcpClient("127.0.0.1", port=port, retries=0, reconnect_delay=0)
    assert await client.connect()
    try:
        resp = await client.write_registers(address, registers, device_id=unit)
        assert not resp.isError()
    finally:
        client.close()


async def raw_read(port: int, address: int, count: int, unit: int = 1) -> list[int]:
    client = AsyncModbusTcpClient("127.0.0.1", port=port, retries=0, reconnect_delay=0)
    assert await client.connect()
    try:
        resp = await client.read_holding_registers(address, count=count, device_id=unit)
        return list(resp.registers)
    finally:
        client.close()


def test_entry_point_options_and_endpoint_checks() -> None:
    cls = load_driver_class("modbus_tcp")
    assert cls is ModbusTcpDriver
    assert ModbusTcpDriver.check_endpoint("tcp://10.0.0.5:502") is None
    assert ModbusTcpDriver.check_endpoint("tcp://plc") is None
    assert "tcp://host:502" in (ModbusTcpDriver.check_endpoint("rtu:///dev/ttyUSB0") or "")
    assert ModbusTcpDriver.check_endpoint("tcp://:502") is not None
    assert ModbusTcpDriver.check_endpoint("tcp://plc:99999") is not None
    opts = ModbusTcpDriver.options_model.model_validate({"connections": 4})
    assert opts.connections == 4  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="connections"):
        ModbusTcpDriver.options_model.model_validate({"connections": 17})
    with pytest.raises(ValueError, match="baudrate"):
        ModbusTcpDriver.options_model.model_validate({"baudrate": 9600})  # RTU-only key
    assert isinstance(driver("tcp://127.0.0.1:1", []), Driver)


async def test_known_layouts_written_by_a_plain_client(server: ModbusTestServer) -> None:
    await raw_write(server.port, 0, [0x4048, 0xF5C3, 0xF5C3, 0x4048, 0xFFFE, 0x0201])
    await raw_write(server.port, 10, [0x4C69, 0x6E65, 0x3700])  # "Line7"
    tags = [
        tag(0, address=0, type="float32"),
        tag(1, address=2, type="float32", word_order="little"),
        tag(2, address=4, type="int16", scale=0.5, offset=10),
        tag(3, address=5, type="uint16", byte_order="little"),
        tag(4, address=10, type="string", length=3),
        tag(5, address=4, type="bool"),
    ]
    d = driver(server.endpoint, tags)
    await d.connect()
    try:
        result = await d.read("default")
    finally:
        await d.close()
    values = by_index(result)
    assert values[0][0] == pytest.approx(3.14, rel=1e-6)
    assert values[1][0] == pytest.approx(3.14, rel=1e-6)
    assert values[2][0] == -2 * 0.5 + 10
    assert values[3][0] == 0x0102
    assert values[5][0] == 1.0
    assert result.text == {4: "Line7"}
    assert all(q == Quality.GOOD for _, q in values.values())
    assert d.requests_per_scan("default") == 1
    assert len(server.reads()) == 1


TYPES = [
    ("int16", -1234.5, 0.5, 0.0),
    ("uint16", 6553.0, 0.1, 0.0),
    ("int32", -2_000_000_000.0, 1.0, 0.0),
    ("uint32", 4_000_000_000.0, 1.0, 0.0),
    ("int64", -(2**52) + 3.0, 1.0, 0.0),
    ("float32", 273.25, 1.0, -273.15),
    ("float64", -1.25e300, 1.0, 0.0),
]


async def test_every_type_and_order_round_trips_through_the_device(
    server: ModbusTestServer,
) -> None:
    bindings: list[TagBinding] = []
    expected: dict[int, float] = {}
    address = 0
    for dtype, value, scale, offset in TYPES:
        for bo in ("big", "little"):
            for wo in ("big", "little"):
                i = len(bindings)
                bindings.append(
                    tag(
                        i,
                        address=address,
                        type=dtype,
                        byte_order=bo,
                        word_order=wo,
                        scale=scale,
                        offset=offset,
                        writable=True,
                        limits={"min": -1e301, "max": 1e301},
                    )
                )
                expected[i] = value
                address += 5  # leave a gap so the plan exercises gap bridging too
    strings = [
        tag(100 + k, address=1000 + 4 * k, type="string", length=4, byte_order=bo, writable=True)
        for k, bo in enumerate(("big", "little"))
    ]
    coils = [
        tag(200 + k, address=7 + k, table="coil", type="bool", writable=True) for k in range(3)
    ]
    d = driver(server.endpoint, [*bindings, *strings, *coils], readback_writes=True)
    await d.connect()
    try:
        for b in bindings:
            await d.write(b, expected[b.index])
        for s in strings:
            await d.write(s, "ab€")
        for k, c in enumerate(coils):
            await d.write(c, k % 2 == 0)
        result = await d.read("default")
    finally:
        await d.close()
    values = by_index(result)
    for i, value in expected.items():
        assert values[i][1] == Quality.GOOD
        assert values[i][0] == pytest.approx(value, rel=1e-7), bindings[i].tag.address
    assert result.text == {100: "ab€", 101: "ab€"}
    assert [values[200 + k][0] for k in range(3)] == [1.0, 0.0, 1.0]
    # The little byte order string really is swapped on the device.
    assert await raw_read(server.port, 1004, 1) == [int.from_bytes(b"ba", "big")]
    assert d.stats.writes == len(bindings) + 2 + 3


async def test_coalescing_counted_on_the_server(server: ModbusTestServer) -> None:
    # 300 contiguous registers, a gap of 8 (bridged), a gap of 20 (not), 2100 coils.
    tags = [tag(i, address=i) for i in range(300)]
    tags.append(tag(300, address=308))
    tags.append(tag(301, address=329))
    tags += [tag(400 + i, address=i, table="coil", type="bool") for i in range(2100)]
    d = driver(server.endpoint, tags)
    await d.connect()
    try:
        result = await d.read("default")
    finally:
        await d.close()
    spans = sorted((r.function_code, r.address, r.count) for r in server.reads())
    assert spans == [
        (1, 0, 2000),
        (1, 2000, 100),
        (3, 0, 125),
        (3, 125, 125),
        (3, 250, 59),
        (3, 329, 1),
    ]
    assert d.stats.requests == 6 == d.requests_per_scan("default")
    assert len(result) == len(tags)
    assert np.all(result.quality == Quality.GOOD)


async def test_parallel_connections_spread_one_scan(server: ModbusTestServer) -> None:
    from edgeos_testing.faultproxy import FaultProxy

    async with FaultProxy("127.0.0.1", server.port) as proxy:
        tags = [tag(i, address=i) for i in range(1000)]
        d = driver(f"tcp://127.0.0.1:{proxy.port}", tags, connections=4)
        await d.connect()
        try:
            result = await d.read("default")
            assert proxy.counts["connections"] == 4
        finally:
            await d.close()
    assert d.stats.requests == 8
    assert len(server.reads()) == 8
    assert np.all(result.quality == Quality.GOOD)


async def test_exception_marks_only_that_requests_tags(server: ModbusTestServer) -> None:
    tags = [
        tag(0, address=1490),  # block 1490..1499 ok
        tag(1, address=1495),
        tag(2, address=1505),  # inside the hole 1500..1509 → exception 2
        tag(3, address=1200),
        tag(4, address=0, unit=9),  # no such unit
    ]
    d = driver(server.endpoint, tags, max_gap=0)
    await d.connect()
    try:
        result = await d.read("default")
        again = await d.read("default")  # the connection is still fine
    finally:
        await d.close()
    values = by_index(result)
    assert values[0][1] == values[1][1] == values[3][1] == Quality.GOOD
    assert values[2][1] == Quality.BAD_DEVICE and math.isnan(values[2][0])
    assert values[4][1] == Quality.BAD_DEVICE
    assert result.bad_reasons["exception_2"] == 1
    assert d.stats.errors["exception_2"] == 2
    assert len(again) == 5


async def test_gap_into_a_hole_fails_the_merged_request(server: ModbusTestServer) -> None:
    # Documented trade-off: bridging a gap that crosses unmapped registers fails the block.
    tags = [tag(0, address=1498), tag(1, address=1511)]
    d = driver(server.endpoint, tags, max_gap=20)
    await d.connect()
    try:
        result = await d.read("default")
    finally:
        await d.close()
    assert d.requests_per_scan("default") == 1
    assert list(result.quality) == [Quality.BAD_DEVICE] * 2


async def test_writes_refused_before_the_wire(server: ModbusTestServer) -> None:
    limited = tag(0, address=0, type="int16", writable=True, limits={"min": 0, "max": 100})
    wide = tag(1, address=1, type="int16", writable=True, limits={"min": -1e6, "max": 1e6})
    readonly = tag(2, address=2)
    inputs = tag(3, address=0, table="input", writable=True, limits={"min": 0, "max": 1})
    text = tag(4, address=10, type="string", length=1, writable=True)
    rate = tag(5, address=5, writable=True, limits={"min": 0, "max": 1000}, max_rate=1.0)
    d = driver(server.endpoint, [limited, wide, readonly, inputs, text, rate])
    await d.connect()
    try:
        for binding, value, reason in [
            (limited, 101, "outside hard limits"),
            (limited, float("nan"), "not finite"),
            (limited, "7", "expected a number"),
            (wide, 40000, "does not fit int16"),
            (readonly, 1, "not writable"),
            (inputs, 1, "read-only"),
            (text, "abc", "does not fit"),
        ]:
            with pytest.raises(WriteRefused, match=reason):
                await d.write(binding, value)
        await d.write(rate, 10)
        with pytest.raises(WriteRefused, match="max_rate"):
            await d.write(rate, 20)  # 10 units in 0 s of virtual time
    finally:
        await d.close()
    assert [w.address for w in server.writes()] == [5]
    assert d.stats.writes_refused == 8
    assert d.stats.writes == 1


async def test_write_function_codes_and_device_exception(server: ModbusTestServer) -> None:
    single = tag(0, address=20, type="uint16", writable=True, limits={"min": 0, "max": 9})
    double = tag(1, address=21, type="float32", writable=True, limits={"min": 0, "max": 9})
    coil = tag(2, address=3, table="coil", type="bool", writable=True)
    hole = tag(3, address=1500, writable=True, limits={"min": 0, "max": 9})
    d = driver(server.endpoint, [single, double, coil, hole])
    await d.connect()
    try:
        await d.write(single, 7)
        await d.write(double, 1.5)
        await d.write(coil, True)
        with pytest.raises(DeviceException) as info:
            await d.write(hole, 1)
        assert info.value.code == 2
        await d.write(single, 8)  # the connection survived the exception
    finally:
        await d.close()
    assert [(w.function_code, w.address, w.count) for w in server.writes()] == [
        (6, 20, 1),
        (16, 21, 2),
        (5, 3, 1),
        (6, 1500, 1),
        (6, 20, 1),
    ]
    assert await raw_read(server.port, 20, 3) == [8, 0x3FC0, 0]


async def test_always_write_multiple_and_readback_mismatch(server: ModbusTestServer) -> None:
    clamped = tag(0, address=0, unit=2, writable=True, limits={"min": 0, "max": 5000})
    d = driver(server.endpoint, [clamped], readback_writes=True, always_write_multiple=True)
    await d.connect()
    try:
        await d.write(clamped, 999)
        with pytest.raises(ReadbackMismatch) as info:
            await d.write(clamped, 1234)
    finally:
        await d.close()
    assert info.value.written == [1234] and info.value.read == [1000]
    assert {w.function_code for w in server.writes()} == {16}
    assert d.stats.errors["readback"] == 1


async def test_refused_port_is_connect_error(server: ModbusTestServer) -> None:
    probe = ModbusTestServer()
    await probe.start()
    port = probe.port
    await probe.stop()
    d = driver(f"tcp://127.0.0.1:{port}", [tag(0, address=0)])
    with pytest.raises(ConnectError):
        await d.connect()
    with pytest.raises(ConnectError):
        await d.read("default")
    await d.close()
    parallel = driver(f"tcp://127.0.0.1:{port}", [tag(0, address=0)], connections=3)
    with pytest.raises(ConnectError):  # not an ExceptionGroup
        await parallel.connect()
    assert parallel.stats.errors["connect"] == 1


async def test_unknown_scan_group_reads_nothing(server: ModbusTestServer) -> None:
    d = driver(server.endpoint, [tag(0, address=0)])
    assert len(await d.read("nope")) == 0
    with pytest.raises(ConnectError):
        await d.read("default")  # not connected: no silent auto-connect
    with pytest.raises(ConnectError):
        await d.write(tag(0, address=0, writable=True, limits={"min": 0, "max": 1}), 1)
