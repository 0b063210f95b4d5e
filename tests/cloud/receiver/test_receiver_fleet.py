"""A receiver that holds a fleet: floods, per-device quotas, backpressure, the size door,
the writer's sample budget and the broker's generated queue limits.

Real Mosquitto (TLS + ACLs), real SQLite; no timed assertions: waits are bounded by
``asyncio.timeout`` scopes only so a hang fails instead of blocking the run.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

from edgeos_cloud.broker import BrokerLimits, mosquitto_config
from edgeos_cloud.receiver.config import IntakeConfig, LimitsConfig, QuotasConfig
from edgeos_cloud.receiver.fairqueue import Admission, FairQueue
from edgeos_cloud.receiver.ingest import REJECT_REASONS
from edgeos_cloud.receiver.intake import DEFER_REASONS
from edgeos_cloud.receiver.quota import DeviceQuotas
from edgeos_cloud.receiver.registry import DeviceRegistry
from edgeos_cloud.receiver.service import Receiver, _Message
from edgeos_cloud.receiver.storage import open_storage
from edgeos_testing.devsim import SimDevice, simple_batch
from edgeos_testing.mosquitto import MosquittoBroker
from edgeos_testing.receiver import receiver_config_for, running_receiver, wait_for

T0 = 1_700_000_000_000_000
#: Generous bounds for waits on a busy 2-core machine (a hang fails, nothing is timed).
WAIT_S = 120
#: The broker queues without limit for the receiver's session, so every message the test
#: publishes reaches the receiver: what it does with each is then fully accountable.
UNBOUNDED_BROKER = "max_queued_messages 0"
#: The gateway's ``uplink.inflight_window``: batches a device keeps unacknowledged.
WINDOW = 16


def _accounted(receiver: Receiver) -> float:
    """Messages with a known fate: stored, rejected (any reason) or deferred (any reason)."""
    m = receiver.metrics
    rejected = sum(m.value("edgeos_receiver_rejects_total", reason=r) for r in REJECT_REASONS)
    deferred = sum(m.value("edgeos_receiver_deferred_total", reason=r) for r in DEFER_REASONS)
    return m.value("edgeos_receiver_batches_total") + rejected + deferred


def _received(receiver: Receiver) -> float:
    return receiver.metrics.value("edgeos_receiver_messages_received_total")


# ----------------------------------------------------------------------- pure parts


def test_fair_queue_serves_devices_in_turn_whatever_their_backlog() -> None:
    q: FairQueue[str, int] = FairQueue(
        max_bytes=10_000, max_items=1_000, device_max_bytes=10_000, device_max_items=100
    )
    for i in range(50):
        assert q.offer("flood", i, 10) is Admission.ADMITTED
    assert q.offer("calm", 1000, 10) is Admission.ADMITTED
    assert q.offer("calm", 1001, 10) is Admission.ADMITTED
    first = q.take(4)
    assert [(t.key, t.item) for t in first] == [
        ("flood", 0),
        ("calm", 1000),
        ("flood", 1),
        ("calm", 1001),
    ]
    assert q.bytes_in_flight == 52 * 10  # taken but not yet released still counts
    q.release(first)
    assert q.bytes_in_flight == 48 * 10


def test_fair_queue_defers_a_full_lane_and_holds_back_when_the_whole_queue_is_full() -> None:
    q: FairQueue[str, int] = FairQueue(
        max_bytes=1_000, max_items=100, device_max_bytes=300, device_max_items=100
    )
    assert q.offer("a", 1, 200) is Admission.ADMITTED
    assert q.offer("a", 2, 200) is Admission.DEVICE_FULL  # a's lane: 400 > 300
    # A device with nothing in flight gets one message even when it exceeds its lane.
    assert q.offer("b", 3, 700) is Admission.ADMITTED
    assert q.offer("c", 4, 200) is Admission.FULL  # 200 + 700 + 200 > 1000
    q.release(q.take(1))
    assert q.offer("c", 4, 200) is Admission.ADMITTED


def test_fair_queue_requeues_unworked_messages_at_the_head_of_their_lanes() -> None:
    q: FairQueue[str, int] = FairQueue(
        max_bytes=10_000, max_items=100, device_max_bytes=10_000, device_max_items=100
    )
    for i in range(3):
        q.offer("big", i, 10)
    q.offer("calm", 100, 10)
    taken = q.take(3)  # big 0, calm 100, big 1
    q.release(taken[:1])
    q.requeue(taken[1:])  # the writer stopped after the first
    assert q.items_in_flight == 3  # still in flight, nothing lost
    assert [(t.key, t.item) for t in q.take(10)] == [("calm", 100), ("big", 1), ("big", 2)]


def test_quota_defers_over_rate_batches_and_forgives_with_time() -> None:
    now = [0.0]
    quotas = DeviceQuotas(
        QuotasConfig(samples_per_s=10, burst_s=1, new_tags_per_day=3, events_per_s=1),
        clock=lambda: now[0],
    )
    assert quotas.admit_batch("d", ["a", "b"], 25, 0) is None  # a full bucket admits, debt
    assert quotas.admit_batch("d", ["a", "b"], 1, 0) == "samples_per_s"
    assert quotas.admit_batch("other", ["a"], 1, 0) is None  # buckets are per device
    now[0] += 2.0  # 20 tokens back: debt of 15 repaid, 5 left
    assert quotas.admit_batch("d", ["a", "b"], 1, 0) is None
    # "a", "b" were new (3 - 2 = 1 left): one token admits two more, in debt.
    assert quotas.admit_batch("d", ["c", "e"], 1, 0) is None
    assert quotas.admit_batch("d", ["f"], 1, 0) == "new_tags_per_day"
    assert quotas.admit_batch("d", ["a", "e"], 1, 0) is None  # known tags cost nothing


def test_message_quota_turns_a_flooding_device_away_and_forgives_with_time() -> None:
    now = [0.0]
    quotas = DeviceQuotas(QuotasConfig(messages_per_s=2, burst_s=2), clock=lambda: now[0])
    assert [quotas.admit_message("flood") for _ in range(6)] == [True] * 4 + [False] * 2
    assert quotas.admit_message("calm")  # buckets are per device
    now[0] += 1.0  # two messages' worth back
    assert [quotas.admit_message("flood") for _ in range(3)] == [True, True, False]


def test_broker_limits_are_written_into_the_generated_mosquitto_config(tmp_path: Path) -> None:
    files = {name: tmp_path / name for name in ("ca", "crt", "key", "crl", "acl")}
    default = mosquitto_config(
        ca_file=files["ca"],
        cert_file=files["crt"],
        key_file=files["key"],
        crl_file=files["crl"],
        acl_file=files["acl"],
    ).splitlines()
    for line in BrokerLimits().lines():
        assert line in default
    limits = BrokerLimits.for_payload(64 << 10, max_queued_messages=5_000)
    assert limits.max_packet_size > 64 << 10
    assert "max_queued_messages 5000" in limits.lines()
    plain = mosquitto_config(
        ca_file=files["ca"],
        cert_file=files["crt"],
        key_file=files["key"],
        crl_file=files["crl"],
        acl_file=None,
        limits=None,
    )
    assert "max_queued" not in plain


async def test_a_writer_transaction_holds_at_most_its_sample_budget(tmp_path: Path) -> None:
    # White-box on purpose: which batches share a transaction depends on how many the
    # writer finds queued, so _write is given three at once.
    registry = DeviceRegistry(tmp_path / "registry")
    key = registry.add("gw1").current_key
    config = receiver_config_for(
        _NoBroker(),
        tmp_path,
        f"sqlite:///{tmp_path / 'r.db'}",
        intake=IntakeConfig(max_samples_per_transaction=1_200),
    )
    receiver = Receiver(config, registry=registry)
    dev = SimDevice(None, "gw1", key)
    items = [
        _Message(
            "batch",
            "gw1",
            dev.seal(simple_batch({f"t{c}": [float(i)] * 3 for c in range(200)}, _t(i))),
            int(time.time() * 1e6),
        )
        for i in range(3)
    ]
    storage = open_storage(config.storage.url)
    receiver._storage = storage
    m = receiver.metrics
    try:
        # 600 samples each: the budget is reached after two; the third is left unopened
        # (the writer loop puts it back in its lane) for the next transaction.
        first = receiver._write(items)
        assert first.processed == 2
        assert m.value("edgeos_receiver_store_seconds_count") == 1
        second = receiver._write(items[first.processed :])
        assert second.processed == 1
    finally:
        storage.close()
    assert m.value("edgeos_receiver_store_seconds_count") == 2
    assert m.value("edgeos_receiver_batches_total") == 3
    # Each ack names the contiguous mark after its transaction.
    assert [seq for *_, seq in first.acks + second.acks] == [2, 2, 3]


def _t(i: int) -> list[int]:
    return [T0 + (3 * i + r) * 1_000_000 for r in range(3)]


class _NoBroker:
    """Enough of a broker for :func:`receiver_config_for` when nothing connects."""

    tls = False
    url = "mqtt://127.0.0.1:1"
    receiver_identity = "receiver"


# ----------------------------------------------------------------------- with a broker


async def test_junk_flood_on_one_device_leaves_every_healthy_batch_stored_on_first_delivery(
    tmp_path: Path,
) -> None:
    junk_count, healthy_count = 4_000, 40
    async with MosquittoBroker(tmp_path / "mq", extra_config=UNBOUNDED_BROKER) as broker:
        config = receiver_config_for(broker, tmp_path, f"sqlite:///{tmp_path / 'r.db'}")
        registry = DeviceRegistry(config.registry.dir)
        good_key = registry.add("good").current_key
        registry.add("attacker")  # holds a valid key and certificate
        receiver = Receiver(config, registry=registry)
        async with (
            running_receiver(receiver),
            SimDevice.connect(broker, "good", good_key) as good,
            broker.client("attacker", max_inflight_messages=1_000) as attacker,
        ):
            junk = [os.urandom(64 + i % 512) for i in range(256)]

            async def flood() -> None:
                # QoS 1 as fast as this process can publish, up to 256 in flight at once.
                for start in range(0, junk_count, 256):
                    await asyncio.gather(
                        *(
                            attacker.publish("edgeos/v1/attacker/batch", junk[i % 256], qos=1)
                            for i in range(start, min(start + 256, junk_count))
                        )
                    )

            attacker.pending_calls_threshold = 1_000  # aiomqtt warns past it: expected here

            async def healthy() -> None:
                # As the gateway's uplink does: at most WINDOW batches unacknowledged.
                for i in range(healthy_count):
                    if i >= WINDOW:
                        await good.wait_acked(good.epoch.epoch, i - WINDOW + 1)
                    await good.publish(good.seal(simple_batch({"t": [float(i)]}, [T0 + i])))

            async with asyncio.timeout(WAIT_S):
                await asyncio.gather(flood(), healthy())
                # Each healthy batch was published once: an ack up to the last one means every
                # one was stored on its first delivery.
                assert await good.wait_acked(good.epoch.epoch, healthy_count) == healthy_count
                await wait_for(lambda: _received(receiver) >= junk_count + healthy_count)
                await wait_for(lambda: _accounted(receiver) >= _received(receiver))
            # Nothing delivered was dropped uncounted: every message has exactly one fate.
            assert _received(receiver) == junk_count + healthy_count
            assert _accounted(receiver) == _received(receiver)
            assert receiver.metrics.value("edgeos_receiver_batches_total") == healthy_count


async def test_a_device_over_its_quota_is_deferred_and_stored_from_its_resend(
    tmp_path: Path,
) -> None:
    now = [0.0]
    async with MosquittoBroker(tmp_path / "mq") as broker:
        config = receiver_config_for(
            broker,
            tmp_path,
            f"sqlite:///{tmp_path / 'r.db'}",
            quotas=QuotasConfig(samples_per_s=10, burst_s=1),
        )
        registry = DeviceRegistry(config.registry.dir)
        key = registry.add("gw1").current_key
        quotas = DeviceQuotas(config.quotas, clock=lambda: now[0])
        receiver = Receiver(config, registry=registry, quotas=quotas)
        m = receiver.metrics
        async with running_receiver(receiver), SimDevice.connect(broker, "gw1", key) as dev:
            times = [T0 + i for i in range(30)]
            first = dev.seal(simple_batch({"t": [1.0] * 30}, times))  # 30 samples: debt of 20
            second = dev.seal(simple_batch({"t": [2.0] * 30}, times))
            async with asyncio.timeout(WAIT_S):
                await dev.publish(first)
                assert await dev.wait_acked(dev.epoch.epoch, 1) == 1
                await dev.publish(second)
                await wait_for(
                    lambda: m.value("edgeos_receiver_deferred_total", reason="samples_per_s") == 1
                )
                assert dev.acked[dev.epoch.epoch] == 1  # deferred: not stored, not acked
                assert m.value("edgeos_receiver_batches_total") == 1
                now[0] += 3.0  # the debt is repaid; the gateway's re-send timer fires
                await dev.publish(second)
                assert await dev.wait_acked(dev.epoch.epoch, 2) == 2
            assert m.value("edgeos_receiver_batches_total") == 2
            assert m.value("edgeos_receiver_deferred_total", reason="samples_per_s") == 1


async def test_oversized_messages_are_refused_at_the_door_without_queueing_their_bytes(
    tmp_path: Path,
) -> None:
    oversized, limit = 20, 64 << 10
    async with MosquittoBroker(tmp_path / "mq") as broker:
        config = receiver_config_for(
            broker,
            tmp_path,
            f"sqlite:///{tmp_path / 'r.db'}",
            limits=LimitsConfig(max_payload_bytes=limit),
        )
        registry = DeviceRegistry(config.registry.dir)
        key = registry.add("gw1").current_key
        receiver = Receiver(config, registry=registry)
        m = receiver.metrics
        async with running_receiver(receiver), SimDevice.connect(broker, "gw1", key) as dev:
            big = os.urandom(2 << 20)
            async with asyncio.timeout(WAIT_S):
                for _ in range(oversized):
                    await dev.publish(big)
                good = dev.seal(simple_batch({"t": [1.0]}, [T0]))
                await dev.publish(good)
                assert await dev.wait_acked(dev.epoch.epoch, 1) == 1
        assert m.value("edgeos_receiver_rejects_total", reason="oversized") == oversized
        # Only the good batch ever entered the queue: 40 MiB were refused at the door.
        assert m.value("edgeos_receiver_peak_bytes_in_flight") == len(good)
        assert m.value("edgeos_receiver_bytes_in_flight") == 0


async def test_a_full_queue_withholds_pubacks_and_loses_nothing(tmp_path: Path) -> None:
    devices, per_device = 4, 10
    async with MosquittoBroker(tmp_path / "mq") as broker:
        config = receiver_config_for(
            broker,
            tmp_path,
            f"sqlite:///{tmp_path / 'r.db'}",
            # One message in flight at a time: every other one waits at the door, unacked.
            limits=LimitsConfig(queue_size=1),
            intake=IntakeConfig(max_bytes_in_flight=1 << 20),
        )
        registry = DeviceRegistry(config.registry.dir)
        keys = {f"gw{i}": registry.add(f"gw{i}").current_key for i in range(devices)}
        receiver = Receiver(config, registry=registry)
        m = receiver.metrics
        async with running_receiver(receiver):
            sims = [SimDevice.connect(broker, d, k) for d, k in keys.items()]
            entered = [await s.__aenter__() for s in sims]
            try:
                async with asyncio.timeout(WAIT_S):
                    for i in range(per_device):
                        for dev in entered:
                            await dev.publish(dev.seal(simple_batch({"t": [float(i)]}, [T0 + i])))
                    for dev in entered:
                        assert await dev.wait_acked(dev.epoch.epoch, per_device) == per_device
            finally:
                for s in reversed(sims):
                    await s.__aexit__(None, None, None)
        assert m.value("edgeos_receiver_batches_total") == devices * per_device
        assert sum(m.value("edgeos_receiver_deferred_total", reason=r) for r in DEFER_REASONS) == 0


async def test_a_device_over_its_message_rate_is_turned_away_at_the_door_alone(
    tmp_path: Path,
) -> None:
    now = [0.0]  # frozen: no token comes back during the test
    junk_count, burst = 60, 5
    async with MosquittoBroker(tmp_path / "mq", extra_config=UNBOUNDED_BROKER) as broker:
        config = receiver_config_for(
            broker,
            tmp_path,
            f"sqlite:///{tmp_path / 'r.db'}",
            quotas=QuotasConfig(messages_per_s=1, burst_s=burst),
        )
        registry = DeviceRegistry(config.registry.dir)
        good_key = registry.add("good").current_key
        registry.add("attacker")
        quotas = DeviceQuotas(config.quotas, clock=lambda: now[0])
        receiver = Receiver(config, registry=registry, quotas=quotas)
        m = receiver.metrics
        async with (
            running_receiver(receiver),
            SimDevice.connect(broker, "good", good_key) as good,
            broker.client("attacker") as attacker,
        ):
            async with asyncio.timeout(WAIT_S):
                for i in range(junk_count):
                    await attacker.publish("edgeos/v1/attacker/batch", os.urandom(100 + i), qos=1)
                for i in range(3):  # within the healthy device's own burst
                    await good.publish(good.seal(simple_batch({"t": [float(i)]}, [T0 + i])))
                assert await good.wait_acked(good.epoch.epoch, 3) == 3
                await wait_for(lambda: _received(receiver) >= junk_count + 3)
                await wait_for(lambda: _accounted(receiver) >= _received(receiver))
        deferred = m.value("edgeos_receiver_deferred_total", reason="messages_per_s")
        rejected = sum(m.value("edgeos_receiver_rejects_total", reason=r) for r in REJECT_REASONS)
        # The first `burst` junk messages were let in (and refused by the opener); the rest were
        # turned away at the door before costing a queue slot or a decode attempt.
        assert deferred == junk_count - burst
        assert rejected == burst
        assert m.value("edgeos_receiver_batches_total") == 3
        assert _accounted(receiver) == _received(receiver) == junk_count + 3


async def test_generated_broker_limits_queue_past_mosquittos_default_for_a_receiver(
    tmp_path: Path,
) -> None:
    """Mosquitto's default (1,000 per session) would drop the rest while a receiver is away."""
    count = 1_500
    async with MosquittoBroker(tmp_path / "mq", limits=BrokerLimits()) as broker:
        session = {"identifier": "receiver-persistent", "clean_session": False}
        async with broker.client("receiver", **session) as receiver:
            await receiver.subscribe("edgeos/v1/+/batch", qos=1)
        async with broker.client("gw1") as device:
            for i in range(count):
                await device.publish("edgeos/v1/gw1/batch", i.to_bytes(4, "big"), qos=1)
        seen: set[int] = set()
        async with broker.client("receiver", **session) as receiver, asyncio.timeout(WAIT_S):
            async for message in receiver.messages:
                seen.add(int.from_bytes(bytes(message.payload), "big"))
                if len(seen) == count:
                    break
        assert seen == set(range(count))
