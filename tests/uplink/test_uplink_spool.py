"""The spool: order, acks, recovery, quarantine, full policies, ENOSPC, kill -9."""

from __future__ import annotations

import contextlib
import errno
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgeos.config import SpoolConfig
from edgeos.errors import SpoolFull, StorageError
from edgeos.uplink.spool import FILE_MAGIC, GAPS_FILE, GAPS_SLOT, Spool
from edgeos_testing.crashload import payload_for


def _segments(directory: Path) -> list[Path]:
    return sorted(directory.glob("seg-*.spool"))


def _fill(spool: Spool, epoch: int, seqs: range, size: int = 1000) -> None:
    for seq in seqs:
        spool.append(epoch, seq, payload_for(epoch, seq)[:size].ljust(size, b"x"))


def test_pending_in_order_ack_drops_and_deletes_segments(tmp_path: Path) -> None:
    with Spool(tmp_path, segment_bytes=64 << 10, fsync=False) as spool:
        _fill(spool, 1, range(1, 101))  # ~100 kB: two segments
        _fill(spool, 2, range(1, 11))
        assert [(r.epoch, r.seq) for r in spool.pending()][:3] == [(1, 1), (1, 2), (1, 3)]
        assert len(spool) == 110 and len(_segments(tmp_path)) == 2
        assert spool.ack(2, 5) == 5  # another epoch's ack leaves epoch 1 alone
        assert spool.ack(1, 70) == 70
        assert spool.ack(1, 70) == 0  # idempotent
        assert spool.ack(99, 5) == 0  # unknown epoch
        assert len(_segments(tmp_path)) == 1  # the fully acknowledged first segment is gone
        keys = spool.pending_keys()
        assert keys[0] == (1, 71) and keys[-1] == (2, 10) and len(keys) == 35
        assert spool.get(1, 3) is None
        record = spool.get(1, 71)
        assert record is not None and record.payload.startswith(payload_for(1, 71)[:100])
        stats = spool.stats()
        assert stats["acked"] == 75 and stats["appended"] == 110
        assert stats["pending_records"] == 35 and stats["segments"] == 1
        spool.append(1, 80, b"dup")  # already stored: idempotent, not a second copy
        assert len(spool) == 35


def test_reopen_recovers_pending_and_remembers_acks(tmp_path: Path) -> None:
    with Spool(tmp_path, fsync=True) as spool:
        _fill(spool, 7, range(1, 21))
        spool.ack(7, 12)
    with Spool(tmp_path) as spool:
        assert spool.pending_keys() == [(7, s) for s in range(13, 21)]
        assert spool.stats()["recovered_records"] == 8
        _fill(spool, 8, range(1, 3))  # appends go to a new segment after open
        assert len(_segments(tmp_path)) == 2
        spool.ack(7, 20)
    with Spool(tmp_path) as spool:
        assert spool.pending_keys() == [(8, 1), (8, 2)]
        assert len(_segments(tmp_path)) == 1
    with pytest.raises(StorageError, match="closed"):
        spool.append(9, 1, b"x")


def test_corrupt_record_is_quarantined_and_the_rest_delivered(tmp_path: Path) -> None:
    with Spool(tmp_path, fsync=False) as spool:
        _fill(spool, 1, range(1, 11))
    seg = _segments(tmp_path)[0]
    data = bytearray(seg.read_bytes())
    record = 28 + 1000
    data[len(FILE_MAGIC) + 3 * record + 40] ^= 0xFF  # payload byte of record 4
    data[len(FILE_MAGIC) + 6 * record + 2] ^= 0xFF  # magic of record 7
    seg.write_bytes(bytes(data))
    with Spool(tmp_path) as spool:
        assert [s for _, s in spool.pending_keys()] == [1, 2, 3, 5, 6, 8, 9, 10]
        for r in spool.pending():
            assert r.payload.startswith(payload_for(1, r.seq)[:100])
        stats = spool.stats()
        assert stats["quarantined_ranges"] == 2 and stats["quarantined_bytes"] == 2 * record
        # The lost sequence numbers are reported so the batcher can announce the gaps.
        assert spool.take_lost() == [(1, 4, 4), (1, 7, 7)]
        assert spool.take_lost() == []
    assert len(list((tmp_path / "quarantine").iterdir())) == 2


def test_truncated_tail_and_garbage_segment(tmp_path: Path) -> None:
    with Spool(tmp_path, fsync=False) as spool:
        _fill(spool, 1, range(1, 6))
    seg = _segments(tmp_path)[0]
    seg.write_bytes(seg.read_bytes()[:-500])  # an append interrupted mid-write
    (tmp_path / "seg-00000000000000aa.spool").write_bytes(b"garbage, not a segment" * 10)
    (tmp_path / "seg-00000000000000ab.spool").write_bytes(FILE_MAGIC[:3])  # torn creation
    with Spool(tmp_path) as spool:
        assert [s for _, s in spool.pending_keys()] == [1, 2, 3, 4]
        stats = spool.stats()
        assert stats["torn_tails"] == 2 and stats["quarantined_ranges"] == 1
        _fill(spool, 2, range(1, 3))
        assert spool.pending_keys()[-1] == (2, 2)
    assert not (tmp_path / "seg-00000000000000aa.spool").exists()


def test_full_policy_drop_oldest_is_bounded_and_counted(tmp_path: Path) -> None:
    config = SpoolConfig(max_bytes=1 << 20, segment_bytes=64 << 10, fsync=False)
    with Spool.from_config(tmp_path, config) as spool:
        _fill(spool, 1, range(1, 2001), size=1000)  # ~2 MB into a 1 MiB spool
        stats = spool.stats()
        assert stats["disk_bytes"] <= 1 << 20
        assert stats["dropped_records"] > 0 and stats["dropped_segments"] > 0
        assert stats["dropped_records"] + stats["pending_records"] == 2000
        keys = spool.pending_keys()
        assert keys[-1] == (1, 2000)  # the newest data is kept
        assert spool.take_lost() == [(1, 1, keys[0][1] - 1)]  # dropped, announced as a gap
        assert [s for _, s in keys] == list(range(keys[0][1], 2001))
        with pytest.raises(SpoolFull, match="exceeds"):
            spool.append(1, 5000, bytes(2 << 20))


def test_full_policy_refuse_new_raises_and_keeps_old_data(tmp_path: Path) -> None:
    with Spool(
        tmp_path, max_bytes=1 << 20, segment_bytes=64 << 10, full_policy="refuse_new", fsync=False
    ) as spool:
        with pytest.raises(SpoolFull, match="refuse_new"):
            _fill(spool, 1, range(1, 2001), size=1000)
        stats = spool.stats()
        stored = stats["pending_records"]
        assert stats["refused"] == 1 and stats["dropped_records"] == 0 and stored > 900
        assert spool.pending_keys()[0] == (1, 1)
        spool.ack(1, 500)  # acks free whole segments, then new data fits again
        _fill(spool, 1, range(stored + 1, stored + 100))


class SmallDisk:
    """A real writer over a filesystem with a tiny capacity: past it, writes fail with ENOSPC.

    Like a real full disk it may write part of the data before failing.
    """

    def __init__(self, directory: Path, capacity: int) -> None:
        self.directory = directory
        self.capacity = capacity
        self.failures = 0

    def __call__(self, fd: int, data: bytes) -> int:
        used = sum(p.stat().st_size for p in self.directory.glob("seg-*.spool"))
        room = self.capacity - used
        if room < len(data):
            self.failures += 1
            if room > 0:
                os.write(fd, data[: room // 2])  # a partial write, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return os.write(fd, data)


@pytest.mark.parametrize("policy", ["drop_oldest", "refuse_new"])
def test_enospc_follows_the_policy_without_crashing(tmp_path: Path, policy: str) -> None:
    disk = SmallDisk(tmp_path, capacity=300_000)
    spool = Spool(
        tmp_path,
        max_bytes=10 << 20,
        segment_bytes=64 << 10,
        full_policy=policy,  # type: ignore[arg-type]
        fsync=False,
        writer=disk,
    )
    refused = 0
    for seq in range(1, 601):
        try:
            spool.append(1, seq, payload_for(1, seq)[:1000].ljust(1000, b"x"))
        except SpoolFull:
            refused += 1
    stats = spool.stats()
    spool.close()
    assert disk.failures > 0 and stats["enospc"] > 0
    if policy == "refuse_new":
        assert refused > 0 and stats["refused"] == refused and stats["dropped_records"] == 0
    else:
        assert stats["dropped_records"] > 0 and (1, 600) in Spool(tmp_path).pending_keys()
    # No partial record was left behind: reopening finds only whole records.
    reopened = Spool(tmp_path)
    assert reopened.stats()["torn_tails"] == 0
    assert reopened.stats()["quarantined_ranges"] == 0
    for r in reopened.pending():
        assert r.payload.startswith(payload_for(1, r.seq)[:100])
    reopened.close()


def _spool_on_a_disk_smaller_than_a_segment(directory: Path, policy: str) -> Spool:
    """200 kB of disk under a spool whose bound (64 MiB) and segment (8 MiB) are far larger."""
    return Spool(
        directory,
        max_bytes=64 << 20,
        segment_bytes=8 << 20,
        full_policy=policy,  # type: ignore[arg-type]
        fsync=False,
        writer=SmallDisk(directory, capacity=200_000),
    )


@pytest.mark.parametrize("policy", ["drop_oldest", "refuse_new"])
def test_a_full_disk_is_given_back_once_acknowledged(tmp_path: Path, policy: str) -> None:
    """The disk is smaller than one segment (the default 8 MiB segment on a small partition):
    everything lands in the active segment, the disk fills, the link comes back and acks it
    all. The acknowledged space must come back; appends must succeed again."""
    spool = _spool_on_a_disk_smaller_than_a_segment(tmp_path, policy)
    record = b"x" * 1000
    seq = 0
    while spool.stats()["enospc"] < 3:  # the disk filled (refused, or the oldest dropped)
        seq += 1
        with contextlib.suppress(SpoolFull):
            spool.append(1, seq, record)
    last = max(k[1] for k in spool.pending_keys())
    spool.ack(1, last)  # the link is back: everything stored is acknowledged
    for more in range(seq + 1, seq + 50):
        spool.append(1, more, record)  # room again
    assert len(spool) == 49
    spool.close()


@pytest.mark.parametrize("policy", ["drop_oldest", "refuse_new"])
def test_a_full_disk_with_a_partly_acked_segment_recovers_as_acks_arrive(
    tmp_path: Path, policy: str
) -> None:
    spool = _spool_on_a_disk_smaller_than_a_segment(tmp_path, policy)
    record = b"y" * 1000
    seq = 0
    while spool.stats()["enospc"] == 0:
        seq += 1
        with contextlib.suppress(SpoolFull):
            spool.append(1, seq, record)
    keys = spool.pending_keys()
    spool.ack(1, keys[len(keys) // 2][1])  # half acknowledged: the segment must stay
    with contextlib.suppress(SpoolFull):
        spool.append(1, seq + 1, record)
    if policy == "refuse_new":
        assert keys[-1] in spool.pending_keys()  # nothing unacknowledged was given up
    spool.ack(1, max(k[1] for k in spool.pending_keys()))
    spool.append(1, seq + 2, record)  # and once the rest is acked, there is room
    assert spool.pending_keys() == [(1, seq + 2)]
    spool.close()


def _kill_runs(directory: Path, kills: int, seed: int) -> None:
    """Start, kill -9 at a random instant, repeat; then check every returned append."""
    rng = random.Random(seed)
    returned: set[tuple[int, int]] = set()
    acked: dict[int, int] = {}
    for run in range(kills):
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "edgeos_testing.crashload",
                str(directory),
                str(seed + run),
                "1" if run % 2 else "0",
            ],
            stdout=subprocess.PIPE,
        )
        assert proc.stdout is not None
        lines = []
        while (line := proc.stdout.readline()) not in (b"R\n", b""):
            lines.append(line)  # acks of earlier runs' records, before appends start
        time.sleep(rng.uniform(0.02, 0.3))  # not an assertion: where the kill lands
        proc.kill()
        out, _ = proc.communicate()
        lines += out.split(b"\n")[:-1]  # the last piece may be a torn line
        for line in lines:
            parts = line.split()
            if len(parts) == 3 and parts[0] == b"A":
                returned.add((int(parts[1]), int(parts[2])))
            elif len(parts) == 3 and parts[0] == b"K":
                e, s = int(parts[1]), int(parts[2])
                acked[e] = max(acked.get(e, 0), s)
    with Spool(directory) as spool:
        keys = spool.pending_keys()
        assert len(keys) == len(set(keys))
        for r in spool.pending():
            assert r.payload == payload_for(r.epoch, r.seq), "a record came back damaged"
        must_have = {(e, s) for e, s in returned if s > acked.get(e, 0)}
        missing = must_have - set(keys)
        assert not missing, f"{len(missing)} returned appends lost, e.g. {sorted(missing)[:3]}"
        assert len(must_have) > 0  # the runs did append something that must survive


def test_kill_9_at_random_instants_loses_nothing_that_returned(tmp_path: Path) -> None:
    _kill_runs(tmp_path, kills=10, seed=1)


@pytest.mark.slow
def test_kill_9_soak(tmp_path: Path) -> None:
    _kill_runs(tmp_path, kills=120, seed=1000)


def test_kept_gaps_survive_a_reopen_and_a_torn_write_leaves_the_previous_list(
    tmp_path: Path,
) -> None:
    with Spool(tmp_path) as spool:
        assert spool.restored_gaps() == []
        spool.keep_gaps([(7, 3, 4), (7, 5, 5), (9, 1, 1)])
        spool.keep_gaps([(7, 3, 5), (9, 1, 2)])
    with Spool(tmp_path) as spool:
        assert spool.restored_gaps() == [(7, 3, 5), (9, 1, 2)]
        assert spool.stats()["gaps_restored"] == 2
    # A power cut in the middle of the next write: that slot is garbage, the other one holds.
    path = tmp_path / GAPS_FILE
    data = bytearray(path.read_bytes())
    with Spool(tmp_path) as spool:
        spool.keep_gaps([(7, 3, 5), (9, 1, 2), (11, 4, 4)])
    written = path.read_bytes()
    slot = next(i for i in (0, GAPS_SLOT) if written[i : i + GAPS_SLOT] != data[i : i + GAPS_SLOT])
    data[slot : slot + 40] = written[slot : slot + 40]  # only its first bytes reached the disk
    path.write_bytes(bytes(data))
    with Spool(tmp_path) as spool:
        assert spool.restored_gaps() == [(7, 3, 5), (9, 1, 2)]


def test_keeping_gaps_needs_no_free_block(tmp_path: Path) -> None:
    """The journal is written in full at the first open; on a disk with no block left, keeping
    an announcement still works (a real 1 MiB tmpfs, filled to ENOSPC)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "small"
    mnt.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)]
    if subprocess.run(mount, check=False).returncode:
        pytest.skip("cannot mount a tmpfs here (no CAP_SYS_ADMIN)")
    try:
        with Spool(mnt / "spool", fsync=True) as spool:
            pass
        with open(mnt / "filler", "wb", buffering=0) as f, contextlib.suppress(OSError):
            while True:
                f.write(bytes(4096))
        with pytest.raises(OSError):
            (mnt / "probe").write_bytes(bytes(8192))
        with Spool(mnt / "spool", fsync=True) as spool:
            spool.keep_gaps([(5, 1, 9)])
            assert spool.stats()["gaps_write_errors"] == 0
        with Spool(mnt / "spool", fsync=True) as spool:
            assert spool.restored_gaps() == [(5, 1, 9)]
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
