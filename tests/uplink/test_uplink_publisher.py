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

from edgeos.config import TlsConfig
from edgeos.errors import ConnectError
from edgeos.uplink.acker import Acker
from edgeos.uplink.batcher import Batcher
from edgeos.uplink.publisher import Publisher, PublisherOptions
from edgeos.uplink.spool import Spool
from edgeos_protocol.crypto import Keyring
from edgeos_protocol.wire import ControlKind, open_control, seal_control
from edgeos_testing.mosquitto import MosquittoBroker, mosquitto_path
from edgeos_testing.uplink_synth import SyntheticLine

pytestmark = pytest.mark.skipif(mosquitto_path() is None, reason="mosquitto not installed")

DEVICE = "gw-1"
RING = Keyring.of(bytes(range(32)))


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
    defaults: dict[str, object] = {"backoff_initial_s": 0.05, "backoff_max_s": 0.5}
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
                await attacker.publish(f"edgeos/v1/{DEVICE}/ack", message, qos=1)
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
            await receiver.subscribe(f"edgeos/v1/{DEVICE}/cmd/result", qos=1)
            cmd = seal_control(
                ControlKind.COMMAND,
                {"id": "c1", "version": 3, "desired": {"nest01.p000": 1.5}},
                RING.current,
                DEVICE,
                10,
                key_id=RING.current_id,
            )
            await receiver.publish(f"edgeos/v1/{DEVICE}/cmd", cmd, qos=1)
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
            await receiver.publish(f"edgeos/v1/{DEVICE}/cmd", cmd, qos=1)  # a replay
            await _until(lambda: r.publisher.counters.bad_control == 1, "replay refused")
            assert r.publisher.counters.commands == 1


async def test_birth_and_orderly_death_are_retained(tmp_path: Path) -> None:
    async with rig(tmp_path) as r:
        task = r.start_publisher()
        await _until(lambda: r.publisher.counters.state == "connected", "connected")

        async def status() -> dict[str, object]:
            async with r.broker.client(r.broker.receiver_identity) as c:
                await c.subscribe(f"edgeos/v1/{DEVICE}/status", qos=1)
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
            device=DEVICE, broker=broker.url, tls=tls, backoff_initial_s=0.05, backoff_max_s=0.2
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


async def test_stop_then_cancel_ends_run_even_when_the_client_eats_the_cancellation(
    tmp_path: Path,
) -> None:
    """The client may raise MqttError in place of CancelledError while a cancelled session
    closes: without stop() run() takes it for a lost connection and reconnects; after stop()
    (what the runtime's SIGTERM handler calls before cancelling) it ends."""
    options = PublisherOptions(
        device=DEVICE, broker="mqtt://127.0.0.1:1", backoff_initial_s=0.01, backoff_max_s=0.02
    )
    with Spool(tmp_path, fsync=False) as spool:
        publisher = Publisher(options, spool=spool, keyring=RING)
        sessions = 0

        @contextlib.asynccontextmanager
        async def session() -> AsyncIterator[None]:
            nonlocal sessions
            sessions += 1
            try:
                await asyncio.Event().wait()  # "connected" until cancelled
                yield None
            except asyncio.CancelledError:
                raise aiomqtt.MqttError("Disconnected during message iteration") from None

        publisher.session = session  # type: ignore[method-assign]
        task = asyncio.create_task(publisher.run())
        await _until(lambda: sessions == 1, "first session")
        task.cancel()  # eaten: run() reconnects
        await _until(lambda: sessions == 2, "reconnected after a lost cancellation")
        assert not task.done()
        publisher.stop()
        task.cancel()
        async with asyncio.timeout(5):
            with pytest.raises(asyncio.CancelledError):
                await task
        assert sessions == 2
