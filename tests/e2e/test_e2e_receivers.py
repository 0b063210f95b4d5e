"""Two receivers on one shared subscription store every batch exactly once."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from edgeos_cloud.receiver.storage import open_storage
from edgeos_testing.rig import finish


def _rejects(storage_url: str) -> dict[str, int]:
    """Every reject the receivers counted, by reason (all devices)."""
    storage = open_storage(storage_url)
    try:
        total: dict[str, int] = {}
        for summary in storage.device_summaries():
            for reason, count in summary.rejects.items():
                total[reason] = total.get(reason, 0) + count
        return total
    finally:
        storage.close()


async def test_two_receivers_store_each_batch_once(e2e_rig: Any) -> None:
    rig = await e2e_rig(receivers=2)
    async with asyncio.timeout(60):
        await rig.wait_batches(8)
    outcome = await finish(rig, "e2e: two receivers, shared subscription")
    print(json.dumps(outcome.as_dict(), indent=1))
    fig = outcome.figures
    assert all(r.running for r in rig.receivers)
    assert not outcome.problems
    assert fig.lost_batches == 0 and fig.unaccounted_stored_batches == 0
    assert fig.duplicates == 0 and fig.order_violations == 0 and fig.mismatched == 0
    # A healthy run sends each batch once: no batch reaches a receiver twice.
    assert _rejects(rig.storage_url).get("replayed", 0) == 0
