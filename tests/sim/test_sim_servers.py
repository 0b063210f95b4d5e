"""The line on real servers, checked with plain pymodbus and asyncua clients."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest
from asyncua import Client, ua
from pymodbus.client import AsyncModbusTcpClient

from edgeos_sim.servers import SimLine, SimOptions


async def _modbus(line: SimLine) -> AsyncModbusTcpClient:
    assert line.modbus_port is not None
    client = AsyncModbusTcpClient("127.0.0.1", port=line.modbus_port)
    assert await client.connect()
    return client


@pytest.fixture
async def small_line() -> AsyncIterator[SimLine]:
    # tick_hz=0: the test drives the clock, so served values are exactly predictable.
    options = SimOptions(
        nests=4, tags_per_nest=20, tick_hz=0, truth_memory=True, seed=1, opcua_port=None
    )
    async with SimLine(options) as line:
        await line.step(5)
        yield line


async def test_modbus_client_reads_registers_and_writes_a_setpoint(small_line: SimLine) -> None:
    line = small_line
    client = await _modbus(line)
    try:
        rr = await client.read_holding_registers(0, count=80, device_id=1)
        assert not rr.isError()
        assert rr.registers == line.registers.tolist()

        sp = line.layout.index("nest03.heater.sp")
        wr = await client.write_register(sp, 1725, device_id=1)  # 172.5 °C
        assert not wr.isError()
        assert line.physics.heater_sp[2] == pytest.approx(172.5)
        rr = await client.read_holding_registers(sp, count=1, device_id=1)
        assert rr.registers == [1725]

        # Measurements are read-only; set-points have hard limits.
        pv = line.layout.index("nest03.heater.pv")
        assert (await client.write_register(pv, 1000, device_id=1)).exception_code == 2
        assert (await client.write_register(sp, 2500, device_id=1)).exception_code == 3
        assert line.physics.heater_sp[2] == pytest.approx(172.5)
    finally:
        client.close()


async def test_truth_log_records_every_served_modbus_response(small_line: SimLine) -> None:
    line = small_line
    client = await _modbus(line)
    served = []
    try:
        for _ in range(3):
            rr = await client.read_holding_registers(20, count=20, device_id=1)
            served.append(line.layout.decode(np.array(rr.registers, np.uint16), np.arange(20, 40)))
            await line.step(3)
    finally:
        client.close()
    truth = line.ground_truth()
    assert truth.modbus_response_count == 3
    pv = line.layout.index("nest02.heater.pv")
    series = truth.series("nest02.heater.pv")
    assert series.values.tolist() == [s[pv - 20] for s in served]
    assert np.all(np.diff(series.times) >= 0)
    assert truth.served().sum() == 20


async def test_opcua_client_reads_writes_and_subscribes() -> None:
    options = SimOptions(nests=2, tags_per_nest=20, tick_hz=0, modbus_port=None, truth_memory=True)
    async with SimLine(options) as line:
        await line.step(3)
        assert line.opcua_url is not None
        async with Client(line.opcua_url) as client:
            pv_tag = line.layout.tag("nest02.heater.pv")
            value = await client.get_node(pv_tag.node_id).read_value()
            assert value == line.values[pv_tag.index]

            sp_tag = line.layout.tag("nest01.press.sp")
            sp = client.get_node(sp_tag.node_id)
            await sp.write_value(ua.DataValue(ua.Variant(18.5, ua.VariantType.Double)))
            assert line.physics.press_sp[0] == pytest.approx(18.5)
            assert await sp.read_value() == pytest.approx(18.5)
            with pytest.raises(ua.UaStatusCodeError):
                await sp.write_value(ua.DataValue(ua.Variant(99.0, ua.VariantType.Double)))

            received: asyncio.Queue[float] = asyncio.Queue()

            class Handler:
                def datachange_notification(self, node: Any, val: float, data: Any) -> None:
                    received.put_nowait(val)

            sub = await client.create_subscription(50, Handler())
            await sub.subscribe_data_change(client.get_node(pv_tag.node_id))
            async with asyncio.timeout(10):  # a guard against hanging, not a timing check
                first = await received.get()
                # Change the platen temperature for sure, then expect a notification of it.
                line.physics.write(line.layout.index("nest02.heater.sp"), 190.0)
                await line.step(20)
                final = float(line.values[pv_tag.index])
                assert final != first
                while (latest := await received.get()) != final:
                    pass
            await sub.delete()

        truth = line.ground_truth()
        series = truth.series(pv_tag.index, "opcua")
        assert value in series.values.tolist()
        assert latest in series.values.tolist()


async def test_full_line_serves_all_16000_registers_in_128_requests(tmp_path: Any) -> None:
    path = tmp_path / "line.truth"
    options = SimOptions(opcua_port=None, tick_hz=0, truth_path=path)
    async with SimLine(options) as line:
        await line.step(2)
        expected = line.registers.copy()
        client = await _modbus(line)
        got: list[int] = []
        try:
            requests = line.layout.requests()
            for unit, address, count in requests:
                rr = await client.read_holding_registers(address, count=count, device_id=unit)
                assert not rr.isError()
                got.extend(rr.registers)
        finally:
            client.close()
    assert len(requests) == 128
    assert np.array_equal(np.array(got, np.uint16), expected)

    from edgeos_sim.truth import GroundTruth

    truth = GroundTruth.load(path)
    assert truth.modbus_response_count == 128
    assert truth.served().all()
    tag = line.layout.tag("nest80.quality.elasticity")
    assert truth.series(tag.name).values.tolist() == [
        pytest.approx(expected[tag.index] * tag.scale)
    ]


async def test_unit_per_nest_layout_answers_on_each_unit() -> None:
    options = SimOptions(
        nests=3, tags_per_nest=20, layout="unit-per-nest", opcua_port=None, tick_hz=0
    )
    async with SimLine(options) as line:
        client = await _modbus(line)
        try:
            for unit in (1, 3):
                rr = await client.read_holding_registers(0, count=20, device_id=unit)
                first = (unit - 1) * 20
                assert rr.registers == line.registers[first : first + 20].tolist()
            # Past the end of a unit's block is an illegal address, not someone else's data.
            rr = await client.read_holding_registers(15, count=10, device_id=2)
            assert rr.isError()
        finally:
            client.close()


async def test_clock_ticks_on_its_own_and_shuts_down_cleanly() -> None:
    options = SimOptions(nests=2, tags_per_nest=20, opcua_port=None, tick_hz=50)
    async with SimLine(options) as line:
        start = line.physics.time_s
        await line.wait_ticks(5)
        assert line.ticks >= 5
        assert line.physics.time_s > start
    # The autouse fixtures fail this test if a task or thread is left behind.
