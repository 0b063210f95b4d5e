"""The same end-to-end path with the receiver on PostgreSQL (fresh database from template0)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from edgeos_testing.receiver import postgres_unreachable
from edgeos_testing.rig import DutSpec, ReceiverSpec, RigSpec, finish


@pytest.mark.postgres
async def test_exactly_once_on_postgres(e2e_rig: Any, pg_dsn: str) -> None:
    problem = await asyncio.to_thread(postgres_unreachable, pg_dsn)
    if problem is not None:
        print(f"SKIP reason: {problem}")
        pytest.skip(f"PostgreSQL unreachable: {problem}")
    spec = RigSpec(dut=DutSpec(device_id="e2e-gw-01"), receiver=ReceiverSpec(storage=pg_dsn))
    rig = await e2e_rig(spec=spec)
    async with asyncio.timeout(60):
        await rig.wait_batches(3)
    await rig.dut.kill()
    await rig.dut.start()
    async with asyncio.timeout(60):
        await rig.wait_batches(2)
    outcome = await finish(rig, "e2e: PostgreSQL receiver, one kill -9")
    print(json.dumps(outcome.as_dict(), indent=1))
    fig = outcome.figures
    assert not outcome.problems
    assert fig.lost_batches == 0 and fig.window_lost == 0
    assert fig.duplicates == 0 and fig.order_violations == 0 and fig.mismatched == 0
    assert fig.stored_usable > 500
