"""The receiver service: MQTT in, verify, deduplicate, store, acknowledge; commands out.

One asyncio loop, one root TaskGroup with three children:

* ``mqtt``    — connects (TLS client certificate, or plain TCP), subscribes with a shared
  subscription ``$share/<group>/<prefix>/+/batch`` (and ``…/cmd/result``) so several
  receivers split the load (``group = ""``: plain subscriptions, for brokers without shared
  subscriptions), plainly to ``<prefix>/+/status`` (retained birth/death), and queues every
  message (bounded: a slow writer pauses reading, it never drops);
* ``writer``  — takes up to ``max_batches_per_transaction`` queued messages at a time and hands
  them to the single writer thread, which opens, decodes and stores them in one transaction;
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
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import aiomqtt

from edgeos_cloud.receiver.config import ReceiverConfig
from edgeos_cloud.receiver.ingest import BatchOpener, Rejected, parse_status
from edgeos_cloud.receiver.metrics import MetricsServer, ReceiverMetrics
from edgeos_cloud.receiver.ratelimit import OncePerMinute
from edgeos_cloud.receiver.registry import DeviceRegistry, KeyLookupError
from edgeos_cloud.receiver.storage import (
    DeviceStatus,
    IngestBatch,
    Storage,
    StoreOutcome,
    open_storage,
)
from edgeos_protocol.aio import reraise_lost_cancellation
from edgeos_protocol.backoff import Backoff, BackoffPolicy
from edgeos_protocol.topics import TopicError, TopicKind, parse_topic, topic
from edgeos_protocol.wire import ControlKind, ReplayGuard, counter_from_time, seal_control

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


@dataclass(slots=True)
class _WriteResult:
    acks: list[tuple[str, int, int, int]] = field(
        default_factory=list
    )  # device, key id, epoch, seq


class Receiver:
    """One receiver instance; ``await receiver.run()`` until cancelled.

    ``ready`` is set once the broker subscription is in place (tests and supervisors wait on
    it); ``metrics`` holds this instance's Prometheus registry.
    """

    def __init__(
        self,
        config: ReceiverConfig,
        *,
        registry: DeviceRegistry | None = None,
        metrics: ReceiverMetrics | None = None,
    ) -> None:
        self.config = config
        self.registry = registry if registry is not None else DeviceRegistry(config.registry.dir)
        self.metrics = metrics if metrics is not None else ReceiverMetrics()
        self.ready = asyncio.Event()
        self.metrics_port: int | None = None
        self._opener = BatchOpener(self.registry, config.limits.max_payload_bytes)
        self._queue: asyncio.Queue[_Message] = asyncio.Queue(config.limits.queue_size)
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
        kwargs: dict[str, Any] = {
            "keepalive": b.keepalive_s,
            "identifier": b.client_id or None,
            "max_queued_incoming_messages": self.config.limits.queue_size * 4,
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
        was_connected = True
        while True:
            served = False
            try:
                async with aiomqtt.Client(b.host, b.port, **self._client_kwargs()) as client:
                    for subscribed in self.subscriptions:
                        await client.subscribe(subscribed, qos=1)
                    # Python 3.11's wait_for (inside aiomqtt) can drop a cancellation that
                    # lands as an operation completes: do not serve for a caller that gave up.
                    reraise_lost_cancellation()
                    backoff.succeeded()
                    served = True
                    self._client = client
                    self.metrics.connected.set(1)
                    if not was_connected:
                        log.warning("broker connection recovered (%s)", b.url)
                    was_connected = True
                    self.ready.set()
                    async for message in client.messages:
                        await self._dispatch(str(message.topic), message.payload)
            except aiomqtt.MqttError as exc:
                # Cancelled, but the client raised a connection error in its place: stop.
                reraise_lost_cancellation(exc)
                if served:
                    backoff.lost()
                if was_connected:
                    log.warning("broker connection lost or refused (%s): %s", b.url, exc)
                was_connected = False
            finally:
                self._client = None
                self.metrics.connected.set(0)
                self.ready.clear()
            await asyncio.sleep(backoff.next_delay())

    async def _dispatch(self, topic: str, payload: Any) -> None:
        now_us = int(time.time() * 1e6)
        data = payload if isinstance(payload, bytes) else bytes(payload or b"")
        try:
            parsed = parse_topic(topic, self._topic_prefix)
        except TopicError:
            parsed = None
        kind = None if parsed is None else _KINDS.get(parsed.kind)
        if parsed is None or kind is None:
            self._reject("topic", "", f"unexpected topic {topic!r}")
            return
        if kind == "status" and not data:
            return  # a retained status being cleared
        await self._queue.put(_Message(kind, parsed.device, data, now_us))
        self.metrics.queue_depth.set(self._queue.qsize())

    # ------------------------------------------------------------------ writer

    async def _writer_loop(self) -> None:
        limit = self.config.storage.max_batches_per_transaction
        backoff = Backoff(STORAGE_RETRY)
        while True:
            items = [await self._queue.get()]
            while len(items) < limit and not self._queue.empty():
                items.append(self._queue.get_nowait())
            self.metrics.queue_depth.set(self._queue.qsize())
            try:
                result = await self._call(self._write, items)
            except Exception as exc:  # storage unusable: nothing was acked, devices re-send
                self.metrics.storage_errors.inc()
                if self._log_once.should_log(("storage", type(exc).__name__), time.time()):
                    log.error("storage failed; %d messages not acknowledged: %s", len(items), exc)
                await asyncio.sleep(backoff.next_delay())
                await self._reopen_storage()
                continue
            backoff.succeeded()
            for device, key_id, epoch, seq in result.acks:
                await self._publish_ack(device, key_id, epoch, seq)

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
        """Writer thread: open, store (one transaction), collect acks and command results."""
        storage = self._storage
        if storage is None:
            raise RuntimeError("storage is not open")
        batches: list[IngestBatch] = []
        key_ids: list[int] = []
        statuses: list[DeviceStatus] = []
        for item in items:
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
            except Rejected as exc:
                self._reject(exc.reason, exc.device, str(exc))
                continue
            batches.append(batch)
            key_ids.append(self._key_id_of(item.payload))
        result = _WriteResult()
        if batches:
            started = time.perf_counter()
            outcomes = storage.store(batches)
            self.metrics.store_seconds.observe(time.perf_counter() - started)
            now = time.time()
            # Older epochs named by skip lists: one ack each per transaction is enough.
            others: dict[tuple[str, int, int], int] = {}
            for batch, outcome, key_id in zip(batches, outcomes, key_ids, strict=True):
                self._count(batch, outcome, now)
                result.acks.append((outcome.device, key_id, outcome.epoch, outcome.ack_seq))
                for epoch, seq in outcome.other_acks:
                    others[(outcome.device, key_id, epoch)] = seq
            result.acks.extend((d, k, e, seq) for (d, k, e), seq in others.items())
        if statuses:
            storage.record_statuses(statuses)
            for status in statuses:
                self.metrics.online.labels(status.device).set(1 if status.online else 0)
        with self._reject_lock:
            pending, self._pending_rejects = self._pending_rejects, {}
        if pending:
            storage.record_rejects(pending, int(time.time() * 1e6))
        return result

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

    @staticmethod
    def _key_id_of(payload: bytes) -> int:
        from edgeos_protocol.wire import parse_header

        return parse_header(payload).key_id

    def _count(self, batch: IngestBatch, outcome: StoreOutcome, now: float) -> None:
        if outcome.stored:
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
        if not isinstance(version, int) or not isinstance(ok, bool):
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
        message = seal_control(
            ControlKind.ACK,
            {"epoch": epoch, "seq": seq},
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
