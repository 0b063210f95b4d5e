"""Raw material of a served line: its distribution, the Mooney the lab reports, a new rubber
mid-run (``edgeos sim --material-…``), read over Modbus like a gateway would."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys

import numpy as np
from pymodbus.client import AsyncModbusTcpClient

from edgeos_sim.servers import SimLine, SimOptions

NESTS = 4
#: Simulated seconds per tick at tick_hz 10 (the test drives the clock: tick_hz 0 steps 0.1 s).
CYCLE_S = 4.0


def _options(**material: float | None) -> SimOptions:
    return SimOptions(
        nests=NESTS, tags_per_nest=20, tick_hz=0, opcua_port=None, seed=3, cycle_s=CYCLE_S,
        **material,  # type: ignore[arg-type]
    )  # fmt: skip


async def _served_mooney(line: SimLine) -> list[float]:
    """``batch.mooney`` of every nest as a Modbus client decodes it."""
    assert line.modbus_port is not None
    client = AsyncModbusTcpClient("127.0.0.1", port=line.modbus_port)
    assert await client.connect()
    try:
        out = []
        for n in range(1, NESTS + 1):
            spec = line.layout.tag(f"{line.layout.nest_name(n)}.batch.mooney")
            rr = await client.read_holding_registers(
                spec.modbus_address, count=1, device_id=spec.modbus_unit
            )
            assert not rr.isError()
            raw = np.asarray(rr.registers, dtype=np.uint16)
            out.append(float(line.layout.decode(raw, np.array([spec.index]))[0]))
        return out
    finally:
        client.close()


async def test_material_distribution_and_mooney_offset_are_served() -> None:
    async with SimLine(_options(material_mean=1.5, material_std=0.0, mooney_offset=20.0)) as line:
        await line.step(round(2 * CYCLE_S / line.tick_s))
        p = line.physics.batch_property
        assert np.allclose(
            p[line.physics.batch_id > 0], 1.5, atol=0.15
        )  # std 0: the slow drift only
        mooney = await _served_mooney(line)
        # 50 + 6p ± lab noise, read 20 MU higher: the compound the models never saw.
        assert all(75.0 < m < 83.0 for m in mooney), mooney


async def test_a_new_rubber_mid_run_reaches_every_nest_at_its_next_load() -> None:
    options = _options(
        material_change_after_s=3 * CYCLE_S,
        material_mean_after=2.0,
        material_std_after=0.0,
        mooney_offset_after=9.0,
    )
    async with SimLine(options) as line:
        await line.step(round(2.5 * CYCLE_S / line.tick_s))
        assert line.material_changed_at is None
        old_batch = int(line.physics.batch_id.max())
        await line.step(round(3 * CYCLE_S / line.tick_s))
        assert line.material_changed_at is not None
        assert line.material_changed_at >= 3 * CYCLE_S
        # Every nest has loaded since (a cycle is CYCLE_S): all on the new batch, p = 2.
        assert (line.physics.batch_id > old_batch).all()
        assert np.allclose(line.physics.batch_property, 2.0, atol=0.15)
        mooney = await _served_mooney(line)
        assert all(58.0 + 9.0 < m < 66.0 + 9.0 for m in mooney), mooney
        # Tyres made of the new batch finish with the new property (ground truth).
        newer = [c for c in line.physics.cycles if c.batch_id > old_batch]
        assert newer and all(abs(c.batch_property - 2.0) < 0.15 for c in newer)


async def test_cli_takes_the_material_options_and_reports_them() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "edgeos", "sim", "--nests", "2", "--tags-per-nest", "20",
        "--modbus-port", "0", "--no-opcua", "--json", "--material-mean", "1.5",
        "--material-std", "0.2", "--material-change-after-s", "30", "--material-mean-after",
        "2", "--mooney-offset-after", "20",
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(60):
            info = json.loads(await proc.stdout.readline())
        assert info["material"] == {
            "mean": 1.5, "std": 0.2, "mooney_offset": 0.0, "change_after_s": 30.0,
            "mean_after": 2.0, "std_after": 1.0, "mooney_offset_after": 20.0,
        }  # fmt: skip
    finally:
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(30):
            assert await proc.wait() == 0
    bad = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "edgeos", "sim", "--material-std", "-1",
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )  # fmt: skip
    async with asyncio.timeout(60):
        _, err = await bad.communicate()
    assert bad.returncode == 2 and b"--material-std" in err
