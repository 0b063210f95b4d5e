"""Read what the receiver stored for a device: the batch ledger, the epochs, every sample.

Samples come through the storage API; the ledger, epochs and tags tables are read directly
(``docs/receiver.md``, "Schema"). SQLite or PostgreSQL, by URL.
"""

from __future__ import annotations

import json
import math
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = [
    "DeviceTime",
    "LedgerBatch",
    "ReceiverData",
    "ScanSkip",
    "StoredSample",
    "read_receiver",
    "to_real_time",
]


@dataclass(frozen=True, slots=True)
class ScanSkip:
    """A run of scans the runtime's scheduler announced as not run (``meta["scans_skipped"]``):
    ``count`` deadlines of one job from ``first_us`` to ``last_us`` (device wall clock)."""

    group: str
    job: str
    first_us: int
    last_us: int
    count: int


@dataclass(frozen=True, slots=True)
class LedgerBatch:
    epoch: int
    seq: int
    created_us: int
    received_us: int
    samples: int
    skip: tuple[tuple[int, int, int], ...]
    scans_skipped: tuple[ScanSkip, ...] = ()


@dataclass(frozen=True, slots=True)
class StoredSample:
    tag: str
    ts_us: int
    value: float | None
    quality: int


@dataclass(slots=True)
class ReceiverData:
    """Everything one device has in the receiver's database."""

    batches: list[LedgerBatch]
    samples: list[StoredSample]
    resolutions: dict[str, float]
    #: ``epochs`` rows: epoch → (acked_seq, max_seq).
    epochs: dict[int, tuple[int, int]]


#: Maps device wall times (µs) to the rig's real times (µs): see ``edgeos_testing.clockjump``.
DeviceTime = Callable[[npt.NDArray[np.int64]], npt.NDArray[np.int64]]


def to_real_time(data: ReceiverData, device_time: DeviceTime) -> ReceiverData:
    """``data`` with sample and batch ``created`` times moved from the device's (stepped) wall
    clock back to real time, samples re-sorted per tag in real time. Receive times are the
    receiver's own clock and stay as they are."""
    ts = device_time(np.array([s.ts_us for s in data.samples], np.int64))
    samples = [
        StoredSample(s.tag, int(t), s.value, s.quality)
        for s, t in zip(data.samples, ts.tolist(), strict=True)
    ]
    samples.sort(key=lambda s: (s.tag, s.ts_us))
    created = device_time(np.array([b.created_us for b in data.batches], np.int64))
    batches = [
        LedgerBatch(
            b.epoch,
            b.seq,
            int(c),
            b.received_us,
            b.samples,
            b.skip,
            tuple(_skip_to_real(k, device_time) for k in b.scans_skipped),
        )
        for b, c in zip(data.batches, created.tolist(), strict=True)
    ]
    return ReceiverData(batches, samples, data.resolutions, data.epochs)


def _skip_to_real(skip: ScanSkip, device_time: DeviceTime) -> ScanSkip:
    first, last = device_time(np.array([skip.first_us, skip.last_us], np.int64)).tolist()
    return ScanSkip(skip.group, skip.job, int(first), int(last), skip.count)


def _scan_skips(doc: Any) -> tuple[ScanSkip, ...]:
    """``meta["scans_skipped"]``: ``[[group, job, first_us, last_us, count], …]``."""
    out = []
    for item in doc.get("scans_skipped", []) or []:
        group, job, first, last, count = item
        out.append(ScanSkip(str(group), str(job), int(first), int(last), int(count)))
    return tuple(out)


def _from_db_epoch(value: int) -> int:
    return value & ((1 << 64) - 1)


def read_receiver(storage_url: str, device: str) -> ReceiverData:
    """The ledger, the epochs and every sample of ``device`` (SQLite or PostgreSQL).

    Samples come through the storage API (``query_samples``, what ``edgeos-receiver query``
    prints); the ledger (``batches``), ``epochs`` and ``tags`` tables are read directly
    (``docs/receiver.md``, "Schema"): the storage API has no ledger query.
    """
    if storage_url.startswith("sqlite:///"):
        conn: Any = sqlite3.connect(storage_url.removeprefix("sqlite:///"), timeout=30)
        ph = "?"
    else:
        import psycopg

        conn = psycopg.connect(storage_url)
        ph = "%s"
    try:
        cur = conn.cursor()
        cur.execute(f"SELECT id FROM devices WHERE name = {ph}", (device,))
        row = cur.fetchone()
        if row is None:
            return ReceiverData([], [], {}, {})
        dev_id = int(row[0])
        cur.execute(
            "SELECT epoch, seq, created_us, received_us, samples, meta FROM batches"
            f" WHERE device_id = {ph} ORDER BY created_us",
            (dev_id,),
        )
        batches = []
        for epoch, seq, created, received, samples, meta in cur.fetchall():
            skip: list[tuple[int, int, int]] = []
            scan_skips: tuple[ScanSkip, ...] = ()
            try:
                doc = json.loads(meta) if isinstance(meta, str) else (meta or {})
                for item in doc.get("skip", []) or []:
                    skip.append((_from_db_epoch(int(item[0])), int(item[1]), int(item[2])))
                scan_skips = _scan_skips(doc)
            except (ValueError, TypeError, AttributeError, IndexError):
                pass
            batches.append(
                LedgerBatch(
                    _from_db_epoch(int(epoch)),
                    int(seq),
                    int(created),
                    int(received),
                    int(samples),
                    tuple(skip),
                    scan_skips,
                )
            )
        cur.execute(f"SELECT id, name, resolution FROM tags WHERE device_id = {ph}", (dev_id,))
        names: dict[int, str] = {}
        resolutions: dict[str, float] = {}
        for tag_id, name, resolution in cur.fetchall():
            names[int(tag_id)] = str(name)
            if resolution is not None and math.isfinite(float(resolution)):
                resolutions[str(name)] = float(resolution)
        cur.execute(
            f"SELECT epoch, acked_seq, max_seq FROM epochs WHERE device_id = {ph}", (dev_id,)
        )
        epochs = {_from_db_epoch(int(e)): (int(a), int(m)) for e, a, m in cur.fetchall()}
    finally:
        conn.close()
    return ReceiverData(batches, _query_samples(storage_url, device), resolutions, epochs)


def _query_samples(storage_url: str, device: str) -> list[StoredSample]:
    """Every stored sample through the storage API (what ``edgeos-receiver query`` prints)."""
    from edgeos_cloud.receiver.storage import open_storage

    storage = open_storage(storage_url)
    try:
        rows = [
            StoredSample(r.tag, r.ts_us, r.value if isinstance(r.value, float) else None, r.quality)
            for r in storage.query_samples(device)
        ]
    finally:
        storage.close()
    rows.sort(key=lambda r: (r.tag, r.ts_us))
    return rows
