"""The receiver service: MQTT in, verify, deduplicate, store, acknowledge; commands out.

One asyncio loop, one root TaskGroup with three children:

* ``mqtt``    — connects (TLS client certificate, or plain TCP), subscribes with a shared
  subscription ``$share/<group>/<prefix>/+/batch`` (and ``…/cmd/result``) so several
  receivers split the load (``group = ""``: plain subscriptions, for brokers without shared
  subscriptions), plainly to ``<prefix>/+/status`` (retained birth/death). Every message
  passes the *door* on the loop as it arrives (topic, size, bytes/day quota) and is admitted
  to its device's lane of a :class:`~edgeos_cloud.receiver.fairqueue.FairQueue`, deferred
  (counted, not acknowledged: the device re-sends), or refused (counted). The broker's PUBACK
  is sent only then (paho's manual acknowledgement): when ``intake.max_bytes_in_flight`` is
  reached the PUBACK is withheld, the broker's in-flight window fills and it stops sending.
  Nothing the broker delivered is dropped uncounted, and memory is bounded by admission;
* ``writer``  — takes up to ``max_batches_per_transaction`` queued messages, one device at a
  time in turn (a flood or backlog of one device cannot starve the others), and hands them to
  the single writer thread, which opens, decodes, checks the device's quotas and stores them
  in one transaction;
  only after that transaction committed are the acks published (an ack never runs ahead of
  durable storage; a lost ack makes the device re-send, which is stored once, acked again);
* ``commands`` — sends queued desired-state changes (``shadow set``) sealed with the device
  key, re-sending unanswered ones; device answers arrive through ``mqtt`` and are stored.

Blocking work (crypto, zstd, msgpack, SQL) runs only in the writer thread.

Reconnecting to the broker and retrying storage follow :class:`edgeos_protocol.backoff.Backoff`
(``broker.reconnect_s``/``reconnect_max_s``; storage from 0.5 s to 30 s). A cancellation the
MQTT client turns into a connection error is recognised from ``Task.cancelling()``
(:mod:`edgeos_protocol.aio`): the broker loop ends instead of reconnecting.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import aiomqtt

from edgeos_cloud.receiver.config import ReceiverConfig
from edgeos_cloud.receiver.fairqueue import Admission, FairQueue, Taken
from edgeos_cloud.receiver.ingest import BatchOpener, Quarantined, Rejected, parse_status
from edgeos_cloud.receiver.intake import IntakeMetrics
from edgeos_cloud.receiver.metrics import MetricsServer, ReceiverMetrics
from edgeos_cloud.receiver.quota import DeviceQuotas
from edgeos_cloud.receiver.ratelimit import OncePerMinute
from edgeos_cloud.receiver.registry import DeviceRegistry, KeyLookupError
from edgeos_cloud.receiver.storage import (
    DeviceStatus,
    IngestBatch,
    QuarantineRecord,
    Storage,
    StoreOutcome,
    open_storage,
)
from edgeos_protocol.aio import reraise_lost_cancellation
from edgeos_protocol.backoff import Backoff, BackoffPolicy
from edgeos_protocol.topics import TopicError, TopicKind, parse_topic, topic
from edgeos_protocol.wire import Ack, ControlKind, ReplayGuard, counter_from_time, seal_control

__all__ = ["Receiver"]

log = logging.getLogger("edgeos_cloud.receiver")
T = TypeVar("T")

#: Storage retries after a failed transaction (nothing was acked: devices re-send meanwhile).
STORAGE_RETRY = BackoffPolicy(initial_s=0.5, max_s=30.0, first_retry_s=None)

_KINDS = {
    TopicKind.BATCH: "batch",
    TopicKind.COMMAND_RESULT: "result",
    TopicKind.STATUS: "status",
}


@dataclass(slots=True)
class _Message:
    kind: str  # "batch" | "result" | "status"
    device: str
    payload: bytes
    received_us: int


@dataclass(frozen=True, slots=True)
class _Held:
    """A QoS 1 message waiting at the door for room; its PUBACK is withheld meanwhile."""

    topic: str
    payload: bytes
    mid: int
    received_us: int


@dataclass(slots=True)
class _WriteResult:
    acks: list[tuple[str, int, int, int]] = field(
        default_factory=list
    )  # device, key id, epoch, seq
    #: How many of the messages given were worked on; the rest go back to their lanes.
    processed: int = 0


class Receiver:
    """One receiver instance; ``await receiver.run()`` until cancelled.

    ``ready`` is set once the broker subscription is in place (tests and supervisors wait on
    it); ``metrics`` holds this instance's Prometheus registry. ``quotas`` replaces the
    per-device quotas of ``config.quotas`` (tests pass one with a virtual clock).
    """

    def __init__(
        self,
        config: ReceiverConfig,
        *,
        registry: DeviceRegistry | None = None,
        metrics: ReceiverMetrics | None = None,
        quotas: DeviceQuotas | None = None,
    ) -> None:
        self.config = config
        self.registry = registry if registry is not None else DeviceRegistry(config.registry.dir)
        self.metrics = metrics if metrics is not None else ReceiverMetrics()
        self.ready = asyncio.Event()
        self.metrics_port: int | None = None
        self._opener = BatchOpener(
            self.registry, config.limits.max_payload_bytes, limits=config.limits
        )
        # Sequence numbers quarantined per (device, epoch) since its last ack: the writer
        # thread notes them, the next ack of that epoch names them (AckStatus.QUARANTINED).
        self._ack_quarantined: dict[tuple[str, int], set[int]] = {}
        self._ack_lock = threading.Lock()
        intake = config.intake
        self._queue: FairQueue[str, _Message] = FairQueue(
            max_bytes=intake.max_bytes_in_flight,
            max_items=config.limits.queue_size,
            device_max_bytes=intake.device_max_bytes,
            device_max_items=intake.device_max_messages,
        )
        self.intake_metrics = IntakeMetrics(self.metrics.registry)
        self._quotas = quotas if quotas is not None else DeviceQuotas(config.quotas)
        # QoS 1 messages whose PUBACK waits for room, in arrival order (the broker's in-flight
        # window bounds how many), and the paho client that must acknowledge them.
        self._held: deque[_Held] = deque()
        self._acker: Any = None
        self._client: aiomqtt.Client | None = None
        self._storage: Storage | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._log_once = OncePerMinute()
        self._counters: dict[tuple[str, int], int] = {}
        self._results_guard = ReplayGuard()
        self._pending_rejects: dict[tuple[str, str], int] = {}
        # Rejects are counted on the loop (bad topics) and in the writer thread.
        self._reject_lock = threading.Lock()
        self._topic_prefix = config.broker.topic_prefix

    # ------------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        """Serve until cancelled; storage, metrics endpoint and writer thread are closed."""
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="edgeos-receiver-writer")
        server: MetricsServer | None = None
        try:
            cfg = self.config.storage
            self._storage = await self._call(
                open_storage, cfg.url, sqlite_synchronous=cfg.sqlite_synchronous
            )
            if self.config.metrics.listen:
                server = MetricsServer(self.metrics.registry, self.config.metrics.listen)
                self.metrics_port = server.port
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._mqtt_loop(), name="receiver-mqtt")
                tg.create_task(self._writer_loop(), name="receiver-writer")
                tg.create_task(self._command_loop(), name="receiver-commands")
        finally:
            self.ready.clear()
            if server is not None:
                server.close()
            if self._storage is not None:
                storage, self._storage = self._storage, None
                # Close on the thread that used it; shield so a second cancel cannot skip it.
                await asyncio.shield(self._call(storage.close))
            executor, self._executor = self._executor, None
            await asyncio.shield(asyncio.to_thread(executor.shutdown, True))

    async def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        assert self._executor is not None
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: fn(*args, **kwargs))

    # ------------------------------------------------------------------ mqtt

    def _client_kwargs(self) -> dict[str, Any]:
        b = self.config.broker
        receiver = self

        class _Door(asyncio.Queue[aiomqtt.Message]):
            """aiomqtt's incoming queue, replaced: every message goes through the door as it
            arrives (aiomqtt's own queue discards messages once full, after paho acked them)."""

            def put_nowait(self, item: aiomqtt.Message) -> None:
                receiver._door(item)

        kwargs: dict[str, Any] = {
            "keepalive": b.keepalive_s,
            "identifier": b.client_id or None,
            "queue_type": _Door,
        }
        if b.uses_tls:
            assert b.tls is not None
            kwargs["tls_params"] = aiomqtt.TLSParameters(
                ca_certs=str(b.tls.ca_file),
                certfile=str(b.tls.cert_file),
                keyfile=str(b.tls.key_file),
            )
        if b.username:
            kwargs["username"] = b.username
        return kwargs

    @property
    def subscriptions(self) -> list[str]:
        """The topic filters the receiver subscribes to (QoS 1)."""
        b = self.config.broker
        # Status is retained, and brokers send no retained messages to shared subscriptions:
        # every receiver reads every status (recording it twice is harmless).
        return [
            b.topic(TopicKind.BATCH),
            b.topic(TopicKind.COMMAND_RESULT),
            b.topic(TopicKind.STATUS, shared=False),
        ]

    async def _mqtt_loop(self) -> None:
        b = self.config.broker
        backoff = Backoff(b.reconnect_policy)
        # None until the first attempt: connected, subscribed and lost are each logged once per
        # change of state (as the gateway logs its uplink), not on every retry.
        was_connected: bool | None = None
        while True:
            served = False
            try:
                client = aiomqtt.Client(b.host, b.port, **self._client_kwargs())
                # aiomqtt has no manual acknowledgement yet (empicano/aiomqtt#345); paho's is
                # switched on so a PUBACK leaves only once the door has decided.
                self._acker = client._client
                self._acker.manual_ack_set(True)
                async with client:
                    for subscribed in self.subscriptions:
                        await client.subscribe(subscribed, qos=1)
                    # Python 3.11's wait_for (inside aiomqtt) can drop a cancellation that
                    # lands as an operation completes: do not serve for a caller that gave up.
                    reraise_lost_cancellation()
                    backoff.succeeded()
                    served = True
                    self._client = client
                    self.metrics.connected.set(1)
                    if was_connected is None:
                        log.info(
                            "broker connected (%s), subscribed to %s",
                            b.url,
                            ", ".join(self.subscriptions),
                        )
                    elif not was_connected:
                        log.warning(
                            "broker connection recovered (%s), subscribed to %s",
                            b.url,
                            ", ".join(self.subscriptions),
                        )
                    was_connected = True
                    self.ready.set()
                    # Never yields (the door takes every message); ends when the link drops.
                    async for message in client.messages:
                        self._door(message)
            except aiomqtt.MqttError as exc:
                # Cancelled, but the client raised a connection error in its place: stop.
                reraise_lost_cancellation(exc)
                if served:
                    backoff.lost()
                self.metrics.connect_failures.inc()
                if was_connected is None:
                    log.warning("broker refused or unreachable (%s): %s; retrying", b.url, exc)
                elif was_connected:
                    log.warning("broker connection lost (%s): %s; reconnecting", b.url, exc)
                was_connected = False
            finally:
                self._client = None
                self._acker = None
                self._forget_held()
                self.metrics.connected.set(0)
                self.ready.clear()
            await asyncio.sleep(backoff.next_delay())

    def _door(self, message: aiomqtt.Message) -> None:
        """Every message, on the loop as it arrives: admit, defer or refuse, then PUBACK.

        Behind messages already waiting for room, a QoS 1 message waits too (a device's order
        is kept); a QoS 0 message cannot wait (the broker does not hold it back) and is
        deferred when there is no room.
        """
        self.intake_metrics.received.inc()
        payload = message.payload
        data = payload if isinstance(payload, bytes) else bytes(payload or b"")
        now_us = int(time.time() * 1e6)
        held = _Held(str(message.topic), data, message.mid, now_us)
        if message.qos == 0:
            if not self._admit(held):
                self._defer("queue_full", "", f"QoS 0 message on {held.topic!r}")
            return
        if self._held or not self._admit(held):
            self._held.append(held)
            self.intake_metrics.held.set(len(self._held))
            return
        self._acker.ack(message.mid, message.qos)

    def _admit(self, held: _Held) -> bool:
        """Queue, defer or refuse one message; False when the queue is full (it must wait)."""
        data = held.payload
        try:
            parsed = parse_topic(held.topic, self._topic_prefix)
        except TopicError:
            parsed = None
        kind = None if parsed is None else _KINDS.get(parsed.kind)
        if parsed is None or kind is None:
            self._reject("topic", "", f"unexpected topic {held.topic!r}")
            return True
        device = parsed.device
        if kind == "status" and not data:
            return True  # a retained status being cleared
        if len(data) > self.config.limits.max_payload_bytes:
            # At the door, before anything is queued: the payload is released right here.
            self._reject("oversized", device, f"{len(data)} bytes on {held.topic!r}")
            return True
        queue = self._queue
        # Check the queue's room before charging the device's quotas for a message that would
        # then have to wait (and be charged again when it is let in).
        if queue.items_in_flight >= queue.max_items or (
            queue.bytes_in_flight and queue.bytes_in_flight + len(data) > queue.max_bytes
        ):
            return False
        # Messages per second first: a device flooding junk is turned away here, before its
        # messages cost a queue slot, a decode attempt or a write of its reject counts.
        if not self._quotas.admit_message(device):
            self._defer("messages_per_s", device, f"on {held.topic!r}")
            return True
        if kind == "batch":
            # A device that overdrew its rates waits before it costs a decode.
            overdrawn = self._quotas.in_debt(device)
            if overdrawn is not None:
                self._defer(overdrawn, device, "over quota at the door")
                return True
            if not self._quotas.admit_bytes(device, len(data)):
                self._defer("bytes_per_day", device, f"{len(data)} bytes")
                return True
        admission = queue.offer(device, _Message(kind, device, data, held.received_us), len(data))
        if admission is Admission.FULL:
            return False
        if admission is Admission.DEVICE_FULL:
            self._defer("device_busy", device, f"{queue.device_max_items} messages queued")
            return True
        self.metrics.queue_depth.set(queue.items_in_flight)
        self.intake_metrics.bytes_in_flight.set(queue.bytes_in_flight)
        self.intake_metrics.peak_bytes_in_flight.set(queue.peak_bytes)
        return True

    def _drain_held(self) -> None:
        """Admit waiting messages in arrival order while there is room, acknowledging each."""
        held = self._held
        while held and self._acker is not None:
            if not self._admit(held[0]):
                break
            self._acker.ack(held.popleft().mid, 1)
        self.intake_metrics.held.set(len(held))

    def _forget_held(self) -> None:
        """The connection is gone: its unacknowledged messages are the broker's again."""
        while self._held:
            message = self._held.popleft()
            try:
                device = parse_topic(message.topic, self._topic_prefix).device
            except TopicError:
                device = ""
            self._defer("disconnected", device, "waiting for room when the link dropped")
        self.intake_metrics.held.set(0)

    def _defer(self, why: str, device: str, message: str) -> None:
        """Count a deferred message (not stored, not acked: the device re-sends it later).

        Called on the loop (the door) and in the writer thread (quotas after decoding).
        """
        self.intake_metrics.deferred_by[why].inc()
        key = (device, f"deferred:{why}")
        with self._reject_lock:
            self._pending_rejects[key] = self._pending_rejects.get(key, 0) + 1
            loud = self._log_once.should_log(key, time.time())
        if loud:
            log.info("deferred %s from %r (%s): %s", why, device or "?", why, message)

    # ------------------------------------------------------------------ writer

    async def _writer_loop(self) -> None:
        limit = self.config.storage.max_batches_per_transaction
        backoff = Backoff(STORAGE_RETRY)
        while True:
            await self._queue.wait()
            # One message per device in turn: a device's flood or backlog waits its turn.
            taken = self._queue.take(limit)
            items = [t.item for t in taken]
            try:
                result = await self._call(self._write, items)
            except Exception as exc:  # storage unusable: nothing was acked, devices re-send
                self.metrics.storage_errors.inc()
                if self._log_once.should_log(("storage", type(exc).__name__), time.time()):
                    log.error("storage failed; %d messages not acknowledged: %s", len(items), exc)
                self._release(taken)
                await asyncio.sleep(backoff.next_delay())
                await self._reopen_storage()
                continue
            # Past the transaction's sample budget the writer stopped: the rest wait their
            # turn again, behind the other devices.
            self._queue.requeue(taken[result.processed :])
            self._release(taken[: result.processed])
            backoff.succeeded()
            for device, key_id, epoch, seq in result.acks:
                await self._publish_ack(device, key_id, epoch, seq)
                # A stop that landed as a PUBACK completed can be dropped inside the client
                # (Python 3.11's wait_for): end here, not at the next write (edgeos_protocol.aio).
                reraise_lost_cancellation()

    def _release(self, taken: list[Taken[str, _Message]]) -> None:
        self._queue.release(taken)
        self.metrics.queue_depth.set(self._queue.items_in_flight)
        self.intake_metrics.bytes_in_flight.set(self._queue.bytes_in_flight)
        self._drain_held()

    async def _reopen_storage(self) -> None:
        old, self._storage = self._storage, None
        if old is not None:
            try:
                await self._call(old.close)
            except Exception as exc:  # a broken connection may fail to close; it is dropped
                log.debug("closing broken storage: %s", exc)
        cfg = self.config.storage
        try:
            self._storage = await self._call(
                open_storage, cfg.url, sqlite_synchronous=cfg.sqlite_synchronous
            )
        except Exception as exc:  # still down: the writer retries with the next messages
            log.debug("storage still unavailable: %s", exc)

    def _write(self, items: list[_Message]) -> _WriteResult:
        """Writer thread: open, store (one transaction), collect acks and command results.

        Stops once the decoded batches hold ``intake.max_samples_per_transaction`` samples
        (``result.processed`` says how many messages were worked on): a device sending huge
        batches then costs the others one transaction per turn, and the writer's memory is
        bounded by the budget plus one batch.
        """
        storage = self._storage
        if storage is None:
            raise RuntimeError("storage is not open")
        batches: list[IngestBatch] = []
        key_ids: list[int] = []
        quarantine: list[QuarantineRecord] = []
        statuses: list[DeviceStatus] = []
        result = _WriteResult()
        budget = self.config.intake.max_samples_per_transaction
        samples = 0
        result.processed = len(items)
        for index, item in enumerate(items):
            if samples >= budget:
                result.processed = index
                break
            if item.kind == "result":
                self._handle_result(storage, item)
                continue
            if item.kind == "status":
                status = self._open_status(item)
                if status is not None:
                    statuses.append(status)
                continue
            try:
                batch = self._opener.open(item.payload, item.received_us, item.device)
            except Quarantined as exc:  # authenticated, kept sealed, acked as quarantined
                quarantine.append(exc.record)
                continue
            except Rejected as exc:
                self._reject(exc.reason, exc.device, str(exc))
                continue
            over = self._quotas.admit_batch(
                batch.device, batch.tag_names, batch.sample_count, len(batch.events)
            )
            if over is not None:
                self._defer(over, batch.device, f"batch {batch.epoch:#x}/{batch.seq}")
                continue
            batches.append(batch)
            key_ids.append(batch.key_id)
            samples += batch.sample_count
        self._store(storage, batches, key_ids, quarantine, result)
        if statuses:
            storage.record_statuses(statuses)
            for status in statuses:
                self.metrics.online.labels(status.device).set(1 if status.online else 0)
        with self._reject_lock:
            pending, self._pending_rejects = self._pending_rejects, {}
        if pending:
            storage.record_rejects(pending, int(time.time() * 1e6))
        return result

    def _store(
        self,
        storage: Storage,
        batches: list[IngestBatch],
        key_ids: list[int],
        quarantine: list[QuarantineRecord],
        result: _WriteResult,
    ) -> None:
        """One transaction: store ``batches`` and ``quarantine``, count them, collect acks."""
        if not batches and not quarantine:
            return
        started = time.perf_counter()
        # A batch the database refuses comes back quarantined; the others are stored.
        outcomes = storage.store(batches, quarantine)
        self.metrics.store_seconds.observe(time.perf_counter() - started)
        now = time.time()
        # Older epochs named by skip lists: one ack each per transaction is enough.
        others: dict[tuple[str, int, int], int] = {}
        for batch, outcome, key_id in zip(batches, outcomes, key_ids, strict=False):
            self._count(batch, outcome, now)
            result.acks.append((outcome.device, key_id, outcome.epoch, outcome.ack_seq))
            for epoch, seq in outcome.other_acks:
                others[(outcome.device, key_id, epoch)] = seq
        for record, outcome in zip(quarantine, outcomes[len(batches) :], strict=True):
            self._count_quarantine(record.detail, record.nbytes, outcome)
            result.acks.append((outcome.device, record.key_id, outcome.epoch, outcome.ack_seq))
        result.acks.extend((d, k, e, seq) for (d, k, e), seq in others.items())

    def _open_status(self, item: _Message) -> DeviceStatus | None:
        try:
            status = parse_status(item.payload, item.device, item.received_us)
        except Rejected as exc:
            self._reject(exc.reason, exc.device, str(exc))
            return None
        if self.registry.get(item.device) is None:
            self._reject("unknown_device", item.device, "status of an unknown device")
            return None
        return status

    def _count(self, batch: IngestBatch, outcome: StoreOutcome, now: float) -> None:
        if outcome.quarantined is not None:  # the database refused it: kept sealed instead
            self._count_quarantine("refused by the database", batch.nbytes, outcome)
        elif outcome.stored:
            self.metrics.batches.inc()
            self.metrics.samples.inc(outcome.samples)
            self.metrics.bytes.inc(batch.nbytes)
            self.metrics.ingest_lag.observe(max(0.0, now - batch.created_us / 1e6))
            self.metrics.last_seen.labels(batch.device).set(now)
        else:
            self._reject(
                "replayed",
                batch.device,
                f"batch {batch.epoch:#x}/{batch.seq} already stored; acknowledged again",
                level=logging.INFO,
            )

    def _count_quarantine(self, detail: str, nbytes: int, outcome: StoreOutcome) -> None:
        """Count a quarantined batch and note it for the next ack of its epoch."""
        what = f"batch {outcome.epoch:#x}/{outcome.seq}"
        if outcome.quarantined is None:  # stored before: a plain replay
            self._reject("replayed", outcome.device, f"{what} already stored", logging.INFO)
            return
        with self._ack_lock:
            self._ack_quarantined.setdefault((outcome.device, outcome.epoch), set()).add(
                outcome.seq
            )
        if not outcome.new_quarantine:
            self._reject("replayed", outcome.device, f"{what} already quarantined", logging.INFO)
            return
        self.metrics.quarantined.labels(outcome.quarantined).inc()
        self.metrics.quarantined_bytes.inc(nbytes)
        if self._log_once.should_log((outcome.device, "quarantine"), time.time()):
            log.warning(
                "quarantined %s from %r (%s): %s",
                what,
                outcome.device,
                outcome.quarantined,
                detail,
            )

    def _reject(self, reason: str, device: str, message: str, level: int = logging.WARNING) -> None:
        self.metrics.rejects.labels(reason).inc()
        key = (device, reason)
        with self._reject_lock:
            self._pending_rejects[key] = self._pending_rejects.get(key, 0) + 1
            loud = self._log_once.should_log(key, time.time())
        if loud:
            log.log(level, "rejected %s from %r: %s", reason, device or "?", message)

    def _handle_result(self, storage: Storage, item: _Message) -> None:
        try:
            control = self._opener.open_result(item.payload, item.device)
        except Rejected as exc:
            self._reject(exc.reason, exc.device, str(exc))
            return
        if control.kind is not ControlKind.COMMAND_RESULT or not self._results_guard.check(control):
            self._reject("replayed", item.device, f"command result counter {control.counter}")
            return
        payload = control.payload
        version, ok, results = payload.get("version"), payload.get("ok"), payload.get("results")
        if (
            type(version) is not int
            or not 0 < version < 1 << 63  # a BIGINT column: a larger one cannot match
            or not isinstance(ok, bool)
        ):
            self._reject("malformed", item.device, "command result lacks version/ok")
            return
        if not isinstance(results, dict):
            results = {"results": results}
        if storage.record_command_result(item.device, version, ok, results, int(time.time() * 1e6)):
            self.metrics.command_results.labels("applied" if ok else "refused").inc()
        else:
            self._reject("malformed", item.device, f"result for unknown command v{version}")

    # ------------------------------------------------------------------ downlink

    def _next_counter(self, device: str, kind: ControlKind) -> int:
        key = (device, int(kind))
        counter = counter_from_time(self._counters.get(key, 0), time.time())
        self._counters[key] = counter
        return counter

    async def _publish_ack(self, device: str, key_id: int, epoch: int, seq: int) -> None:
        client = self._client
        if client is None:
            self.metrics.acks_dropped.inc()
            return
        try:
            device_key = self.registry.key_for(device, key_id)
        except KeyLookupError:  # revoked between storing and acking: say nothing more
            return
        with self._ack_lock:
            quarantined = self._ack_quarantined.pop((device, epoch), set())
        message = seal_control(
            ControlKind.ACK,
            Ack(epoch, seq, tuple(sorted(quarantined))).payload(),
            device_key,
            device,
            self._next_counter(device, ControlKind.ACK),
            key_id=key_id,
        )
        try:
            await client.publish(topic(device, TopicKind.ACK, self._topic_prefix), message, qos=1)
            self.metrics.acks.inc()
        except aiomqtt.MqttError:
            self.metrics.acks_dropped.inc()

    async def _command_loop(self) -> None:
        cfg = self.config.commands
        while True:
            await asyncio.sleep(cfg.poll_s)
            if self._client is None or self._storage is None:
                continue
            storage = self._storage
            now_us = int(time.time() * 1e6)
            try:
                due = await self._call(storage.due_commands, now_us, int(cfg.resend_s * 1e6))
            except Exception as exc:  # storage trouble is the writer's to report and repair
                log.debug("cannot read pending commands: %s", exc)
                continue
            for command in due:
                await self._send_command(storage, command.device, command)
                # As in the writer: a stop dropped inside a publish must still end this loop,
                # or the service polls on and the stop waits for systemd's SIGKILL.
                reraise_lost_cancellation()

    async def _send_command(self, storage: Storage, device: str, command: Any) -> None:
        client = self._client
        record = self.registry.get(device)
        if client is None or record is None or record.status != "active":
            return
        message = seal_control(
            ControlKind.COMMAND,
            {"id": command.id, "version": command.version, "desired": command.desired},
            record.current_key,
            device,
            self._next_counter(device, ControlKind.COMMAND),
            key_id=record.current_key_id,
            created_us=int(time.time() * 1e6),
        )
        try:
            await client.publish(
                topic(device, TopicKind.COMMAND, self._topic_prefix), message, qos=1
            )
        except aiomqtt.MqttError:
            return
        self.metrics.commands_sent.inc()
        await self._call(storage.mark_sent, device, command.version, int(time.time() * 1e6))
