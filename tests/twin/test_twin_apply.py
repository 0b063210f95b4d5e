"""Twin.apply: change detection with deadbands and quality, columns, scan log, query."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest

from edgeos.clock import VirtualClock
from edgeos.config import ScanGroupConfig, TagConfig, TwinConfig
from edgeos.driver import Quality, ReadResult
from edgeos.twin import ScanBatch, ScanLog, ScanRecord, Twin


def tag(name: str, **kw: object) -> TagConfig:
    data: dict[str, object] = {
        "name": name,
        "connection": "plc",
        "modbus": {"address": 0, "type": "float32"},
        "resolution": 0.1,
    }
    data.update(kw)
    return TagConfig.model_validate(data)


def read(
    indices: Sequence[int],
    values: Sequence[float],
    quality: Sequence[int] | None = None,
    ts: float = 1.0,
    text: dict[int, str] | None = None,
) -> ReadResult:
    n = len(indices)
    return ReadResult(
        np.array(indices, dtype=np.int32),
        np.array(values, dtype=np.float64),
        np.array(quality if quality is not None else [Quality.GOOD] * n, dtype=np.uint8),
        np.full(n, ts),
        text=text or {},
    )


@pytest.fixture
def twin() -> Twin:
    tags = [
        tag("line.temp", deadband=0.5, unit="degC"),
        tag("line.press", unit="bar"),
        tag("line.count", modbus={"address": 2, "type": "uint16"}, resolution=None),
        tag("line.run", modbus={"address": 0, "table": "coil", "type": "bool"}, resolution=None),
        tag("line.recipe", modbus={"address": 4, "type": "string", "length": 4}, resolution=None),
    ]
    groups = [ScanGroupConfig(name="default", period_ms=1000)]
    return Twin(tags, TwinConfig(history_s=10), clock=VirtualClock(), scan_groups=groups)


def test_first_read_changes_everything_then_deadbands_apply(twin: Twin) -> None:
    assert (twin.quality == Quality.BAD_NO_VALUE).all()
    changed = twin.apply(read([0, 1], [20.0, 1.0]), recv_ts=10.0)
    assert list(changed) == [0, 1]
    assert list(twin.values[:2]) == [20.0, 1.0]
    assert twin.recv_ts[0] == 10.0

    # 0.3 is inside temp's deadband (0.5); any change of press counts (deadband 0).
    changed = twin.apply(read([0, 1], [20.3, 1.1]), recv_ts=11.0)
    assert list(changed) == [1]
    assert twin.values[0] == 20.3  # the value is current even when not a change
    # Drift accumulates against the last *reported* value, so it is reported eventually.
    changed = twin.apply(read([0, 1], [20.6, 1.1]), recv_ts=12.0)
    assert list(changed) == [0]
    assert list(twin.changes[:2]) == [2, 2]


def test_quality_changes_count_as_changes(twin: Twin) -> None:
    twin.apply(read([0], [20.0]), 1.0)
    changed = twin.apply(read([0], [float("nan")], [Quality.BAD_COMM]), 2.0)
    assert list(changed) == [0]
    assert twin.quality[0] == Quality.BAD_COMM
    assert list(twin.apply(read([0], [float("nan")], [Quality.BAD_COMM]), 3.0)) == []
    assert list(twin.apply(read([0], [20.0]), 4.0)) == [0]
    assert list(twin.apply(read([0], [20.0], [Quality.UNCERTAIN]), 5.0)) == [0]


def test_strings_live_in_a_side_table(twin: Twin) -> None:
    changed = twin.apply(read([4], [float("nan")], text={4: "R-17"}), 1.0)
    assert list(changed) == [4]
    assert twin.text(4) == "R-17"
    assert list(twin.apply(read([4], [float("nan")], text={4: "R-17"}), 2.0)) == []
    assert list(twin.apply(read([4], [float("nan")], text={4: "R-18"}), 3.0)) == [4]


def test_every_sample_reaches_history_and_the_scan_log(twin: Twin) -> None:
    for k in range(5):
        twin.apply(read([0, 1], [20.0 + k * 0.1, 1.0]), recv_ts=float(k))
    assert twin.window([0, 1], 5, dtype=np.float64) == pytest.approx(
        np.array([[20.0, 20.1, 20.2, 20.3, 20.4], [1.0] * 5])
    )
    records = twin.scan_log.drain()
    assert [r.recv_ts for r in records] == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert [list(r.changed) for r in records] == [[True, True]] + [[False, False]] * 4
    assert twin.scan_log.drain() == []


def test_scan_log_copies_the_drivers_buffers(twin: Twin) -> None:
    result = read([0, 1], [20.0, 1.0])
    twin.apply(result, 1.0)
    result.values[:] = 99.0  # a driver reusing its buffer
    (record,) = twin.scan_log.drain()
    assert list(record.values) == [20.0, 1.0]


def test_scan_log_is_bounded_and_counts_drops() -> None:
    log = ScanLog(max_samples=5)
    for k in range(4):
        n = 2
        log.append(
            ScanRecord(
                float(k),
                np.arange(n, dtype=np.int32),
                np.zeros(n),
                np.zeros(n, dtype=np.uint8),
                np.zeros(n),
                np.zeros(n, dtype=bool),
            )
        )
    assert len(log) == 4
    assert log.dropped_samples == 4
    batch = log.drain_batch()
    assert isinstance(batch, ScanBatch)
    assert list(batch.recv_ts) == [2.0, 3.0]
    assert list(batch.offsets) == [0, 2, 4]
    assert len(batch) == 4
    assert len(ScanBatch.concat([])) == 0


def test_subscribers_see_each_record_until_they_unsubscribe(twin: Twin) -> None:
    seen: list[float] = []
    unsubscribe = twin.subscribe(lambda r: seen.append(r.recv_ts))
    twin.apply(read([0], [1.0]), 1.0)
    unsubscribe()
    twin.apply(read([0], [2.0]), 2.0)
    assert seen == [1.0]


def test_query_globs_names_and_formats_values(twin: Twin) -> None:
    twin.apply(read([0, 2, 3], [20.25, 7.0, 1.0], ts=123.0), 124.0)
    rows = {r["name"]: r for r in twin.query("line.*")}
    assert set(rows) == {"line.temp", "line.press", "line.count", "line.run", "line.recipe"}
    assert rows["line.temp"] == {
        "name": "line.temp",
        "value": 20.25,
        "quality": "GOOD",
        "ts": 123.0,
        "unit": "degC",
        "changes": 1,
    }
    assert rows["line.count"]["value"] == 7 and isinstance(rows["line.count"]["value"], int)
    assert rows["line.run"]["value"] is True
    assert rows["line.press"]["value"] is None
    assert rows["line.press"]["quality"] == "BAD_NO_VALUE"
    assert [r["name"] for r in twin.query("*.t?mp")] == ["line.temp"]
    assert twin.query("nothing*") == []
    assert list(twin.indices("line.c*")) == [2]


def test_views_are_read_only(twin: Twin) -> None:
    with pytest.raises(ValueError, match="read-only"):
        twin.values[0] = 1.0


def test_duplicate_names_are_refused() -> None:
    with pytest.raises(ValueError, match="duplicate tag names: a"):
        Twin([tag("a"), tag("a")], TwinConfig(), clock=VirtualClock())


def test_history_length_follows_the_scan_period_with_a_cap() -> None:
    tags = [tag("fast.x", scan_group="fast"), tag("slow.x", scan_group="slow"), tag("other.x")]
    groups = [
        ScanGroupConfig(name="fast", period_ms=10),
        ScanGroupConfig(name="slow", period_ms=1000),
    ]
    twin = Twin(
        tags,
        TwinConfig(history_s=600),
        clock=VirtualClock(),
        scan_groups=groups,
        max_history_samples=6000,
    )
    assert [twin.history.length(i) for i in range(3)] == [6000, 600, 600]
    none = Twin(tags, TwinConfig(history_s=0), clock=VirtualClock(), scan_groups=groups)
    assert none.history.nbytes < 1000


def test_without_a_consumer_the_scan_log_stays_empty() -> None:
    from edgeos.clock import VirtualClock
    from edgeos.config import TwinConfig
    from edgeos.twin import Twin
    from edgeos_testing.twin_synthetic import SyntheticLine, line_tags

    tags = line_tags(1, 20)
    twin = Twin(tags, TwinConfig(), clock=VirtualClock(), keep_scan_log=False)
    line = SyntheticLine([0], 20)
    for k in range(50):
        twin.apply(line.read(0, float(k)), float(k))
    assert len(twin.scan_log) == 0 and twin.applied_samples == 1000
    assert twin.window([0], 10).shape[-1] == 10  # history is still kept for the models
