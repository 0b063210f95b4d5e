"""Bounded per-tag history for model windows, stored at ~2 bytes per sample.

Each tag keeps a ring of its last ``N`` samples. A sample is quantized to the tag's resolution
(``q = rint(value / resolution)``) and stored as the int16 *delta* from the tag's previous valid
sample; the latest absolute ``q`` is kept per tag (int64), so the last ``n`` values are
rebuilt backwards from it with one cumulative sum. Two codes are reserved:

* ``-32767`` — no value (bad quality / NaN, or a slot never written); it carries delta 0, so the
  chain continues across gaps;
* ``-32768`` — escape: the delta did not fit in int16 (a step of more than 32,766 resolution
  units); the real delta lives in a small side table keyed by (tag, slot), purged when the
  slot is overwritten.

Tags are grouped by ring length into 2-D arrays (one row per tag), so a 16,000-tag group with
600 samples each is one 19.2 MB int16 array.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["ESCAPE", "MISSING", "History"]

MISSING = -32767
ESCAPE = -32768
_DMAX = 32767
_DMIN = -32766
# Quantized values are kept within ±2**62 so the int64 arithmetic never overflows.
_QMAX = float(2**62)

IntArray = npt.NDArray[np.int64]


class History:
    """Per-tag sample rings; ``lengths[i]`` samples for tag ``i`` (0 keeps none)."""

    def __init__(self, resolution: npt.ArrayLike, lengths: npt.ArrayLike) -> None:
        res = np.asarray(resolution, dtype=np.float64)
        lens = np.asarray(lengths, dtype=np.int64)
        if res.shape != lens.shape or res.ndim != 1:
            raise ValueError("resolution and lengths must be 1-D arrays of the same length")
        if np.any(res <= 0):
            raise ValueError("every resolution must be > 0")
        n = res.shape[0]
        self._res = res
        self._inv_res = 1.0 / res
        self._length = lens
        self._bucket = np.full(n, -1, dtype=np.int16)
        self._row = np.zeros(n, dtype=np.int64)
        self._rings: list[npt.NDArray[np.int16]] = []
        self._ring_len: list[int] = []
        for length in np.unique(lens):
            if length <= 0:
                continue
            members = np.flatnonzero(lens == length)
            self._bucket[members] = len(self._rings)
            self._row[members] = np.arange(members.shape[0])
            self._rings.append(np.full((members.shape[0], int(length)), MISSING, dtype=np.int16))
            self._ring_len.append(int(length))
        self._single = len(self._rings) == 1 and bool(np.all(self._bucket == 0))
        self._pos = np.zeros(n, dtype=np.int64)
        self._last = np.zeros(n, dtype=np.int64)
        self._has_last = np.zeros(n, dtype=bool)
        self._escapes: dict[tuple[int, int], int] = {}

    @property
    def nbytes(self) -> int:
        """Bytes held by the rings and per-tag state (the side table is not counted)."""
        rings = sum(r.nbytes for r in self._rings)
        per_tag = sum(
            a.nbytes
            for a in (
                *(self._res, self._inv_res, self._length, self._bucket, self._row),
                *(self._pos, self._last, self._has_last),
            )
        )
        return rings + per_tag

    @property
    def escapes(self) -> int:
        """Deltas currently held in the side table (steps too large for int16)."""
        return len(self._escapes)

    def length(self, index: int) -> int:
        return int(self._length[index])

    def count(self, index: int) -> int:
        """Samples ever appended for tag ``index``."""
        return int(self._pos[index])

    # ------------------------------------------------------------------------------- append

    def append(self, indices: npt.NDArray[np.int32], values: npt.NDArray[np.float64]) -> None:
        """Append one sample per index (indices unique within one call; NaN = no value)."""
        if indices.shape[0] == 0 or not self._rings:
            return
        if self._single:
            self._append_bucket(0, indices, values)
            return
        buckets = self._bucket[indices]
        first = buckets[0]
        if np.all(buckets == first):
            if first >= 0:
                self._append_bucket(int(first), indices, values)
            return
        for b in np.unique(buckets):
            if b < 0:
                continue
            mask = buckets == b
            self._append_bucket(int(b), indices[mask], values[mask])

    def _append_bucket(
        self, b: int, idx: npt.NDArray[np.int32], values: npt.NDArray[np.float64]
    ) -> None:
        ring = self._rings[b]
        length = self._ring_len[b]
        valid = np.isfinite(values)
        q = np.rint(values * self._inv_res[idx])
        np.maximum(q, -_QMAX, out=q)
        np.minimum(q, _QMAX, out=q)
        # NaN becomes 0 here; its slot is overwritten with MISSING below.
        qi = np.where(valid, q, 0.0).astype(np.int64)
        last = self._last[idx]
        has_last = self._has_last[idx]
        delta = qi - last
        # The first sample of a tag has nothing to be relative to; older slots are MISSING, so
        # its delta is never used when rebuilding.
        delta *= has_last
        big = valid & ((delta > _DMAX) | (delta < _DMIN))
        code = np.where(valid, np.where(big, ESCAPE, delta), MISSING).astype(np.int16)
        rows = self._row[idx]
        pos = self._pos[idx]
        slots = pos % length
        if self._escapes:
            old = ring[rows, slots]
            stale = old == ESCAPE
            if stale.any():
                for t, s in zip(idx[stale].tolist(), slots[stale].tolist(), strict=True):
                    self._escapes.pop((t, s), None)
        ring[rows, slots] = code
        if big.any():
            for t, s, d in zip(
                idx[big].tolist(), slots[big].tolist(), delta[big].tolist(), strict=True
            ):
                self._escapes[(t, s)] = d
        self._last[idx] = np.where(valid, qi, last)
        self._has_last[idx] = has_last | valid
        self._pos[idx] = pos + 1

    # ------------------------------------------------------------------------------- window

    def window(
        self,
        indices: npt.ArrayLike,
        n: int,
        *,
        dtype: type[np.floating[Any]] = np.float32,
    ) -> npt.NDArray[np.floating[Any]]:
        """The last ``n`` samples of each tag, oldest first: shape ``(len(indices), n)``.

        Samples not (yet) available, and samples read with bad quality, are NaN. ``n`` may not
        exceed a tag's ring length.
        """
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        out = np.full((idx.shape[0], n), np.nan, dtype=dtype)
        if idx.shape[0] == 0 or n == 0:
            return out
        buckets = self._bucket[idx]
        for b in np.unique(buckets):
            mask = buckets == b
            sel = idx[mask]
            if b < 0:
                raise ValueError(f"tag index {int(sel[0])} keeps no history")
            length = self._ring_len[int(b)]
            if n > length:
                raise ValueError(f"window of {n} samples exceeds the ring of {length} samples")
            out[mask] = self._window_bucket(int(b), sel, n)
        return out

    def _window_bucket(self, b: int, idx: IntArray, n: int) -> npt.NDArray[np.float64]:
        ring = self._rings[b]
        length = self._ring_len[b]
        pos = self._pos[idx][:, None] + np.arange(-n, 0)[None, :]
        slots = pos % length
        codes = ring[self._row[idx][:, None], slots]
        missing = (codes == MISSING) | (pos < 0)
        delta = codes.astype(np.int64)
        escaped = codes == ESCAPE
        if escaped.any():
            for r, c in zip(*np.nonzero(escaped), strict=True):
                delta[r, c] = self._escapes[(int(idx[r]), int(slots[r, c]))]
        delta[missing] = 0
        # value_j = last - sum of the deltas after j (suffix sum without j itself).
        suffix = np.cumsum(delta[:, ::-1], axis=1)[:, ::-1] - delta
        q = self._last[idx][:, None] - suffix
        values: npt.NDArray[np.float64] = q * self._res[idx][:, None]
        values[missing] = np.nan
        return values

    def clear(self) -> None:
        for ring in self._rings:
            ring.fill(MISSING)
        self._pos[:] = 0
        self._last[:] = 0
        self._has_last[:] = False
        self._escapes.clear()
