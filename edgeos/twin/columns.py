"""The twin's columns: current value, quality and timestamps of every tag, and change detection.

Index = position in the tag sequence (the twin column). See ``docs/twin.md`` ("Columns",
"apply: change detection").
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from edgeos.config import FLOAT_TYPES, INTEGER_TYPES, AnyTag
from edgeos.driver import Quality, ReadResult, Value

__all__ = ["Columns"]

_KIND_FLOAT, _KIND_INT, _KIND_BOOL, _KIND_STRING = 0, 1, 2, 3
_BAD = int(Quality.BAD)

#: The restorable columns, in snapshot order, with their dtypes.
SAVED: tuple[tuple[str, type[np.generic]], ...] = (
    ("values", np.float64),
    ("quality", np.uint8),
    ("source_ts", np.float64),
    ("recv_ts", np.float64),
    ("changes", np.int64),
)


def _readonly(a: npt.NDArray[Any]) -> npt.NDArray[Any]:
    view = a.view()
    view.flags.writeable = False
    return view


class Columns:
    """Per-tag state as numpy columns, plus the side table of string values."""

    def __init__(self, tags: Sequence[AnyTag]) -> None:
        self.tags = tuple(tags)
        n = len(self.tags)
        self.names = [t.name for t in self.tags]
        self._index = {name: i for i, name in enumerate(self.names)}
        if len(self._index) != n:
            dupes = [name for name, c in Counter(self.names).items() if c > 1]
            raise ValueError(f"duplicate tag names: {', '.join(dupes[:5])}")

        self._values = np.full(n, np.nan, dtype=np.float64)
        self._quality = np.full(n, Quality.BAD_NO_VALUE, dtype=np.uint8)
        self._source_ts = np.zeros(n, dtype=np.float64)
        self._recv_ts = np.zeros(n, dtype=np.float64)
        self._changes = np.zeros(n, dtype=np.int64)
        # Last *reported* value: deadbands compare against it, so slow drifts still report.
        self._ref = np.full(n, np.nan, dtype=np.float64)
        self._deadband = np.array([t.deadband for t in self.tags], dtype=np.float64)
        self.resolution = np.array([t.effective_resolution for t in self.tags], np.float64)
        self._kind = np.array([_kind(t) for t in self.tags], dtype=np.uint8)
        self._text: dict[int, str] = {}

        #: Read-only views for consumers (inference, metrics); index = twin column.
        self.values = _readonly(self._values)
        self.quality = _readonly(self._quality)
        self.source_ts = _readonly(self._source_ts)
        self.recv_ts = _readonly(self._recv_ts)
        self.changes = _readonly(self._changes)

    def __len__(self) -> int:
        return len(self.tags)

    # ------------------------------------------------------------------------------ lookup

    def index(self, name: str) -> int:
        try:
            return self._index[name]
        except KeyError:
            raise KeyError(f"unknown tag {name!r}") from None

    def matching(self, pattern: str) -> list[int]:
        """Columns of the tags whose names match a glob pattern, in twin order."""
        rx = re.compile(fnmatch.translate(pattern))
        return [i for i, n in enumerate(self.names) if rx.match(n)]

    def text(self, index: int) -> str | None:
        return self._text.get(index)

    def is_string(self, index: int) -> bool:
        return bool(self._kind[index] == _KIND_STRING)

    # ------------------------------------------------------------------------------ samples

    def apply(self, result: ReadResult, recv_ts: float) -> npt.NDArray[np.bool_]:
        """Take one read into the columns; return the per-sample ``changed`` mask."""
        idx = result.indices
        vals = result.values
        qual = result.quality
        ref = self._ref[idx]
        changed: npt.NDArray[np.bool_] = np.abs(vals - ref) > self._deadband[idx]
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
        return changed

    # ------------------------------------------------------------------------------ values out

    def value(self, i: int) -> Value | None:
        """The current value of column ``i``, JSON-ready (NaN → None, typed like the tag)."""
        if self._kind[i] == _KIND_STRING:
            return self._text.get(i)
        return self.format(i, float(self._values[i]))

    def format(self, i: int, v: float) -> Value | None:
        if not math.isfinite(v):
            return None
        kind = self._kind[i]
        if kind == _KIND_BOOL:
            return bool(v)
        if kind == _KIND_INT and v.is_integer():
            return int(v)
        return v

    def quality_name(self, i: int) -> str:
        return Quality(int(self._quality[i])).name

    def row(self, i: int) -> dict[str, Any]:
        """One tag as a JSON-ready dict (``edgeos twin get``), without desired state."""
        tag = self.tags[i]
        ts = float(self._source_ts[i])
        return {
            "name": self.names[i],
            "value": self.value(i),
            "quality": self.quality_name(i),
            "ts": ts if ts > 0 else None,
            "unit": tag.unit,
            "changes": int(self._changes[i]),
        }

    # ------------------------------------------------------------------------------ snapshots

    def saved(self) -> dict[str, npt.NDArray[Any]]:
        """The columns a snapshot keeps (live arrays: encode them before the next apply)."""
        return {
            "values": self._values,
            "quality": self._quality,
            "source_ts": self._source_ts,
            "recv_ts": self._recv_ts,
            "changes": self._changes,
        }

    def saved_text(self) -> dict[str, str]:
        return {str(i): v for i, v in self._text.items()}

    def load(self, arrays: dict[str, npt.NDArray[Any]], text: dict[int, str]) -> None:
        """Restore saved columns: usable values come back ``STALE``, bad ones ``BAD_NO_VALUE``."""
        quality = arrays["quality"]
        usable = quality < _BAD
        self._values[:] = np.where(usable, arrays["values"], np.nan)
        self._quality[:] = np.where(usable, Quality.STALE, Quality.BAD_NO_VALUE)
        self._source_ts[:] = arrays["source_ts"]
        self._recv_ts[:] = arrays["recv_ts"]
        self._changes[:] = arrays["changes"]
        self._ref[:] = self._values
        self._text = {i: s for i, s in text.items() if usable[i]}

    # ------------------------------------------------------------------------------ status

    @property
    def nbytes(self) -> int:
        return sum(
            a.nbytes
            for a in (
                self._values,
                self._quality,
                self._source_ts,
                self._recv_ts,
                self._changes,
                self._ref,
                self._deadband,
                self.resolution,
                self._kind,
            )
        )

    def by_quality(self) -> dict[str, int]:
        counts = np.bincount(self._quality, minlength=_BAD + 6)
        return {q.name: int(counts[int(q)]) for q in Quality if counts[int(q)] > 0}


def _kind(tag: AnyTag) -> int:
    dtype = tag.data_type
    if dtype == "string":
        return _KIND_STRING
    if dtype == "bool":
        return _KIND_BOOL
    if dtype in INTEGER_TYPES and tag.scale == 1.0:
        return _KIND_INT
    assert dtype in FLOAT_TYPES or dtype in INTEGER_TYPES
    return _KIND_FLOAT
