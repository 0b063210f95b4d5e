"""The oracle itself: a sample is matched to the serve it came from (never to a later one),
wrong values are caught, and only those inside an injected corruption window are excused."""

from __future__ import annotations

from typing import Any

import numpy as np

from edgeos_cloud.fleet.physics.layout import build_layout
from edgeos_sim.truth import GroundTruth, TruthLog
from edgeos_testing.oracle import Figures, Incarnation, evaluate
from edgeos_testing.receiverdb import LedgerBatch, ReceiverData, ScanSkip, StoredSample

LAYOUT = build_layout(1, 20)
TAG = LAYOUT.tags[3]
T0 = 1_800_000_000.0


def _truth(serves: list[tuple[float, float]]) -> GroundTruth:
    """One Modbus response per (time, value) of ``TAG`` (a one-register read)."""
    log = TruthLog(LAYOUT)
    index = np.array([LAYOUT.index(TAG.name)])
    for t, value in serves:
        regs = LAYOUT.encode(np.array([value]), index)
        log.record_modbus(t, TAG.modbus_unit, 3, TAG.modbus_address, regs)
    log.flush()
    return GroundTruth(LAYOUT, log._chunks)


def _data(samples: list[tuple[float, float]]) -> ReceiverData:
    rows = [StoredSample(f"{TAG.name}", int(t * 1e6), v, 0) for t, v in samples]
    batch = LedgerBatch(1, 1, int(T0 * 1e6) + 10**7, int(T0 * 1e6) + 10**7, len(rows), ())
    return ReceiverData([batch], rows, {}, {1: (1, 1)})


def _judge(
    serves: list[tuple[float, float]], samples: list[tuple[float, float]], **kw: Any
) -> Figures:
    return evaluate(_truth(serves), _data(samples), accepted={1: {1}}, window_checks=False, **kw)


def test_each_sample_maps_to_the_serve_before_its_scan_time() -> None:
    serves = [(T0 + k * 0.1, 10.0 + k) for k in range(10)]
    samples = [(t + 0.03, v) for t, v in serves]  # stamped when the read returned
    fig = _judge(serves, samples)
    assert (fig.mismatched, fig.order_violations, fig.duplicates) == (0, 0, 0)
    assert fig.clean


def test_a_serve_just_after_the_stamp_is_not_the_samples_source() -> None:
    """The old 2 ms slack: a scan stamped at the end of a long scan, the next scan's request
    served 1 ms later with the same value; the next sample must not look like a repeat."""
    serves = [(T0, 5.0), (T0 + 0.100, 5.0), (T0 + 0.181, 5.0)]
    samples = [(T0 + 0.180, 5.0), (T0 + 0.210, 5.0)]  # from serves #1 and #2
    fig = _judge(serves, samples)
    assert fig.order_violations == 0, fig.examples


def test_a_value_never_served_is_wrong_unless_corruption_was_injected_then() -> None:
    serves = [(T0 + k * 0.1, 20.0) for k in range(10)]
    samples = [(T0 + 0.05, 20.0), (T0 + 0.45, -41.8), (T0 + 0.85, 20.0)]
    plain = _judge(serves, samples)
    assert plain.mismatched == 1 and not plain.clean
    assert "mismatch" in plain.examples[0]
    excused = _judge(serves, samples, corrupt_windows=[(T0 + 0.3, T0 + 0.4)])
    assert excused.mismatched == 0 and excused.wrong_under_corruption == 1 and excused.clean
    elsewhere = _judge(serves, samples, corrupt_windows=[(T0 + 5.0, T0 + 6.0)])
    assert elsewhere.mismatched == 1


def test_the_same_sample_stored_twice_is_a_duplicate() -> None:
    serves = [(T0, 1.0), (T0 + 0.1, 2.0)]
    fig = _judge(serves, [(T0 + 0.02, 1.0), (T0 + 0.02, 1.0), (T0 + 0.12, 2.0)])
    assert fig.duplicates >= 1 and not fig.clean


def _holed(skips: tuple[ScanSkip, ...]) -> Figures:
    """One tag scanned every second for 30 s, scans 9 and 10 missing from the rows."""
    serves = [(T0 + k, float(k)) for k in range(30)]
    rows = [StoredSample(TAG.name, int((t + 0.02) * 1e6), v, 0) for t, v in serves]
    del rows[9:11]
    end_us = int((T0 + 31) * 1e6)
    batch = LedgerBatch(1, 1, end_us, end_us, len(rows), (), skips)
    return evaluate(
        _truth(serves),
        ReceiverData([batch], rows, {}, {1: (1, 1)}),
        accepted={1: {1}},
        incarnations=[Incarnation(T0 - 1, None)],
        tag_jobs={TAG.name: ("default", "line-plc", 1.0)},
    )


def _skip(job: str, first_k: int, last_k: int) -> ScanSkip:
    return ScanSkip(
        "default", job, int((T0 + first_k) * 1e6), int((T0 + last_k) * 1e6), last_k - first_k + 1
    )


def test_scans_the_runtime_announced_as_skipped_are_not_lost() -> None:
    fig = _holed((_skip("line-plc", 9, 10),))
    assert (fig.window_skipped, fig.window_lost, fig.scans_skipped_announced) == (2, 0, 2)
    assert fig.clean


def test_a_hole_without_an_announcement_of_its_own_job_is_lost() -> None:
    silent = _holed(())
    assert (silent.window_skipped, silent.window_lost) == (0, 2) and not silent.clean
    # Another connection's skipped scans do not explain this tag's hole.
    other = _holed((_skip("other-plc", 9, 10),))
    assert (other.window_skipped, other.window_lost) == (0, 2) and not other.clean


def test_an_announcement_excuses_no_more_scans_than_it_names() -> None:
    fig = _holed((_skip("line-plc", 9, 9),))
    assert (fig.window_skipped, fig.window_lost) == (1, 1) and not fig.clean


def test_a_late_stamp_after_a_skip_is_not_counted_as_a_second_missing_scan() -> None:
    """The scan after the hole took 0.66 s (a loaded machine): its row is stamped late, so the
    hole looks like 2.66 periods, but only one deadline (announced) had no scan."""
    serves = [(T0 + k, float(k)) for k in range(30)]
    rows = [StoredSample(TAG.name, int((t + 0.02) * 1e6), v, 0) for t, v in serves]
    rows[10] = StoredSample(TAG.name, int((T0 + 10.66) * 1e6), 10.0, 0)  # deadline 10, late
    del rows[9]  # deadline 9 skipped (announced)
    end_us = int((T0 + 31) * 1e6)
    batch = LedgerBatch(1, 1, end_us, end_us, len(rows), (), (_skip("line-plc", 9, 9),))
    fig = evaluate(
        _truth(serves),
        ReceiverData([batch], rows, {}, {1: (1, 1)}),
        accepted={1: {1}},
        incarnations=[Incarnation(T0 - 1, None)],
        tag_jobs={TAG.name: ("default", "line-plc", 1.0)},
    )
    assert (fig.window_skipped, fig.window_lost) == (1, 0), fig.examples
