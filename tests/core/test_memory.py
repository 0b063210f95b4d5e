"""Memory diagnosis: process figures, heap by type, tracemalloc snapshots and their comparison."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import pytest

from edgeos.memory import compare_snapshots, memory_report, process_figures


class Hoarded:
    pass


HOARD_LINE = next(
    n
    for n, line in enumerate(Path(__file__).read_text().splitlines(), 1)
    if line.strip().startswith("hoard = [Hoarded()")
)


def test_process_figures_are_read_from_proc() -> None:
    figures = process_figures()
    assert figures["rss_mb"] > 5
    assert figures["rss_peak_mb"] >= figures["rss_mb"]
    assert figures["py_blocks"] > 1000 and figures["threads"] >= 1 and figures["open_files"] > 2


def test_growth_between_two_snapshots_names_the_line_that_allocated(tmp_path: Path) -> None:
    tracemalloc.start(1)
    try:
        first = memory_report(top=0, dump=tmp_path / "a.snapshot")
        hoard = [Hoarded() for _ in range(20_000)]  # the comparison must name this line
        # Every type, not the top 10: in a full test session (hundreds of tests' modules and
        # objects) ten other types outnumber 20,000 objects and the hoard fell off the list.
        second = memory_report(top=100_000, dump=tmp_path / "b.snapshot")
    finally:
        tracemalloc.stop()
    assert first["tracemalloc"]["dumped"] == str(tmp_path / "a.snapshot")
    assert dict(second["types"]).get("Hoarded", 0) >= 20_000
    lines = compare_snapshots(tmp_path / "a.snapshot", tmp_path / "b.snapshot", top=3)
    assert lines[0].endswith(f"test_memory.py:{HOARD_LINE}")
    assert int(lines[0].split("KiB")[1].split()[0]) >= 20_000  # objects (and their dicts)
    assert len(hoard) == 20_000


def test_a_snapshot_without_tracing_is_a_clear_error(tmp_path: Path) -> None:
    assert not tracemalloc.is_tracing()
    with pytest.raises(ValueError, match="PYTHONTRACEMALLOC"):
        memory_report(top=0, dump=tmp_path / "x.snapshot")
    assert memory_report(top=0)["tracemalloc"] == {"tracing": False}
