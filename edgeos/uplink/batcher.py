"""The batcher: scan samples and events → sealed batches in the spool, every 2–5 s.

Samples arrive as scan records (the twin's :class:`~edgeos.twin.ScanRecord`, or anything with
``recv_ts``, ``indices``, ``values``, ``quality`` and ``text``): pushed with :meth:`Batcher.add`
or pulled from a source with ``drain()`` (the twin's ``ScanLog``). Records with the same tag
set (one scan group of one connection) become one :class:`~edgeos_protocol.wire.Group`, one row
per scan. Every ``interval_s`` — or as soon as ``max_batch_samples`` are waiting — the batch is
closed, encoded, compressed and sealed (in a worker thread when it is large) and appended to
the spool. **A sample is accepted when its batch is in the spool**; until then it exists only
in memory.

Gaps in an epoch's sequence (a batch the spool refused, records the spool dropped or
quarantined) are announced in later batches' ``meta["skip"]`` as ``[epoch, first, last]``
ranges until a batch that carried them is acknowledged, so the receiver's contiguous ack never
waits for a batch that will not come (see ``docs/wire-format.md``), and every gap the status
counts reaches the receiver.

Scans the scheduler did not run (a scan still running at its next deadline, a dispatcher that
woke late: the runtime was overloaded) are announced too, in ``meta["scans_skipped"]`` as
``[group, connection, first_us, last_us, count]`` runs of skipped deadlines (wall clock), once,
in the next batch sealed: those scans were never read, so the receiver must not take the hole
in a tag's rows for accepted data that was lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from edgeos.clock import Clock, SystemClock
from edgeos.config import AnyTag
from edgeos.errors import SpoolFull, StorageError
from edgeos.histogram import Histogram
from edgeos.uplink.spool import Spool, merge_ranges
from edgeos_protocol.crypto import Epoch, Keyring, Suite
from edgeos_protocol.wire import Batch, Group, TagTable, ValueKind, encode_body, seal_batch

__all__ = [
    "Batcher",
    "BatcherStats",
    "ScanLike",
    "ScanSource",
    "SealedBatch",
    "tag_table_from_config",
]

log = logging.getLogger(__name__)

#: Batches with more samples than this are encoded and sealed in a worker thread.
THREAD_THRESHOLD = 20_000


class ScanLike(Protocol):
    """What the batcher needs from a scan record (the twin's ``ScanRecord`` fits)."""

    @property
    def recv_ts(self) -> float: ...
    @property
    def indices(self) -> npt.NDArray[np.int32]: ...
    @property
    def values(self) -> npt.NDArray[np.float64]: ...
    @property
    def quality(self) -> npt.NDArray[np.uint8]: ...
    @property
    def text(self) -> Mapping[int, str]: ...


class ScanSource(Protocol):
    """A pull source of scan records (the twin's ``ScanLog`` fits)."""

    def drain(self) -> Sequence[ScanLike]: ...
    def __len__(self) -> int: ...


@dataclass(frozen=True, slots=True)
class SealedBatch:
    """A batch now in the spool."""

    epoch: int
    seq: int
    samples: int
    size: int
    #: Wall time (s) of the oldest scan in the batch, for scan → stored latency.
    oldest_scan: float


@dataclass(slots=True)
class BatcherStats:
    batches: int = 0
    samples: int = 0
    events: int = 0
    bytes: int = 0
    refused_batches: int = 0
    refused_samples: int = 0
    epochs: int = 1
    skipped_ranges: int = 0
    #: Scans announced as skipped by the scheduler (``meta["scans_skipped"]``), and their runs.
    scans_skipped: int = 0
    scan_skip_runs: int = 0
    encode_seconds: Histogram = field(default_factory=Histogram)
    append_seconds: Histogram = field(default_factory=Histogram)

    def as_dict(self) -> dict[str, Any]:
        return {
            "batches": self.batches,
            "samples": self.samples,
            "events": self.events,
            "bytes": self.bytes,
            "bytes_per_sample": round(self.bytes / self.samples, 4) if self.samples else None,
            "refused_batches": self.refused_batches,
            "refused_samples": self.refused_samples,
            "epochs": self.epochs,
            "skipped_ranges": self.skipped_ranges,
            "scans_skipped": self.scans_skipped,
            "scan_skip_runs": self.scan_skip_runs,
            "encode": self.encode_seconds.summary_ms(),
            "append": self.append_seconds.summary_ms(),
        }


def tag_table_from_config(tags: Sequence[AnyTag]) -> TagTable:
    """The wire tag table of configured tags in twin index order (index = position)."""
    kinds = []
    for tag in tags:
        dtype = tag.data_type
        kinds.append(
            ValueKind.STRING
            if dtype == "string"
            else ValueKind.BOOL
            if dtype == "bool"
            else ValueKind.NUMBER
        )
    return TagTable(
        np.arange(len(tags), dtype=np.int32),
        [t.name for t in tags],
        kinds,
        [t.effective_resolution for t in tags],
        [t.unit for t in tags],
    )


class Batcher:
    """Closes, seals and spools batches (see the module docs).

    ``table`` describes every tag (twin index → name, kind, resolution, unit). ``on_stored`` is
    called (on the event loop) after each batch is in the spool — the publisher's wake-up.
    """

    def __init__(
        self,
        *,
        table: TagTable,
        keyring: Keyring,
        device: str,
        spool: Spool,
        suite: Suite = Suite.CHACHA20_POLY1305,
        interval_s: float = 3.0,
        max_batch_samples: int = 200_000,
        source: ScanSource | None = None,
        drain_events: Callable[[], list[dict[str, Any]]] | None = None,
        skipped_scans: Callable[[], Sequence[list[Any]]] | None = None,
        on_stored: Callable[[SealedBatch], None] | None = None,
        clock: Clock | None = None,
        level: int = 3,
        max_epoch_seq: int | None = None,
    ) -> None:
        self.table = table
        self.keyring = keyring
        self.device = device
        self.spool = spool
        self.suite = suite
        self.interval_s = interval_s
        self.max_batch_samples = max_batch_samples
        self.source = source
        self.drain_events = drain_events
        self.skipped_scans = skipped_scans
        #: Skipped-scan runs drained from the scheduler, not yet in a stored batch.
        self._scan_skips: list[list[Any]] = []
        self.on_stored = on_stored
        self.clock = clock or SystemClock()
        self.level = level
        self._max_epoch_seq = max_epoch_seq
        self.epoch = self._new_epoch()
        self.counters = BatcherStats()
        self._records: list[ScanLike] = []
        self._pending_samples = 0
        self._events: list[dict[str, Any]] = []
        self._full = asyncio.Event()
        self._flush_lock = asyncio.Lock()
        # Positions of twin indices in the full table (-1: unknown tag).
        top = int(table.indices.max()) + 1 if len(table) else 0
        self._position = np.full(top, -1, np.int64)
        self._position[table.indices] = np.arange(len(table))
        self._identity = bool(np.array_equal(table.indices, np.arange(len(table))))
        self._subtables: OrderedDict[bytes, TagTable] = OrderedDict()
        #: Announced gaps ``(epoch, first, last)`` not yet passed by an ack; kept in the
        #: spool's ``gaps.bin`` across restarts (a gap the last run could not get out yet).
        self.skip: list[tuple[int, int, int]] = merge_ranges(spool.restored_gaps())
        #: Announced gap → (epoch, seq) of the first stored batch that carried it.
        self._carried: dict[tuple[int, int, int], tuple[int, int]] = {}
        #: ``skip`` gained a gap that ``gaps.bin`` does not hold yet (written off the loop).
        self._gaps_dirty = False
        self._take_spool_losses()
        if self._gaps_dirty:
            self._gaps_dirty = False
            self.spool.keep_gaps(self.skip)

    def _new_epoch(self) -> Epoch:
        if self._max_epoch_seq is None:
            return Epoch.new(self.keyring, self.device, self.suite)
        return Epoch.new(self.keyring, self.device, self.suite, max_seq=self._max_epoch_seq)

    # ------------------------------------------------------------------ input

    def add(self, record: ScanLike) -> None:
        """Queue one scan record (cheap; arrays are kept, not copied — do not mutate them)."""
        self._records.append(record)
        self._pending_samples += int(record.indices.shape[0])
        if self._pending_samples >= self.max_batch_samples:
            self._full.set()

    def add_event(self, event: Mapping[str, Any]) -> None:
        """Queue an event (gate verdict, write outcome, alarm): ``{"type": …, "ts_us": …}``."""
        self._events.append(dict(event))

    @property
    def pending_samples(self) -> int:
        return self._pending_samples + (len(self.source) if self.source is not None else 0)

    def stats(self) -> dict[str, Any]:
        """Counters, encode/append timings, pending samples and the current epoch."""
        return {
            **self.counters.as_dict(),
            "pending_samples": self.pending_samples,
            "epoch": f"{self.epoch.epoch:016x}",
            "seq": self.epoch.last_seq,
            "skip": len(self.skip),
        }

    def on_ack(self, epoch: int, seq: int) -> None:
        """Forget announced gaps once a batch that carried them is acknowledged (called by the
        publisher): the receiver has read the announcement then.

        Forgetting a gap as soon as an ack passed it lost announcements: a batch dropped from
        the spool while the receiver already held it (sent before a partition, its ack lost
        with the link) was announced only in batches sealed during the partition, dropped
        too; the first ack after the heal passed it, and the status counted a drop the
        receiver never heard of (the "13 vs 12" of docs/hil.md).
        """
        keep = []
        for s in self.skip:
            carrier = self._carried.get(s)
            if carrier is not None and carrier[0] == epoch and carrier[1] <= seq:
                del self._carried[s]
            else:
                keep.append(s)
        if keep != self.skip:
            self.skip = keep
            # Not synced (this runs on the loop, once per ack): a forgotten removal only makes
            # the next run announce an acknowledged gap again, which the receiver ignores.
            self.spool.keep_gaps(keep, durable=False)

    # ------------------------------------------------------------------ loop

    async def run(self) -> None:
        """Close a batch every ``interval_s`` (or early when full) until cancelled.

        On cancellation the batch in progress is flushed first (orderly shutdown), then the
        cancellation propagates.
        """
        deadline = self.clock.monotonic() + self.interval_s
        try:
            while True:
                await self._wait(deadline)
                now = self.clock.monotonic()
                if now >= deadline:
                    # Absolute deadlines: no drift; after a stall, skip missed ticks.
                    deadline += self.interval_s * max(
                        1, math.ceil((now - deadline) / self.interval_s)
                    )
                await self.flush()
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await asyncio.shield(self.flush())
            raise

    async def _wait(self, deadline: float) -> None:
        self._full.clear()
        sleeper = asyncio.ensure_future(self.clock.sleep_until(deadline))
        full = asyncio.ensure_future(self._full_or_source())
        try:
            await asyncio.wait({sleeper, full}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (sleeper, full):
                task.cancel()
            await asyncio.gather(sleeper, full, return_exceptions=True)

    async def _full_or_source(self) -> None:
        if self.source is None:
            await self._full.wait()
            return
        # A pull source cannot signal: look at its size a few times a second.
        while self.pending_samples < self.max_batch_samples:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.25):
                    await self._full.wait()

    async def flush(self) -> SealedBatch | None:
        """Close the current batch now; returns it once it is in the spool (None if empty).

        Raises :class:`~edgeos.errors.StorageError` when the spool cannot store it for a reason
        other than its full policy (a refused batch is counted and announced as a gap).
        """
        async with self._flush_lock:
            records = self._records
            self._records = []
            self._pending_samples = 0
            if self.source is not None:
                records = [*records, *self.source.drain()]
            events = self._events
            self._events = []
            if self.drain_events is not None:
                events.extend(self.drain_events())
            self._take_spool_losses()
            await self._keep_gaps()
            if self.skipped_scans is not None:
                self._scan_skips.extend(self.skipped_scans())
            if not records and not events:
                # Skipped-scan runs wait for the next batch that carries anything.
                return None
            announced = list(self.skip)
            batch, samples, oldest = self._build(records, events)
            if self.epoch.exhausted:
                self.epoch = self._new_epoch()
                self.counters.epochs += 1
            created_us = int(self.clock.time() * 1e6)
            t0 = self.clock.monotonic()
            if samples > THREAD_THRESHOLD:
                epoch, seq, sealed = await asyncio.to_thread(self._seal, batch, created_us)
            else:
                epoch, seq, sealed = self._seal(batch, created_us)
            t1 = self.clock.monotonic()
            self.counters.encode_seconds.record(t1 - t0)
            try:
                if self.spool.fsync:
                    await asyncio.to_thread(self.spool.append, epoch, seq, sealed)
                else:
                    self.spool.append(epoch, seq, sealed)
            except SpoolFull as exc:
                self.counters.refused_batches += 1
                self.counters.refused_samples += samples
                self._announce_gap(epoch, seq, seq)
                await self._keep_gaps()
                log.warning("uplink batch %d refused by the spool: %s", seq, exc)
                return None
            except StorageError:
                self._announce_gap(epoch, seq, seq)
                await self._keep_gaps()
                raise
            self.counters.append_seconds.record(self.clock.monotonic() - t1)
            for gap in announced:
                self._carried.setdefault(gap, (epoch, seq))
            if self._scan_skips:
                # Announced once: in a stored batch (a refused one is itself an announced gap,
                # and its runs are announced again in the next batch).
                self.counters.scan_skip_runs += len(self._scan_skips)
                self.counters.scans_skipped += sum(int(run[4]) for run in self._scan_skips)
                self._scan_skips = []
            self.counters.batches += 1
            self.counters.samples += samples
            self.counters.events += len(events)
            self.counters.bytes += len(sealed)
            stored = SealedBatch(epoch, seq, samples, len(sealed), oldest)
            if self.on_stored is not None:
                self.on_stored(stored)
            return stored

    def _seal(self, batch: Batch, created_us: int) -> tuple[int, int, bytes]:
        body = encode_body(batch, level=self.level)
        header, sealed = seal_batch(self.epoch, body, created_us)
        return header.epoch, header.seq, sealed

    def _announce_gap(self, epoch: int, first: int, last: int) -> None:
        self.skip = merge_ranges([*self.skip, (epoch, first, last)])
        # A merged range is a new announcement: it needs a carrier of its own.
        self._carried = {g: c for g, c in self._carried.items() if g in self.skip}
        self.counters.skipped_ranges += 1
        self._gaps_dirty = True

    async def _keep_gaps(self) -> None:
        """Write new announcements to the spool's ``gaps.bin`` (synced, so off the loop)."""
        if not self._gaps_dirty:
            return
        self._gaps_dirty = False
        if self.spool.fsync:
            await asyncio.to_thread(self.spool.keep_gaps, list(self.skip))
        else:
            self.spool.keep_gaps(list(self.skip))

    def _take_spool_losses(self) -> None:
        for epoch, first, last in self.spool.take_lost():
            self._announce_gap(epoch, first, last)

    # ------------------------------------------------------------------ building

    def _build(
        self, records: list[ScanLike], events: list[dict[str, Any]]
    ) -> tuple[Batch, int, float]:
        by_tags: dict[bytes, list[ScanLike]] = {}
        for record in records:
            if record.indices.shape[0]:
                by_tags.setdefault(record.indices.tobytes(), []).append(record)
        table, positions = self._table_for(by_tags)
        groups = []
        samples = 0
        oldest = math.inf
        for key, recs in by_tags.items():
            recs.sort(key=lambda r: r.recv_ts)
            indices = recs[0].indices
            times = np.fromiter((round(r.recv_ts * 1e6) for r in recs), np.int64, len(recs))
            values = np.stack([r.values for r in recs]).astype(np.float64, copy=False)
            quality = np.stack([r.quality for r in recs]).astype(np.uint8, copy=False)
            text: dict[tuple[int, int], str] = {}
            if any(r.text for r in recs):
                col = {int(ix): c for c, ix in enumerate(indices.tolist())}
                for row, r in enumerate(recs):
                    for ix, s in r.text.items():
                        if ix in col:
                            text[(row, col[ix])] = s
            groups.append(Group(times, positions[key], values, quality, text))
            samples += values.size
            oldest = min(oldest, recs[0].recv_ts)
        meta: dict[str, Any] = {}
        if self.skip:
            meta["skip"] = [list(s) for s in self.skip]
        if self._scan_skips:
            meta["scans_skipped"] = [list(run) for run in self._scan_skips]
        if oldest == math.inf:
            oldest = self.clock.time()
        return Batch(table, groups, events, meta), samples, oldest

    def _table_for(
        self, by_tags: dict[bytes, list[ScanLike]]
    ) -> tuple[TagTable, dict[bytes, npt.NDArray[np.int32]]]:
        """The full table (when the batch uses most tags) or a cached sub-table."""
        all_idx = [np.frombuffer(k, np.int32) for k in by_tags]
        for idx in all_idx:
            if idx.size and (
                int(idx.max()) >= self._position.shape[0] or (self._position[idx] < 0).any()
            ):
                raise ValueError("scan record holds a twin index that is not in the tag table")
        used = int(sum(i.size for i in all_idx))
        if used * 2 >= len(self.table) or not all_idx:
            if self._identity:
                return self.table, {k: i for k, i in zip(by_tags, all_idx, strict=True)}
            return self.table, {
                k: self._position[i].astype(np.int32) for k, i in zip(by_tags, all_idx, strict=True)
            }
        union = np.unique(np.concatenate(all_idx))
        key = union.tobytes()
        sub = self._subtables.get(key)
        if sub is None:
            pos = self._position[union]
            t = self.table
            sub = TagTable(
                t.indices[pos],
                [t.names[p] for p in pos.tolist()],
                t.kinds[pos],
                t.resolutions[pos],
                [t.units[p] for p in pos.tolist()],
            )
            self._subtables[key] = sub
            if len(self._subtables) > 8:
                self._subtables.popitem(last=False)
        else:
            self._subtables.move_to_end(key)
        return sub, {
            k: np.searchsorted(union, i).astype(np.int32)
            for k, i in zip(by_tags, all_idx, strict=True)
        }
