"""The spool: sealed batches on disk until the receiver acknowledges them.

Append-only segment files in one directory::

    seg-<n:016x>.spool   = b"EOSSPL01" record*
    record               = magic "ESR1" | length u32 | crc32 u32 | epoch u64 | seq u64 | payload
    acked.json           = {"<epoch>": seq}  ack watermarks (atomic rename, advisory)
    gaps.bin             = the batcher's announced gaps not yet acknowledged (see below)
    quarantine/          = corrupt bytes moved aside, for post-mortems

The CRC-32 covers length, epoch, seq and payload. A record is written with one ``write`` and
(by default) ``fsync``-ed before :meth:`Spool.append` returns, so a returned append survives a
kill -9 or power loss. Recovery on open re-reads every segment: a torn record at the very end
of a segment (the append that was interrupted, which never returned) is dropped and counted;
corrupt bytes followed by valid records are copied to ``quarantine/`` and counted, and the
records around them are still delivered. Appends always go to a new segment after open.

:meth:`Spool.ack` drops every record of an epoch up to a sequence number; a segment file is
deleted once none of its records is pending. The spool is bounded by ``max_bytes`` of segment
files; when an append would pass it (or the OS reports ENOSPC) the ``full_policy`` decides:
``drop_oldest`` deletes the oldest segments (their pending records are counted as dropped),
``refuse_new`` raises :class:`~edgeos.errors.SpoolFull` (counted).

``gaps.bin`` keeps the gaps the batcher announces (a batch the spool refused, records it
dropped) until a batch that carried them is acknowledged, across restarts: without it a gap at
the end of an epoch — the disk full and the broker away, then a restart — was forgotten with the
process, and the receiver never heard of samples the device had counted as lost. The file is
written in full (zeros) when the spool is first opened, while there is room, and from then on
only overwritten in place, so keeping an announcement never needs a free block: it works on a
full disk. Two 4 KiB slots are written alternately, each ``magic "EGP1" | generation u64 |
count u32 | crc32 u32 | (epoch u64, first u64, last u64)*``; the valid slot with the higher
generation wins, so a write torn by a power cut leaves the previous list.

The spool is synchronous and thread-safe: call the blocking :meth:`append` through
``asyncio.to_thread`` from the event loop (an fsync takes milliseconds to tens of
milliseconds on SD cards), the rest is cheap.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import struct
import threading
import time
import zlib
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from edgeos.errors import SpoolFull, StorageError

if TYPE_CHECKING:
    from edgeos.config import SpoolConfig

__all__ = ["FILE_MAGIC", "RECORD_MAGIC", "Record", "Spool", "SpoolStats", "merge_ranges"]

FILE_MAGIC = b"EOSSPL01"
RECORD_MAGIC = b"ESR1"
_REC = struct.Struct(">4sIIQQ")
_CRC_PART = struct.Struct(">IQQ")
#: A record longer than this is corrupt (the wire format caps sealed batches at 16 MiB).
MAX_RECORD = 32 << 20
GAPS_FILE = "gaps.bin"
GAPS_MAGIC = b"EGP1"
GAPS_SLOT = 4096
_GAPS_HEAD = struct.Struct(">4sQII")
_GAPS_RANGE = struct.Struct(">QQQ")
#: Announced gaps one slot holds (merged ranges; beyond it the list is cut, and counted).
GAPS_CAPACITY = (GAPS_SLOT - _GAPS_HEAD.size) // _GAPS_RANGE.size
FullPolicy = Literal["drop_oldest", "refuse_new"]
Writer = Callable[[int, bytes], int]


@dataclass(frozen=True, slots=True)
class Record:
    """A pending batch: its identity and its sealed bytes."""

    epoch: int
    seq: int
    payload: bytes


@dataclass(slots=True)
class _Entry:
    epoch: int
    seq: int
    segment: int
    offset: int  # of the payload
    length: int
    appended: float  # monotonic time of the append (for latency/age; 0 after recovery)


@dataclass(slots=True)
class SpoolStats:
    """Counters and gauges of a spool (``as_dict`` for status and metrics)."""

    pending_records: int = 0
    pending_bytes: int = 0
    disk_bytes: int = 0
    segments: int = 0
    appended: int = 0
    acked: int = 0
    dropped_records: int = 0
    dropped_segments: int = 0
    refused: int = 0
    enospc: int = 0
    torn_tails: int = 0
    quarantined_ranges: int = 0
    quarantined_bytes: int = 0
    recovered_records: int = 0
    #: Announced gaps read back from ``gaps.bin`` at open (a restart before they were acked).
    gaps_restored: int = 0
    #: Writes of ``gaps.bin`` that failed; lists longer than a slot (cut to the slot: the
    #: ranges of the lowest epoch numbers are kept only in memory).
    gaps_write_errors: int = 0
    gaps_truncated: int = 0
    #: ``gaps.bin`` could not be created (no room at the very first open): not kept then.
    gaps_unavailable: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__slots__}


class _Segment:
    __slots__ = ("fd", "live", "number", "path", "size")

    def __init__(self, number: int, path: Path, fd: int, size: int) -> None:
        self.number = number
        self.path = path
        self.fd = fd
        self.size = size
        self.live = 0


class Spool:
    """A bounded, crash-safe, append-only store of sealed batches (see the module docs)."""

    def __init__(
        self,
        directory: str | Path,
        *,
        max_bytes: int = 512 << 20,
        segment_bytes: int = 8 << 20,
        full_policy: FullPolicy = "drop_oldest",
        fsync: bool = True,
        writer: Writer = os.write,
    ) -> None:
        if full_policy not in ("drop_oldest", "refuse_new"):
            raise ValueError(f"unknown full policy {full_policy!r}")
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        self.full_policy: FullPolicy = full_policy
        self.fsync = fsync
        self._write = writer
        self._lock = threading.RLock()
        self._segments: OrderedDict[int, _Segment] = OrderedDict()
        self._entries: OrderedDict[tuple[int, int], _Entry] = OrderedDict()
        self._by_epoch: dict[int, deque[int]] = {}
        self._watermarks: dict[int, int] = {}
        self._active: _Segment | None = None
        self._closed = False
        self._lost: list[tuple[int, int, int]] = []
        self.counters = SpoolStats()
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / "quarantine").mkdir(exist_ok=True)
        self._recover()
        self._gaps_fd: int | None = None
        self._gaps_generation = 0
        self._restored_gaps = self._open_gaps()

    @classmethod
    def from_config(cls, directory: str | Path, config: SpoolConfig) -> Spool:
        """A spool with the bounds and policy of an :class:`~edgeos.config.SpoolConfig`."""
        return cls(
            directory,
            max_bytes=config.max_bytes,
            segment_bytes=config.effective_segment_bytes,
            full_policy=config.full_policy,
            fsync=config.fsync,
        )

    # ------------------------------------------------------------------ recovery

    def _recover(self) -> None:
        try:
            marks = json.loads((self.directory / "acked.json").read_text())
            self._watermarks = {int(k): int(v) for k, v in marks.items()}
        except (OSError, ValueError, AttributeError):
            self._watermarks = {}
        numbers = sorted(
            int(p.name[4:20], 16)
            for p in self.directory.glob("seg-*.spool")
            if len(p.name) == 26 and _is_hex(p.name[4:20])
        )
        self._epochs_on_disk: set[int] = set()
        self._seen: dict[int, list[int]] = {}
        for number in numbers:
            self._recover_segment(number)
        # Sequence numbers missing between an epoch's watermark and its last record on disk
        # were lost (quarantined); announce them so the receiver does not wait for them.
        for epoch, seen in self._seen.items():
            expected = self._watermarks.get(epoch, 0) + 1
            for seq in sorted(set(seen)):
                if seq > expected:
                    self._lost.append((epoch, expected, seq - 1))
                expected = max(expected, seq + 1)
        del self._seen
        # Forget watermarks of epochs that have no record left on disk.
        present = self._epochs_on_disk
        self._watermarks = {e: s for e, s in self._watermarks.items() if e in present}
        self.counters.recovered_records = len(self._entries)
        self._next_number = (numbers[-1] + 1) if numbers else 1

    def _recover_segment(self, number: int) -> None:
        path = self._path(number)
        data = path.read_bytes()
        if not data.startswith(FILE_MAGIC):
            if len(data) < len(FILE_MAGIC) and FILE_MAGIC.startswith(data):
                path.unlink()  # created, killed before its magic was written
                self.counters.torn_tails += 1
                return
            self._quarantine(number, 0, data)
            path.unlink()
            return
        fd = os.open(path, os.O_RDONLY)
        segment = _Segment(number, path, fd, len(data))
        self._segments[number] = segment
        pos = len(FILE_MAGIC)
        end = len(data)
        while pos < end:
            parsed = _parse_record(data, pos)
            if parsed is None:
                nxt = _resync(data, pos + 1)
                if nxt is None:
                    # No valid record after this point: the interrupted last append, which
                    # never returned to its caller; nothing to deliver, nothing to keep.
                    self.counters.torn_tails += 1
                    break
                self._quarantine(number, pos, data[pos:nxt])
                pos = nxt
                continue
            epoch, seq, length = parsed
            self._epochs_on_disk.add(epoch)
            self._seen.setdefault(epoch, []).append(seq)
            if seq > self._watermarks.get(epoch, 0) and (epoch, seq) not in self._entries:
                self._add_entry(_Entry(epoch, seq, number, pos + _REC.size, length, 0.0))
            pos += _REC.size + length
        if segment.live == 0:
            self._delete_segment(segment)

    def _quarantine(self, number: int, offset: int, data: bytes) -> None:
        target = self.directory / "quarantine" / f"seg-{number:016x}-at-{offset}.bad"
        target.write_bytes(data)
        self.counters.quarantined_ranges += 1
        self.counters.quarantined_bytes += len(data)

    # ------------------------------------------------------------------ append

    def append(self, epoch: int, seq: int, payload: bytes) -> None:
        """Store a sealed batch durably (fsync unless disabled); blocking.

        Raises :class:`SpoolFull` when the full policy refuses it (or nothing can be dropped
        to make room) and :class:`StorageError` when the disk fails otherwise.
        """
        record = _encode_record(epoch, seq, payload)
        with self._lock:
            if self._closed:
                raise StorageError("spool is closed")
            if (epoch, seq) in self._entries:
                return  # idempotent: already stored
            if len(record) + len(FILE_MAGIC) > self.max_bytes:
                self.counters.refused += 1
                raise SpoolFull(f"batch of {len(record)} bytes exceeds the spool bound")
            self._make_room(len(record))
            segment, offset = self._write_or_reclaim(record)
            self._add_entry(
                _Entry(
                    epoch, seq, segment.number, offset + _REC.size, len(payload), time.monotonic()
                )
            )
            self.counters.appended += 1

    def _write_or_reclaim(self, record: bytes) -> tuple[_Segment, int]:
        """Write a record; on ENOSPC reclaim, apply the full policy, retry (see ``append``)."""
        try:
            return self._write_record(record)
        except OSError as exc:
            self._count_enospc(exc)
        # The disk is fuller than our bound thinks. First give back what was already delivered
        # and stop filling the segment being appended (an active segment is never deleted, so
        # a full disk would otherwise hold acknowledged data for ever); then the policy.
        if self._roll_active():
            try:
                return self._write_record(record)
            except OSError as exc:
                self._count_enospc(exc)
        if self.full_policy == "refuse_new" or not self._drop_oldest_segment():
            self.counters.refused += 1
            raise SpoolFull("disk full (ENOSPC) and nothing left to drop")
        try:
            return self._write_record(record)
        except OSError as exc:
            self.counters.refused += 1
            if exc.errno == errno.ENOSPC:
                self.counters.enospc += 1
            raise SpoolFull(f"disk full after dropping the oldest data: {exc}") from exc

    def _count_enospc(self, exc: OSError) -> None:
        if exc.errno != errno.ENOSPC:
            raise StorageError(f"spool write failed: {exc}") from exc
        self.counters.enospc += 1

    def _make_room(self, size: int) -> None:
        while self._disk_bytes() + size > self.max_bytes:
            if self.full_policy == "refuse_new":
                self.counters.refused += 1
                raise SpoolFull(
                    f"spool holds {self._disk_bytes()} of {self.max_bytes} bytes "
                    "(full_policy = refuse_new)"
                )
            if not self._drop_oldest_segment():
                self.counters.refused += 1
                raise SpoolFull("spool is full and has nothing left to drop")

    def _roll_active(self) -> bool:
        """End the active segment: deleted now when fully acknowledged (its space comes back at
        once), otherwise kept until its records are. True when a retry may now succeed."""
        active = self._active
        if active is None:
            return False
        if active.live == 0:
            self._delete_segment(active)
            return True
        self._active = None
        # Its space returns once acknowledged; a retry now only helps if the disk had room for
        # a fresh segment, which the caller finds out.
        return True

    def _drop_oldest_segment(self) -> bool:
        for segment in self._segments.values():
            if segment is self._active and segment.live == 0:
                continue
            if segment is self._active:
                # Dropping the active segment: start a new one for the next record.
                self._active = None
            dropped = [k for k, e in self._entries.items() if e.segment == segment.number]
            for key in dropped:
                self._remove_entry(key)
            self._lost.extend(_ranges(dropped))
            self.counters.dropped_records += len(dropped)
            self.counters.dropped_segments += 1
            self._delete_segment(segment)
            return True
        return False

    def _write_record(self, record: bytes) -> tuple[_Segment, int]:
        segment = self._active
        full = segment is not None and segment.size + len(record) > self.segment_bytes
        # A record larger than a segment gets a segment of its own rather than being refused.
        if segment is None or (full and segment.size > len(FILE_MAGIC)):
            segment = self._new_segment()
        offset = segment.size
        try:
            written = 0
            while written < len(record):
                written += self._write(segment.fd, record[written:])
            if self.fsync:
                os.fsync(segment.fd)
        except OSError:
            # Leave no partial record behind: the next append starts at a record boundary.
            with contextlib.suppress(OSError):
                os.ftruncate(segment.fd, offset)
            raise
        segment.size += len(record)
        return segment, offset

    def _new_segment(self) -> _Segment:
        if self._active is not None and self._active.live == 0:
            self._delete_segment(self._active)
        number = self._next_number
        self._next_number += 1
        path = self._path(number)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_EXCL, 0o600)
        segment = _Segment(number, path, fd, 0)
        try:
            self._write(fd, FILE_MAGIC)
            if self.fsync:
                os.fsync(fd)
                _fsync_dir(self.directory)
        except OSError:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        segment.size = len(FILE_MAGIC)
        self._segments[number] = segment
        self._active = segment
        return segment

    # ------------------------------------------------------------------ index

    def _add_entry(self, entry: _Entry) -> None:
        self._entries[(entry.epoch, entry.seq)] = entry
        self._by_epoch.setdefault(entry.epoch, deque()).append(entry.seq)
        self._segments[entry.segment].live += 1
        self.counters.pending_bytes += entry.length

    def _remove_entry(self, key: tuple[int, int], *, unindex: bool = True) -> _Entry:
        entry = self._entries.pop(key)
        self.counters.pending_bytes -= entry.length
        seqs = self._by_epoch.get(entry.epoch)
        if unindex and seqs is not None:
            with contextlib.suppress(ValueError):
                seqs.remove(entry.seq)
        if seqs is not None and not seqs:
            del self._by_epoch[entry.epoch]
        segment = self._segments.get(entry.segment)
        if segment is not None:
            segment.live -= 1
            if segment.live == 0 and segment is not self._active:
                self._delete_segment(segment)
        return entry

    def _delete_segment(self, segment: _Segment) -> None:
        if self._segments.pop(segment.number, None) is None:
            return  # already deleted (never close an fd number twice: it may be reused)
        with contextlib.suppress(OSError):
            os.close(segment.fd)
        segment.path.unlink(missing_ok=True)
        if segment is self._active:
            self._active = None

    def _disk_bytes(self) -> int:
        return sum(s.size for s in self._segments.values())

    def _path(self, number: int) -> Path:
        return self.directory / f"seg-{number:016x}.spool"

    # ------------------------------------------------------------------ reading, acks

    def pending(self) -> Iterator[Record]:
        """Pending records in append order (a snapshot; records acked meanwhile are skipped)."""
        with self._lock:
            keys = list(self._entries)
        for key in keys:
            record = self.get(*key)
            if record is not None:
                yield record

    def pending_keys(self) -> list[tuple[int, int]]:
        """``(epoch, seq)`` of every pending record, in append order."""
        with self._lock:
            return list(self._entries)

    def get(self, epoch: int, seq: int) -> Record | None:
        """A pending record's bytes, or None when it was acked or dropped."""
        with self._lock:
            entry = self._entries.get((epoch, seq))
            if entry is None:
                return None
            segment = self._segments[entry.segment]
            payload = os.pread(segment.fd, entry.length, entry.offset)
        if len(payload) != entry.length:
            raise StorageError(f"spool segment {segment.path} shrank under a pending record")
        return Record(epoch, seq, payload)

    # ------------------------------------------------------------------ announced gaps

    def _open_gaps(self) -> list[tuple[int, int, int]]:
        path = self.directory / GAPS_FILE
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError:
            self.counters.gaps_unavailable = 1
            return []
        try:
            size = os.fstat(fd).st_size
            data = os.pread(fd, 2 * GAPS_SLOT, 0) if size == 2 * GAPS_SLOT else b""
            if size != 2 * GAPS_SLOT:
                # New (or cut short): allocate both slots now, while there is room.
                os.ftruncate(fd, 0)
                if os.pwrite(fd, bytes(2 * GAPS_SLOT), 0) != 2 * GAPS_SLOT:
                    raise OSError(errno.ENOSPC, "short write")
                os.fsync(fd)
        except OSError:
            os.close(fd)
            with contextlib.suppress(OSError):
                path.unlink()
            self.counters.gaps_unavailable = 1
            return []
        self._gaps_fd = fd
        best: tuple[int, list[tuple[int, int, int]]] | None = None
        for slot in (data[:GAPS_SLOT], data[GAPS_SLOT:]):
            parsed = _parse_gaps_slot(slot)
            if parsed is not None and (best is None or parsed[0] > best[0]):
                best = parsed
        if best is None:
            return []
        self._gaps_generation = best[0]
        self.counters.gaps_restored = len(best[1])
        return best[1]

    def restored_gaps(self) -> list[tuple[int, int, int]]:
        """The announced, not yet acknowledged gaps kept by the previous run (at open)."""
        return list(self._restored_gaps)

    def keep_gaps(self, ranges: list[tuple[int, int, int]], *, durable: bool = True) -> None:
        """Keep the batcher's announced gaps in ``gaps.bin`` (needs no free block; never
        raises: a failure is counted, the announcement still goes out from memory).
        ``durable``: ``fdatasync`` too (when the spool syncs at all) — blocks: call it through
        ``asyncio.to_thread`` from the event loop."""
        with self._lock:
            if self._gaps_fd is None or self._closed:
                return
            ranges = merge_ranges(ranges)
            if len(ranges) > GAPS_CAPACITY:
                self.counters.gaps_truncated += 1
                ranges = ranges[-GAPS_CAPACITY:]
            self._gaps_generation += 1
            body = b"".join(_GAPS_RANGE.pack(*r) for r in ranges)
            head = _GAPS_HEAD.pack(GAPS_MAGIC, self._gaps_generation, len(ranges), zlib.crc32(body))
            slot = (head + body).ljust(GAPS_SLOT, b"\0")
            try:
                os.pwrite(self._gaps_fd, slot, (self._gaps_generation % 2) * GAPS_SLOT)
                if self.fsync and durable:
                    os.fdatasync(self._gaps_fd)
            except OSError:
                self.counters.gaps_write_errors += 1

    def take_lost(self) -> list[tuple[int, int, int]]:
        """``(epoch, first, last)`` ranges lost since the last call (dropped, quarantined)."""
        with self._lock:
            lost, self._lost = self._lost, []
            return merge_ranges(lost)

    def appended_at(self, epoch: int, seq: int) -> float | None:
        """Monotonic time a record was appended in this process (None after recovery)."""
        with self._lock:
            entry = self._entries.get((epoch, seq))
            return entry.appended if entry is not None and entry.appended else None

    def ack(self, epoch: int, seq: int) -> int:
        """Drop every pending record of ``epoch`` with a sequence number ≤ ``seq``.

        Returns how many were dropped; fully acknowledged segment files are deleted.
        """
        with self._lock:
            seqs = self._by_epoch.get(epoch)
            done = 0
            # Sequence numbers of an epoch are appended in increasing order.
            while seqs and seqs[0] <= seq:
                self._remove_entry((epoch, seqs.popleft()), unindex=False)
                done += 1
            self.counters.acked += done
            if done:
                self._watermarks[epoch] = max(seq, self._watermarks.get(epoch, 0))
                self._write_watermarks()
            return done

    def _write_watermarks(self) -> None:
        marks = {str(e): s for e, s in self._watermarks.items()}
        tmp = self.directory / "acked.json.tmp"
        # Not fsync'ed on purpose (flash wear): a lost watermark only causes re-sends, which
        # the receiver deduplicates; rename keeps the file whole.
        try:
            tmp.write_text(json.dumps(marks))
            tmp.replace(self.directory / "acked.json")
        except OSError:
            pass  # advisory only

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def stats(self) -> dict[str, Any]:
        """Counters and gauges as a dict (for status, metrics, tests)."""
        with self._lock:
            self.counters.pending_records = len(self._entries)
            self.counters.disk_bytes = self._disk_bytes()
            self.counters.segments = len(self._segments)
            return self.counters.as_dict()

    def close(self) -> None:
        """Close every file; further appends raise :class:`StorageError`."""
        with self._lock:
            self._closed = True
            if self._gaps_fd is not None:
                with contextlib.suppress(OSError):
                    os.close(self._gaps_fd)
                self._gaps_fd = None
            for segment in list(self._segments.values()):
                with contextlib.suppress(OSError):
                    os.close(segment.fd)
            self._segments.clear()
            self._active = None

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def merge_ranges(ranges: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """Sort ``(epoch, first, last)`` ranges and merge overlapping or adjacent ones."""
    out: list[tuple[int, int, int]] = []
    for epoch, first, last in sorted(ranges):
        if out and out[-1][0] == epoch and first <= out[-1][2] + 1:
            out[-1] = (epoch, out[-1][1], max(last, out[-1][2]))
        else:
            out.append((epoch, first, last))
    return out


def _parse_gaps_slot(slot: bytes) -> tuple[int, list[tuple[int, int, int]]] | None:
    """(generation, ranges) of one ``gaps.bin`` slot; None when empty, torn or corrupt."""
    if len(slot) < _GAPS_HEAD.size:
        return None
    magic, generation, count, crc = _GAPS_HEAD.unpack_from(slot)
    if magic != GAPS_MAGIC or count > GAPS_CAPACITY:
        return None
    body = slot[_GAPS_HEAD.size : _GAPS_HEAD.size + count * _GAPS_RANGE.size]
    if zlib.crc32(body) != crc:
        return None
    return generation, [_GAPS_RANGE.unpack_from(body, i * _GAPS_RANGE.size) for i in range(count)]


def _ranges(keys: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
    out: list[tuple[int, int, int]] = []
    for epoch, seq in sorted(keys):
        if out and out[-1][0] == epoch and out[-1][2] == seq - 1:
            out[-1] = (epoch, out[-1][1], seq)
        else:
            out.append((epoch, seq, seq))
    return out


def _encode_record(epoch: int, seq: int, payload: bytes) -> bytes:
    if len(payload) > MAX_RECORD:
        raise ValueError(f"record of {len(payload)} bytes exceeds {MAX_RECORD}")
    crc = zlib.crc32(payload, zlib.crc32(_CRC_PART.pack(len(payload), epoch, seq)))
    return _REC.pack(RECORD_MAGIC, len(payload), crc, epoch, seq) + payload


def _parse_record(data: bytes, pos: int) -> tuple[int, int, int] | None:
    if pos + _REC.size > len(data):
        return None
    magic, length, crc, epoch, seq = _REC.unpack_from(data, pos)
    if magic != RECORD_MAGIC or length > MAX_RECORD:
        return None
    start = pos + _REC.size
    if start + length > len(data):
        return None
    payload = memoryview(data)[start : start + length]
    if zlib.crc32(payload, zlib.crc32(_CRC_PART.pack(length, epoch, seq))) != crc:
        return None
    return epoch, seq, length


def _resync(data: bytes, pos: int) -> int | None:
    """The offset of the next valid record at or after ``pos``."""
    while True:
        pos = data.find(RECORD_MAGIC, pos)
        if pos < 0:
            return None
        if _parse_record(data, pos) is not None:
            return pos
        pos += 1


def _is_hex(text: str) -> bool:
    try:
        int(text, 16)
    except ValueError:
        return False
    return True


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
