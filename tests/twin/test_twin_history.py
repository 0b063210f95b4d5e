"""History rings: quantized int16 deltas, escapes for big steps, gaps, wrap-around."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeos.twin.history import History


def append_series(h: History, index: int, series: list[float]) -> None:
    idx = np.array([index], dtype=np.int32)
    for v in series:
        h.append(idx, np.array([v], dtype=np.float64))


def test_window_returns_last_samples_oldest_first_quantized() -> None:
    h = History([0.1, 0.01], [5, 5])
    append_series(h, 0, [1.0, 1.04, 1.26, 2.0])
    w = h.window([0], 5, dtype=np.float64)
    assert np.isnan(w[0, 0])  # only four samples so far
    assert w[0, 1:] == pytest.approx([1.0, 1.0, 1.3, 2.0])
    append_series(h, 0, [3.0, 4.0, 5.0])  # wraps the ring of 5
    assert h.window([0], 3, dtype=np.float64)[0] == pytest.approx([3.0, 4.0, 5.0])
    assert h.window([0], 5, dtype=np.float64)[0] == pytest.approx([1.3, 2.0, 3.0, 4.0, 5.0])
    # The other tag is untouched.
    assert np.isnan(h.window([1], 2)).all()


def test_bad_samples_are_nan_and_the_chain_continues_across_them() -> None:
    h = History([1.0], [6])
    append_series(h, 0, [10.0, float("nan"), float("nan"), 13.0, 12.0])
    w = h.window([0], 5, dtype=np.float64)[0]
    assert w[0] == 10.0
    assert np.isnan(w[1]) and np.isnan(w[2])
    assert list(w[3:]) == [13.0, 12.0]


def test_large_steps_use_the_escape_table_and_are_purged_on_wrap() -> None:
    h = History([0.001], [4])
    append_series(h, 0, [0.0, 1000.0, -1000.0, 5.0])  # steps of 1e6 units
    assert h.escapes == 3
    assert h.window([0], 4, dtype=np.float64)[0] == pytest.approx([0.0, 1000.0, -1000.0, 5.0])
    append_series(h, 0, [5.001, 5.002, 5.003, 5.004])
    assert h.escapes == 0
    assert h.window([0], 4, dtype=np.float64)[0] == pytest.approx([5.001, 5.002, 5.003, 5.004])


def test_tags_with_different_ring_lengths_and_mixed_blocks() -> None:
    h = History([1.0, 1.0, 1.0], [3, 10, 0])
    idx = np.array([0, 1, 2], dtype=np.int32)
    for k in range(12):
        h.append(idx, np.full(3, float(k)))
    assert list(h.window([0], 3, dtype=np.float64)[0]) == [9.0, 10.0, 11.0]
    assert list(h.window([1], 10, dtype=np.float64)[0]) == [float(k) for k in range(2, 12)]
    with pytest.raises(ValueError, match="exceeds the ring"):
        h.window([0], 4)
    with pytest.raises(ValueError, match="keeps no history"):
        h.window([2], 1)


def test_memory_is_two_bytes_per_sample() -> None:
    h = History(np.full(16_000, 0.01), np.full(16_000, 600))
    samples = 16_000 * 600
    assert h.nbytes < samples * 2 + 16_000 * 64
    assert h.nbytes / samples < 2.1


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.one_of(st.floats(-1e6, 1e6), st.just(float("nan"))),
        min_size=1,
        max_size=40,
    ),
    st.sampled_from([0.001, 0.1, 1.0, 25.0]),
)
def test_round_trip_within_half_a_resolution_step(series: list[float], res: float) -> None:
    length = 16
    h = History([res], [length])
    append_series(h, 0, series)
    n = min(len(series), length)
    got = h.window([0], n, dtype=np.float64)[0]
    want = np.array(series[-n:])
    assert np.array_equal(np.isnan(got), np.isnan(want))
    ok = ~np.isnan(want)
    assert np.all(np.abs(got[ok] - want[ok]) <= res / 2 + 1e-9 * np.maximum(1, np.abs(want[ok])))
