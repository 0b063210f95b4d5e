"""The batcher: groups, intervals in virtual time, early close, spool-first acceptance, gaps."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from edgeos.clock import VirtualClock
from edgeos.config import parse_config
from edgeos.driver import Quality
from edgeos.uplink.batcher import Batcher, SealedBatch, tag_table_from_config
from edgeos.uplink.spool import Spool
from edgeos_protocol.crypto import Keyring
from edgeos_protocol.wire import MISSING, ValueKind, epoch_key_for, open_sealed, parse_header
from edgeos_testing.uplink_synth import Scan, SyntheticLine

RING = Keyring.of(bytes(range(32)))


def _open(spool: Spool) -> list:  # type: ignore[type-arg]
    out = []
    for record in spool.pending():
        header = parse_header(record.payload)
        out.append(open_sealed(record.payload, epoch_key_for(header, RING.current)))
    return out


def _batcher(tmp_path: Path, line: SyntheticLine, **kw: object) -> tuple[Batcher, Spool]:
    spool = Spool(tmp_path / "spool", fsync=False)
    return Batcher(table=line.table, keyring=RING, device="gw-1", spool=spool, **kw), spool  # type: ignore[arg-type]


async def test_flush_groups_scans_and_is_accepted_only_in_the_spool(tmp_path: Path) -> None:
    line = SyntheticLine(nests=3, tags_per_nest=20)
    stored: list[SealedBatch] = []
    batcher, spool = _batcher(tmp_path, line, on_stored=stored.append)
    assert await batcher.flush() is None  # nothing to send
    scans = [line.record(1_700_000_000.0 + i) for i in range(3)]
    for s in scans:
        batcher.add(s)
    fast_idx = np.array([2, 5], np.int32)
    for i in range(5):  # a faster scan group over two tags, with a string-less bad sample
        batcher.add(
            Scan(
                1_700_000_000.2 * 1 + i * 0.2,
                fast_idx,
                np.array([1.5, np.nan]),
                np.array([0, Quality.BAD_COMM], np.uint8),
            )
        )
    batcher.add_event({"type": "alarm", "ts_us": 5, "code": 3})
    result = await batcher.flush()
    assert result is not None and stored == [result]
    assert (result.seq, result.samples) == (1, 3 * 60 + 5 * 2)
    assert len(spool) == 1
    [(header, batch)] = _open(spool)
    assert header.seq == 1 and header.epoch == batcher.epoch.epoch
    assert [g.shape for g in batch.groups] == [(3, 60), (5, 2)]
    g = batch.groups[0]
    for row, scan in enumerate(scans):
        usable = scan.quality < Quality.BAD
        np.testing.assert_allclose(
            g.values[row][usable], scan.values[usable], atol=float(line.resolution.max()) / 2 + 1e-9
        )
    assert batch.tag_names[batch.groups[1].tags[0]] == line.table.names[2]
    assert batch.events == [{"type": "alarm", "ts_us": 5, "code": 3}]
    assert batcher.counters.as_dict()["batches"] == 1


async def test_small_batches_use_a_sub_table_and_unknown_indices_are_refused(
    tmp_path: Path,
) -> None:
    line = SyntheticLine(nests=4, tags_per_nest=50)
    batcher, spool = _batcher(tmp_path, line)
    batcher.add(
        Scan(1.0, np.array([7, 150], np.int32), np.array([1.0, 0.0]), np.zeros(2, np.uint8))
    )
    await batcher.flush()
    [(_, batch)] = _open(spool)
    assert batch.tag_indices.tolist() == [7, 150]
    assert batch.tag_names == [line.table.names[7], line.table.names[150]]
    batcher.add(Scan(1.0, np.array([9999], np.int32), np.array([1.0]), np.zeros(1, np.uint8)))
    with pytest.raises(ValueError, match="not in the tag table"):
        await batcher.flush()


async def test_run_closes_a_batch_every_interval_in_virtual_time(tmp_path: Path) -> None:
    line = SyntheticLine(nests=1, tags_per_nest=10)
    clock = VirtualClock()
    stored: list[SealedBatch] = []
    batcher, _ = _batcher(tmp_path, line, clock=clock, interval_s=3.0, on_stored=stored.append)
    task = asyncio.create_task(batcher.run())
    for second in range(9):
        batcher.add(line.record(clock.time()))
        await clock.advance(1.0)
        assert len(stored) == (second + 1) // 3
    batcher.add(line.record(clock.time()))
    task.cancel()  # orderly shutdown flushes what is pending
    with pytest.raises(asyncio.CancelledError):
        await task
    assert [b.seq for b in stored] == [1, 2, 3, 4] and stored[-1].samples == 10


async def test_max_batch_samples_closes_early(tmp_path: Path) -> None:
    line = SyntheticLine(nests=1, tags_per_nest=100)
    clock = VirtualClock()
    stored: list[SealedBatch] = []
    batcher, _ = _batcher(
        tmp_path, line, clock=clock, interval_s=5.0, max_batch_samples=250, on_stored=stored.append
    )
    task = asyncio.create_task(batcher.run())
    await clock.advance(0.1)
    for _ in range(3):
        batcher.add(line.record(clock.time()))
    await clock.advance(0.1)  # far before the 5 s deadline
    assert [b.samples for b in stored] == [300]
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


class _Log:
    """A pull source shaped like the twin's ScanLog."""

    def __init__(self) -> None:
        self.records: list[Scan] = []

    def drain(self) -> list[Scan]:
        out, self.records = self.records, []
        return out

    def __len__(self) -> int:
        return sum(len(r.indices) for r in self.records)


async def test_pull_source_and_event_source(tmp_path: Path) -> None:
    line = SyntheticLine(nests=1, tags_per_nest=10)
    source = _Log()
    events = [{"type": "gate", "ts_us": 1, "verdict": "continue"}]
    batcher, spool = _batcher(
        tmp_path, line, source=source, drain_events=lambda: [events.pop()] if events else []
    )
    source.records.append(line.record(10.0))
    assert batcher.pending_samples == 10
    await batcher.flush()
    [(_, batch)] = _open(spool)
    assert batch.sample_count == 10 and batch.events[0]["verdict"] == "continue"


async def test_refused_batch_and_dropped_records_are_announced_as_gaps(tmp_path: Path) -> None:
    line = SyntheticLine(nests=10, tags_per_nest=200)
    spool = Spool(
        tmp_path / "s",
        max_bytes=1 << 20,
        segment_bytes=64 << 10,
        full_policy="refuse_new",
        fsync=False,
    )
    batcher = Batcher(table=line.table, keyring=RING, device="gw-1", spool=spool, level=1)
    rng = np.random.default_rng(0)
    refused_at = None
    for i in range(1000):
        # Incompressible values so the spool fills quickly.
        batcher.add(
            Scan(float(i), line.table.indices, rng.normal(0, 1e6, 2000), np.zeros(2000, np.uint8))
        )
        if await batcher.flush() is None:
            refused_at = i + 1
            break
    assert refused_at is not None and batcher.counters.refused_batches == 1
    assert batcher.skip == [(batcher.epoch.epoch, refused_at, refused_at)]
    spool.ack(batcher.epoch.epoch, 50)
    batcher.add(line.record(1000.0))
    await batcher.flush()
    last = list(spool.pending())[-1]
    _, batch = open_sealed(last.payload, epoch_key_for(parse_header(last.payload), RING.current))
    assert batch.meta["skip"] == [[batcher.epoch.epoch, refused_at, refused_at]]
    # An ack that passes the gap but not the batch that carried the announcement leaves it
    # announced (the receiver may hold the gap's number without having read that it was
    # dropped); the ack of the carrier ends it.
    batcher.on_ack(batcher.epoch.epoch, refused_at)
    assert batcher.skip == [(batcher.epoch.epoch, refused_at, refused_at)]
    batcher.on_ack(batcher.epoch.epoch, parse_header(last.payload).seq)
    assert batcher.skip == []


async def test_a_gap_the_last_run_could_not_get_out_is_announced_by_the_next_run(
    tmp_path: Path,
) -> None:
    """The boot test's full data partition: the broker away, batches refused, then a restart
    before any batch could carry the announcement. The next run (a new epoch) announces it."""
    line = SyntheticLine(nests=10, tags_per_nest=200)

    def spool() -> Spool:
        return Spool(
            tmp_path / "s",
            max_bytes=1 << 20,
            segment_bytes=64 << 10,
            full_policy="refuse_new",
            fsync=True,
        )

    first = spool()
    batcher = Batcher(table=line.table, keyring=RING, device="gw-1", spool=first, level=1)
    rng = np.random.default_rng(0)
    for i in range(1000):
        batcher.add(
            Scan(float(i), line.table.indices, rng.normal(0, 1e6, 2000), np.zeros(2000, np.uint8))
        )
        if await batcher.flush() is None:
            break
    old_epoch = batcher.epoch.epoch
    gap = batcher.skip
    assert len(gap) == 1 and gap[0][0] == old_epoch
    first.close()  # the process ends; everything in memory is gone

    second = spool()
    assert second.stats()["gaps_restored"] == 1
    restarted = Batcher(table=line.table, keyring=RING, device="gw-1", spool=second, level=1)
    assert restarted.epoch.epoch != old_epoch and restarted.skip == gap
    second.ack(old_epoch, 10_000)  # the receiver took the rest: room again
    restarted.add(line.record(2000.0))
    stored = await restarted.flush()
    assert stored is not None and stored.epoch == restarted.epoch.epoch
    last = list(second.pending())[-1]
    _, batch = open_sealed(last.payload, epoch_key_for(parse_header(last.payload), RING.current))
    assert batch.meta["skip"] == [list(gap[0])]
    # Acknowledged: forgotten, in memory and on disk.
    restarted.on_ack(stored.epoch, stored.seq)
    assert restarted.skip == []
    second.close()
    with spool() as third:
        assert third.restored_gaps() == []


async def test_skipped_scans_are_announced_once_in_the_next_stored_batch(tmp_path: Path) -> None:
    line = SyntheticLine(nests=1, tags_per_nest=10)
    runs = [["fast", "plc1", 1_700_000_000_100_000, 1_700_000_000_200_000, 2]]
    drained: list[list[list[object]]] = [runs]
    batcher, spool = _batcher(
        tmp_path, line, skipped_scans=lambda: drained.pop() if drained else []
    )
    # Nothing to seal: the announcement waits for a batch that carries something.
    assert await batcher.flush() is None
    batcher.add(line.record(10.0))
    await batcher.flush()
    batcher.add(line.record(11.0))
    await batcher.flush()
    [(_, first), (_, second)] = _open(spool)
    assert first.meta["scans_skipped"] == runs
    assert "scans_skipped" not in second.meta
    assert (batcher.counters.scans_skipped, batcher.counters.scan_skip_runs) == (2, 1)


def test_tag_table_from_config() -> None:
    config = parse_config(
        """
        device = { id = "gw-1" }
        [[connections]]
        name = "plc"
        driver = "modbus_tcp"
        endpoint = "tcp://127.0.0.1:502"
        [[tags]]
        name = "nest01.temp"
        connection = "plc"
        unit = "°C"
        modbus = { address = 0, type = "int16", scale = 0.1 }
        [[tags]]
        name = "nest01.running"
        connection = "plc"
        modbus = { address = 1, table = "coil", type = "bool" }
        [[tags]]
        name = "nest01.recipe"
        connection = "plc"
        modbus = { address = 2, type = "string", length = 4 }
        """,
        check_drivers=False,
    )
    table = tag_table_from_config(config.all_tags)
    assert table.names == ["nest01.temp", "nest01.running", "nest01.recipe"]
    assert table.kinds.tolist() == [ValueKind.NUMBER, ValueKind.BOOL, ValueKind.STRING]
    assert table.resolutions.tolist() == [0.1, 1.0, 1.0]
    assert table.units == ["°C", "", ""]
    assert MISSING == 255
