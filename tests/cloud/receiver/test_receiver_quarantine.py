"""One faulty or compromised gateway cannot hurt another: poison and amplification are
quarantined alone (sealed bytes kept, acked as quarantined), limits hold before anything is
built, quarantined batches re-ingest after a fix, and a storage outage still backs off."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import tracemalloc
from pathlib import Path
from typing import Any

import pytest

from edgeos_cloud.cli import main
from edgeos_cloud.receiver.config import LimitsConfig
from edgeos_cloud.receiver.ingest import BatchOpener, Quarantined
from edgeos_cloud.receiver.registry import DeviceRegistry
from edgeos_cloud.receiver.service import Receiver
from edgeos_cloud.receiver.storage import open_storage
from edgeos_cloud.receiver.storage.base import QuarantineRecord
from edgeos_protocol.crypto import Epoch, Keyring
from edgeos_protocol.wire import encode_body, seal_batch
from edgeos_testing import hostile
from edgeos_testing.devsim import SimDevice, simple_batch
from edgeos_testing.mosquitto import MosquittoBroker
from edgeos_testing.receiver import admin_url, receiver_config_for, running_receiver, wait_for

T0 = hostile.T0
#: 2001-01-01: 200,000 rows 61 minutes apart still end before now.
Y2001_US = 978_307_200_000_000


class _Device:
    """A registered device sealing bodies under its real key, in sequence."""

    def __init__(self, registry: DeviceRegistry, name: str) -> None:
        self.name = name
        self.epoch = Epoch.new(Keyring.of(registry.add(name).current_key), name)

    def seal(self, body: bytes) -> bytes:
        return seal_batch(self.epoch, body, T0)[1]


def _quarantined(opener: BatchOpener, sealed: bytes, device: str) -> QuarantineRecord:
    with pytest.raises(Quarantined) as info:
        opener.open(sealed, T0, device)
    assert info.value.record.payload == sealed
    return info.value.record


POISON = {
    "meta_bytes_key": (lambda: hostile.with_meta({b"k": 1}), "malformed"),
    "event_bytes_key": (lambda: hostile.with_event({"type": "e", b"k": 1}), "malformed"),
    "meta_deep": (lambda: hostile.with_meta({"d": hostile.deep(200)}), "limit"),
    "tag_name_nul": (lambda: hostile.with_names(name="te\x00mp"), "malformed"),
    "unit_nul": (lambda: hostile.with_names(unit="\x00C"), "malformed"),
    "event_type_nul": (lambda: hostile.with_event({"type": "ga\x00te", "ts_us": T0}), "malformed"),
}


@pytest.mark.parametrize("case", sorted(POISON))
def test_poison_is_quarantined_and_a_healthy_batch_in_the_same_write_is_stored(
    case: str, registry: DeviceRegistry, storage_url: str
) -> None:
    build, reason = POISON[case]
    bad, good = _Device(registry, "bad"), _Device(registry, "good")
    opener = BatchOpener(registry)
    record = _quarantined(opener, bad.seal(build()), "bad")
    assert record.reason == reason
    healthy = opener.open(good.seal(encode_body(hostile.healthy())), T0, "good")
    storage = open_storage(storage_url)
    try:
        stored, kept = storage.store([healthy], [record])
        assert stored.stored and stored.ack_seq == 1 and stored.quarantined is None
        assert kept.quarantined == reason and kept.new_quarantine and kept.ack_seq == 1
        assert [r.value for r in storage.query_samples("good")] == [20.0, 20.5]
        (entry,) = storage.quarantined("bad")
        assert (entry.seq, entry.reason) == (1, reason)
        summary = {s.device: s for s in storage.device_summaries()}
        assert summary["bad"].quarantined == 1 and summary["bad"].backlog == 0
        # The device re-sends it (its ack was lost): kept once, acked again.
        (again,) = storage.store([], [record])
        assert again.quarantined == reason and not again.new_quarantine
    finally:
        storage.close()


def test_a_batch_the_database_refuses_is_quarantined_and_the_rest_stored(
    registry: DeviceRegistry, storage_url: str
) -> None:
    """Past every ingest check (a value no BIGINT holds): storage isolates it by itself."""
    devices = [_Device(registry, f"gw{i}") for i in range(3)]
    opener = BatchOpener(registry)
    batches = [
        opener.open(d.seal(encode_body(hostile.healthy(i))), T0, d.name)
        for i, d in enumerate(devices)
    ]
    batches[1] = dataclasses.replace(batches[1], created_us=1 << 70)
    storage = open_storage(storage_url)
    try:
        outcomes = storage.store(batches)
        assert [o.stored for o in outcomes] == [True, False, True]
        assert outcomes[1].quarantined == "unstorable" and outcomes[1].ack_seq == 1
        (entry,) = storage.quarantined()
        assert (entry.device, entry.reason) == ("gw1", "unstorable")
        record = storage.quarantined_record("gw1", entry.epoch, 1)
        assert record is not None and record.payload == batches[1].payload
        assert len(list(storage.query_samples("gw0"))) == 2
        assert len(list(storage.query_samples("gw2"))) == 2
        assert list(storage.query_samples("gw1")) == []
    finally:
        storage.close()


@pytest.mark.postgres
def test_nul_in_a_tag_name_reaching_postgresql_is_quarantined_not_fatal(
    registry: DeviceRegistry, tmp_path: Path
) -> None:
    from edgeos_testing.receiver import PostgresUnavailable, postgres_database

    bad, good = _Device(registry, "bad"), _Device(registry, "good")
    opener = BatchOpener(registry)
    poisoned = opener.open(bad.seal(encode_body(hostile.healthy())), T0, "bad")
    poisoned = dataclasses.replace(poisoned, tag_names=["te\x00mp"])
    healthy = opener.open(good.seal(encode_body(hostile.healthy())), T0, "good")
    try:
        with postgres_database() as url:
            storage = open_storage(url)
            try:
                kept, stored = storage.store([poisoned, healthy])
                assert kept.quarantined == "unstorable" and stored.stored
                assert "NUL" in storage.quarantined("bad")[0].detail
            finally:
                storage.close()
    except PostgresUnavailable as exc:
        pytest.skip(f"PostgreSQL unavailable: {exc}")


# --------------------------------------------------------------------------- amplification

AMPLIFICATION = {
    # 1,000,000 events are 3,000,000 msgpack values: the object budget stops the scan.
    "events_1M": (lambda epoch: hostile.many_events(1_000_000), "max_objects"),
    "events_100k": (lambda epoch: hostile.many_events(100_000), "max_events"),
    "tags_1M": (lambda epoch: hostile.many_tags(1_000_000), "max_tags"),
    "blocks_200k": (lambda epoch: hostile.rows_hours_apart(200_000, Y2001_US), "max_blocks"),
    "epochs_65537": (lambda epoch: hostile.skip_epochs(65_536, epoch), "max_skip_epochs"),
    "empty_maps_64MiB": (lambda epoch: hostile.empty_maps((64 << 20) - 4096), "max_container_len"),
    "nested_empty_maps_64MiB": (
        lambda epoch: hostile.nested_empty_maps(128, (1 << 19) - 64),
        "max_objects",
    ),
}


@pytest.mark.parametrize("case", sorted(AMPLIFICATION))
def test_amplification_is_refused_before_it_is_built(case: str, registry: DeviceRegistry) -> None:
    build, limit = AMPLIFICATION[case]
    dev = _Device(registry, "amp")
    sealed = dev.seal(build(dev.epoch.epoch))
    assert len(sealed) < 64 << 10  # small on the wire (distinct epoch ids cost 9 bytes each)
    opener = BatchOpener(registry)
    tracemalloc.start()
    try:
        record = _quarantined(opener, sealed, "amp")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert record.reason == "limit" and record.detail.startswith(f"limits.{limit}:")
    # Bounded: at most the decompressed body (≤ 64 MiB) and a little more, never its objects.
    assert peak < 100 << 20, f"peak {peak >> 20} MiB"


def test_times_outside_the_plausible_window_are_refused(registry: DeviceRegistry) -> None:
    dev = _Device(registry, "clock")
    opener = BatchOpener(registry)
    early = simple_batch({"t": [1.0]}, [5_000_000])  # 1970: an unset clock
    assert _quarantined(opener, dev.seal(encode_body(early)), "clock").reason == "timestamp"
    late = simple_batch({"t": [1.0]}, [T0 + 400 * 86_400 * 10**6])
    assert _quarantined(opener, dev.seal(encode_body(late)), "clock").reason == "timestamp"
    event = hostile.with_event({"type": "e", "ts_us": -(1 << 62)})
    assert _quarantined(opener, dev.seal(event), "clock").reason == "timestamp"


def _toml(tmp_path: Path, storage_url: str, registry_dir: Path, limits: str = "") -> Path:
    path = tmp_path / "receiver.toml"
    path.write_text(
        f'[broker]\nurl = "mqtt://127.0.0.1:1"\n[storage]\nurl = "{storage_url}"\n'
        f'[registry]\ndir = "{registry_dir}"\n[metrics]\nlisten = ""\n[limits]\n{limits}',
        encoding="utf-8",
    )
    return path


def test_query_prints_stored_times_outside_datetime_range(
    registry: DeviceRegistry, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Stored before the window existed: ``query`` prints them (raw µs) instead of failing."""
    dev = _Device(registry, "old")
    batch = BatchOpener(registry).open(dev.seal(encode_body(hostile.healthy())), T0, "old")
    far = [-(1 << 61), 1 << 61]  # ±73,000 years
    batch = dataclasses.replace(batch, ts_us=batch.ts_us.copy())
    batch.ts_us[:] = far
    url = f"sqlite:///{tmp_path / 'r.db'}"
    storage = open_storage(url)
    storage.store([batch])
    storage.close()
    assert (
        main(
            ["query", "--config", str(_toml(tmp_path, url, registry.directory)), "--device", "old"]
        )
        == 0
    )
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["ts"], r["ts_us"]) for r in rows] == [(None, far[0]), (None, far[1])]


def test_quarantined_bytes_reingest_after_the_limit_is_raised(
    registry: DeviceRegistry, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dev = _Device(registry, "busy")
    batch = hostile.healthy()
    batch.events = [{"type": "alarm", "ts_us": T0 + i, "n": i} for i in range(20)]
    sealed = dev.seal(encode_body(batch))
    url = f"sqlite:///{tmp_path / 'r.db'}"
    strict = BatchOpener(registry, limits=LimitsConfig(max_events=10))
    record = _quarantined(strict, sealed, "busy")
    assert record.detail.startswith("limits.max_events:")
    storage = open_storage(url)
    storage.store([], [record])
    storage.close()

    def cli(*args: str, limits: str = "") -> list[dict[str, Any]]:
        config = str(_toml(tmp_path, url, registry.directory, limits))
        main([*args[:2], "--config", config, *args[2:]] if args[0] == "quarantine" else [])
        return [json.loads(line) for line in capsys.readouterr().out.splitlines()]

    (listed,) = cli("quarantine", "list")
    assert (listed["device"], listed["seq"], listed["reason"]) == ("busy", 1, "limit")
    # Still over the limit: stays quarantined, with the attempt counted.
    (again,) = cli("quarantine", "reingest", limits="max_events = 10\n")
    assert again["outcome"] == "quarantined"
    (done,) = cli("quarantine", "reingest", limits="max_events = 100\n")
    assert done["outcome"] == "stored"
    assert cli("quarantine", "list") == []
    storage = open_storage(url)
    try:
        assert len(storage.events("busy")) == 20
        assert [s.quarantined for s in storage.device_summaries()] == [0]
    finally:
        storage.close()


# --------------------------------------------------------------------------- the service


async def test_a_poisoned_device_never_holds_back_a_healthy_one(
    tmp_path: Path, storage_url: str
) -> None:
    async with MosquittoBroker(tmp_path / "mq") as broker:
        config = receiver_config_for(broker, tmp_path, storage_url)
        registry = DeviceRegistry(config.registry.dir)
        bad_key = registry.add("bad").current_key
        good_key = registry.add("good").current_key
        receiver = Receiver(config, registry=registry)
        async with (
            running_receiver(receiver),
            SimDevice.connect(broker, "bad", bad_key) as bad,
            SimDevice.connect(broker, "good", good_key) as good,
        ):
            poisons = [
                hostile.with_meta({b"k": 1}),
                hostile.with_names(name="a\x00b"),
                hostile.many_events(1_000_000),
                hostile.with_meta({"d": hostile.deep(100)}),
            ]
            n = 24
            m = receiver.metrics
            try:
                async with asyncio.timeout(60):
                    for i in range(n):
                        await bad.publish(bad.seal_body(poisons[i % len(poisons)]))
                        await good.publish(good.seal(hostile.healthy(i)))
                    assert await good.wait_acked(good.epoch.epoch, n) == n
                    # The bad device is told to move on: every batch acked, as quarantined.
                    assert await bad.wait_acked(bad.epoch.epoch, n) == n
                    await bad.wait_quarantined(bad.epoch.epoch, n)
            except TimeoutError:
                pytest.fail(
                    f"not every batch was acked in 60 s: good acked {good.acked}, bad acked"
                    f" {bad.acked} ({len(bad.quarantined)} as quarantined); receiver counted"
                    f" {m.value('edgeos_receiver_batches_total')} batches,"
                    f" {m.value('edgeos_receiver_storage_errors_total')} storage errors"
                )
            assert not good.quarantined
            assert m.value("edgeos_receiver_batches_total") == n
            assert m.value("edgeos_receiver_storage_errors_total") == 0
            assert m.value("edgeos_receiver_quarantined_total", reason="malformed") == n // 2
            assert m.value("edgeos_receiver_quarantined_total", reason="limit") == n // 2
    storage = open_storage(storage_url)
    try:
        summary = {s.device: s for s in storage.device_summaries()}
        assert summary["good"].batches == n and summary["good"].quarantined == 0
        assert summary["bad"].quarantined == n and summary["bad"].backlog == 0
        assert summary["bad"].quarantine_reasons == {"limit": n // 2, "malformed": n // 2}
    finally:
        storage.close()


async def test_a_command_result_with_a_bytes_key_is_stored_and_the_writer_goes_on(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'r.db'}"
    async with MosquittoBroker(tmp_path / "mq") as broker:
        config = receiver_config_for(broker, tmp_path, url)
        registry = DeviceRegistry(config.registry.dir)
        key = registry.add("gw1").current_key
        receiver = Receiver(config, registry=registry)
        storage = open_storage(url)
        storage.enqueue_command("gw1", {"sp": 1}, T0)
        try:
            async with (
                running_receiver(receiver),
                SimDevice.connect(
                    broker, "gw1", key, handler=lambda desired: (True, {b"\x00k": {b"x": 1}})
                ) as dev,
            ):
                async with asyncio.timeout(60):
                    await dev.wait_commands(1)
                    await wait_for(lambda: storage.commands("gw1")[0].status == "applied")
                    await dev.publish(dev.seal(hostile.healthy()))
                    await dev.wait_acked(dev.epoch.epoch, 1)
                assert storage.commands("gw1")[0].results == {
                    "006b": {"78": 1}
                }  # bytes keys as hex
                assert receiver.metrics.value("edgeos_receiver_storage_errors_total") == 0
        finally:
            storage.close()


@pytest.mark.postgres
async def test_a_storage_outage_still_backs_off_without_acks(tmp_path: Path) -> None:
    import psycopg

    from edgeos_testing.receiver import PostgresUnavailable, postgres_database

    try:
        database = postgres_database()
        url = database.__enter__()
    except PostgresUnavailable as exc:
        pytest.skip(f"PostgreSQL unavailable: {exc}")
    name = url.rpartition("/")[2]

    def allow(yes: bool) -> None:
        with psycopg.connect(admin_url(), autocommit=True) as conn:
            conn.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS {str(yes).lower()}')
            if not yes:
                conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                    (name,),
                )

    try:
        async with MosquittoBroker(tmp_path / "mq") as broker:
            config = receiver_config_for(broker, tmp_path, url)
            registry = DeviceRegistry(config.registry.dir)
            key = registry.add("gw1").current_key
            receiver = Receiver(config, registry=registry)
            async with running_receiver(receiver), SimDevice.connect(broker, "gw1", key) as dev:
                await dev.publish(dev.seal(hostile.healthy(0)))
                async with asyncio.timeout(60):
                    await dev.wait_acked(dev.epoch.epoch, 1)
                allow(False)
                second = dev.seal(hostile.healthy(1))
                await dev.publish(second)
                m = receiver.metrics
                async with asyncio.timeout(60):
                    await wait_for(lambda: m.value("edgeos_receiver_storage_errors_total") >= 1)
                # Down is not poison: nothing acked, nothing quarantined.
                assert dev.acked[dev.epoch.epoch] == 1 and not dev.quarantined
                assert m.value("edgeos_receiver_quarantined_total", reason="unstorable") == 0
                allow(True)
                async with asyncio.timeout(90):
                    while dev.acked[dev.epoch.epoch] < 2:
                        # As a gateway does: re-send what is not acked, every few seconds.
                        await dev.publish(second)
                        with contextlib.suppress(TimeoutError):
                            async with asyncio.timeout(3):
                                await dev.wait_acked(dev.epoch.epoch, 2)
                assert not dev.quarantined
    finally:
        allow(True)
        database.__exit__(None, None, None)
