"""kill -9 the runtime repeatedly: every accepted sample (its batch reached the spool)
arrives exactly once; samples of the downtime were never read (coverage is reported)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from edgeos_testing.rig import finish


async def _kill_loop(rig: Any, kills: int) -> None:
    for _ in range(kills):
        async with asyncio.timeout(60):
            await rig.wait_batches(2)
        await asyncio.sleep(0.7)  # somewhere inside a batch interval
        await rig.dut.kill()
        await rig.dut.start()
    async with asyncio.timeout(60):
        await rig.wait_batches(2)


def _check(outcome: Any, kills: int) -> None:
    print(json.dumps(outcome.as_dict(), indent=1))
    fig = outcome.figures
    assert not outcome.problems
    assert fig.incarnations == kills + 1 and fig.epochs == kills + 1
    assert fig.lost_batches == 0, fig.lost_batch_ids
    assert fig.window_lost == 0, fig.examples
    assert fig.duplicates == 0 and fig.order_violations == 0 and fig.mismatched == 0


@pytest.mark.timeout(240)
async def test_kill9_three_times(e2e_rig: Any) -> None:
    rig = await e2e_rig()
    await _kill_loop(rig, 3)
    _check(await finish(rig, "e2e: kill -9 ×3"), 3)


@pytest.mark.slow
@pytest.mark.timeout(900)
async def test_kill9_many_times(e2e_rig: Any) -> None:
    rig = await e2e_rig()
    await _kill_loop(rig, 12)
    _check(await finish(rig, "e2e: kill -9 ×12"), 12)
