"""The publisher: spooled batches → MQTT, deleted only when the receiver acknowledges them.

Topics (built by :mod:`edgeos_protocol.topics`; ``<p>`` = ``topic_prefix``, default
``edgeos/v1``)::

    <p>/<device>/batch       device → receiver   sealed batches, QoS 1
    <p>/<device>/ack         receiver → device   sealed ACK {epoch, seq} (contiguous, stored)
    <p>/<device>/cmd         receiver → device   sealed COMMAND
    <p>/<device>/cmd/result  device → receiver   sealed COMMAND_RESULT
    <p>/<device>/status      device → all        retained JSON birth ("online"); the MQTT
                                                 last will is the death ("offline")

A PUBACK means only that the broker has the batch; a batch leaves the spool when an ack
covering it arrives. Sent-but-unacknowledged batches are re-sent after ``resend_after_s``
and after every reconnect. Sending order each time the window has room: fresh batches (those
the batcher stored while connected) first, then re-sends, then the backlog (everything else
in the spool, oldest first) at most ``backlog_rate`` per second; re-sends and backlog never
take the last slot of the ``inflight_window``, so fresh data keeps a bounded latency while an
outage drains.

Commands never hold up acknowledgements: each runs as a task of the session's task group,
under its own ``command_timeout_s``, at most ``max_commands_in_flight`` at a time; a command
beyond that is answered at once with a refusal saying the device is busy (never dropped).
A command is applied at most once: its version is recorded per source in the
:class:`~edgeos.uplink.commands.CommandLedger` (persisted in the state directory by the
runtime) before its handler runs; a version already taken is never applied again — the same
version is answered with the stored result, an older one with a refusal — so a captured
command replayed after a restart does nothing.

Structure (as in aiomqtt): :meth:`Publisher.session` is one async context manager per
connection and :meth:`Session.serve` runs it until the connection fails; :meth:`Publisher.run`
is the caller's reconnect loop (:class:`~edgeos_protocol.backoff.Backoff`, the policy in
``PublisherOptions.reconnect``). Cancellation cancels the inner tasks and propagates; a
cancellation the MQTT client turns into a connection error (or Python 3.11's ``wait_for``
drops) is recognised from ``Task.cancelling()`` by :mod:`edgeos_protocol.aio`, and ``run()``
ends instead of reconnecting.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import aiomqtt

from edgeos.clock import Clock, SystemClock
from edgeos.config import TlsConfig, UplinkConfig
from edgeos.errors import ConnectError, WireError
from edgeos.histogram import Histogram
from edgeos.uplink.batcher import SealedBatch
from edgeos.uplink.commands import CommandLedger, Verdict
from edgeos.uplink.spool import Spool
from edgeos_protocol.aio import in_own_task, reraise_lost_cancellation
from edgeos_protocol.backoff import Backoff, BackoffPolicy
from edgeos_protocol.crypto import Keyring, Suite
from edgeos_protocol.topics import DEFAULT_PREFIX, device_topics
from edgeos_protocol.wire import (
    Ack,
    ControlKind,
    ReplayGuard,
    counter_from_time,
    open_control,
    seal_control,
)

__all__ = ["CommandHandler", "Publisher", "PublisherOptions", "PublisherStats", "Session"]

log = logging.getLogger(__name__)

#: Handles a command payload ``{"id", "version", "desired"}``; returns the result payload.
CommandHandler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]
Key = tuple[int, int]


@dataclass(frozen=True, slots=True)
class PublisherOptions:
    """Connection and flow options (see :class:`~edgeos.config.UplinkConfig`)."""

    device: str
    broker: str = "mqtts://localhost:8883"
    tls: TlsConfig | None = None
    username: str | None = None
    topic_prefix: str = DEFAULT_PREFIX
    inflight_window: int = 16
    backlog_rate: float = 20.0
    #: Seconds without an ack before a sent batch is sent again.
    resend_after_s: float = 20.0
    keepalive_s: int = 30
    #: Reconnect delays: exponential from 0.5 s to 30 s, each jittered into [d/2, d]; the
    #: first retry after a connection that was up drops comes after 0.1 s.
    reconnect: BackoffPolicy = field(default_factory=BackoffPolicy)
    suite: Suite = Suite.CHACHA20_POLY1305
    #: Commands run at the same time; one more is refused at once with a "busy" result.
    max_commands_in_flight: int = 4
    #: A command's handler is given up after this long (its result says so).
    command_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        if self.max_commands_in_flight < 1:
            raise ValueError("max_commands_in_flight must be >= 1")
        if self.command_timeout_s <= 0:
            raise ValueError("command_timeout_s must be > 0")

    @classmethod
    def from_config(cls, device: str, config: UplinkConfig, **overrides: Any) -> PublisherOptions:
        return cls(
            device=device,
            broker=config.broker,
            tls=config.tls,
            username=config.username,
            topic_prefix=config.topic_prefix,
            inflight_window=config.inflight_window,
            backlog_rate=config.backlog_rate,
            suite=Suite.from_name(config.cipher),
            **overrides,
        )


@dataclass(slots=True)
class PublisherStats:
    state: str = "idle"
    connects: int = 0
    connect_failures: int = 0
    published: int = 0
    resent: int = 0
    #: Batches dropped from the spool because the receiver stored them.
    acked: int = 0
    #: Batches dropped from the spool because the receiver quarantined them: they
    #: authenticated but it could not decode or store them, and it keeps their sealed bytes
    #: to re-ingest (``edgeos-cloud quarantine``). Not data loss, but a fault to look at.
    cloud_quarantined: int = 0
    acks: int = 0
    bad_control: int = 0
    commands: int = 0
    #: Commands refused because ``max_commands_in_flight`` were running.
    commands_busy: int = 0
    #: Commands whose handler did not finish within ``command_timeout_s``.
    commands_timed_out: int = 0
    #: Commands not applied because their version was already taken (replays, re-sends).
    commands_stale: int = 0
    last_ack_time: float | None = None
    #: Monotonic time of the last ack: ages are measured on it (a wall-clock step would make
    #: ``now - last_ack_time`` jump by hours and fail the OTA health check of a healthy slot).
    last_ack_monotonic: float | None = None
    #: Spool append → ack, for batches appended by this process.
    ack_latency: Histogram = field(default_factory=Histogram)

    def as_dict(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "connects": self.connects,
            "connect_failures": self.connect_failures,
            "published": self.published,
            "resent": self.resent,
            "acked": self.acked,
            "cloud_quarantined": self.cloud_quarantined,
            "acks": self.acks,
            "bad_control": self.bad_control,
            "commands": self.commands,
            "commands_busy": self.commands_busy,
            "commands_timed_out": self.commands_timed_out,
            "commands_stale": self.commands_stale,
            "last_ack_time": self.last_ack_time,
            "ack_latency": self.ack_latency.summary_ms(),
        }


class Publisher:
    """Moves spooled batches to the broker and applies the receiver's acks (module docs)."""

    def __init__(
        self,
        options: PublisherOptions,
        *,
        spool: Spool,
        keyring: Keyring,
        clock: Clock | None = None,
        on_ack: Callable[[int, int], None] | None = None,
        on_command: CommandHandler | None = None,
        status: Callable[[], dict[str, Any]] | None = None,
        command_ledger: CommandLedger | None = None,
    ) -> None:
        self.options = options
        self.spool = spool
        self.keyring = keyring
        self.clock = clock or SystemClock()
        self.on_ack = on_ack
        self.on_command = on_command
        self.status_extra = status
        self.counters = PublisherStats()
        self._fresh: deque[Key] = deque()
        self._wake = asyncio.Event()
        self._connected = False
        self._commands = ReplayGuard()
        # Pending batches the receiver said it quarantined; counted when an ack drops them.
        self._cloud_quarantined: set[Key] = set()
        #: Versions taken per source, persisted by the runtime (replays after a restart).
        self.command_ledger = command_ledger or CommandLedger()
        #: (source, version) of commands whose handler is running now.
        self._commands_running: set[tuple[str, int]] = set()
        self._counter = 0
        self._tls: tuple[tuple[tuple[int, int], ...], ssl.SSLContext] | None = None
        self.topics = device_topics(options.device, options.topic_prefix)

    # ------------------------------------------------------------------ inputs

    def notify(self, batch: SealedBatch) -> None:
        """A batch is in the spool (the batcher's ``on_stored``): send it as fresh data."""
        if self._connected:
            self._fresh.append((batch.epoch, batch.seq))
        self._wake.set()

    @property
    def backlog(self) -> int:
        """Batches in the spool that are not yet acknowledged."""
        return len(self.spool)

    def stats(self) -> dict[str, Any]:
        last = self.counters.last_ack_monotonic
        age = None if last is None else round(self.clock.monotonic() - last, 1)
        return {**self.counters.as_dict(), "backlog": self.backlog, "last_ack_age_s": age}

    # ------------------------------------------------------------------ connection

    def tls_context(self) -> ssl.SSLContext:
        """The client TLS context, built once and rebuilt only when a credential file changes.

        One context for every reconnect: building it per attempt loaded the CA, certificate and
        key again each time (an attempt every few seconds while the broker is away) and left a
        context behind per attempt until the next full garbage collection.
        """
        tls = self.options.tls
        if tls is None:
            raise ConnectError("an mqtts:// broker needs uplink.tls (ca_file, cert_file, key_file)")
        files = (tls.ca_file, tls.cert_file, tls.key_file)
        try:
            stamp = tuple((st.st_mtime_ns, st.st_size) for st in (f.stat() for f in files))
        except OSError as exc:
            raise ConnectError(f"TLS credentials not readable: {exc}") from exc
        if self._tls is not None and self._tls[0] == stamp:
            return self._tls[1]
        # Verify the broker's certificate and host name against our CA, present our own.
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        try:
            context.load_verify_locations(cafile=str(tls.ca_file))
            context.load_cert_chain(str(tls.cert_file), str(tls.key_file))
        except (OSError, ssl.SSLError) as exc:
            raise ConnectError(f"TLS credentials not usable: {exc}") from exc
        if self._tls is not None:
            log.info("uplink TLS credentials changed on disk; using the new ones")
        self._tls = (stamp, context)
        return context

    @contextlib.asynccontextmanager
    async def session(self) -> AsyncIterator[Session]:
        """One connection: connect (TLS, last will), birth, subscriptions; death on exit."""
        o = self.options
        url = urlsplit(o.broker)
        secure = url.scheme in ("mqtts", "ssl", "tls")
        if url.scheme not in ("mqtt", "mqtts", "tcp", "ssl", "tls") or not url.hostname:
            raise ConnectError(f"broker URL {o.broker!r} is not mqtt://host:port or mqtts://…")
        tls_context = self.tls_context() if secure else None
        will = aiomqtt.Will(self.topics.status, self._status("offline"), qos=1, retain=True)
        client = aiomqtt.Client(
            url.hostname,
            url.port or (8883 if secure else 1883),
            username=o.username,
            identifier=o.device,
            will=will,
            keepalive=o.keepalive_s,
            tls_context=tls_context,
            clean_session=True,
            timeout=10.0,
            max_inflight_messages=max(20, o.inflight_window + 4),
        )
        self.counters.state = "connecting"
        async with client:
            self.counters.connects += 1
            await client.subscribe(self.topics.ack, qos=1)
            await client.subscribe(self.topics.command, qos=1)
            # "connected" once acks and commands can arrive: the session is clean, so a command
            # published between CONNACK and SUBACK would never reach this device (seen in the
            # arm64 lane, where that window is wide).
            self.counters.state = "connected"
            await client.publish(self.topics.status, self._status("online"), qos=1, retain=True)
            # Python 3.11's wait_for (inside aiomqtt) can drop a cancellation that lands as an
            # operation completes: do not start serving for a caller that gave up.
            reraise_lost_cancellation()
            session = Session(self, client)
            self._connected = True
            self._fresh.clear()  # everything already spooled is backlog now
            broken = False
            try:
                yield session
            except (aiomqtt.MqttError, OSError):
                broken = True
                raise
            finally:
                self._connected = False
                self.counters.state = "disconnected"
                if not broken:
                    # Orderly end (also on cancellation): the last will fires only when the
                    # connection breaks, so say goodbye ourselves.
                    with contextlib.suppress(aiomqtt.MqttError):
                        await client.publish(
                            self.topics.status,
                            self._status("offline"),
                            qos=1,
                            retain=True,
                            timeout=2.0,
                        )

    async def run(self) -> None:
        """Connect, serve, and reconnect (``options.reconnect``) until cancelled."""
        backoff = Backoff(self.options.reconnect)
        lost = False
        while True:
            served = False
            try:
                async with self.session() as session:
                    if lost:
                        log.info("uplink connection recovered")
                    lost = False
                    served = True
                    backoff.succeeded()
                    # In a task of its own: the session's TaskGroup must not touch this task's
                    # cancellation count, which tells a lost cancellation (edgeos_protocol.aio).
                    await in_own_task(session.serve(), name="uplink-session")
            except (aiomqtt.MqttError, ConnectError, OSError) as exc:
                # Cancelled, but the client raised a connection error in its place: stop.
                reraise_lost_cancellation(exc)
                self.counters.connect_failures += 1
                self.counters.state = "disconnected"
                if served:
                    backoff.lost()
                if not lost:
                    # Log state changes only (flash wear), not every failed attempt.
                    log.warning("uplink connection lost: %s", exc)
                    lost = True
            await self.clock.sleep_until(self.clock.monotonic() + backoff.next_delay())

    def _status(self, state: str) -> bytes:
        doc: dict[str, Any] = {
            "state": state,
            "device": self.options.device,
            "ts": self.clock.time(),
        }
        if self.status_extra is not None:
            doc.update(self.status_extra())
        return json.dumps(doc).encode()

    def _next_counter(self) -> int:
        self._counter = counter_from_time(self._counter, self.clock.time())
        return self._counter

    def _apply_ack(self, epoch: int, seq: int, quarantined: tuple[int, ...] = ()) -> int:
        """Drop what the ack covers from the spool; ``quarantined`` (``AckStatus``) names
        batches of the epoch the receiver kept sealed instead of storing."""
        now = self.clock.monotonic()
        pending = [k for k in self.spool.pending_keys() if k[0] == epoch]
        if quarantined:
            held = set(pending)
            self._cloud_quarantined.update(k for q in quarantined if (k := (epoch, q)) in held)
        appended = [
            t for k in pending if k[1] <= seq and (t := self.spool.appended_at(*k)) is not None
        ]
        dropped = self.spool.ack(epoch, seq)
        for t in appended:
            self.counters.ack_latency.record(now - t)
        gone = {k for k in self._cloud_quarantined if k[0] == epoch and k[1] <= seq}
        self._cloud_quarantined -= gone
        n_quarantined = min(len(gone), dropped)
        if n_quarantined:
            log.warning(
                "the receiver quarantined %d batches of epoch %#x (it keeps them sealed and "
                "can re-ingest them); dropped from the spool",
                n_quarantined,
                epoch,
            )
        self.counters.acks += 1
        self.counters.acked += dropped - n_quarantined
        self.counters.cloud_quarantined += n_quarantined
        self.counters.last_ack_time = self.clock.time()
        self.counters.last_ack_monotonic = now
        if self.on_ack is not None:
            self.on_ack(epoch, seq)
        return dropped


class Session:
    """One live connection: a sender, a receiver and the running commands (see :meth:`serve`)."""

    def __init__(self, publisher: Publisher, client: aiomqtt.Client) -> None:
        self.p = publisher
        self.client = client
        self._tg: asyncio.TaskGroup | None = None
        #: Commands whose handler is running (bounded by ``max_commands_in_flight``).
        self.commands_running = 0
        #: Sent, not yet acknowledged: key → monotonic time sent.
        self.inflight: dict[Key, float] = {}
        self._resend: deque[Key] = deque()
        self._backlog: deque[Key] = deque()
        self._tokens = 1.0
        self._last_refill = publisher.clock.monotonic()

    async def serve(self) -> None:
        """Send, receive and run commands until the connection fails (raises
        ``aiomqtt.MqttError``); every task of the session is a child of one task group."""
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                tg.create_task(self._receive(), name="uplink-receive")
                tg.create_task(self._send(tg), name="uplink-send")
        except BaseExceptionGroup as group:
            # A lost connection fails several tasks at once; the caller wants one MqttError.
            match, rest = group.split((aiomqtt.MqttError, OSError))
            if rest is not None or match is None:
                raise
            first: BaseException = match
            while isinstance(first, BaseExceptionGroup):
                first = first.exceptions[0]
            raise first from group
        finally:
            self._tg = None

    # ------------------------------------------------------------------ receiving

    async def _receive(self) -> None:
        p = self.p
        async for message in self.client.messages:
            payload = message.payload
            if not isinstance(payload, bytes | bytearray):
                p.counters.bad_control += 1
                continue
            topic = message.topic.value
            try:
                if topic == p.topics.ack:
                    control = open_control(
                        bytes(payload),
                        p.keyring.keys,
                        device=p.options.device,
                        kinds=frozenset({ControlKind.ACK}),
                    )
                    self._on_ack(control.payload)
                elif topic == p.topics.command:
                    control = open_control(
                        bytes(payload),
                        p.keyring.keys,
                        device=p.options.device,
                        kinds=frozenset({ControlKind.COMMAND}),
                    )
                    if p._commands.check(control):
                        # Never awaited here: acks arrive on this loop too.
                        self._start_command(control.payload, control.key_id)
                    else:
                        p.counters.bad_control += 1
            except (WireError, KeyError, TypeError, ValueError) as exc:
                p.counters.bad_control += 1
                log.debug("control message refused: %s", exc)

    def _on_ack(self, payload: dict[str, Any]) -> None:
        ack = Ack.parse(payload)  # MalformedBatch (a WireError): counted as bad_control
        epoch, seq = ack.epoch, ack.seq
        self.p._apply_ack(epoch, seq, ack.quarantined)
        # Sequence numbers are per epoch; acks are contiguous, so drop what they cover.
        for key in [k for k in self.inflight if k[0] == epoch and k[1] <= seq]:
            del self.inflight[key]
        self.p._wake.set()

    def _start_command(self, payload: dict[str, Any], key_id: int) -> None:
        p = self.p
        assert self._tg is not None, "commands arrive only while serve() runs"
        p.counters.commands += 1
        try:
            # On the loop on purpose: claims must be decided in arrival order, and commands
            # are rare (one small fsync-ed file per command, a few ms).
            verdict = p.command_ledger.claim(payload)
        except TypeError as exc:
            p.counters.bad_control += 1
            log.warning("command %r refused: %s", payload.get("id"), exc)
            return
        except OSError as exc:
            log.error("command %r not applied: cannot record it: %s", payload.get("id"), exc)
            refusal = _refusal(payload, f"the device cannot record the command: {exc}")
            self._tg.create_task(self._send_result(refusal, key_id), name="uplink-command-result")
            return
        if verdict.action != "apply":
            answer = self._answer_taken(payload, verdict)
            if answer is not None:
                self._tg.create_task(
                    self._send_result(answer, key_id), name="uplink-command-result"
                )
            return
        limit = p.options.max_commands_in_flight
        if self.commands_running >= limit:
            p.counters.commands_busy += 1
            log.warning("command %r refused: %d commands are running", payload.get("id"), limit)
            busy = _refusal(payload, f"device busy: {limit} commands running; send it again later")
            p.command_ledger.record_result(verdict, busy)
            self._tg.create_task(self._send_result(busy, key_id), name="uplink-command-result")
            return
        self.commands_running += 1
        p._commands_running.add((verdict.source, verdict.version))
        self._tg.create_task(self._run_command(payload, key_id, verdict), name="uplink-command")

    def _answer_taken(self, payload: dict[str, Any], verdict: Verdict) -> dict[str, Any] | None:
        """The answer to a command whose version was already taken (never applied again)."""
        p = self.p
        p.counters.commands_stale += 1
        if verdict.action == "stale":
            log.warning(
                "command %r refused: version %d is below version %d already taken",
                payload.get("id"),
                verdict.version,
                verdict.taken,
            )
            return _refusal(
                payload, f"version {verdict.version} is older than version {verdict.taken}"
            )
        if verdict.result is not None:
            return verdict.result  # the same command again (a re-send): the same answer
        if (verdict.source, verdict.version) in p._commands_running:
            return None  # still running: its handler answers
        return _refusal(payload, "interrupted by a restart before it finished; send it again")

    async def _run_command(self, payload: dict[str, Any], key_id: int, verdict: Verdict) -> None:
        p = self.p
        try:
            result = await self._command_result(payload)
        finally:
            self.commands_running -= 1
            p._commands_running.discard((verdict.source, verdict.version))
        p.command_ledger.record_result(verdict, result)
        await self._send_result(result, key_id)

    async def _command_result(self, payload: dict[str, Any]) -> dict[str, Any]:
        p = self.p
        if p.on_command is None:
            return _refusal(payload, "this device does not accept commands")
        timeout_s = p.options.command_timeout_s
        deadline = asyncio.timeout(timeout_s)
        try:
            async with deadline:
                return await p.on_command(payload)
        except Exception as exc:  # a failing handler must not end the session the acks use
            if deadline.expired():
                p.counters.commands_timed_out += 1
                log.warning("command %r gave up after %g s", payload.get("id"), timeout_s)
                return _refusal(payload, f"not finished within {timeout_s:g} s; given up")
            log.exception("command %r failed", payload.get("id"))
            return _refusal(payload, f"the device failed to apply it: {exc}")

    async def _send_result(self, result: dict[str, Any], key_id: int) -> None:
        p = self.p
        sealed = seal_control(
            ControlKind.COMMAND_RESULT,
            result,
            p.keyring.current,
            p.options.device,
            p._next_counter(),
            key_id=p.keyring.current_id,
            suite=p.options.suite,
            created_us=int(p.clock.time() * 1e6),
        )
        await self.client.publish(p.topics.command_result, sealed, qos=1)

    # ------------------------------------------------------------------ sending

    async def _send(self, tg: asyncio.TaskGroup) -> None:
        p = self.p
        window = p.options.inflight_window
        # Re-sends and backlog leave the last slot to fresh data.
        slow_window = max(1, window - 1)
        while True:
            p._wake.clear()
            now = p.clock.monotonic()
            self._expire(now)
            self._refill(now)
            sent = taken = False
            if len(self.inflight) < window and p._fresh:
                taken = True
                sent = self._publish(tg, p._fresh.popleft(), now, resend=False)
            elif len(self.inflight) < slow_window and self._resend:
                taken = True
                sent = self._publish(tg, self._resend.popleft(), now, resend=True)
            elif len(self.inflight) < slow_window and self._tokens >= 1.0:
                key = self._next_backlog()
                if key is not None:
                    self._tokens -= 1.0
                    sent = self._publish(tg, key, now, resend=False)
            if sent:
                await asyncio.sleep(0)  # let the publish task start; keeps order on the wire
                continue
            if taken:
                continue  # a queued key needed no sending (sent or acked already): next one
            await self._sleep(now)

    def _publish(self, tg: asyncio.TaskGroup, key: Key, now: float, *, resend: bool) -> bool:
        if not resend and (key in self.inflight or key in self._resend):
            # Already sent on this connection: a batch reaches the spool (in the batcher's
            # thread) before its notify() reaches the loop, so the backlog may have taken it
            # in between; only the re-send path (after resend_after_s) sends it again.
            return False
        record = self.p.spool.get(*key)
        if record is None:
            return False  # acknowledged or dropped meanwhile
        self.inflight[key] = now
        if resend:
            self.p.counters.resent += 1
        tg.create_task(self._publish_one(record.payload))
        return True

    async def _publish_one(self, payload: bytes) -> None:
        await self.client.publish(self.p.topics.batch, payload, qos=1)
        self.p.counters.published += 1

    def _expire(self, now: float) -> None:
        limit = self.p.options.resend_after_s
        for key, sent in list(self.inflight.items()):
            if now - sent >= limit:
                del self.inflight[key]
                self._resend.append(key)

    def _refill(self, now: float) -> None:
        rate = self.p.options.backlog_rate
        self._tokens = min(max(1.0, rate), self._tokens + (now - self._last_refill) * rate)
        self._last_refill = now

    def _next_backlog(self) -> Key | None:
        p = self.p
        fresh = set(p._fresh)
        for _ in range(2):
            while self._backlog:
                key = self._backlog.popleft()
                if (
                    key not in self.inflight
                    and key not in fresh
                    and key not in self._resend
                    and p.spool.get(*key) is not None
                ):
                    return key
            # Refill from the spool, oldest first (new records arrive as fresh or later here).
            self._backlog.extend(
                k
                for k in p.spool.pending_keys()
                if k not in self.inflight and k not in fresh and k not in self._resend
            )
            if not self._backlog:
                return None
        return None

    async def _sleep(self, now: float) -> None:
        p = self.p
        wake_at = now + 1.0
        if self.inflight:
            wake_at = min(wake_at, min(self.inflight.values()) + p.options.resend_after_s)
        if self._tokens < 1.0:
            wake_at = min(wake_at, now + (1.0 - self._tokens) / p.options.backlog_rate)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(0.0, wake_at - now)):
                await p._wake.wait()


def _refusal(command: dict[str, Any], reason: str) -> dict[str, Any]:
    """A command result that applied nothing, saying why."""
    return {
        "id": command.get("id"),
        "version": command.get("version"),
        "ok": False,
        "results": {"error": reason},
    }
