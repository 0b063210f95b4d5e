"""The example configurations load, match the simulator's layout, and are up to date."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from pathlib import Path

import pytest
from pymodbus.client import AsyncModbusTcpClient

from drivers.modbus import ModbusRef
from drivers.opcua import OpcUaAddress
from edgeos.config import load_config
from edgeos_cloud.fleet.physics.layout import build_layout
from edgeos_sim.configgen import OPCUA_TAGS, render_small_line, render_tyre_line

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.mark.parametrize(
    ("name", "render"),
    [("tyre-line.toml", render_tyre_line), ("small-line.toml", render_small_line)],
)
def test_committed_examples_are_what_the_generator_writes(name: str, render: object) -> None:
    assert callable(render)
    assert (EXAMPLES / name).read_text(encoding="utf-8") == render(), (
        f"examples/{name} is stale: run python examples/generate.py"
    )


def test_tyre_line_example_has_the_16000_tags_of_the_flat_layout() -> None:
    config = load_config(EXAMPLES / "tyre-line.toml", check_drivers=False)
    layout = build_layout(80, 200, "flat")
    tags = config.all_tags
    assert len(tags) == 16_000
    for tag, spec in zip(tags, layout.tags, strict=True):
        assert tag.name == spec.name
        modbus = tag.address
        assert isinstance(modbus, ModbusRef)
        assert (modbus.unit, modbus.table, modbus.address) == (1, "holding", spec.modbus_address)
        assert (modbus.type, modbus.scale) == (spec.modbus_type, spec.scale)
        assert tag.writable == spec.writable
        assert tag.connection == "line-plc"
    assert config.connection("line-plc").options == {"connections": 4}
    assert {g.name: g.period_ms for g in config.scan_groups} == {"default": 1000, "fast": 100}
    assert not config.inference.enabled and not config.ota.enabled


def test_small_line_example_mixes_modbus_and_opcua_over_the_same_presses() -> None:
    config = load_config(EXAMPLES / "small-line.toml", check_drivers=False)
    layout = build_layout(4, 20, "flat")
    modbus = [t for t in config.all_tags if isinstance(t.address, ModbusRef)]
    opcua = [t.address for t in config.all_tags if isinstance(t.address, OpcUaAddress)]
    assert [t.name for t in modbus] == [s.name for s in layout.tags]
    assert [t.address.address for t in modbus if isinstance(t.address, ModbusRef)] == list(
        range(80)
    )
    assert len(opcua) == 4 * len(OPCUA_TAGS)
    node_ids = {s.node_id for s in layout.tags}
    assert all(a.node_id in node_ids for a in opcua)
    assert {a.mode for a in opcua} == {"poll", "subscribe"}


async def test_cli_prints_endpoints_as_json_serves_and_stops_on_sigterm() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "edgeos_sim.cli",
        "--nests",
        "2",
        "--tags-per-nest",
        "20",
        "--modbus-port",
        "0",
        "--no-opcua",
        "--json",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(30):  # guard only
            info = json.loads(await proc.stdout.readline())
        assert info["tags"] == 40 and info["layout"] == "flat" and info["opcua_url"] is None
        client = AsyncModbusTcpClient("127.0.0.1", port=info["modbus"]["port"])
        assert await client.connect()
        rr = await client.read_holding_registers(0, count=40, device_id=1)
        client.close()
        assert not rr.isError() and len(rr.registers) == 40
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(30):
            assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
