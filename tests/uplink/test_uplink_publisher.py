"""The publisher against a real Mosquitto (TLS client certificates, per-device ACLs).

A tiny in-test receiver (:class:`edgeos.uplink.acker.Acker`, wire API only) opens the batches
and acks them; tests wait for conditions, never for durations.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import aiomqtt
import pytest

from edgeos.clock import SystemClock
from edgeos.config import TlsConfig
from edgeos.errors import ConnectError
from edgeos.uplink.acker import Acker
from edgeos.uplink.batcher import Batcher
from edgeos.uplink.publisher import Publisher, PublisherOptions, Session
from edgeos.uplink.spool import Spool
from edgeos_protocol.backoff import BackoffPolicy
from edgeos_protocol.crypto import Keyring
from edgeos_protocol.topics import device_topics
from edgeos_protocol.wire import ControlKind, open_control, seal_control
from edgeos_testing.mosquitto import MosquittoBroker, mosquitto_path
from edgeos_testing.uplink_synth import SyntheticLine

pytestmark = pytest.mark.skipif(mosquitto_path() is None, reason="mosquitto not installed")

DEVICE = "gw-1"
RING = Keyring.of(bytes(range(32)))
TOPICS = device_topics(DEVICE)
FAST = BackoffPolicy(initial_s=0.05, max_s=0.5)


async def _until(cond: Callable[[], bool], what: str, limit: float = 30.0) -> None:
    """Wait for a condition (the limit only turns a hang into a clear failure)."""
    async with asyncio.timeout(limit):
        while not cond():
            await asyncio.sleep(0.02)
    assert cond(), what


async def _cancel(task: asyncio.Task[None]) -> None:
    """Cancel until it ends: on Python 3.11 a cancellation that lands as an MQTT operation
    completes can be lost inside the client (asyncio.wait_for), and the publisher then
    carries on as if reconnecting; a second request stops it."""
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=1.0)
    with contextlib.suppress(asyncio.CancelledError):
        task.result()


@dataclass
class Rig:
    broker: MosquittoBroker
    spool: Spool
    batcher: Batcher
    publisher: Publisher
    acker: Acker
    line: SyntheticLine
    tasks: list[asyncio.Task[None]]

    async def batch(self) -> int:
        self.batcher.add(self.line.record(asyncio.get_running_loop().time()))
        stored = await self.batcher.flush()
        assert stored is not None
        return stored.seq

    def start_publisher(self) -> asyncio.Task[None]:
        task = asyncio.create_task(self.publisher.run())
        self.tasks.append(task)
        return task

    def start_acker(self) -> None:
        async def serve() -> None:
            # The receiver's connection dies with the broker; tests start a new one.
            with contextlib.suppress(aiomqtt.MqttError):
                await self.acker.run()

        self.tasks.append(asyncio.create_task(serve()))


def _options(broker: MosquittoBroker, **kw: object) -> PublisherOptions:
    creds = broker.credentials(DEVICE)
    tls = TlsConfig(ca_file=creds.ca_file, cert_file=creds.cert_file, key_file=creds.key_file)
    defaults: dict[str, object] = {"reconnect": FAST}
    return PublisherOptions(device=DEVICE, broker=broker.url, tls=tls, **{**defaults, **kw})  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def rig(tmp_path: Path, *, preload: int = 0, **options: object) -> AsyncIterator[Rig]:
    async with MosquittoBroker(tmp_path / "broker", tls=True, acl=True) as broker:
        line = SyntheticLine(nests=2, tags_per_nest=20)
        spool = Spool(tmp_path / "spool", fsync=False)
        publisher = Publisher(_options(broker, **options), spool=spool, keyring=RING)
        batcher = Batcher(
            table=line.table, keyring=RING, device=DEVICE, spool=spool, on_stored=publisher.notify
        )
        publisher.on_ack = batcher.on_ack
        receiver = broker.client(broker.receiver_identity)
        await receiver.__aenter__()
        r = Rig(broker, spool, batcher, publisher, Acker(receiver, {DEVICE: RING}), line, [])
        try:
            for _ in range(preload):
                await r.batch()
            r.start_acker()
            yield r
        finally:
            for task in r.tasks:
                task.cancel()
            await asyncio.gather(*r.tasks, return_exceptions=True)
            with contextlib.suppress(aiomqtt.MqttError):
                await r.acker.client.__aexit__(None, None, None)
            spool.close()


async def test_batches_leave_the_spool_only_on_the_receivers_ack(tmp_path: Path) -> None:
    async with rig(tmp_path) as r:
        r.acker.ack_enabled = False
        r.start_publisher()
        await _until(lambda: r.publisher.counters.state == "connected", "connected")
        seqs = [await r.batch() for _ in range(3)]
        await _until(lambda: r.acker.summary()["stored"] == 3, "receiver stored 3")
        await _until(lambda: r.publisher.counters.published >= 3, "PUBACKed")
        assert len(r.spool) == 3  # PUBACK is not an ack
        r.acker.ack_enabled = True
        await r.batch()
        await _until(lambda: len(r.spool) == 0, "acked batches leave the spool")
        assert r.acker.stored(DEVICE) == {(r.batcher.epoch.epoch, s) for s in [*seqs, 4]}
        assert r.publisher.counters.acked == 4 and r.publisher.counters.last_ack_time is not None
        assert r.publisher.counters.ack_latency.count == 4


async def test_unacked_batches_are_resent_after_the_timeout(tmp_path: Path) -> None:
    async with rig(tmp_path, resend_after_s=0.3) as r:
        r.acker.ack_enabled = False
        r.start_publisher()
        await _until(lambda: r.publisher.counters.state == "connected", "connected")
        for _ in range(2):
            await r.batch()
        await _until(lambda: r.acker.duplicates >= 2, "re-sent copies arrived")
        assert len(r.spool) == 2 and r.publisher.counters.resent >= 2
        r.acker.ack_enabled = True
        await _until(lambda: len(r.spool) == 0, "acked after re-send")
        assert r.acker.summary()["stored"] == 2  # the receiver deduplicates


async def test_broker_restart_mid_stream_loses_nothing_and_keeps_order(tmp_path: Path) -> None:
    async with rig(tmp_path) as r:
        device = r.start_publisher()
        await _until(lambda: r.publisher.counters.state == "connected", "connected")
        for _ in range(5):
            await r.batch()
        await _until(lambda: len(r.spool) == 0, "first batches acked")
        await asyncio.to_thread(r.broker.kill)  # a crash, not an orderly stop
        await _until(lambda: r.publisher.counters.state != "connected", "noticed the outage")
        outage = [await r.batch() for _ in range(8)]  # produced while the broker is down
        assert len(r.spool) == 8
        # Hold the device back until the receiver is subscribed again: a broker without
        # persistence drops what arrives before any subscriber (the device would re-send it
        # after resend_after_s — still no loss, but then it arrives after newer batches).
        device.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await device
        await asyncio.to_thread(r.broker.start)
        # The receiver's connection died with the broker; a new one takes over.
        r.acker.client = r.broker.client(r.broker.receiver_identity)
        await r.acker.client.__aenter__()
        r.start_acker()
        await r.acker.subscribed()
        r.start_publisher()
        await _until(lambda: len(r.spool) == 0, "backlog drained and acked", 60)
        tail = [await r.batch() for _ in range(2)]
        await _until(lambda: len(r.spool) == 0, "fresh batches acked")
        epoch = r.batcher.epoch.epoch
        assert r.acker.stored(DEVICE) == {(epoch, s) for s in range(1, 16)}
        assert outage == list(range(6, 14)) and tail == [14, 15]
        # The backlog left in spool order.
        first_seen = list(dict.fromkeys(s for _, _, s in r.acker.arrivals))
        backlog_order = [s for s in first_seen if s in outage]
        assert backlog_order == outage
        assert r.publisher.counters.connects >= 2


async def test_backlog_is_rate_limited_and_fresh_data_overtakes_it(tmp_path: Path) -> None:
    async with rig(tmp_path, preload=12, backlog_rate=5.0) as r:
        r.start_publisher()
        await _until(lambda: r.acker.summary()["stored"] >= 2, "backlog started")
        fresh = await r.batch()
        await _until(lambda: len(r.spool) == 0, "all acked", 60)
        order = list(dict.fromkeys(s for _, _, s in r.acker.arrivals))
        assert order.index(fresh) < order.index(12), "fresh data waited behind the backlog"
        assert [s for s in order if s != fresh] == list(range(1, 13))  # backlog in order


async def test_forged_and_foreign_acks_never_drop_data(tmp_path: Path) -> None:
    async with rig(tmp_path) as r:
        r.acker.ack_enabled = False
        r.start_publisher()
        await _until(lambda: r.publisher.counters.state == "connected", "connected")
        await r.batch()
        await _until(lambda: r.acker.summary()["stored"] == 1, "stored")
        epoch = r.batcher.epoch.epoch
        forged = seal_control(
            ControlKind.ACK,
            {"epoch": epoch, "seq": 1},
            bytes(32),
            DEVICE,
            1,
            key_id=RING.current_id,
        )
        other_device = seal_control(
            ControlKind.ACK,
            {"epoch": epoch, "seq": 1},
            RING.current,
            "gw-2",
            2,
            key_id=RING.current_id,
        )
        async with r.broker.client(r.broker.receiver_identity) as attacker:
            for message in (forged, other_device, b"garbage"):
                await attacker.publish(TOPICS.ack, message, qos=1)
        await _until(lambda: r.publisher.counters.bad_control == 3, "refused")
        assert len(r.spool) == 1


async def test_commands_get_sealed_results_and_replays_are_refused(tmp_path: Path) -> None:
    async def handler(payload: dict[str, object]) -> dict[str, object]:
        return {
            "id": payload["id"],
            "version": payload["version"],
            "ok": True,
            "results": {"applied": payload["desired"]},
        }

    async with rig(tmp_path) as r:
        r.publisher.on_command = handler
        r.start_publisher()
        await _until(lambda: r.publisher.counters.state == "connected", "connected")
        async with r.broker.client(r.broker.receiver_identity) as receiver:
            await receiver.subscribe(TOPICS.command_result, qos=1)
            cmd = seal_control(
                ControlKind.COMMAND,
                {"id": "c1", "version": 3, "desired": {"nest01.p000": 1.5}},
                RING.current,
                DEVICE,
                10,
                key_id=RING.current_id,
            )
            await receiver.publish(TOPICS.command, cmd, qos=1)
            async with asyncio.timeout(30):
                message = await anext(aiter(receiver.messages))
            assert isinstance(message.payload, bytes)
            result = open_control(
                message.payload,
                RING.keys,
                device=DEVICE,
                kinds=frozenset({ControlKind.COMMAND_RESULT}),
            )
            assert result.payload == {
                "id": "c1",
                "version": 3,
                "ok": True,
                "results": {"applied": {"nest01.p000": 1.5}},
            }
            await receiver.publish(TOPICS.command, cmd, qos=1)  # a replay
            await _until(lambda: r.publisher.counters.bad_control == 1, "replay refused")
            assert r.publisher.counters.commands == 1


async def test_birth_and_orderly_death_are_retained(tmp_path: Path) -> None:
    async with rig(tmp_path) as r:
        task = r.start_publisher()
        await _until(lambda: r.publisher.counters.state == "connected", "connected")

        async def status() -> dict[str, object]:
            async with r.broker.client(r.broker.receiver_identity) as c:
                await c.subscribe(TOPICS.status, qos=1)
                async with asyncio.timeout(30):
                    message = await anext(aiter(c.messages))
            assert message.retain and isinstance(message.payload, bytes)
            return json.loads(message.payload)  # type: ignore[no-any-return]

        assert (await status())["state"] == "online"
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        assert (await status())["state"] == "offline"


async def test_unreachable_broker_backs_off_and_cancels_cleanly(tmp_path: Path) -> None:
    async with MosquittoBroker(tmp_path / "broker", tls=True) as broker:
        await asyncio.to_thread(broker.stop)
        spool = Spool(tmp_path / "spool", fsync=False)
        publisher = Publisher(_options(broker), spool=spool, keyring=RING)
        task = asyncio.create_task(publisher.run())
        await _until(lambda: publisher.counters.connect_failures >= 3, "retrying")
        assert publisher.counters.state == "disconnected" and publisher.counters.connects == 0
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        spool.close()


async def test_mqtts_without_tls_files_is_a_clear_connect_error(tmp_path: Path) -> None:
    options = PublisherOptions(device=DEVICE, broker="mqtts://127.0.0.1:1")
    with Spool(tmp_path, fsync=False) as spool:
        publisher = Publisher(options, spool=spool, keyring=RING)
        with pytest.raises(ConnectError, match=r"needs uplink\.tls"):
            async with publisher.session():
                pass
        bad_url = Publisher(
            PublisherOptions(device=DEVICE, broker="http://x"), spool=spool, keyring=RING
        )
        with pytest.raises(ConnectError, match="not mqtt://"):
            async with bad_url.session():
                pass


async def test_reconnects_reuse_one_tls_context_until_a_credential_file_changes(
    tmp_path: Path,
) -> None:
    async with MosquittoBroker(tmp_path / "broker", tls=True) as broker:
        creds = broker.credentials(DEVICE)
        own = tmp_path / "own"
        own.mkdir()
        for f in (creds.ca_file, creds.cert_file, creds.key_file):
            shutil.copy(f, own / f.name)
        tls = TlsConfig(
            ca_file=own / creds.ca_file.name,
            cert_file=own / creds.cert_file.name,
            key_file=own / creds.key_file.name,
        )
        options = PublisherOptions(
            device=DEVICE,
            broker=broker.url,
            tls=tls,
            reconnect=BackoffPolicy(initial_s=0.05, max_s=0.2),
        )
        with Spool(tmp_path / "spool", fsync=False) as spool:
            publisher = Publisher(options, spool=spool, keyring=RING)
            first = publisher.tls_context()
            assert publisher.tls_context() is first
            for _ in range(2):
                async with publisher.session():
                    pass
            assert publisher.tls_context() is first
            # A broken key on disk: a clear error, and the old context is not used for it.
            good_key = tls.key_file.read_bytes()
            tls.key_file.write_bytes(b"-----BEGIN PRIVATE KEY-----\nnot a key\n")
            with pytest.raises(ConnectError, match="TLS credentials not usable"):
                publisher.tls_context()
            connects = publisher.counters.connects
            task = asyncio.create_task(publisher.run())
            try:
                await _until(lambda: publisher.counters.connect_failures >= 2, "retrying")
                assert publisher.counters.connects == connects
                # Fixed on disk (a rotated credential): picked up without a restart.
                tls.key_file.write_bytes(good_key)
                os.utime(tls.key_file, ns=(time.time_ns(), time.time_ns() + 1_000_000))
                await _until(lambda: publisher.counters.connects > connects, "reconnected")
                assert publisher.tls_context() is not first
            finally:
                await _cancel(task)
        missing = Publisher(
            PublisherOptions(
                device=DEVICE,
                broker=broker.url,
                tls=TlsConfig(
                    ca_file=own / "nope.crt", cert_file=tls.cert_file, key_file=tls.key_file
                ),
            ),
            spool=Spool(tmp_path / "spool2", fsync=False),
            keyring=RING,
        )
        with pytest.raises(ConnectError, match="not readable"):
            missing.tls_context()
        missing.spool.close()


class _ScopedSleepClock(SystemClock):
    """The system clock, sleeping through a timeout scope that fires: every backoff sleep of
    ``run()`` then cancels and uncancels ``run()``'s own task (an inner timeout, not a stop)."""

    async def sleep_until(self, deadline: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(0.0, deadline - self.monotonic())):
                await asyncio.Event().wait()


async def _restart_acker(r: Rig) -> None:
    """The receiver's connection died with the broker: a new one takes over."""
    r.acker.client = r.broker.client(r.broker.receiver_identity)
    await r.acker.client.__aenter__()
    r.start_acker()
    await r.acker.subscribed()


async def test_a_healthy_publisher_keeps_reconnecting_after_a_lost_connection(
    tmp_path: Path,
) -> None:
    """Why the first cancelling() guard was reverted: a lost connection fails the session's
    task group while it waits to exit, and Python 3.11 then leaves the publisher's task
    'cancelling' for good; the next failed reconnect stopped it. Inner timeout scopes (the
    backoff sleeps here) fire meanwhile too. Neither may stop a publisher nobody cancelled."""
    async with rig(tmp_path) as r:
        r.publisher.clock = _ScopedSleepClock()
        task = r.start_publisher()
        await _until(lambda: r.publisher.counters.state == "connected", "connected")
        await r.batch()
        await _until(lambda: len(r.spool) == 0, "acked before the outage")
        await asyncio.to_thread(r.broker.kill)
        await _until(lambda: r.publisher.counters.state != "connected", "noticed the outage")
        failures = r.publisher.counters.connect_failures
        await _until(
            lambda: r.publisher.counters.connect_failures >= failures + 2,
            "failed reconnect attempts are retried",
        )
        assert not task.done()
        await asyncio.to_thread(r.broker.start)
        await _restart_acker(r)
        await _until(lambda: r.publisher.counters.connects >= 2, "reconnected")
        await r.batch()
        await _until(lambda: len(r.spool) == 0, "acked after the reconnect")
        assert not task.done()


async def test_a_cancellation_the_client_turns_into_a_connection_error_ends_run(
    tmp_path: Path,
) -> None:
    """aiomqtt may raise MqttError in place of CancelledError while a cancelled session closes:
    run() recognises the cancellation from Task.cancelling() and ends at the first request."""
    async with rig(tmp_path) as r:
        real_session = r.publisher.session
        sessions = 0

        @contextlib.asynccontextmanager
        async def converting_session() -> AsyncIterator[Session]:
            nonlocal sessions
            async with real_session() as session:
                sessions += 1
                try:
                    yield session
                except asyncio.CancelledError:
                    raise aiomqtt.MqttError("Disconnected during message iteration") from None

        r.publisher.session = converting_session  # type: ignore[method-assign]
        task = r.start_publisher()
        await _until(lambda: r.publisher.counters.state == "connected", "connected")
        await r.batch()
        await _until(lambda: len(r.spool) == 0, "serving")
        task.cancel()
        async with asyncio.timeout(10):
            with pytest.raises(asyncio.CancelledError):
                await task
        assert sessions == 1
        assert r.publisher.counters.connect_failures == 0


async def test_shutdown_while_connecting_to_a_silent_broker_ends_run(tmp_path: Path) -> None:
    """A broker that accepts the TCP connection and never answers CONNECT: a single
    cancellation ends run() (no connect failure counted, no reconnect)."""
    accepted = asyncio.Event()
    peers: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peers.append(writer)
        accepted.set()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    options = PublisherOptions(device=DEVICE, broker=f"mqtt://127.0.0.1:{port}", reconnect=FAST)
    try:
        with Spool(tmp_path, fsync=False) as spool:
            publisher = Publisher(options, spool=spool, keyring=RING)
            task = asyncio.create_task(publisher.run())
            async with asyncio.timeout(30):
                await accepted.wait()
            task.cancel()
            async with asyncio.timeout(10):
                with pytest.raises(asyncio.CancelledError):
                    await task
            assert publisher.counters.connects == 0
            assert publisher.counters.connect_failures == 0
    finally:
        for writer in peers:
            writer.close()
        server.close()
        await server.wait_closed()


def _command(command_id: str, version: int, counter: int) -> bytes:
    return seal_control(
        ControlKind.COMMAND,
        {"id": command_id, "version": version, "desired": {"nest01.p000": 1.5}},
        RING.current,
        DEVICE,
        counter,
        key_id=RING.current_id,
    )


async def _next_result(cloud: aiomqtt.Client) -> dict[str, object]:
    async with asyncio.timeout(30):
        message = await anext(aiter(cloud.messages))
    assert isinstance(message.payload, bytes)
    control = open_control(
        message.payload, RING.keys, device=DEVICE, kinds=frozenset({ControlKind.COMMAND_RESULT})
    )
    return control.payload


class _StuckWrite:
    """A command handler like a tag write to a PLC that does not answer, until released."""

    def __init__(self) -> None:
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    async def __call__(self, payload: dict[str, object]) -> dict[str, object]:
        self.entered.set()
        await self.release.wait()
        return {"id": payload["id"], "version": payload["version"], "ok": True, "results": {}}


async def test_a_slow_command_does_not_delay_acks_of_batches_published_meanwhile(
    tmp_path: Path,
) -> None:
    handler = _StuckWrite()
    async with rig(tmp_path) as r:
        r.publisher.on_command = handler
        r.start_publisher()
        await _until(lambda: r.publisher.counters.state == "connected", "connected")
        async with r.broker.client(r.broker.receiver_identity) as cloud:
            await cloud.subscribe(TOPICS.command_result, qos=1)
            await cloud.publish(TOPICS.command, _command("slow", 1, 10), qos=1)
            async with asyncio.timeout(30):
                await handler.entered.wait()
            for _ in range(3):
                await r.batch()
            await _until(lambda: len(r.spool) == 0, "acked while the command still runs")
            assert not handler.release.is_set() and r.publisher.counters.acked == 3
            handler.release.set()
            result = await _next_result(cloud)
        assert result == {"id": "slow", "version": 1, "ok": True, "results": {}}


async def test_commands_beyond_the_limit_are_refused_with_a_busy_result(tmp_path: Path) -> None:
    handler = _StuckWrite()
    async with rig(tmp_path, max_commands_in_flight=1) as r:
        r.publisher.on_command = handler
        r.start_publisher()
        await _until(lambda: r.publisher.counters.state == "connected", "connected")
        async with r.broker.client(r.broker.receiver_identity) as cloud:
            await cloud.subscribe(TOPICS.command_result, qos=1)
            await cloud.publish(TOPICS.command, _command("first", 1, 10), qos=1)
            async with asyncio.timeout(30):
                await handler.entered.wait()
            await cloud.publish(TOPICS.command, _command("second", 2, 11), qos=1)
            busy = await _next_result(cloud)
            assert busy["id"] == "second" and busy["ok"] is False
            assert "busy" in str(busy["results"])
            handler.release.set()
            first = await _next_result(cloud)
        assert first["id"] == "first" and first["ok"] is True
        assert r.publisher.counters.commands == 2 and r.publisher.counters.commands_busy == 1


async def test_a_command_that_outlives_its_timeout_is_answered_as_given_up(
    tmp_path: Path,
) -> None:
    handler = _StuckWrite()  # never released
    async with rig(tmp_path, command_timeout_s=0.2) as r:
        r.publisher.on_command = handler
        r.start_publisher()
        await _until(lambda: r.publisher.counters.state == "connected", "connected")
        async with r.broker.client(r.broker.receiver_identity) as cloud:
            await cloud.subscribe(TOPICS.command_result, qos=1)
            await cloud.publish(TOPICS.command, _command("stuck", 1, 10), qos=1)
            result = await _next_result(cloud)
        assert result["id"] == "stuck" and result["ok"] is False
        assert "not finished within 0.2 s" in str(result["results"])
        assert r.publisher.counters.commands_timed_out == 1
        await r.batch()
        await _until(lambda: len(r.spool) == 0, "the session carries on")


async def test_a_batch_spooled_before_its_notify_reaches_the_loop_is_sent_once(
    tmp_path: Path,
) -> None:
    """The healthy-run replay: the batcher appends in a thread, then notify() runs on the loop;
    a send loop that wakes in between takes the record as backlog. The late notify() must not
    send it a second time (it did: ``rejects{replayed}`` with ``resent 0``)."""
    async with rig(tmp_path) as r:
        r.acker.ack_enabled = False  # an ack would hide the double send (spool.get → None)
        r.start_publisher()
        await _until(lambda: r.publisher.counters.state == "connected", "connected")
        r.batcher.on_stored = None  # the notify is late: the record is only in the spool
        r.batcher.add(r.line.record(asyncio.get_running_loop().time()))
        late = await r.batcher.flush()
        assert late is not None
        await _until(lambda: r.acker.summary()["stored"] == 1, "sent from the backlog")
        r.publisher.notify(late)  # now the batcher's notify arrives
        r.batcher.on_stored = r.publisher.notify
        await r.batch()  # a marker sent after anything the late notify could cause
        await _until(lambda: r.acker.summary()["stored"] == 2, "marker arrived")
        await _until(lambda: r.publisher.counters.published == 2, "marker PUBACKed")
        assert r.acker.duplicates == 0
        assert r.publisher.counters.resent == 0


async def test_a_healthy_stream_under_acks_sends_every_batch_exactly_once(tmp_path: Path) -> None:
    async with rig(tmp_path, preload=5) as r:
        r.start_publisher()
        seqs = [await r.batch() for _ in range(40)]
        await _until(lambda: len(r.spool) == 0, "all acked", 60)
        assert r.acker.summary()["stored"] == 45 and seqs[-1] == 45
        assert r.acker.duplicates == 0
        assert r.publisher.counters.published == 45 and r.publisher.counters.resent == 0


async def test_a_captured_command_replayed_after_a_restart_is_not_applied_again(
    tmp_path: Path,
) -> None:
    from edgeos.uplink.commands import CommandLedger

    applied: list[object] = []

    async def handler(payload: dict[str, object]) -> dict[str, object]:
        applied.append(payload["version"])
        return {"id": payload["id"], "version": payload["version"], "ok": True, "results": {}}

    ledger_file = tmp_path / "state" / "commands.json"
    async with rig(tmp_path) as r:
        r.publisher.on_command = handler
        r.publisher.command_ledger = CommandLedger(ledger_file)
        task = r.start_publisher()
        await _until(lambda: r.publisher.counters.state == "connected", "connected")
        async with r.broker.client(r.broker.receiver_identity) as cloud:
            await cloud.subscribe(TOPICS.command_result, qos=1)
            captured = _command("c5", 5, 100)
            await cloud.publish(TOPICS.command, captured, qos=1)
            assert (await _next_result(cloud))["ok"] is True
            # The gateway restarts: a new publisher (empty in-memory counter guard) with the
            # ledger read back from the state directory.
            await _cancel(task)
            r.publisher = Publisher(
                _options(r.broker),
                spool=r.spool,
                keyring=RING,
                on_command=handler,
                command_ledger=CommandLedger(ledger_file),
            )
            r.start_publisher()
            await _until(lambda: r.publisher.counters.state == "connected", "reconnected")
            await cloud.publish(TOPICS.command, captured, qos=1)  # the replay
            repeated = await _next_result(cloud)
            assert repeated == {"id": "c5", "version": 5, "ok": True, "results": {}}
            # An older version (sealed later, so its counter is new) is refused, not applied.
            await cloud.publish(TOPICS.command, _command("c4", 4, 200), qos=1)
            stale = await _next_result(cloud)
            assert stale["ok"] is False and "older than version 5" in str(stale["results"])
            await cloud.publish(TOPICS.command, _command("c6", 6, 300), qos=1)
            assert (await _next_result(cloud))["ok"] is True
    assert applied == [5, 6]
    assert CommandLedger(ledger_file).taken() == 6


def test_the_command_ledger_survives_kill_9_between_claim_and_result(tmp_path: Path) -> None:
    """A process SIGKILLed right after claiming a version: the version stays taken."""
    import subprocess
    import sys

    from edgeos.uplink.commands import CommandLedger

    ledger_file = tmp_path / "commands.json"
    script = (
        "import os, signal, sys\n"
        "from pathlib import Path\n"
        "from edgeos.uplink.commands import CommandLedger\n"
        "ledger = CommandLedger(Path(sys.argv[1]))\n"
        "assert ledger.claim({'id': 'c9', 'version': 9}).action == 'apply'\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, str(ledger_file)], check=False)
    assert proc.returncode == -9
    ledger = CommandLedger(ledger_file)
    verdict = ledger.claim({"id": "c9", "version": 9})
    assert verdict.action == "repeat" and verdict.result is None  # answered "interrupted"
    assert ledger.claim({"id": "c8", "version": 8}).action == "stale"
    assert not list(tmp_path.glob(".commands.json.tmp*"))
