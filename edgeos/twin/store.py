"""The local digital twin: a small facade over its components.

* :class:`~edgeos.twin.columns.Columns` — current value, quality, timestamps, change detection;
* :class:`~edgeos.twin.history.History` — quantized rings for model windows;
* :class:`~edgeos.twin.scanlog.ScanLog` — every sample, for the uplink batcher;
* :class:`~edgeos.twin.desired.DesiredState` — desired changes, the write task, rate limits;
* :class:`~edgeos.twin.snapshot.Snapshots` — save and restore.

See ``docs/twin.md`` for the data layout, the memory bound and the contracts with the uplink
batcher (the scan log), the inference engine (windows) and the runtime (write path, snapshots).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from edgeos.clock import Clock
from edgeos.config import AnyTag, ScanGroupConfig, TwinConfig
from edgeos.driver import ReadResult, Value
from edgeos.twin.columns import Columns
from edgeos.twin.desired import DesiredChange, DesiredState, WriteLog, WritePath
from edgeos.twin.history import History
from edgeos.twin.scanlog import ScanLog, ScanRecord
from edgeos.twin.snapshot import Snapshots

__all__ = ["Twin"]

_EMPTY = np.empty(0, dtype=np.int32)

Listener = Callable[[ScanRecord], None]


class Twin:
    """Columnar state for every tag; index = position in ``tags`` (the twin column).

    ``scan_groups`` give each tag's period, which sizes its history ring
    (``min(ceil(history_s / period), max_history_samples)`` samples; tags of unknown groups
    assume 1 s).
    """

    def __init__(
        self,
        tags: Sequence[AnyTag],
        config: TwinConfig,
        *,
        clock: Clock,
        scan_groups: Sequence[ScanGroupConfig] = (),
        max_history_samples: int = 6_000,
        confirm_timeout_s: float = 10.0,
        scan_log_samples: int = 1_000_000,
        keep_scan_log: bool = True,
        max_events: int = 10_000,
    ) -> None:
        self.columns = Columns(tags)
        periods = {g.name: g.period_ms / 1000.0 for g in scan_groups}
        lengths = [
            0
            if config.history_s <= 0
            else min(
                math.ceil(config.history_s / periods.get(t.scan_group, 1.0) - 1e-9),
                max_history_samples,
            )
            for t in self.columns.tags
        ]
        self.history = History(self.columns.resolution, lengths)
        self.scan_log = ScanLog(scan_log_samples)
        #: Without a consumer (no uplink) the scan log would only fill to its bound: skip it.
        self.keep_scan_log = keep_scan_log
        self._listeners: list[Listener] = []
        self.desired_changes = DesiredState(
            self.columns, clock=clock, confirm_timeout_s=confirm_timeout_s, max_events=max_events
        )
        self.snapshots = Snapshots(
            self.columns, self.desired_changes, clock=clock, interval_s=config.snapshot_interval_s
        )
        self.applied_samples = 0

        #: Read-only views for consumers (inference, metrics); index = twin column.
        self.values = self.columns.values
        self.quality = self.columns.quality
        self.source_ts = self.columns.source_ts
        self.recv_ts = self.columns.recv_ts
        self.changes = self.columns.changes

    # ------------------------------------------------------------------------------ lookup

    def __len__(self) -> int:
        return len(self.columns)

    @property
    def tags(self) -> tuple[AnyTag, ...]:
        return self.columns.tags

    @property
    def names(self) -> list[str]:
        return list(self.columns.names)

    def index(self, name: str) -> int:
        return self.columns.index(name)

    def indices(self, pattern: str) -> npt.NDArray[np.int32]:
        """Twin columns of the tags whose names match a glob pattern, in twin order."""
        return np.array(self.columns.matching(pattern), dtype=np.int32)

    def text(self, index: int) -> str | None:
        return self.columns.text(index)

    # ------------------------------------------------------------------------------ samples

    def apply(self, result: ReadResult, recv_ts: float) -> npt.NDArray[np.int32]:
        """Take one read into the twin; return the indices that changed.

        A sample changes when it moves more than the tag's deadband away from the last reported
        value, when its quality changes, or when a string differs. Every sample (changed or not)
        goes to the history ring and the scan log. ``recv_ts`` is ``clock.time()`` when the
        response arrived. Indices must be unique within one result.
        """
        idx = result.indices
        if idx.shape[0] == 0:
            return _EMPTY
        vals = result.values
        changed = self.columns.apply(result, recv_ts)
        self.history.append(idx, vals)
        self.applied_samples += idx.shape[0]
        cidx: npt.NDArray[np.int32] = idx[changed]
        if not (self.keep_scan_log or self._listeners):
            self.desired_changes.confirm(idx, vals, result.quality)
            return cidx
        text = result.text
        record = ScanRecord(
            recv_ts,
            idx.copy(),
            vals.copy(),
            result.quality.copy(),
            result.source_ts.copy(),
            changed,
            dict(text) if text else {},
        )
        if self.keep_scan_log:
            self.scan_log.append(record)
        self.desired_changes.confirm(idx, vals, result.quality)
        for listener in self._listeners:
            listener(record)
        return cidx

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Call ``listener(record)`` after every apply (synchronously; keep it short).

        Returns a function that unsubscribes.
        """
        self._listeners.append(listener)

        def unsubscribe() -> None:
            if listener in self._listeners:
                self._listeners.remove(listener)

        return unsubscribe

    def window(
        self,
        indices: npt.ArrayLike,
        n: int,
        *,
        dtype: type[np.floating[Any]] = np.float32,
    ) -> npt.NDArray[np.floating[Any]]:
        """The last ``n`` samples of each tag, oldest first, dequantized; NaN where missing."""
        return self.history.window(indices, n, dtype=dtype)

    # ------------------------------------------------------------------------------ desired

    def set_desired(self, name: str, value: Value, *, source: str) -> DesiredChange:
        """Request ``value`` for a writable tag; returns the versioned change.

        The value is checked at once (:func:`~edgeos.driver.check_write`: type, hard limits,
        ``max_rate`` against this runtime's last write to the tag, on the monotonic clock); a
        refused change is final right away. Otherwise it is queued for :meth:`run_writes`, and
        applied when a later read reports it. A still-pending older version for the same tag is
        superseded. ``await change.wait()`` (under a timeout scope) returns its final status.
        """
        return self.desired_changes.set(name, value, source=source)

    async def run_writes(self, write_path: WritePath) -> None:
        """Carry queued desired changes to the device until cancelled (a root-TaskGroup child).

        Writes to one tag are serialised (a newer version never overtakes an older one on the
        wire); writes to different tags proceed concurrently.
        """
        await self.desired_changes.run_writes(write_path)

    @property
    def writes(self) -> WriteLog:
        """When each tag was last written and to what (monotonic clock): ``max_rate``'s record."""
        return self.desired_changes.writes

    @property
    def outcomes(self) -> Counter[str]:
        return self.desired_changes.outcomes

    @property
    def events_dropped(self) -> int:
        return self.desired_changes.events_dropped

    def drain_events(self) -> list[dict[str, Any]]:
        """Outcome events (one per change reaching a final status) since the last drain."""
        return self.desired_changes.drain_events()

    def desired(self, name: str) -> DesiredChange | None:
        return self.desired_changes.get(self.index(name))

    def desired_state(self) -> dict[str, dict[str, Any]]:
        """Latest desired change per writable tag that has one, with the reported value."""
        return self.desired_changes.state()

    # ------------------------------------------------------------------------------ query

    def query(self, pattern: str = "*") -> list[dict[str, Any]]:
        """Tags whose names match a glob pattern, as JSON-ready dicts (``edgeos twin get``).

        Writable tags also carry their last desired change: ``desired``, ``version``,
        ``desired_status`` and ``desired_reason`` (why it was refused, failed or timed out).
        """
        out = []
        for i in self.columns.matching(pattern):
            row = self.columns.row(i)
            if self.columns.tags[i].writable:
                row.update(self.desired_changes.fields(i))
            out.append(row)
        return out

    # ------------------------------------------------------------------------------ snapshots

    def save_snapshot(self, path: str | Path) -> None:
        """Write the current state atomically (blocking: temp file, fsync, rename, fsync dir)."""
        self.snapshots.save(path)

    async def run_snapshots(self, path: str | Path) -> None:
        """Save every ``snapshot_interval_s`` (the file I/O in a thread) and once more when
        cancelled at shutdown. Failures are counted and logged on change, never fatal."""
        await self.snapshots.run(path)

    def restore(self, path: str | Path) -> bool:
        """Load a snapshot at start; return False when there is none.

        Values come back with quality ``STALE`` until the first fresh read. A corrupt snapshot,
        or one of a different tag set, is moved aside (``<name>.rejected-<time>``) and
        :class:`~edgeos.errors.StorageError` is raised; the runtime logs it and starts without.
        """
        return self.snapshots.restore(path)

    @property
    def snapshots_saved(self) -> int:
        return self.snapshots.saved

    @property
    def snapshot_errors(self) -> int:
        return self.snapshots.errors

    # ------------------------------------------------------------------------------ status

    def memory_bytes(self) -> int:
        """Bytes held by the columns, the history rings and the scan log (approximate)."""
        log_bytes = len(self.scan_log) * (4 + 8 + 1 + 8 + 1)
        columns = self.columns.nbytes + self.desired_changes.nbytes
        return columns + self.history.nbytes + log_bytes

    def stats(self) -> dict[str, Any]:
        """Counters for status and metrics."""
        return {
            "tags": len(self.columns),
            "writable": sum(1 for t in self.columns.tags if t.writable),
            "history_mb": round(self.history.nbytes / 1e6, 2),
            "applied_samples": self.applied_samples,
            "by_quality": self.columns.by_quality(),
            "memory_bytes": self.memory_bytes(),
            "history_escapes": self.history.escapes,
            "scan_log": self.scan_log.stats(),
            "desired_outcomes": dict(self.outcomes),
            "desired_pending": self.desired_changes.pending,
            "events_dropped": self.events_dropped,
            "snapshots_saved": self.snapshots_saved,
            "snapshot_errors": self.snapshot_errors,
        }
