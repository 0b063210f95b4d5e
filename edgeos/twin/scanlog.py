"""The scan log: every sample the twin applied, in order, for the uplink batcher to drain.

One :class:`ScanRecord` per :meth:`Twin.apply` call (one connection's read of one scan group):
the receive time and the read's columns. Appending is one small object and four array copies
(the driver may reuse its buffers); the batcher calls :meth:`ScanLog.drain` every batch
interval and gets everything since the last drain, oldest first.

The log is bounded (``max_samples``): if the batcher stops draining, the oldest records are
dropped and counted in ``dropped_samples`` rather than growing without limit. The spool, not
this log, is what survives outages; the bound only protects memory from a stalled consumer.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

__all__ = ["ScanBatch", "ScanLog", "ScanRecord"]


@dataclass(frozen=True, slots=True)
class ScanRecord:
    """One applied read. Arrays are owned by the record (copies) and must not be mutated."""

    recv_ts: float
    indices: npt.NDArray[np.int32]
    values: npt.NDArray[np.float64]
    quality: npt.NDArray[np.uint8]
    source_ts: npt.NDArray[np.float64]
    #: True where the sample counted as a change (deadband exceeded or quality changed).
    changed: npt.NDArray[np.bool_]
    #: String tags' values by twin index.
    text: dict[int, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.indices.shape[0])


@dataclass(frozen=True, slots=True)
class ScanBatch:
    """Several records concatenated column-wise; record ``r`` is ``offsets[r]:offsets[r+1]``."""

    recv_ts: npt.NDArray[np.float64]
    offsets: npt.NDArray[np.int64]
    indices: npt.NDArray[np.int32]
    values: npt.NDArray[np.float64]
    quality: npt.NDArray[np.uint8]
    source_ts: npt.NDArray[np.float64]
    changed: npt.NDArray[np.bool_]
    text: list[dict[int, str]]

    @classmethod
    def concat(cls, records: list[ScanRecord]) -> ScanBatch:
        sizes = np.fromiter((len(r) for r in records), dtype=np.int64, count=len(records))
        offsets = np.zeros(len(records) + 1, dtype=np.int64)
        np.cumsum(sizes, out=offsets[1:])

        def cat(name: str, dtype: type[np.generic]) -> npt.NDArray[np.generic]:
            if not records:
                return np.empty(0, dtype=dtype)
            return np.concatenate([getattr(r, name) for r in records]).astype(dtype, copy=False)

        return cls(
            recv_ts=np.fromiter((r.recv_ts for r in records), np.float64, count=len(records)),
            offsets=offsets,
            indices=cat("indices", np.int32),  # type: ignore[arg-type]
            values=cat("values", np.float64),  # type: ignore[arg-type]
            quality=cat("quality", np.uint8),  # type: ignore[arg-type]
            source_ts=cat("source_ts", np.float64),  # type: ignore[arg-type]
            changed=cat("changed", np.bool_),  # type: ignore[arg-type]
            text=[r.text for r in records],
        )

    def __len__(self) -> int:
        return int(self.indices.shape[0])


class ScanLog:
    """Append-only, bounded, drained by one consumer (the uplink batcher)."""

    def __init__(self, max_samples: int = 1_000_000) -> None:
        if max_samples < 1:
            raise ValueError("max_samples must be >= 1")
        self.max_samples = max_samples
        self._records: deque[ScanRecord] = deque()
        self._samples = 0
        self.appended_samples = 0
        self.dropped_samples = 0
        self.dropped_records = 0

    def __len__(self) -> int:
        """Samples currently held."""
        return self._samples

    def append(self, record: ScanRecord) -> None:
        self._records.append(record)
        n = len(record)
        self._samples += n
        self.appended_samples += n
        while self._samples > self.max_samples and len(self._records) > 1:
            old = self._records.popleft()
            self._samples -= len(old)
            self.dropped_samples += len(old)
            self.dropped_records += 1

    def drain(self) -> list[ScanRecord]:
        """Everything appended since the last drain, oldest first."""
        records = list(self._records)
        self._records.clear()
        self._samples = 0
        return records

    def drain_batch(self) -> ScanBatch:
        """Like :meth:`drain`, concatenated into columns."""
        return ScanBatch.concat(self.drain())

    def stats(self) -> dict[str, int]:
        return {
            "held_samples": self._samples,
            "appended_samples": self.appended_samples,
            "dropped_samples": self.dropped_samples,
            "dropped_records": self.dropped_records,
        }
