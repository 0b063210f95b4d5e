"""Storage back-ends (parametrized: SQLite and PostgreSQL) pass the same contract tests."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from edgeos_cloud.receiver.ingest import BatchOpener
from edgeos_cloud.receiver.registry import DeviceRegistry
from edgeos_cloud.receiver.storage import IngestBatch, StoreOutcome, open_storage
from edgeos_protocol.crypto import Epoch, Keyring
from edgeos_protocol.wire import encode_body, seal_batch
from edgeos_testing.devsim import simple_batch

T0 = 1_700_000_000_000_000


def _batches(
    registry: DeviceRegistry, device: str, count: int, start_s: int = 0
) -> list[IngestBatch]:
    record = registry.get(device) or registry.add(device)
    epoch = Epoch.new(Keyring.of(record.current_key), device)
    opener = BatchOpener(registry)
    out = []
    for i in range(count):
        ts = [T0 + (start_s + 2 * i) * 1_000_000, T0 + (start_s + 2 * i + 1) * 1_000_000]
        batch = simple_batch(
            {"temp": [20.0 + i, 20.5 + i], "press": [1.0, math.nan]},
            ts,
            text={"recipe": [f"r{i}", f"r{i}b"]},
            events=[{"type": "gate", "ts_us": ts[0], "verdict": "ok"}],
        )
        batch.groups[0].quality[1, 1] = 17  # press not usable in row 1
        _, sealed = seal_batch(epoch, encode_body(batch), ts[-1])
        out.append(opener.open(sealed, ts[-1] + 1000, device))
    return out


def test_store_deduplicates_and_acks_contiguous(storage_url: str, registry: DeviceRegistry) -> None:
    storage = open_storage(storage_url)
    try:
        b = _batches(registry, "gw1", 5)
        # Out of order with a gap: 1, 3 → ack stays at 1 until 2 arrives.
        out = storage.store([b[0], b[2]])
        assert [(o.seq, o.stored, o.ack_seq) for o in out] == [(1, True, 1), (3, True, 1)]
        assert storage.device_summaries()[0].backlog == 1
        out = storage.store([b[1]])
        assert [(o.seq, o.stored, o.ack_seq) for o in out] == [(2, True, 3)]
        # The same batch twice (also within one transaction) is stored once, acked again.
        out = storage.store([b[3], b[3], b[1]])
        assert [(o.seq, o.stored, o.ack_seq) for o in out] == [
            (4, True, 4),
            (4, False, 4),
            (2, False, 4),
        ]
        rows = list(storage.query_samples("gw1", "temp"))
        assert [r.value for r in rows] == [20.0, 20.5, 21.0, 21.5, 22.0, 22.5, 23.0, 23.5]
        summary = storage.device_summaries()[0]
        assert (summary.device, summary.batches, summary.backlog) == ("gw1", 4, 0)
        assert summary.samples == sum(x.sample_count for x in b[:4])
    finally:
        storage.close()


def test_query_order_text_quality_and_window(storage_url: str, registry: DeviceRegistry) -> None:
    storage = open_storage(storage_url)
    try:
        storage.store(_batches(registry, "gw1", 2))
        rows = list(storage.query_samples("gw1"))
        assert [r.ts_us for r in rows] == sorted(r.ts_us for r in rows)
        assert len(rows) == 12
        by_tag = {(r.tag, r.ts_us): r for r in rows}
        bad = by_tag[("press", T0 + 1_000_000)]
        assert (bad.value, bad.quality) == (None, 17)
        assert by_tag[("recipe", T0 + 3_000_000)].value == "r1b"
        window = list(
            storage.query_samples("gw1", since_us=T0 + 1_000_000, until_us=T0 + 3_000_000)
        )
        assert {r.ts_us for r in window} == {T0 + 1_000_000, T0 + 2_000_000}
        assert list(storage.query_samples("gw1", "nope")) == []
        assert list(storage.query_samples("unknown")) == []
        assert len(list(storage.query_samples("gw1", limit=5))) == 5
        events = storage.events("gw1")
        assert [e["verdict"] for e in events] == ["ok", "ok"]
    finally:
        storage.close()


def test_reported_shadow_keeps_latest_per_tag(storage_url: str, registry: DeviceRegistry) -> None:
    storage = open_storage(storage_url)
    try:
        batches = _batches(registry, "gw1", 3)
        storage.store([batches[2]])
        storage.store([batches[0]])  # older data arriving late must not win
        reported = storage.reported("gw1")
        assert reported["temp"].value == 22.5
        assert reported["temp"].ts_us == T0 + 5_000_000
        assert reported["recipe"].value == "r2b"
        assert reported["press"].quality == 17
    finally:
        storage.close()


def test_commands_and_rejects(storage_url: str, registry: DeviceRegistry) -> None:
    storage = open_storage(storage_url)
    try:
        c1 = storage.enqueue_command("gw1", {"setpoint": 42.5}, 1000)
        c2 = storage.enqueue_command("gw1", {"mode": "auto"}, 2000)
        assert (c1.version, c2.version) == (1, 2)
        assert [c.version for c in storage.due_commands(3000, 10_000)] == [1, 2]
        storage.mark_sent("gw1", 1, 3000)
        assert [c.version for c in storage.due_commands(4000, 10_000)] == [2]
        assert [c.version for c in storage.due_commands(13_000, 10_000)] == [1, 2]
        assert storage.record_command_result("gw1", 1, True, {"setpoint": "applied"}, 5000)
        assert not storage.record_command_result("gw1", 9, True, {}, 5000)
        storage.record_command_result("gw1", 2, False, {"mode": "not writable"}, 6000)
        status = {c.version: (c.status, c.results) for c in storage.commands("gw1")}
        assert status == {
            1: ("applied", {"setpoint": "applied"}),
            2: ("refused", {"mode": "not writable"}),
        }
        assert storage.due_commands(100_000, 10) == []
        storage.record_rejects({("gw1", "forged"): 2, ("ghost", "unknown_device"): 1}, 1)
        storage.record_rejects({("gw1", "forged"): 1}, 2)
        summaries = {s.device: s.rejects for s in storage.device_summaries()}
        assert summaries == {"gw1": {"forged": 3}, "ghost": {"unknown_device": 1}}
    finally:
        storage.close()


def test_reopen_keeps_data_and_rejects_unknown_urls(
    storage_url: str, registry: DeviceRegistry
) -> None:
    storage = open_storage(storage_url)
    storage.store(_batches(registry, "gw1", 1))
    storage.close()
    storage = open_storage(storage_url)
    try:
        assert len(list(storage.query_samples("gw1"))) == 6
    finally:
        storage.close()
    with pytest.raises(ValueError, match="unsupported storage url"):
        open_storage("mysql://x")


def test_large_batch_roundtrip_values(storage_url: str, registry: DeviceRegistry) -> None:
    """A 16,000-tag batch: every stored value equals the decoded one (bulk insert paths)."""
    from edgeos_protocol.wire import Batch, Group
    from edgeos_testing.uplink_synth import SyntheticLine

    line = SyntheticLine(nests=20, tags_per_nest=100, seed=3)
    record = registry.add("big")
    epoch = Epoch.new(Keyring.of(record.current_key), "big")
    scans = [line.scan() for _ in range(3)]
    group = Group(
        np.array([T0, T0 + 1_000_000, T0 + 2_000_000], np.int64),
        np.arange(line.tag_count, dtype=np.int32),
        np.stack([s[0] for s in scans]),
        np.stack([s[1] for s in scans]),
    )
    _, sealed = seal_batch(epoch, encode_body(Batch(line.table, [group])), T0)
    batch = BatchOpener(registry).open(sealed, T0, "big")
    storage = open_storage(storage_url)
    try:
        storage.store([batch])
        rows = list(storage.query_samples("big"))
        assert len(rows) == batch.sample_count == 3 * line.tag_count
        expected = {
            (line.table.names[t], int(ts)): (None if math.isnan(v) else v, int(q))
            for t, ts, v, q in zip(
                batch.tag, batch.ts_us, batch.value.tolist(), batch.quality, strict=True
            )
        }
        got = {(r.tag, r.ts_us): (r.value, r.quality) for r in rows}
        assert got == expected
    finally:
        storage.close()


class _Device:
    """Seals numbered batches of one epoch; ``take(n)`` burns sequence numbers (lost batches)."""

    def __init__(self, registry: DeviceRegistry, device: str = "gw1") -> None:
        record = registry.get(device) or registry.add(device)
        self.keyring = Keyring.of(record.current_key)
        self.device = device
        self.opener = BatchOpener(registry)
        self.epoch = Epoch.new(self.keyring, device)

    def new_epoch(self) -> int:
        self.epoch = Epoch.new(self.keyring, self.device)
        return self.epoch.epoch

    def take(self, count: int) -> None:
        for _ in range(count):
            self.next()

    def next(self, skip: list[list[int]] | None = None) -> IngestBatch:
        seq = self.epoch.last_seq + 1
        batch = simple_batch({"temp": [float(seq)]}, [T0 + seq * 1_000_000])
        if skip is not None:
            batch.meta["skip"] = skip
        _, sealed = seal_batch(self.epoch, encode_body(batch), T0)
        return self.opener.open(sealed, T0, self.device)


def _acks(outcomes: list[StoreOutcome]) -> list[tuple[int, bool, int]]:
    return [(o.seq, o.stored, o.ack_seq) for o in outcomes]


def test_announced_skips_count_as_present(storage_url: str, registry: DeviceRegistry) -> None:
    dev = _Device(registry)
    e = dev.epoch.epoch
    storage = open_storage(storage_url)
    try:
        assert _acks(storage.store([dev.next(), dev.next()])) == [(1, True, 2), (2, True, 2)]
        dev.take(3)  # 3–5: refused by the spool, never sent
        assert _acks(storage.store([dev.next(skip=[[e, 3, 5]])])) == [(6, True, 6)]
        # The device repeats the announcement until the ack reaches it: harmless.
        assert _acks(storage.store([dev.next(skip=[[e, 3, 5]])])) == [(7, True, 7)]
        (summary,) = storage.device_summaries()
        assert (summary.backlog, summary.skipped, summary.skipped_ranges) == (0, 3, ((e, 3, 5),))
    finally:
        storage.close()


def test_unannounced_gap_still_holds_the_ack(storage_url: str, registry: DeviceRegistry) -> None:
    dev = _Device(registry)
    e = dev.epoch.epoch
    storage = open_storage(storage_url)
    try:
        storage.store([dev.next(), dev.next()])
        dev.take(2)  # 3–4 announced below
        late = dev.next()  # 5: in flight, arrives last
        out = storage.store([dev.next(skip=[[e, 3, 4]])])  # 6
        assert _acks(out) == [(6, True, 4)]  # past the skipped 3–4; 5 is missing
        (summary,) = storage.device_summaries()
        assert (summary.backlog, summary.skipped) == (1, 2)
        assert _acks(storage.store([late])) == [(5, True, 6)]
        (summary,) = storage.device_summaries()
        assert (summary.backlog, summary.skipped) == (0, 2)
    finally:
        storage.close()


def test_skips_of_an_epoch_already_acked_past_are_harmless(
    storage_url: str, registry: DeviceRegistry
) -> None:
    dev = _Device(registry)
    old = dev.epoch.epoch
    storage = open_storage(storage_url)
    try:
        storage.store([dev.next(), dev.next(), dev.next()])  # old epoch acked up to 3
        # 2 was delivered, then dropped from the spool before its ack arrived: announced anyway.
        assert _acks(storage.store([dev.next(skip=[[old, 2, 2]])])) == [(4, True, 4)]
        new = dev.new_epoch()
        out = storage.store([dev.next(skip=[[old, 1, 3]])])
        assert _acks(out) == [(1, True, 1)]
        assert out[0].other_acks == ((old, 4),)  # re-acked, so the device can forget the gap
        (summary,) = storage.device_summaries()
        assert (summary.batches, summary.backlog, summary.skipped) == (5, 0, 0)
        assert new != old
    finally:
        storage.close()


def test_skips_move_an_older_epochs_mark(storage_url: str, registry: DeviceRegistry) -> None:
    dev = _Device(registry)
    old = dev.epoch.epoch
    storage = open_storage(storage_url)
    try:
        first = dev.next()
        dev.take(2)  # 2–3 dropped with the spool's oldest segment after a restart
        storage.store([first, dev.next()])  # 1 and 4
        dev.take(1)  # 5 lost too: the old epoch ends at 5
        dev.new_epoch()
        out = storage.store([dev.next(skip=[[old, 2, 3], [old, 5, 5]])])
        assert _acks(out) == [(1, True, 1)]
        assert out[0].other_acks == ((old, 5),)
        (summary,) = storage.device_summaries()
        assert (summary.backlog, summary.skipped) == (0, 3)
        assert summary.skipped_ranges == ((old, 2, 3), (old, 5, 5))
    finally:
        storage.close()


def test_replayed_batch_with_stale_skip_list_changes_nothing(
    storage_url: str, registry: DeviceRegistry
) -> None:
    dev = _Device(registry)
    e = dev.epoch.epoch
    storage = open_storage(storage_url)
    try:
        storage.store([dev.next()])
        dev.take(1)
        stale = dev.next(skip=[[e, 2, 2]])  # 3
        storage.store([stale])
        dev.take(1)
        storage.store([dev.next(skip=[[e, 4, 4]])])  # 5; the device forgot 2 (acked past)
        before = storage.device_summaries()
        out = storage.store([stale])
        assert _acks(out) == [(3, False, 5)]
        assert out[0].other_acks == ()
        assert storage.device_summaries() == before
        assert before[0].skipped_ranges == ((e, 2, 2), (e, 4, 4))
    finally:
        storage.close()


def test_overlapping_batches_and_resent_samples_query_in_order(
    storage_url: str, registry: DeviceRegistry
) -> None:
    """A drained backlog interleaves with fresh data; a restored device re-sends samples."""
    first = _Device(registry)
    storage = open_storage(storage_url)
    try:

        def batch(dev: _Device, times: list[int], value: float) -> IngestBatch:
            sealed = seal_batch(
                dev.epoch,
                encode_body(simple_batch({"t": [value] * len(times)}, [T0 + t for t in times])),
                T0,
            )[1]
            return dev.opener.open(sealed, T0, dev.device)

        storage.store([batch(first, [10, 30], 1.0)])
        storage.store([batch(first, [0, 20, 40], 2.0)])  # older backlog, stored later
        restored = _Device(registry)  # same device, new epoch, same samples again
        storage.store([batch(restored, [30, 40], 3.0)])
        rows = list(storage.query_samples("gw1"))
        assert [(r.ts_us - T0, r.value) for r in rows] == [
            (0, 2.0),
            (10, 1.0),
            (20, 2.0),
            (30, 1.0),  # first stored wins
            (40, 2.0),
        ]
        window = storage.query_samples("gw1", "t", since_us=T0 + 10, until_us=T0 + 40, limit=2)
        assert [r.ts_us - T0 for r in window] == [10, 20]
        assert list(storage.query_samples("gw1", limit=0)) == []
    finally:
        storage.close()


def test_schema_version_1_is_migrated(storage_url: str, registry: DeviceRegistry) -> None:
    """A database of one row per sample (schema 1) is packed into blocks when opened."""
    storage = open_storage(storage_url)
    pg = storage_url.startswith("postgres")
    real = "DOUBLE PRECISION" if pg else "REAL"
    ex = storage._execute  # type: ignore[attr-defined]
    ex("DROP TABLE sample_blocks")
    ex(
        f"CREATE TABLE samples (device_id INTEGER NOT NULL, ts BIGINT NOT NULL,"
        f" tag_id INTEGER NOT NULL, value {real}, quality SMALLINT NOT NULL)"
    )
    ex(
        "CREATE TABLE text_samples (device_id INTEGER NOT NULL, ts BIGINT NOT NULL,"
        " tag_id INTEGER NOT NULL, value TEXT, quality SMALLINT NOT NULL)"
    )
    ex("INSERT INTO devices (name) VALUES ('gw1')")
    (dev,) = ex("SELECT id FROM devices").fetchone()
    assert dev == 1
    for name, kind in (("a", 0), ("b", 0), ("s", 2)):
        ex(
            "INSERT INTO tags (device_id, name, kind, unit, resolution, twin_index)"
            " VALUES (1, ?, ?, '', 0.01, 0)",
            (name, kind),
        )
    assert ex("SELECT id, name FROM tags ORDER BY id").fetchall() == [(1, "a"), (2, "b"), (3, "s")]
    nan = math.nan if pg else None
    for ts, tid, value, q in ((T0, 1, 1.5, 0), (T0, 2, nan, 40), (T0 + 5, 1, 2.5, 0)):
        ex("INSERT INTO samples VALUES (1, ?, ?, ?, ?)", (ts, tid, value, q))
    ex("INSERT INTO text_samples VALUES (1, ?, 3, 'on', 0)", (T0 + 1,))
    ids, tss = np.array([1, 3], "<i8"), np.array([T0 + 5, T0 + 1], "<i8")
    ex(
        "INSERT INTO shadows VALUES (1, ?, ?, ?, ?, ?, 0)",
        (
            ids.tobytes(),
            tss.tobytes(),
            np.array([2.5, math.nan]).tobytes(),
            bytes(2),
            json.dumps({"3": [T0 + 1, "on", 0]}),
        ),
    )
    ex("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    storage.close()
    storage = open_storage(storage_url)
    try:
        rows = [(r.ts_us - T0, r.tag, r.value, r.quality) for r in storage.query_samples("gw1")]
        assert rows == [(0, "a", 1.5, 0), (0, "b", None, 40), (1, "s", "on", 0), (5, "a", 2.5, 0)]
        assert storage.reported("gw1")["a"].value == 2.5
        assert storage.reported("gw1")["s"].value == "on"
        storage.store([_Device(registry).next()])  # and it takes new batches
        assert len(list(storage.query_samples("gw1"))) == 5
    finally:
        storage.close()
