"""ModbusRtuDriver over a pseudo-terminal pair against pymodbus's RTU server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest

from drivers.modbus import ModbusRtuDriver
from edgeos.clock import SystemClock
from edgeos.config import ConnectionConfig, TagConfig
from edgeos.driver import Quality, TagBinding, load_driver_class
from edgeos.errors import ConnectError, TimeoutError_
from edgeos_testing.modbus import ModbusTestServer, SerialLine, UnitSpec


def tag(i: int, **modbus: Any) -> TagBinding:
    extra = {k: modbus.pop(k) for k in ("writable", "limits") if k in modbus}
    if modbus.get("type") in ("float32", "float64"):
        extra["resolution"] = 0.01
    return TagBinding(i, TagConfig(name=f"t{i}", connection="bus", modbus=modbus, **extra))


TAGS = [
    tag(0, address=0, type="int16", scale=0.1),
    tag(1, address=1, type="float32", word_order="little"),
    tag(2, address=40, unit=2),
    tag(3, address=5, table="coil", type="bool"),
    tag(4, address=3, writable=True, limits={"min": 0, "max": 1000}),
    tag(5, address=5, type="float32", writable=True, limits={"min": -10, "max": 10}),
]


def make(device: str, tags: list[TagBinding] = TAGS, **options: Any) -> ModbusRtuDriver:
    options = {"baudrate": 115200, "request_timeout_s": 1.0} | options
    conn = ConnectionConfig(
        name="bus", driver="modbus_rtu", endpoint=f"rtu://{device}", options=options
    )
    return ModbusRtuDriver(conn.driver_context(tags, clock=SystemClock()))


@pytest.fixture
async def line() -> AsyncIterator[SerialLine]:
    async with SerialLine() as line:
        server = ModbusTestServer(
            [UnitSpec(unit=1, holding=100), UnitSpec(unit=2, holding=100)],
            serial_port=line.device_a,
        )
        await server.start()
        try:
            yield line
        finally:
            await server.stop()


def test_endpoint_and_options() -> None:
    assert load_driver_class("modbus_rtu") is ModbusRtuDriver
    assert ModbusRtuDriver.check_endpoint("rtu:///dev/ttyUSB0") is None
    assert "three slashes" in (ModbusRtuDriver.check_endpoint("rtu://dev/ttyUSB0") or "")
    assert ModbusRtuDriver.check_endpoint("tcp://plc:502") is not None
    opts = ModbusRtuDriver.options_model.model_validate({"baudrate": 9600, "parity": "E"})
    # 11 bits per character at 9600 baud: 3.5 characters ≈ 4.01 ms.
    assert opts.inter_frame_s() == pytest.approx(3.5 * 11 / 9600)  # type: ignore[attr-defined]
    fast = ModbusRtuDriver.options_model.model_validate({"baudrate": 115200})
    assert fast.inter_frame_s() == 0.00175  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="connections"):
        ModbusRtuDriver.options_model.model_validate({"connections": 2})


async def test_read_write_over_the_serial_line(line: SerialLine) -> None:
    d = make(line.device_b)
    await d.connect()
    try:
        await d.write(TAGS[4], 321)
        await d.write(TAGS[5], -2.5)
        result = await d.read("default")
    finally:
        await d.close()
    values = dict(zip(result.indices.tolist(), result.values.tolist(), strict=True))
    assert values[4] == 321 and values[5] == -2.5
    assert values[0] == 0.0 and values[3] == 0.0
    assert np.all(result.quality == Quality.GOOD)
    assert d.stats.requests == 2 + d.requests_per_scan("default")
    assert d.stats.bytes_out > 0 and d.stats.bytes_in > 0


async def test_garbage_between_frames_then_reads_succeed(line: SerialLine) -> None:
    # The default 1 s request timeout, not a short one: server, pump and driver share this
    # test's loop, and on a loaded machine one round trip took longer than 0.3 s; every answer
    # then arrived after its request had timed out and the scan saw "no answer to any
    # request" — a finding about the test's timeout, not about resynchronisation.
    d = make(line.device_b)
    await d.connect()
    try:
        assert np.all((await d.read("default")).quality == Quality.GOOD)
        # Noise towards the driver while the line is idle, as a long cable picks up.
        line.inject_to_b(b"\x00\xff\x13\x37\x01\x03\x99")
        await d.read("default")
        # Noise towards the device. pymodbus's RTU server does not delimit frames by silence,
        # so it may swallow the next request with the noise: that request times out, only its
        # tags go BAD_COMM, the scan goes on, and the line is clean afterwards. (The noise is
        # in the pty when inject_to_a returns: nothing to wait for before the next request.)
        line.inject_to_a(b"\x55\xaa\x07")
        first = await d.read("default")
        assert set(first.bad_reasons) <= {"timeout"}
        assert int(np.sum(first.quality == Quality.BAD_COMM)) <= max(
            r.n_tags for r in d.plan("default")
        )
        for _ in range(3):
            result = await d.read("default")
            assert np.all(result.quality == Quality.GOOD)
    finally:
        await d.close()


async def test_inter_frame_gap_is_kept(line: SerialLine) -> None:
    gap_ms = 15.0
    d = make(line.device_b, inter_frame_ms=gap_ms)
    await d.connect()
    try:
        for _ in range(2):
            await d.read("default")
    finally:
        await d.close()
    # Silence before each request, measured at the line between the end of the previous
    # answer (towards b) and the next request (towards a): a lower bound, never flaky.
    gaps = []
    last_answer = None
    for stamp, towards, _ in line.log:
        if towards == "b":
            last_answer = stamp
        elif last_answer is not None:
            gaps.append(stamp - last_answer)
            last_answer = None
    assert len(gaps) >= 4
    assert min(gaps) >= gap_ms / 1000 * 0.9


async def test_silent_line_times_out_and_recovers(line: SerialLine) -> None:
    d = make(line.device_b, request_timeout_s=0.2)
    await d.connect()
    try:
        line.drop_to_b = True
        with pytest.raises(TimeoutError_):
            await d.read("default")
        assert d.stats.errors["timeout"] == d.requests_per_scan("default")
        line.drop_to_b = False
        await d.close()
        await d.connect()
        assert np.all((await d.read("default")).quality == Quality.GOOD)
    finally:
        await d.close()


async def test_missing_serial_port_is_connect_error() -> None:
    d = make("/dev/does-not-exist-edgeos")
    with pytest.raises(ConnectError):
        await d.connect()
    await d.close()
    await asyncio.sleep(0)
