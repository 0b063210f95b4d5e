"""End to end through a real Mosquitto (TLS, ACLs): ingest, dedup, acks, shared subscriptions."""

from __future__ import annotations

import asyncio
import contextlib
import urllib.request
from pathlib import Path

from edgeos_cloud.receiver.registry import DeviceRegistry
from edgeos_cloud.receiver.service import Receiver
from edgeos_cloud.receiver.storage import open_storage
from edgeos_protocol.crypto import Epoch, key_id_for
from edgeos_protocol.wire import Batch, ControlKind, seal_control
from edgeos_testing.devsim import SimDevice, simple_batch
from edgeos_testing.mosquitto import MosquittoBroker
from edgeos_testing.receiver import receiver_config_for, running_receiver, wait_for

T0 = 1_700_000_000_000_000


def _fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return str(response.read().decode())


def _batch(i: int) -> Batch:
    return simple_batch({"temp": [float(i), i + 0.5]}, [T0 + 2 * i * 1000, T0 + (2 * i + 1) * 1000])


async def test_exactly_once_in_order_with_reacks(tmp_path: Path, storage_url: str) -> None:
    async with MosquittoBroker(tmp_path / "mq") as broker:
        config = receiver_config_for(broker, tmp_path, storage_url)
        registry = DeviceRegistry(config.registry.dir)
        key = registry.add("gw1").current_key
        receiver = Receiver(config, registry=registry)
        async with running_receiver(receiver), SimDevice.connect(broker, "gw1", key) as dev:
            sealed = [dev.seal(_batch(i)) for i in range(6)]
            for payload in sealed[:5]:
                await dev.publish(payload)
            assert await dev.wait_acked(dev.epoch.epoch, 5) == 5
            acks = dev.ack_count
            await dev.publish(sealed[2])  # duplicate delivery: stored once, acked again
            await dev.wait_ack_count(acks + 1)
            assert dev.acked[dev.epoch.epoch] == 5
            await dev.publish(sealed[5])
            assert await dev.wait_acked(dev.epoch.epoch, 6) == 6
            assert dev.bad_controls == 0
            # An ack not sealed with the device key (published by the receiver identity, which
            # the ACL allows) is refused by the device.
            async with broker.client(broker.receiver_identity) as rogue:
                forged = seal_control(
                    ControlKind.ACK,
                    {"epoch": dev.epoch.epoch, "seq": 99},
                    b"x" * 32,
                    "gw1",
                    1,
                    key_id=key_id_for(b"x" * 32),
                )
                await rogue.publish("edgeos/v1/gw1/ack", forged, qos=1)
            await wait_for(lambda: dev.bad_controls == 1)
            assert dev.acked[dev.epoch.epoch] == 6
            url = f"http://127.0.0.1:{receiver.metrics_port}/metrics"
            body = await asyncio.to_thread(_fetch, url)
            assert "edgeos_receiver_batches_total 6.0" in body
        m = receiver.metrics
        assert m.value("edgeos_receiver_rejects_total", reason="replayed") == 1
        assert m.value("edgeos_receiver_samples_total") == 12
    storage = open_storage(storage_url)
    try:
        values = [r.value for r in storage.query_samples("gw1", "temp")]
        assert values == [v for i in range(6) for v in (float(i), i + 0.5)]
        summary = storage.device_summaries()[0]
        assert (summary.batches, summary.backlog, summary.rejects) == (6, 0, {"replayed": 1})
    finally:
        storage.close()


async def test_two_receivers_split_one_shared_subscription(
    tmp_path: Path, storage_url: str
) -> None:
    async with MosquittoBroker(tmp_path / "mq") as broker:
        config = receiver_config_for(broker, tmp_path, storage_url)
        registry = DeviceRegistry(config.registry.dir)
        keys = {d: registry.add(d).current_key for d in ("gw1", "gw2")}
        r1 = Receiver(config, registry=registry)
        r2 = Receiver(config, registry=DeviceRegistry(config.registry.dir))
        async with (
            running_receiver(r1),
            running_receiver(r2),
            SimDevice.connect(broker, "gw1", keys["gw1"]) as d1,
            SimDevice.connect(broker, "gw2", keys["gw2"]) as d2,
        ):
            sealed = {d: [d.seal(_batch(i)) for i in range(20)] for d in (d1, d2)}
            for i in range(20):
                for d in (d1, d2):
                    await d.publish(sealed[d][i])
            for d in (d1, d2):
                assert await d.wait_acked(d.epoch.epoch, 20) == 20
            # Everything again: both receivers see replays, nothing is stored twice.
            acks = {d: d.ack_count for d in (d1, d2)}
            for i in range(20):
                for d in (d1, d2):
                    await d.publish(sealed[d][i])
            for d in (d1, d2):
                await d.wait_ack_count(acks[d] + 20)

            def replays_seen() -> list[float]:
                return [
                    r.metrics.value("edgeos_receiver_rejects_total", reason="replayed")
                    for r in (r1, r2)
                ]

            # A receiver may ack more than once per batch (epoch catch-up acks), so the ack
            # count can complete before the last replay is counted: wait for the replays.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(10):
                    while sum(replays_seen()) < 40:
                        await asyncio.sleep(0.05)
        stored = [r.metrics.value("edgeos_receiver_batches_total") for r in (r1, r2)]
        replays = replays_seen()
        assert sum(stored) == 40 and min(stored) > 0, stored
        assert sum(replays) == 40 and min(replays) > 0, replays
    storage = open_storage(storage_url)
    try:
        summaries = {s.device: s for s in storage.device_summaries()}
        assert {d: (s.batches, s.backlog) for d, s in summaries.items()} == {
            "gw1": (20, 0),
            "gw2": (20, 0),
        }
        for dev in ("gw1", "gw2"):
            values = [r.value for r in storage.query_samples(dev, "temp")]
            assert values == [v for i in range(20) for v in (float(i), i + 0.5)]
    finally:
        storage.close()


async def test_announced_skips_let_acks_pass_gaps(tmp_path: Path) -> None:
    """Skipped numbers count as present, also for an older epoch named by a newer batch."""
    async with MosquittoBroker(tmp_path / "mq") as broker:
        config = receiver_config_for(broker, tmp_path, f"sqlite:///{tmp_path / 'r.db'}")
        registry = DeviceRegistry(config.registry.dir)
        key = registry.add("gw1").current_key
        receiver = Receiver(config, registry=registry)
        async with running_receiver(receiver), SimDevice.connect(broker, "gw1", key) as dev:
            old = dev.epoch.epoch
            for i in range(2):
                await dev.publish(dev.seal(_batch(i)))
            assert await dev.wait_acked(old, 2) == 2
            for i in range(2, 5):  # 3–5: refused by the spool
                dev.seal(_batch(i))
            batch = _batch(5)
            batch.meta["skip"] = [[old, 3, 5]]
            await dev.publish(dev.seal(batch))
            assert await dev.wait_acked(old, 6) == 6
            dev.seal(_batch(6))  # 7: dropped with the old epoch's spool
            dev.epoch = Epoch.new(dev.keyring, "gw1")
            batch = _batch(7)
            batch.meta["skip"] = [[old, 7, 7]]
            await dev.publish(dev.seal(batch))
            assert await dev.wait_acked(dev.epoch.epoch, 1) == 1
            assert await dev.wait_acked(old, 7) == 7  # the old epoch's gap is acked too
    storage = open_storage(f"sqlite:///{tmp_path / 'r.db'}")
    try:
        (summary,) = storage.device_summaries()
        assert (summary.batches, summary.backlog, summary.skipped) == (4, 0, 4)
    finally:
        storage.close()
