"""Storage back-ends (parametrized: SQLite and PostgreSQL) pass the same contract tests."""

from __future__ import annotations

import math

import numpy as np
import pytest

from edgeos.receiver.devsim import simple_batch
from edgeos.receiver.ingest import BatchOpener
from edgeos.receiver.registry import DeviceRegistry
from edgeos.receiver.storage import IngestBatch, open_storage
from edgeos.uplink.crypto import Epoch, Keyring
from edgeos.uplink.wire import encode_body, seal_batch

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
    from edgeos.uplink.synth import SyntheticLine
    from edgeos.uplink.wire import Batch, Group

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
