"""The local digital twin: columnar state of every tag, reported vs desired, history, snapshots.

See ``docs/twin.md`` for the data layout, the memory bound and the contracts with the uplink
batcher (the scan log), the inference engine (windows) and the runtime (write path, snapshots).
"""

from __future__ import annotations

import asyncio
import fnmatch
import logging
import math
import re
import threading
from collections import Counter, deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from edgeos.clock import Clock
from edgeos.config import FLOAT_TYPES, INTEGER_TYPES, AnyTag, ScanGroupConfig, TwinConfig
from edgeos.driver import Quality, ReadResult, TagBinding, Value, check_write
from edgeos.errors import EdgeosError, StorageError, WriteRefused
from edgeos.twin import snapshot
from edgeos.twin.desired import DesiredChange, Status, WritePath
from edgeos.twin.history import History
from edgeos.twin.scanlog import ScanLog, ScanRecord

__all__ = ["Twin"]

log = logging.getLogger(__name__)

_KIND_FLOAT, _KIND_INT, _KIND_BOOL, _KIND_STRING = 0, 1, 2, 3
_EMPTY = np.empty(0, dtype=np.int32)
_BAD = int(Quality.BAD)

Listener = Callable[[ScanRecord], None]


def _readonly(a: npt.NDArray[Any]) -> npt.NDArray[Any]:
    view = a.view()
    view.flags.writeable = False
    return view


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
        self._tags = tuple(tags)
        self._config = config
        self._clock = clock
        n = len(self._tags)
        self._names = [t.name for t in self._tags]
        self._index = {name: i for i, name in enumerate(self._names)}
        if len(self._index) != n:
            dupes = [name for name, c in Counter(self._names).items() if c > 1]
            raise ValueError(f"duplicate tag names: {', '.join(dupes[:5])}")

        self._values = np.full(n, np.nan, dtype=np.float64)
        self._quality = np.full(n, Quality.BAD_NO_VALUE, dtype=np.uint8)
        self._source_ts = np.zeros(n, dtype=np.float64)
        self._recv_ts = np.zeros(n, dtype=np.float64)
        self._changes = np.zeros(n, dtype=np.int64)
        # Last *reported* value: deadbands compare against it, so slow drifts still report.
        self._ref = np.full(n, np.nan, dtype=np.float64)
        self._deadband = np.array([t.deadband for t in self._tags], dtype=np.float64)
        self._resolution = np.array([t.effective_resolution for t in self._tags], np.float64)
        self._kind = np.array([_kind(t) for t in self._tags], dtype=np.uint8)
        self._text: dict[int, str] = {}

        periods = {g.name: g.period_ms / 1000.0 for g in scan_groups}
        lengths = [
            0
            if config.history_s <= 0
            else min(
                math.ceil(config.history_s / periods.get(t.scan_group, 1.0) - 1e-9),
                max_history_samples,
            )
            for t in self._tags
        ]
        self.history = History(self._resolution, lengths)
        self.scan_log = ScanLog(scan_log_samples)
        #: Without a consumer (no uplink) the scan log would only fill to its bound: skip it.
        self.keep_scan_log = keep_scan_log
        self._listeners: list[Listener] = []

        # Desired state.
        self._desired: dict[int, DesiredChange] = {}
        self._awaiting: dict[int, DesiredChange] = {}
        self._awaiting_mask = np.zeros(n, dtype=bool)
        #: tag index → (value, monotonic time) of this runtime's last write (for max_rate).
        self._last_write: dict[int, tuple[float, float]] = {}
        self._write_queue: asyncio.Queue[DesiredChange] = asyncio.Queue()
        self._write_locks: dict[int, asyncio.Lock] = {}
        self._confirm_timeout = confirm_timeout_s
        self._events: deque[dict[str, Any]] = deque(maxlen=max_events)
        self.events_dropped = 0
        self.outcomes: Counter[str] = Counter()

        # Snapshots.
        self._tag_set = snapshot.tag_set_digest(self._tags)
        self._snapshot_lock = threading.Lock()
        self.snapshots_saved = 0
        self.snapshot_errors = 0
        self._snapshot_failing = False

        self.applied_samples = 0

        #: Read-only views for consumers (inference, metrics); index = twin column.
        self.values = _readonly(self._values)
        self.quality = _readonly(self._quality)
        self.source_ts = _readonly(self._source_ts)
        self.recv_ts = _readonly(self._recv_ts)
        self.changes = _readonly(self._changes)

    # ------------------------------------------------------------------------------ lookup

    def __len__(self) -> int:
        return len(self._tags)

    @property
    def tags(self) -> tuple[AnyTag, ...]:
        return self._tags

    @property
    def names(self) -> list[str]:
        return list(self._names)

    def index(self, name: str) -> int:
        try:
            return self._index[name]
        except KeyError:
            raise KeyError(f"unknown tag {name!r}") from None

    def indices(self, pattern: str) -> npt.NDArray[np.int32]:
        """Twin columns of the tags whose names match a glob pattern, in twin order."""
        rx = re.compile(fnmatch.translate(pattern))
        return np.array([i for i, n in enumerate(self._names) if rx.match(n)], dtype=np.int32)

    def text(self, index: int) -> str | None:
        return self._text.get(index)

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
        qual = result.quality
        ref = self._ref[idx]
        changed = np.abs(vals - ref) > self._deadband[idx]
        changed |= qual != self._quality[idx]
        changed |= np.isnan(vals) != np.isnan(ref)
        text = result.text
        if text:
            where = {t: p for p, t in enumerate(idx.tolist())}
            for i, s in text.items():
                if self._text.get(i) != s:
                    changed[where[i]] = True
                self._text[i] = s
        self._values[idx] = vals
        self._quality[idx] = qual
        self._source_ts[idx] = result.source_ts
        self._recv_ts[idx] = recv_ts
        cidx = idx[changed]
        if cidx.shape[0]:
            self._ref[cidx] = vals[changed]
            self._changes[cidx] += 1
        self.history.append(idx, vals)
        self.applied_samples += idx.shape[0]
        if not (self.keep_scan_log or self._listeners):
            if self._awaiting:
                self._confirm(idx, vals, qual)
            return cidx
        record = ScanRecord(
            recv_ts,
            idx.copy(),
            vals.copy(),
            qual.copy(),
            result.source_ts.copy(),
            changed,
            dict(text) if text else {},
        )
        if self.keep_scan_log:
            self.scan_log.append(record)
        if self._awaiting:
            self._confirm(idx, vals, qual)
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
        ``max_rate`` against the last written or read value); a refused change is final right
        away. Otherwise it is queued for :meth:`run_writes`, and applied when a later read
        reports it. A still-pending older version for the same tag is superseded.
        """
        i = self.index(name)
        tag = self._tags[i]
        now = self._clock.time()
        previous = self._desired.get(i)
        version = (previous.version if previous is not None else 0) + 1
        change = DesiredChange(name, i, value, version, source, now)
        if not tag.writable:
            self._finish(change, "refused", "tag is not writable")
            return change
        if previous is not None and not previous.done:
            self._finish(previous, "superseded", f"superseded by version {version}")
        self._desired[i] = change
        last_value, last_time = self._last_seen(i)
        try:
            # max_rate is a rate over elapsed time: measured on the monotonic clock, so a wall
            # clock step (NTP, a dead RTC corrected at boot) can neither open the limit (+1 h
            # makes any step look slow) nor refuse every write (a step backwards).
            change.value = check_write(
                tag,
                value,
                last_value=last_value,
                last_time=last_time,
                now=self._clock.monotonic(),
            )
        except WriteRefused as exc:
            self._finish(change, "refused", exc.reason)
            return change
        self._write_queue.put_nowait(change)
        return change

    def _last_seen(self, i: int) -> tuple[float | None, float | None]:
        """Reference for ``max_rate``: the last write this runtime made to the tag.

        ``max_rate`` bounds how fast successive writes move a set-point. Measuring against the
        last *read* would refuse every step (a read is always milliseconds old); the first write
        after start is checked against the hard limits only.
        """
        written = self._last_write.get(i)
        if written is None:
            return None, None
        return written

    async def run_writes(self, write_path: WritePath) -> None:
        """Carry queued desired changes to the device until cancelled (a root-TaskGroup child).

        Writes to one tag are serialised (a newer version never overtakes an older one on the
        wire); writes to different tags proceed concurrently.
        """
        async with asyncio.TaskGroup() as tg:
            while True:
                change = await self._write_queue.get()
                if not change.done:
                    tg.create_task(self._write_one(write_path, change), name=f"write:{change.name}")

    async def _write_one(self, write_path: WritePath, change: DesiredChange) -> None:
        i = change.index
        lock = self._write_locks.setdefault(i, asyncio.Lock())
        async with lock:
            if change.done:
                return
            try:
                await write_path.write(TagBinding(i, self._tags[i]), change.value)
            except WriteRefused as exc:
                self._finish(change, "refused", exc.reason)
                return
            except (EdgeosError, OSError, TimeoutError) as exc:
                self._finish(change, "failed", f"{type(exc).__name__}: {exc}".rstrip(": "))
                return
            now = self._clock.time()
            if isinstance(change.value, int | float) and not isinstance(change.value, bool):
                self._last_write[i] = (float(change.value), self._clock.monotonic())
            if change.done:  # superseded while on the wire
                return
            change.written_ts = now
            self._awaiting[i] = change
            self._awaiting_mask[i] = True
        change._waiter = asyncio.current_task()
        try:
            await self._clock.sleep_until(self._clock.monotonic() + self._confirm_timeout)
        finally:
            change._waiter = None
        if not change.done:
            last = "" if change.reported is None else f" (last read {change.reported!r})"
            self._finish(
                change,
                "timed_out",
                f"no read confirmed the value within {self._confirm_timeout:g} s{last}",
            )

    def _confirm(
        self, idx: npt.NDArray[np.int32], vals: npt.NDArray[np.float64], qual: npt.NDArray[Any]
    ) -> None:
        hits = np.flatnonzero(self._awaiting_mask[idx])
        for p in hits.tolist():
            i = int(idx[p])
            change = self._awaiting.get(i)
            if change is None or int(qual[p]) >= _BAD:
                continue
            reported: Value
            if self._kind[i] == _KIND_STRING:
                reported = self._text.get(i, "")
                ok = reported == change.value
            else:
                reported = float(vals[p])
                target = float(change.value)
                tol = 0.5 * float(self._resolution[i]) + 1e-9 * max(1.0, abs(target))
                ok = abs(reported - target) <= tol
            change.reported = (
                self._format(i, reported) if not isinstance(reported, str) else reported
            )
            if ok:
                self._finish(change, "applied")

    def _finish(self, change: DesiredChange, status: Status, reason: str = "") -> None:
        change.status = status
        change.reason = reason
        change.done_ts = self._clock.time()
        i = change.index
        if self._awaiting.get(i) is change:
            del self._awaiting[i]
            self._awaiting_mask[i] = False
        waiter = change._waiter
        if waiter is not None and waiter is not asyncio.current_task():
            # Its confirmation wait is over; end it instead of letting it sleep to the timeout.
            waiter.cancel()
        self.outcomes[status] += 1
        if len(self._events) == self._events.maxlen:
            self.events_dropped += 1
        self._events.append({"type": "desired", **change.as_dict()})
        if status in ("refused", "failed", "timed_out"):
            log.info("desired %s v%d %s: %s", change.name, change.version, status, reason)

    def drain_events(self) -> list[dict[str, Any]]:
        """Outcome events (one per change reaching a final status) since the last drain."""
        events = list(self._events)
        self._events.clear()
        return events

    def desired(self, name: str) -> DesiredChange | None:
        return self._desired.get(self.index(name))

    def desired_state(self) -> dict[str, dict[str, Any]]:
        """Latest desired change per writable tag that has one, with the reported value."""
        out: dict[str, dict[str, Any]] = {}
        for i, change in sorted(self._desired.items()):
            entry = change.as_dict()
            entry["reported_now"] = self._value(i)
            entry["quality"] = Quality(int(self._quality[i])).name
            out[change.name] = entry
        return out

    # ------------------------------------------------------------------------------ query

    def query(self, pattern: str = "*") -> list[dict[str, Any]]:
        """Tags whose names match a glob pattern, as JSON-ready dicts (``edgeos twin get``)."""
        rx = re.compile(fnmatch.translate(pattern))
        out = []
        for i, name in enumerate(self._names):
            if not rx.match(name):
                continue
            tag = self._tags[i]
            ts = float(self._source_ts[i])
            row: dict[str, Any] = {
                "name": name,
                "value": self._value(i),
                "quality": Quality(int(self._quality[i])).name,
                "ts": ts if ts > 0 else None,
                "unit": tag.unit,
                "changes": int(self._changes[i]),
            }
            if tag.writable:
                change = self._desired.get(i)
                row["desired"] = None if change is None else change.value
                row["version"] = 0 if change is None else change.version
                row["desired_status"] = None if change is None else change.status
            out.append(row)
        return out

    def _value(self, i: int) -> Value | None:
        if self._kind[i] == _KIND_STRING:
            return self._text.get(i)
        return self._format(i, float(self._values[i]))

    def _format(self, i: int, v: float) -> Value | None:
        if not math.isfinite(v):
            return None
        kind = self._kind[i]
        if kind == _KIND_BOOL:
            return bool(v)
        if kind == _KIND_INT and v.is_integer():
            return int(v)
        return v

    # ------------------------------------------------------------------------------ snapshots

    def save_snapshot(self, path: str | Path) -> None:
        """Write the current state atomically (blocking: temp file, fsync, rename, fsync dir)."""
        self._write_locked(Path(path), self._encode_snapshot())

    async def run_snapshots(self, path: str | Path) -> None:
        """Save every ``snapshot_interval_s`` (the file I/O in a thread) and once more when
        cancelled at shutdown. Failures are counted and logged on change, never fatal."""
        path = Path(path)
        clock = self._clock
        interval = self._config.snapshot_interval_s
        start = clock.monotonic()
        k = 1
        try:
            while True:
                await clock.sleep_until(start + k * interval)
                k = max(k + 1, math.floor((clock.monotonic() - start) / interval) + 1)
                data = self._encode_snapshot()
                try:
                    await asyncio.to_thread(self._write_locked, path, data)
                except OSError as exc:
                    self._snapshot_failed(path, exc)
                else:
                    self._snapshot_ok(path)
        finally:
            # Shutdown: the freshest state is what the next start restores. Synchronous on
            # purpose, the loop is winding down; the lock waits for a write still in flight.
            try:
                self.save_snapshot(path)
            except OSError as exc:
                self._snapshot_failed(path, exc)

    def _write_locked(self, path: Path, data: bytes) -> None:
        with self._snapshot_lock:
            snapshot.atomic_write(path, data)
            self.snapshots_saved += 1

    def _snapshot_failed(self, path: Path, exc: OSError) -> None:
        self.snapshot_errors += 1
        if not self._snapshot_failing:
            log.warning("twin snapshot to %s failing: %s", path, exc)
        self._snapshot_failing = True

    def _snapshot_ok(self, path: Path) -> None:
        if self._snapshot_failing:
            log.info("twin snapshot to %s recovered", path)
        self._snapshot_failing = False

    def _encode_snapshot(self) -> bytes:
        desired = []
        for i, change in self._desired.items():
            entry = change.as_dict()
            entry["index"] = i
            desired.append(entry)
        header = {
            "created": self._clock.time(),
            "tag_set": self._tag_set,
            "tags": self._names,
            "text": {str(i): v for i, v in self._text.items()},
            "desired": desired,
        }
        arrays: dict[str, npt.NDArray[Any]] = {
            "values": self._values,
            "quality": self._quality,
            "source_ts": self._source_ts,
            "recv_ts": self._recv_ts,
            "changes": self._changes,
        }
        return snapshot.encode(header, arrays)

    def restore(self, path: str | Path) -> bool:
        """Load a snapshot at start; return False when there is none.

        Values come back with quality ``STALE`` until the first fresh read. A corrupt snapshot,
        or one of a different tag set, is moved aside (``<name>.rejected-<time>``) and
        :class:`~edgeos.errors.StorageError` is raised; the runtime logs it and starts without.
        """
        path = Path(path)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise StorageError(f"{path}: cannot read snapshot: {exc.strerror}") from exc
        try:
            header, arrays = snapshot.decode(data, str(path))
            state = self._check_snapshot(header, arrays, path)
        except StorageError as exc:
            moved = self._quarantine(path)
            raise StorageError(f"{exc}; moved aside to {moved.name}, starting without it") from exc
        self._load(*state)
        return True

    def _check_snapshot(
        self, body: dict[str, Any], columns: dict[str, Any], path: Path
    ) -> tuple[Any, ...]:
        n = len(self._tags)
        try:
            names = list(body["tags"])
            if body["tag_set"] != self._tag_set:
                ours = set(self._names)
                theirs = set(names)
                added = sorted(ours - theirs)
                removed = sorted(theirs - ours)
                detail = []
                if added:
                    detail.append(f"{len(added)} tag(s) not in it (e.g. {added[0]})")
                if removed:
                    detail.append(f"{len(removed)} tag(s) no longer configured (e.g. {removed[0]})")
                if not detail:
                    detail.append("same names, but a different order or data types")
                raise StorageError(
                    f"{path}: snapshot is of a different tag set ({len(names)} tags vs "
                    f"{n} configured: {'; '.join(detail)})"
                )
            arrays = tuple(
                np.asarray(columns[name], dtype=dtype)
                for name, dtype in (
                    ("values", np.float64),
                    ("quality", np.uint8),
                    ("source_ts", np.float64),
                    ("recv_ts", np.float64),
                    ("changes", np.int64),
                )
            )
            if any(a.shape[0] != n for a in arrays):
                raise StorageError(f"{path}: snapshot arrays do not have {n} entries")
            text = {int(k): str(v) for k, v in body["text"].items()}
            desired = [dict(d) for d in body["desired"]]
            for d in desired:
                if not 0 <= int(d["index"]) < n or d["name"] != self._names[int(d["index"])]:
                    raise StorageError(f"{path}: desired entry for unknown tag {d['name']!r}")
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise StorageError(f"{path}: snapshot body is malformed ({exc!r})") from exc
        return (*arrays, text, desired)

    def _load(  # noqa: PLR0917 - one positional per restored column
        self,
        values: npt.NDArray[np.float64],
        quality: npt.NDArray[np.uint8],
        source_ts: npt.NDArray[np.float64],
        recv_ts: npt.NDArray[np.float64],
        changes: npt.NDArray[np.int64],
        text: dict[int, str],
        desired: list[dict[str, Any]],
    ) -> None:
        usable = quality < _BAD
        self._values[:] = np.where(usable, values, np.nan)
        self._quality[:] = np.where(usable, Quality.STALE, Quality.BAD_NO_VALUE)
        self._source_ts[:] = source_ts
        self._recv_ts[:] = recv_ts
        self._changes[:] = changes
        self._ref[:] = self._values
        self._text = {i: s for i, s in text.items() if usable[i]}
        for d in desired:
            i = int(d["index"])
            change = DesiredChange(
                d["name"],
                i,
                d["value"],
                int(d["version"]),
                str(d["source"]),
                float(d["requested_ts"]),
                status=d["status"],
                reason=str(d["reason"]),
                written_ts=d["written_ts"],
                done_ts=d["done_ts"],
                reported=d["reported"],
            )
            self._desired[i] = change
            if not change.done:
                self._finish(change, "timed_out", "the runtime restarted before a confirming read")

    def _quarantine(self, path: Path) -> Path:
        stamp = int(self._clock.time())
        for n in range(1000):
            suffix = f".rejected-{stamp}" + (f"-{n}" if n else "")
            dest = path.with_name(path.name + suffix)
            if not dest.exists():
                break
        try:
            path.rename(dest)
        except OSError as exc:
            log.warning("cannot move rejected snapshot %s aside: %s", path, exc)
            return path
        return dest

    # ------------------------------------------------------------------------------ status

    def memory_bytes(self) -> int:
        """Bytes held by the columns, the history rings and the scan log (approximate)."""
        columns = sum(
            a.nbytes
            for a in (
                self._values,
                self._quality,
                self._source_ts,
                self._recv_ts,
                self._changes,
                self._ref,
                self._deadband,
                self._resolution,
                self._kind,
                self._awaiting_mask,
            )
        )
        log_bytes = len(self.scan_log) * (4 + 8 + 1 + 8 + 1)
        return columns + self.history.nbytes + log_bytes

    def stats(self) -> dict[str, Any]:
        """Counters for status and metrics."""
        quality = np.bincount(self._quality, minlength=_BAD + 6)
        return {
            "tags": len(self._tags),
            "writable": sum(1 for t in self._tags if t.writable),
            "history_mb": round(self.history.nbytes / 1e6, 2),
            "applied_samples": self.applied_samples,
            "by_quality": {q.name: int(quality[int(q)]) for q in Quality if quality[int(q)] > 0},
            "memory_bytes": self.memory_bytes(),
            "history_escapes": self.history.escapes,
            "scan_log": self.scan_log.stats(),
            "desired_outcomes": dict(self.outcomes),
            "desired_pending": sum(1 for c in self._desired.values() if not c.done),
            "events_dropped": self.events_dropped,
            "snapshots_saved": self.snapshots_saved,
            "snapshot_errors": self.snapshot_errors,
        }


def _kind(tag: AnyTag) -> int:
    dtype = tag.data_type
    if dtype == "string":
        return _KIND_STRING
    if dtype == "bool":
        return _KIND_BOOL
    if dtype in INTEGER_TYPES and (tag.modbus is None or tag.modbus.scale == 1.0):
        return _KIND_INT
    assert dtype in FLOAT_TYPES or dtype in INTEGER_TYPES
    return _KIND_FLOAT
