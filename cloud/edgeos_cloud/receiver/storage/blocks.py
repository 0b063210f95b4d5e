"""Sample blocks: a batch's samples packed into one row (``sample_blocks.data``).

One row per sample made the database do per-sample work (a B-tree entry in SQLite, a heap
tuple plus an index entry in PostgreSQL): 16,000 tags x 3 scans = 48,000 rows per batch.
A block holds all samples of one batch (split where a batch spans more than
:data:`MAX_SPAN_US`), sorted by ``(ts, tag_id)`` — the order queries return — as columns:

=========  =================================================================================
``ts``     int64 µs, delta-coded (the first value relative to the row's ``t_first``)
``tag``    int64 tag ids (``tags.id``), delta-coded
``val``    float64; NaN when the quality is not usable, and for string samples
``q``      uint8 quality codes (``edgeos.driver.Quality``)
``si``     int64 positions of the string samples (delta-coded) and ``s`` their values
           (``null`` when not usable)
=========  =================================================================================

Integer and float columns are stored byte-shuffled (the first byte of every value, then the
second, …) so zstd sees the runs of equal high bytes; the document is ``msgpack`` and the
whole is one zstd frame (level 1). On the benchmark's line that is ~2.5 bytes per sample
(values are stored exactly, not quantized as on the wire) and ~1 ms per 48,000 samples.

A reader selects the blocks whose ``[t_first, t_last]`` overlaps its window; because no block
spans more than :data:`MAX_SPAN_US`, an index on ``(device_id, t_first)`` bounds that search.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import msgpack  # type: ignore[import-untyped, unused-ignore]
import numpy as np
import numpy.typing as npt
import zstandard

__all__ = [
    "BLOCK_FORMAT",
    "MAX_SPAN_US",
    "Block",
    "BlockError",
    "BlockMerger",
    "Samples",
    "decode_block",
    "encode_blocks",
]

#: Version of the block document (``"v"``); readers refuse others.
BLOCK_FORMAT = 1
#: Longest time a block covers (1 h); longer batches (a device clock jump) are split.
MAX_SPAN_US = 3_600_000_000
_ZSTD_LEVEL = 1
_MAX_BLOCK_BYTES = 1 << 30


class BlockError(ValueError):
    """A stored block does not decode (corruption, or a format this code does not know)."""


@dataclass(frozen=True, slots=True)
class Block:
    """One encoded block: the row ``(t_first, t_last, count, data)``."""

    t_first: int
    t_last: int
    count: int
    data: bytes


@dataclass(slots=True)
class Samples:
    """Decoded (or to-be-encoded) samples, parallel arrays sorted by ``(ts, tag)``.

    ``text`` maps a position to its string value (``None``: not usable) for string samples.
    """

    ts: npt.NDArray[np.int64]
    tag: npt.NDArray[np.int64]
    value: npt.NDArray[np.float64]
    quality: npt.NDArray[np.uint8]
    text: dict[int, str | None]

    def __len__(self) -> int:
        return int(self.ts.shape[0])


def _shuffle(a: npt.NDArray[Any]) -> bytes:
    """Little-endian bytes as planes: byte 0 of every value, then byte 1, …"""
    le = a.astype(a.dtype.newbyteorder("<"), copy=False)
    return np.ascontiguousarray(le.view(np.uint8).reshape(-1, a.itemsize).T).tobytes()


def _unshuffle(raw: Any, dtype: str, count: int) -> npt.NDArray[Any]:
    dt = np.dtype(dtype)
    if not isinstance(raw, bytes) or len(raw) != dt.itemsize * count:
        raise BlockError(f"column of {dtype} has the wrong size")
    planes = np.frombuffer(raw, np.uint8).reshape(dt.itemsize, count)
    return np.ascontiguousarray(planes.T).view(dt).reshape(count)


def _delta(a: npt.NDArray[np.int64], first: int) -> npt.NDArray[np.int64]:
    out = np.empty_like(a)
    if a.shape[0]:
        out[0] = a[0] - first
        np.subtract(a[1:], a[:-1], out=out[1:])
    return out


def encode_blocks(
    ts: npt.NDArray[np.int64],
    tag: npt.NDArray[np.int64],
    value: npt.NDArray[np.float64],
    quality: npt.NDArray[np.uint8],
    text: dict[int, str | None],
) -> list[Block]:
    """Sort one batch's samples by ``(ts, tag)`` and pack them into blocks.

    ``text`` maps positions in the *input* arrays to string values; their ``value`` entries
    are ignored (stored as NaN).
    """
    n = int(ts.shape[0])
    if not n:
        return []
    dts = np.diff(ts)
    if bool(np.all((dts > 0) | ((dts == 0) & (np.diff(tag) > 0)))):
        order = np.arange(n)  # decoded batches usually come sorted: skip the lexsort
    else:
        order = np.lexsort((tag, ts))
    ts, tag = ts[order], tag[order]
    value, quality = value[order].astype(np.float64), quality[order].astype(np.uint8)
    positions = np.empty(0, np.int64)
    strings: list[str | None] = []
    if text:
        is_text = np.zeros(n, bool)
        is_text[np.fromiter(text, np.int64, len(text))] = True
        is_text = is_text[order]
        positions = np.flatnonzero(is_text).astype(np.int64)
        strings = [text[int(p)] for p in order[positions].tolist()]
        value = value.copy()
        value[positions] = np.nan
    # Split where the span would exceed MAX_SPAN_US (rare: only a batch whose rows are more
    # than an hour apart).
    cuts = [0]
    if int(ts[-1]) - int(ts[0]) > MAX_SPAN_US:
        start = int(ts[0])
        for i in range(1, n):
            if int(ts[i]) - start > MAX_SPAN_US:
                cuts.append(i)
                start = int(ts[i])
    cuts.append(n)
    blocks = []
    for lo, hi in itertools.pairwise(cuts):
        sel = slice(lo, hi)
        pos = positions[(positions >= lo) & (positions < hi)]
        t_first = int(ts[lo])
        doc = {
            "v": BLOCK_FORMAT,
            "n": hi - lo,
            "ts": _shuffle(_delta(ts[sel], t_first)),
            "tag": _shuffle(_delta(tag[sel], 0)),
            "val": _shuffle(value[sel]),
            "q": quality[sel].tobytes(),
            "si": _shuffle(_delta(pos - lo, 0)),
            "s": [strings[int(i)] for i in np.searchsorted(positions, pos).tolist()],
        }
        data = zstandard.ZstdCompressor(level=_ZSTD_LEVEL).compress(msgpack.packb(doc))
        blocks.append(Block(t_first, int(ts[hi - 1]), hi - lo, data))
    return blocks


def decode_block(data: bytes, t_first: int) -> Samples:
    """Unpack a block written by :func:`encode_blocks`; raises :class:`BlockError`."""
    try:
        raw = zstandard.ZstdDecompressor().decompress(bytes(data), max_output_size=_MAX_BLOCK_BYTES)
        doc = msgpack.unpackb(raw, raw=False)
    except (zstandard.ZstdError, ValueError, msgpack.ExtraData, msgpack.FormatError) as exc:
        raise BlockError(f"sample block does not decode: {exc}") from None
    if not isinstance(doc, dict) or doc.get("v") != BLOCK_FORMAT:
        raise BlockError(f"sample block format {doc.get('v') if isinstance(doc, dict) else '?'}")
    n = doc.get("n")
    strings = doc.get("s")
    if not isinstance(n, int) or n < 0 or not isinstance(strings, list):
        raise BlockError("sample block header is damaged")
    ts = np.cumsum(_unshuffle(doc.get("ts"), "<i8", n)) + t_first
    tag = np.cumsum(_unshuffle(doc.get("tag"), "<i8", n))
    value = _unshuffle(doc.get("val"), "<f8", n)
    q = doc.get("q")
    if not isinstance(q, bytes) or len(q) != n:
        raise BlockError("quality column has the wrong size")
    quality = np.frombuffer(q, np.uint8)
    si = doc.get("si")
    count = len(si) // 8 if isinstance(si, bytes) else -1
    if count != len(strings):
        raise BlockError("string columns disagree")
    positions = np.cumsum(_unshuffle(si, "<i8", count)).tolist()
    return Samples(
        ts.astype(np.int64, copy=False),
        tag.astype(np.int64, copy=False),
        value.astype(np.float64, copy=False),
        quality,
        dict(zip(positions, strings, strict=True)),
    )


class BlockMerger:
    """Turns blocks read in ``(t_first, id)`` order into rows in ``(ts, tag)`` order.

    Blocks of one device may overlap in time (a backlog drained after fresh data), so rows are
    held until no later block can precede them: :meth:`add` emits the rows before the new
    block's ``t_first``, :meth:`finish` the rest. An identical ``(ts, tag)`` stored twice (a
    device that re-sends samples under a new epoch after its state was restored) is returned
    once, from the block stored first.
    """

    def __init__(self, since_us: int, until_us: int, tag_id: int | None = None) -> None:
        self.since_us = since_us
        self.until_us = until_us
        self.tag_id = tag_id
        self._pending: list[tuple[npt.NDArray[Any], ...]] = []

    def add(
        self, samples: Samples, block_id: int, t_first: int
    ) -> Iterator[tuple[int, int, float | str | None, int]]:
        """Take a block; yield the rows now known to come before every later block."""
        keep = (samples.ts >= self.since_us) & (samples.ts < self.until_us)
        if self.tag_id is not None:
            keep &= samples.tag == self.tag_id
        if keep.any():
            n = len(samples)
            is_text = np.zeros(n, bool)
            text = np.full(n, None, object)
            if samples.text:
                pos = np.fromiter(samples.text, np.int64, len(samples.text))
                is_text[pos] = True
                text[pos] = list(samples.text.values())
            self._pending.append(
                (
                    samples.ts[keep],
                    samples.tag[keep],
                    samples.value[keep],
                    samples.quality[keep],
                    is_text[keep],
                    text[keep],
                    np.full(int(np.count_nonzero(keep)), block_id, np.int64),
                )
            )
        yield from self._flush(t_first)

    def finish(self) -> Iterator[tuple[int, int, float | str | None, int]]:
        yield from self._flush(None)

    def _flush(self, before: int | None) -> Iterator[tuple[int, int, float | str | None, int]]:
        if not self._pending:
            return
        cols = (
            self._pending[0]
            if len(self._pending) == 1
            else tuple(np.concatenate(c) for c in zip(*self._pending, strict=True))
        )
        ts = cols[0]
        if before is None:
            self._pending = []
            out = cols
        else:
            ready = ts < before
            if not ready.any():
                self._pending = [cols]
                return
            self._pending = [tuple(c[~ready] for c in cols)] if not ready.all() else []
            out = tuple(c[ready] for c in cols)
        ts, tag, value, quality, is_text, text, block = out
        order = np.lexsort((block, tag, ts))
        ts, tag = ts[order], tag[order]
        first = np.ones(ts.shape[0], bool)
        first[1:] = (ts[1:] != ts[:-1]) | (tag[1:] != tag[:-1])
        order = order[first]
        ts, tag = ts[first], tag[first]
        value, quality, is_text, text = value[order], quality[order], is_text[order], text[order]
        values = value.astype(object)
        values[np.isnan(value)] = None
        values[is_text] = text[is_text]
        yield from zip(ts.tolist(), tag.tolist(), values.tolist(), quality.tolist(), strict=True)
