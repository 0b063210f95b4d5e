"""The runtime with inference on the simulated line: verdicts in the twin, guarded writes."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from edgeos.app import Runtime
from edgeos.control import ControlError, request
from edgeos_sim import SimLine, SimOptions
from edgeos_sim.line import write_line_config

MODELS = Path(__file__).resolve().parents[2] / "models"


def _inference(guard: bool) -> dict[str, object]:
    return {
        "enabled": True,
        "models": [
            {"name": task, "manifest": str(MODELS / f"{task}.toml"), "role": "champion"}
            for task in ("anomaly", "quality", "correction")
        ],
        "guard": {"enabled": guard, "alpha": 0.005},
    }


async def test_inference_gates_write_verdicts_into_the_twin(tmp_path: Path) -> None:
    # A fast line (short cycles) so tyres finish within the test.
    options = SimOptions(nests=2, tags_per_nest=20, opcua_port=None, tick_hz=20, cycle_s=6)
    async with SimLine(options) as line:
        config = write_line_config(
            tmp_path / "edgeos.toml",
            modbus_port=line.modbus_port,
            opcua_url=None,
            state_dir=tmp_path / "state",
            nests=2,
            tags_per_nest=20,
            overrides={"uplink": {"enabled": False}, "inference": _inference(guard=True)},
        )
        runtime = Runtime(config)
        assert runtime.inference is not None
        assert runtime.inference.engine.stations == ("nest01", "nest02")
        names = set(runtime.twin.names)
        assert {"nest01.gate.verdict", "nest02.gate.confidence"} <= names
        # Derived tags are not scanned from any device.
        assert all(b.tag.connection != "@derived" for b in runtime.bindings)

        task = asyncio.create_task(runtime.run())
        try:
            async with asyncio.timeout(20):
                await runtime.ready.wait()
            # Steps run once a second; wait for a few and for the first verdict.
            async with asyncio.timeout(60):
                while runtime.inference.steps < 3 or not sum(
                    runtime.status()["gates"]["verdicts"].values()
                ):
                    await asyncio.sleep(0.2)
            status = runtime.status()
            print("verdicts", status["gates"], "guard", status["guard"])
            assert status["inference"]["step_errors"] == 0
            verdict = runtime.twin.query("nest0*.gate.verdict")
            assert any(row["value"] in (0, 1, 2) for row in verdict), verdict
            events = runtime.inference.drain_events()
            assert any(e.get("type") == "verdict" for e in events)

            # The operator switch turns learned actions off at once, over the control socket.
            sock = tmp_path / "state" / "control.sock"
            answer = await asyncio.to_thread(
                request, sock, "inference.learning", enabled=False, who="test"
            )
            assert answer["type"] == "guard_switch"
            assert runtime.status()["guard"]["learning"] is False
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task


async def test_learning_switch_without_inference_is_a_clear_error(tmp_path: Path) -> None:
    async with SimLine(SimOptions(nests=1, tags_per_nest=20, opcua_port=None)) as line:
        config = write_line_config(
            tmp_path / "edgeos.toml",
            modbus_port=line.modbus_port,
            opcua_url=None,
            state_dir=tmp_path / "state",
            nests=1,
            tags_per_nest=20,
            overrides={"uplink": {"enabled": False}},
        )
        runtime = Runtime(config)
        task = asyncio.create_task(runtime.run())
        try:
            async with asyncio.timeout(20):
                await runtime.ready.wait()
            with pytest.raises(ControlError, match="inference is not enabled"):
                await asyncio.to_thread(
                    request,
                    tmp_path / "state" / "control.sock",
                    "inference.learning",
                    enabled=False,
                )
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
