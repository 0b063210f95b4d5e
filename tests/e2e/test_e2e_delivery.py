"""Exactly once, in order, within resolution — through a broker stop/restart mid-stream."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from edgeos_testing.rig import finish, run_cli


async def test_exactly_once_in_order_across_broker_restart(e2e_rig: Any) -> None:
    rig = await e2e_rig()
    async with asyncio.timeout(60):
        await rig.wait_batches(2)
    status = json.loads(
        await asyncio.to_thread(
            run_cli,
            [
                str(Path(sys.executable).parent / "edgeos"),
                "status",
                "--json",
                "--config",
                str(rig.runtime_config),
            ],
        )
    )
    assert status["uplink"]["state"] == "connected"
    await asyncio.to_thread(rig.broker.stop)  # orderly stop mid-stream
    await asyncio.sleep(4)
    await asyncio.to_thread(rig.broker.start)
    async with asyncio.timeout(60):
        await rig.wait_batches(status["uplink"]["batches_sealed"] + 4)
    outcome = await finish(rig, "e2e: broker stop/restart")
    print(json.dumps(outcome.as_dict(), indent=1))
    fig = outcome.figures
    assert not outcome.problems
    assert fig.lost_batches == 0 and fig.pending_on_disk_batches <= 1
    assert fig.duplicates == 0 and fig.order_violations == 0
    assert fig.mismatched == 0, fig.examples  # every value within half its resolution
    assert fig.window_lost == 0, fig.examples
    assert fig.stored_usable > 1000 and fig.opcua_matched > 0
    # The query CLI (the receiver's contract) prints the same samples the oracle judged.
    out = await asyncio.to_thread(
        run_cli,
        [
            str(Path(sys.executable).parent / "edgeos-receiver"),
            "query",
            "--device",
            rig.device_id,
            "--tag",
            "nest01.heater.pv",
            "--config",
            str(rig.workdir / "receiver.toml"),
        ],
    )
    lines = [json.loads(x) for x in out.splitlines()]
    assert lines and all(x["tag"] == "nest01.heater.pv" for x in lines)
    ts = [x["ts"] for x in lines]
    assert ts == sorted(ts) and len(set(ts)) == len(ts)
