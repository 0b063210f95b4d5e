"""Snapshots: atomic save, restore as STALE, refusal and quarantine of bad files, the task."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from edgeos.clock import VirtualClock
from edgeos.config import TagConfig, TwinConfig
from edgeos.driver import Quality, ReadResult
from edgeos.errors import StorageError
from edgeos.twin import Twin
from edgeos_testing.twin_synthetic import line_tags


def make_twin(tags: list[TagConfig] | None = None, clock: VirtualClock | None = None) -> Twin:
    return Twin(
        tags if tags is not None else line_tags(2, 20),
        TwinConfig(snapshot_interval_s=1),
        clock=clock or VirtualClock(),
    )


def fill(twin: Twin, n: int) -> None:
    idx = np.arange(n, dtype=np.int32)
    quality = np.full(n, Quality.GOOD, dtype=np.uint8)
    quality[3] = Quality.BAD_DEVICE
    values = np.linspace(1.0, 2.0, n)
    values[3] = np.nan
    twin.apply(ReadResult(idx, values, quality, np.full(n, 123.0)), 124.0)


def test_round_trip_restores_values_as_stale_until_a_fresh_read(tmp_path: Path) -> None:
    path = tmp_path / "twin.snap"
    twin = make_twin()
    fill(twin, 30)
    twin.set_desired("nest01.p000", 100.0, source="cloud")  # stays pending
    twin.set_desired("nest02.p000", 999.0, source="cloud")  # refused
    twin.save_snapshot(path)
    assert [p.name for p in tmp_path.iterdir()] == ["twin.snap"]  # no temp files left

    fresh = make_twin()
    assert fresh.restore(path) is True
    assert np.array_equal(fresh.values[:30], twin.values[:30], equal_nan=True)
    assert fresh.quality[0] == Quality.STALE
    assert fresh.quality[3] == Quality.BAD_NO_VALUE  # it was bad: no usable value to keep
    assert fresh.quality[35] == Quality.BAD_NO_VALUE  # never read
    assert fresh.changes[0] == 1 and fresh.source_ts[0] == 123.0

    desired = fresh.desired_state()
    assert desired["nest01.p000"]["version"] == 1
    assert desired["nest01.p000"]["status"] == "timed_out"  # interrupted by the restart
    assert desired["nest02.p000"]["status"] == "refused"
    assert fresh.set_desired("nest01.p000", 101.0, source="cloud").version == 2

    idx = np.array([0], dtype=np.int32)
    good = np.array([Quality.GOOD], dtype=np.uint8)
    changed = fresh.apply(ReadResult(idx, fresh.values[:1].copy(), good, np.ones(1)), 200.0)
    assert list(changed) == [0]  # STALE -> GOOD is a change even with the same value
    assert fresh.quality[0] == Quality.GOOD


def test_missing_snapshot_is_not_an_error(tmp_path: Path) -> None:
    assert make_twin().restore(tmp_path / "none.snap") is False


def test_corrupt_snapshot_is_refused_and_moved_aside(tmp_path: Path) -> None:
    path = tmp_path / "twin.snap"
    twin = make_twin()
    fill(twin, 30)
    twin.save_snapshot(path)
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF
    path.write_bytes(bytes(data))

    fresh = make_twin()
    with pytest.raises(
        StorageError, match=r"checksum mismatch.*moved aside to twin\.snap\.rejected-"
    ):
        fresh.restore(path)
    assert not path.exists()
    assert len(list(tmp_path.glob("twin.snap.rejected-*"))) == 1
    assert np.isnan(fresh.values).all()  # started without it

    path.write_bytes(b"not a snapshot at all, clearly" * 3)
    with pytest.raises(StorageError, match="bad magic"):
        fresh.restore(path)
    assert len(list(tmp_path.glob("twin.snap.rejected-*"))) == 2


def test_snapshot_of_another_tag_set_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "twin.snap"
    make_twin(line_tags(2, 20)).save_snapshot(path)
    other = make_twin(line_tags(2, 21))
    with pytest.raises(StorageError, match=r"different tag set \(40 tags vs 42 configured: 2 tag"):
        other.restore(path)
    assert not path.exists()


async def test_periodic_snapshots_and_a_final_one_at_shutdown(tmp_path: Path) -> None:
    clock = VirtualClock()
    twin = make_twin(clock=clock)
    path = tmp_path / "state" / "twin.snap"
    task = asyncio.create_task(twin.run_snapshots(path))
    await clock.advance(2.5)
    fill(twin, 10)  # changed after the last periodic snapshot
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert twin.snapshots_saved >= 2
    assert twin.snapshot_errors == 0
    restored = make_twin()
    assert restored.restore(path)
    assert restored.values[0] == 1.0  # the final snapshot has the latest state


async def test_snapshot_failures_are_counted_not_fatal(tmp_path: Path) -> None:
    clock = VirtualClock()
    twin = make_twin(clock=clock)
    target = tmp_path / "is-a-dir"
    target.mkdir()
    task = asyncio.create_task(twin.run_snapshots(target))
    await clock.advance(1.5)
    for _ in range(50):  # the write runs in a thread; let it finish
        if twin.snapshot_errors:
            break
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert twin.snapshot_errors >= 2  # the periodic one and the final one
    assert twin.snapshots_saved == 0
    leftovers = await asyncio.to_thread(lambda: [p.name for p in tmp_path.iterdir()])
    assert leftovers == ["is-a-dir"]  # temp files cleaned up
