"""Service behaviour: rejects counted without stalling, commands round trip, revocation."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import pytest

from edgeos_cloud.cli import main
from edgeos_cloud.receiver.config import (
    BrokerConfig,
    LimitsConfig,
    MetricsConfig,
    ReceiverConfig,
    RegistryConfig,
    StorageConfig,
)
from edgeos_cloud.receiver.registry import DeviceRegistry
from edgeos_cloud.receiver.service import Receiver
from edgeos_cloud.receiver.storage import open_storage
from edgeos_protocol.crypto import Epoch, Keyring
from edgeos_protocol.topics import TopicKind, subscription, topic
from edgeos_testing.devsim import SimDevice, simple_batch
from edgeos_testing.mosquitto import MosquittoBroker
from edgeos_testing.receiver import receiver_config_for, running_receiver, wait_for

T0 = 1_700_000_000_000_000


def _write_toml(config_dir: Path, broker: MosquittoBroker, db: Path) -> Path:
    creds = broker.receiver_credentials
    path = config_dir / "receiver.toml"
    path.write_text(
        f'[broker]\nurl = "{broker.url}"\n[broker.tls]\nca_file = "{creds.ca_file}"\n'
        f'cert_file = "{creds.cert_file}"\nkey_file = "{creds.key_file}"\n'
        f'[storage]\nurl = "sqlite:///{db}"\n[registry]\ndir = "registry"\n'
        '[metrics]\nlisten = ""\n',
        encoding="utf-8",
    )
    return path


async def test_bad_messages_are_counted_and_never_stall(tmp_path: Path) -> None:
    async with MosquittoBroker(tmp_path / "mq") as broker:
        config = receiver_config_for(
            broker,
            tmp_path,
            f"sqlite:///{tmp_path / 'r.db'}",
            limits=LimitsConfig(max_payload_bytes=4096),
        )
        registry = DeviceRegistry(config.registry.dir)
        key = registry.add("gw1").current_key
        receiver = Receiver(config, registry=registry)
        async with running_receiver(receiver), SimDevice.connect(broker, "gw1", key) as dev:
            good = dev.seal(simple_batch({"a": [1.0]}, [T0]))
            wrong = Epoch.new(Keyring.of(b"w" * 32), "gw1")
            from edgeos_protocol.wire import encode_body, seal_batch

            _, wrong_key = seal_batch(wrong, encode_body(simple_batch({"a": [1.0]}, [T0])), T0)
            bad = {
                "truncated": good[:10],
                "malformed": b"XXXX" + good[4:],
                "oversized": good + bytes(5000),
                "forged": good[:-1] + bytes([good[-1] ^ 1]),
                "wrong_key": wrong_key,
                "unsupported_version": good[:4] + b"\x07" + good[5:],
            }
            for payload in bad.values():
                await dev.publish(payload)
            await dev.publish(good)
            assert await dev.wait_acked(dev.epoch.epoch, 1) == 1
            for reason in bad:
                assert receiver.metrics.value("edgeos_receiver_rejects_total", reason=reason) == 1
            # Revoked: the registry refuses its key at once (no restart needed).
            registry.revoke("gw1")
            await dev.publish(dev.seal(simple_batch({"a": [2.0]}, [T0 + 1])))
            await wait_for(
                lambda: (
                    receiver.metrics.value("edgeos_receiver_rejects_total", reason="revoked") == 1
                )
            )
    storage = open_storage(f"sqlite:///{tmp_path / 'r.db'}")
    try:
        rejects = storage.device_summaries()[0].rejects
        assert rejects == dict.fromkeys([*bad, "revoked"], 1)
        assert [r.value for r in storage.query_samples("gw1")] == [1.0]
    finally:
        storage.close()


async def test_shadow_commands_round_trip(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async with MosquittoBroker(tmp_path / "mq") as broker:
        db = tmp_path / "r.db"
        toml = _write_toml(tmp_path, broker, db)
        config = receiver_config_for(broker, tmp_path, f"sqlite:///{db}")
        registry = DeviceRegistry(config.registry.dir)
        key = registry.add("gw1").current_key

        def handler(desired: dict[str, object]) -> tuple[bool, dict[str, object]]:
            if "locked" in desired:
                return False, {"locked": "tag is not writable"}
            return True, dict.fromkeys(desired, "applied")

        receiver = Receiver(config, registry=registry)
        async with (
            running_receiver(receiver),
            SimDevice.connect(broker, "gw1", key, handler=handler) as dev,
        ):
            await dev.publish(dev.seal(simple_batch({"setpoint": [10.0]}, [T0])))
            await dev.wait_acked(dev.epoch.epoch, 1)
            assert main(["shadow", "set", "gw1", "setpoint", "42.5", "--config", str(toml)]) == 0
            assert main(["shadow", "set", "gw1", "locked", "true", "--config", str(toml)]) == 0
            commands = await dev.wait_commands(2)
            assert [(c["version"], c["desired"]) for c in commands] == [
                (1, {"setpoint": 42.5}),
                (2, {"locked": True}),
            ]

            def answered() -> bool:
                storage = open_storage(f"sqlite:///{db}")
                try:
                    return all(c.status in ("applied", "refused") for c in storage.commands("gw1"))
                finally:
                    storage.close()

            await wait_for(answered)
        capsys.readouterr()
        assert main(["shadow", "get", "gw1", "--config", str(toml)]) == 0
        shadow = json.loads(capsys.readouterr().out)
        assert shadow["reported"]["setpoint"]["value"] == 10.0
        assert shadow["desired"]["setpoint"]["status"] == "applied"
        assert shadow["desired"]["locked"]["status"] == "refused"
        assert shadow["desired"]["locked"]["result"] == {"locked": "tag is not writable"}
        assert (
            receiver.metrics.value("edgeos_receiver_command_results_total", status="refused") == 1
        )


async def test_receiver_survives_broker_restart(tmp_path: Path) -> None:
    async with MosquittoBroker(tmp_path / "mq") as broker:
        config = receiver_config_for(broker, tmp_path, f"sqlite:///{tmp_path / 'r.db'}")
        registry = DeviceRegistry(config.registry.dir)
        key = registry.add("gw1").current_key
        receiver = Receiver(config, registry=registry)
        async with running_receiver(receiver):
            async with SimDevice.connect(broker, "gw1", key) as dev:
                await dev.publish(dev.seal(simple_batch({"a": [1.0]}, [T0])))
                await dev.wait_acked(dev.epoch.epoch, 1)
            broker.kill()
            await wait_for(lambda: not receiver.ready.is_set())
            broker.start()
            await wait_for(receiver.ready.is_set)
            async with SimDevice.connect(broker, "gw1", key) as dev:
                await dev.publish(dev.seal(simple_batch({"a": [2.0]}, [T0 + 1])))
                await dev.wait_acked(dev.epoch.epoch, 1)
        assert receiver.metrics.value("edgeos_receiver_batches_total") == 2


async def test_receiver_logs_connected_lost_and_recovered_once_per_change(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A healthy receiver says it is connected and subscribed; a lost broker is logged once
    however many retries fail, and its return once (issue #20: it used to log nothing)."""
    caplog.set_level(logging.INFO, logger="edgeos_cloud.receiver")
    async with MosquittoBroker(tmp_path / "mq") as broker:
        config = receiver_config_for(broker, tmp_path, f"sqlite:///{tmp_path / 'r.db'}")
        receiver = Receiver(config, registry=DeviceRegistry(config.registry.dir))
        async with running_receiver(receiver):
            broker.kill()
            await wait_for(lambda: not receiver.ready.is_set())
            # The lost link and at least two refused retries before the broker returns.
            failures = "edgeos_receiver_broker_connect_failures_total"
            await wait_for(lambda: receiver.metrics.value(failures) >= 3)
            broker.start()
            await wait_for(receiver.ready.is_set)
    messages = [r.getMessage() for r in caplog.records if r.name == "edgeos_cloud.receiver"]
    connected = [m for m in messages if m.startswith("broker connected")]
    lost = [m for m in messages if m.startswith("broker connection lost")]
    recovered = [m for m in messages if m.startswith("broker connection recovered")]
    assert len(connected) == 1, messages
    assert all(f in connected[0] for f in receiver.subscriptions), connected[0]
    assert len(lost) == 1, messages
    assert len(recovered) == 1, messages
    assert messages.index(connected[0]) < messages.index(lost[0]) < messages.index(recovered[0])


async def test_a_cancelled_receiver_stops_while_its_broker_is_down(tmp_path: Path) -> None:
    """One cancellation ends the broker loop while it is reconnecting (no stop flag: the rule
    of edgeos_protocol.aio), and a lost connection alone never stopped it (test above)."""
    async with MosquittoBroker(tmp_path / "mq") as broker:
        config = receiver_config_for(broker, tmp_path, f"sqlite:///{tmp_path / 'r.db'}")
        receiver = Receiver(config, registry=DeviceRegistry(config.registry.dir))
        task = asyncio.create_task(receiver.run())
        try:
            async with asyncio.timeout(30):
                await receiver.ready.wait()
            broker.kill()
            async with asyncio.timeout(30):
                await wait_for(lambda: not receiver.ready.is_set())
        finally:
            task.cancel()
            async with asyncio.timeout(10):
                with pytest.raises(asyncio.CancelledError):
                    await task
        assert receiver.metrics.value("edgeos_receiver_connected") == 0


async def test_shutdown_while_connecting_to_a_silent_broker_stops_the_receiver(
    tmp_path: Path,
) -> None:
    """A broker that accepts the TCP connection and never answers CONNECT."""
    accepted = asyncio.Event()
    peers: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peers.append(writer)
        accepted.set()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    config = ReceiverConfig(
        broker=BrokerConfig(url=f"mqtt://127.0.0.1:{port}", username="receiver", reconnect_s=0.2),
        storage=StorageConfig(url=f"sqlite:///{tmp_path / 'r.db'}"),
        registry=RegistryConfig(dir=tmp_path / "registry"),
        metrics=MetricsConfig(listen=""),
    )
    receiver = Receiver(config, registry=DeviceRegistry(config.registry.dir))
    try:
        task = asyncio.create_task(receiver.run())
        async with asyncio.timeout(30):
            await accepted.wait()
        task.cancel()
        async with asyncio.timeout(10):
            with pytest.raises(asyncio.CancelledError):
                await task
        assert not receiver.ready.is_set()
    finally:
        for writer in peers:
            writer.close()
        server.close()
        await server.wait_closed()


def _status(device: str, state: str, ts: float = 1.7e9) -> bytes:
    # As edgeos.uplink.publisher.Publisher._status: birth at connect, death as the last will.
    return json.dumps({"state": state, "device": device, "ts": ts}).encode()


async def test_plain_broker_plain_subscription_and_device_status(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The demo's broker: no TLS, no shared subscriptions (``group = ""``)."""
    async with MosquittoBroker(tmp_path / "mq", tls=False) as broker:
        db = tmp_path / "r.db"
        plain = BrokerConfig.model_validate(
            {
                "url": broker.url,
                "username": broker.receiver_identity,
                "shared_group": "",
                "reconnect_s": 0.2,
            }
        )
        config = receiver_config_for(broker, tmp_path, f"sqlite:///{db}")
        config = config.model_copy(update={"broker": plain})
        registry = DeviceRegistry(config.registry.dir)
        key = registry.add("gw1").current_key
        receiver = Receiver(config, registry=registry)
        assert receiver.subscriptions == [  # plain: no "$share/<group>/"
            subscription(TopicKind.BATCH),
            subscription(TopicKind.COMMAND_RESULT),
            subscription(TopicKind.STATUS),
        ]
        async with broker.client("gw1") as client:  # retained before the receiver starts
            await client.publish(
                topic("gw1", TopicKind.STATUS), _status("gw1", "online"), retain=True
            )

        def online() -> float:
            return receiver.metrics.value("edgeos_receiver_device_online", device="gw1")

        async with running_receiver(receiver), SimDevice.connect(broker, "gw1", key) as dev:
            await wait_for(lambda: online() == 1)
            await dev.publish(dev.seal(simple_batch({"a": [1.0]}, [T0])))
            assert await dev.wait_acked(dev.epoch.epoch, 1) == 1
            status_topic = topic("gw1", TopicKind.STATUS)
            await dev.client.publish(status_topic, b"{not json", qos=1)
            await dev.client.publish(status_topic, _status("gw2", "online"), qos=1)
            await dev.client.publish(status_topic, _status("gw1", "offline"), qos=1, retain=True)
            await wait_for(lambda: online() == 0)
            for reason in ("malformed", "forged"):
                assert receiver.metrics.value("edgeos_receiver_rejects_total", reason=reason) == 1
            url = f"http://127.0.0.1:{receiver.metrics_port}/metrics"
            body = await asyncio.to_thread(_fetch, url)
            assert 'edgeos_receiver_device_online{device="gw1"} 0.0' in body
        toml = tmp_path / "receiver.toml"
        toml.write_text(
            f'[broker]\nurl = "{broker.url}"\nshared_group = ""\n'
            f'[storage]\nurl = "sqlite:///{db}"\n[metrics]\nlisten = ""\n'
        )
        capsys.readouterr()
        assert main(["devices", "--config", str(toml)]) == 0
        (row,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert (row["device"], row["batches"], row["state"]) == ("gw1", 1, "offline")
        assert row["state_since"] is not None


def _fetch(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=10) as response:
        return str(response.read().decode())
