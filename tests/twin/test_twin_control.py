"""``edgeos twin get`` / ``twin set`` over a real control socket: outcomes, not just values."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest

from edgeos.cli import twin_row_text
from edgeos.clock import VirtualClock
from edgeos.config import TagConfig, TwinConfig
from edgeos.control import ControlServer, request, twin_handlers
from edgeos.driver import Quality, ReadResult, TagBinding, Value
from edgeos.status_view import render_status
from edgeos.twin import Twin


class SignallingWritePath:
    """Records writes and sets ``written`` after each."""

    def __init__(self) -> None:
        self.writes: list[tuple[str, Value]] = []
        self.written = asyncio.Event()

    async def write(self, binding: TagBinding, value: Value) -> None:
        self.writes.append((binding.tag.name, value))
        self.written.set()


class Rig:
    def __init__(self, sock: Path) -> None:
        self.sock = sock
        self.clock = VirtualClock()
        tags = [
            TagConfig.model_validate(
                {
                    "name": "oven.sp",
                    "connection": "plc",
                    "unit": "degC",
                    "modbus": {"address": 0, "type": "float32"},
                    "resolution": 0.1,
                    "writable": True,
                    "limits": {"min": 0, "max": 250},
                }
            ),
            TagConfig.model_validate(
                {
                    "name": "oven.pv",
                    "connection": "plc",
                    "resolution": 0.1,
                    "modbus": {"address": 2, "type": "float32"},
                }
            ),
        ]
        self.twin = Twin(tags, TwinConfig(), clock=self.clock)
        self.path = SignallingWritePath()

    def read(self, value: float) -> None:
        result = ReadResult(
            np.array([0], dtype=np.int32),
            np.array([value]),
            np.array([Quality.GOOD], dtype=np.uint8),
            np.array([0.0]),
        )
        self.twin.apply(result, self.clock.time())

    async def ask(self, op: str, **params: object) -> object:
        return await asyncio.to_thread(request, self.sock, op, **params)


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    r = Rig(tmp_path / "control.sock")
    ready = asyncio.Event()
    server = ControlServer(r.sock, twin_handlers(r.twin))
    async with asyncio.TaskGroup() as tg:
        tasks = [tg.create_task(r.twin.run_writes(r.path)), tg.create_task(server.run(ready))]
        async with asyncio.timeout(5):
            await ready.wait()
        yield r
        for task in tasks:
            task.cancel()


async def test_twin_set_answers_once_the_confirming_read_applied_it(rig: Rig) -> None:
    answer = asyncio.create_task(rig.ask("twin.set", tag="oven.sp", value=180, wait_s=30))
    async with asyncio.timeout(5):
        await rig.path.written.wait()
    await rig.clock.advance(0)  # let the write task start waiting for the read
    rig.read(180.0)
    async with asyncio.timeout(5):
        done = await answer
    assert isinstance(done, dict)
    assert (done["status"], done["version"], done["reported"]) == ("applied", 1, 180.0)


async def test_twin_set_answers_pending_when_its_wait_ends_first(rig: Rig) -> None:
    done = await rig.ask("twin.set", tag="oven.sp", value=100, wait_s=0)
    assert isinstance(done, dict) and done["status"] == "pending"


async def test_twin_get_shows_a_refused_desired_value_with_its_reason(rig: Rig) -> None:
    refused = await rig.ask("twin.set", tag="oven.sp", value=9999, wait_s=5)
    assert isinstance(refused, dict) and refused["status"] == "refused"
    rows = await rig.ask("twin.get", pattern="oven.*")
    assert isinstance(rows, list)
    sp, pv = rows
    assert (sp["desired"], sp["version"], sp["desired_status"]) == (9999.0, 1, "refused")
    assert sp["desired_reason"] == "value 9999 outside hard limits [0, 250]"
    assert "desired" not in pv  # not writable: no desired columns
    line = twin_row_text(sp)
    assert line.endswith("desired=9999 v1 (refused: value 9999 outside hard limits [0, 250])")
    assert "desired" not in twin_row_text(pv)


def test_twin_get_text_names_each_outcome() -> None:
    row = {"name": "oven.sp", "value": 20.0, "unit": "degC", "quality": "GOOD", "version": 3}
    cases = {
        ("pending", ""): "(pending)",
        ("applied", ""): "(applied)",
        ("timed_out", "no read confirmed the value within 10 s"): (
            "(timed out: no read confirmed the value within 10 s)"
        ),
    }
    for (status, reason), shown in cases.items():
        text = twin_row_text(
            {**row, "desired": 25.0, "desired_status": status, "desired_reason": reason}
        )
        assert text.endswith(f"desired=25.0 v3 {shown}")


def test_status_view_shows_pending_and_refused_desired_changes() -> None:
    from rich.console import Console

    console = Console(record=True, width=140)
    doc = {
        "twin": {
            "tags": 2,
            "by_quality": {"GOOD": 2},
            "desired_pending": 1,
            "desired_outcomes": {"applied": 4, "refused": 1},
        }
    }
    console.print(render_status(doc))
    assert "1 pending; applied 4, refused 1" in console.export_text()
