"""Fill the spool's disk quota while the broker is unreachable, with each full policy: the
dropped batches are counted in status and announced, nothing else is lost, acks do not stall."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from edgeos_testing.rig import finish, spool_quota_options


async def _quota(e2e_rig: Any, policy: str) -> None:
    rig = await e2e_rig(**spool_quota_options(policy, device_id="e2e-gw-01"))
    async with asyncio.timeout(60):
        await rig.wait_batches(2)
    rig.broker_proxy.partition()
    async with asyncio.timeout(150):
        full = await rig.wait_status(lambda d: d["uplink"].get("dropped", 0) > 0)
    await asyncio.sleep(3)
    rig.broker_proxy.heal()
    async with asyncio.timeout(60):
        await rig.wait_batches(full["uplink"]["batches_sealed"] + 2)
    outcome = await finish(rig, f"e2e: spool quota {policy}", drain_s=120)
    print(json.dumps(outcome.as_dict(), indent=1))
    fig = outcome.figures
    dropped = outcome.notes["dropped"]
    assert dropped > 0, "the spool never hit its quota"
    assert not outcome.problems, outcome.problems  # the spool drained: acks did not stall
    assert fig.lost_batches == 0, fig.lost_batch_ids
    # Every sealed batch is stored, announced in meta.skip (the receiver's acks passed it) or
    # still on disk.
    assert fig.announced_gap_batches > 0
    assert fig.accepted_batches == (
        fig.stored_batches + fig.announced_gap_batches + fig.pending_on_disk_batches
    ), fig
    # Every batch the status counts as dropped was announced in meta.skip, except one that was
    # already published when its segment was dropped: the receiver stores it (the identity
    # above counts it as stored) and its ack passes the gap, so it is never announced. Such a
    # batch is in the publisher's in-flight window, so at most `inflight_window` (16) of them.
    # Nothing is announced that was not dropped.
    unannounced = dropped - fig.announced_seqs
    assert 0 <= unannounced <= 16, (
        f"status dropped {dropped}, announced {fig.announced_seqs} distinct "
        f"({fig.announced_gap_batches} never stored + {fig.announced_but_stored} stored)"
    )
    assert fig.window_lost == 0, fig.examples
    assert fig.duplicates == 0 and fig.order_violations == 0 and fig.mismatched == 0


@pytest.mark.timeout(300)
async def test_spool_quota_drop_oldest(e2e_rig: Any) -> None:
    await _quota(e2e_rig, "drop_oldest")


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_spool_quota_refuse_new(e2e_rig: Any) -> None:
    """Also run in the default suite by hil_tests (disk-full scenario, via test_hil_short)."""
    await _quota(e2e_rig, "refuse_new")
