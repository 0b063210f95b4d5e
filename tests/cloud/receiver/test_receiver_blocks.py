"""Sample blocks: packing round trip, span splitting, and the time-ordered merge of blocks."""

from __future__ import annotations

import math

import numpy as np
import pytest

from edgeos_cloud.receiver.storage.blocks import (
    MAX_SPAN_US,
    BlockError,
    BlockMerger,
    Samples,
    decode_block,
    encode_blocks,
)

T0 = 1_700_000_000_000_000


def test_round_trip_sorts_and_keeps_text_nan_and_quality() -> None:
    ts = np.array([T0 + 2, T0, T0, T0 + 1], np.int64)
    tag = np.array([5, 9, 3, 3], np.int64)
    value = np.array([1.5, math.inf, 7.0, math.nan])
    quality = np.array([0, 1, 2, 40], np.uint8)
    (block,) = encode_blocks(ts, tag, value, quality, {1: "run", 3: None})
    assert (block.t_first, block.t_last, block.count) == (T0, T0 + 2, 4)
    got = decode_block(block.data, block.t_first)
    assert got.ts.tolist() == [T0, T0, T0 + 1, T0 + 2]
    assert got.tag.tolist() == [3, 9, 3, 5]
    assert got.quality.tolist() == [2, 1, 40, 0]
    assert got.value[0] == 7.0 and got.value[3] == 1.5
    assert math.isnan(got.value[1]) and math.isnan(got.value[2])  # string samples
    assert got.text == {1: "run", 2: None}


def test_batches_spanning_more_than_an_hour_are_split() -> None:
    ts = np.array([T0, T0 + 10, T0 + MAX_SPAN_US + 11, T0 + 3 * MAX_SPAN_US], np.int64)
    blocks = encode_blocks(
        ts, np.ones(4, np.int64), np.arange(4.0), np.zeros(4, np.uint8), {3: "x"}
    )
    assert [(b.t_first, b.t_last, b.count) for b in blocks] == [
        (T0, T0 + 10, 2),
        (T0 + MAX_SPAN_US + 11, T0 + MAX_SPAN_US + 11, 1),
        (T0 + 3 * MAX_SPAN_US, T0 + 3 * MAX_SPAN_US, 1),
    ]
    assert all(b.t_last - b.t_first <= MAX_SPAN_US for b in blocks)
    assert decode_block(blocks[2].data, blocks[2].t_first).text == {0: "x"}


def test_damaged_blocks_raise_block_error() -> None:
    (block,) = encode_blocks(
        np.array([T0], np.int64), np.array([1], np.int64), np.ones(1), np.zeros(1, np.uint8), {}
    )
    for data in (b"", block.data[:-3], b"\x28\xb5\x2f\xfd" + bytes(20)):
        with pytest.raises(BlockError):
            decode_block(data, T0)


def _block(ts: list[int], tags: list[int], values: list[float]) -> tuple[Samples, int]:
    (b,) = encode_blocks(
        np.array(ts, np.int64),
        np.array(tags, np.int64),
        np.array(values),
        np.zeros(len(ts), np.uint8),
        {},
    )
    return decode_block(b.data, b.t_first), b.t_first


def test_merger_orders_overlapping_blocks_and_keeps_the_first_stored_duplicate() -> None:
    early, t_early = _block([10, 20, 30], [1, 1, 1], [1.0, 2.0, 3.0])
    late, t_late = _block([15, 20, 40], [1, 1, 1], [1.5, 99.0, 4.0])  # 20 stored twice
    merger = BlockMerger(-(1 << 62), 1 << 62)
    # Read in t_first order; the block stored second (id 7) starts later.
    rows = list(merger.add(early, 3, t_early))
    assert rows == []  # nothing is known to precede the next block yet
    rows += list(merger.add(late, 7, t_late))
    assert rows == [(10, 1, 1.0, 0)]
    rows += list(merger.finish())
    assert [(r[0], r[2]) for r in rows] == [(10, 1.0), (15, 1.5), (20, 2.0), (30, 3.0), (40, 4.0)]


def test_merger_window_and_tag_filter() -> None:
    block, t_first = _block([10, 10, 20, 30], [1, 2, 1, 1], [1.0, 5.0, 2.0, 3.0])
    merger = BlockMerger(10, 30, tag_id=1)
    rows = [*merger.add(block, 1, t_first), *merger.finish()]
    assert rows == [(10, 1, 1.0, 0), (20, 1, 2.0, 0)]
