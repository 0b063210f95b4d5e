"""Identities: a device can never be, or act as, a receiver (real CA, real Mosquitto ACL)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import aiomqtt
import pytest

from edgeos_cloud.broker import device_acl
from edgeos_cloud.cli import main
from edgeos_cloud.receiver.pki import CertificateAuthority, role_of
from edgeos_cloud.receiver.registry import DeviceRegistry
from edgeos_protocol.credentials import check_device_id
from edgeos_testing.mosquitto import MosquittoBroker, mosquitto_path
from edgeos_testing.net import free_port

needs_mosquitto = pytest.mark.skipif(mosquitto_path() is None, reason="mosquitto not installed")

RESERVED = ["receiver", "Receiver", "receivers", "receiver-2", "svc-ota", "broker", "edgeos"]


@pytest.mark.parametrize("name", RESERVED)
def test_device_add_refuses_a_reserved_service_name(
    tmp_path: Path, name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "receiver.toml"
    config.write_text(
        '[broker]\nurl = "mqtt://127.0.0.1:1883"\n[storage]\nurl = "sqlite:///r.db"\n'
        f'[registry]\ndir = "{tmp_path / "registry"}"\n[metrics]\nlisten = ""\n',
        encoding="utf-8",
    )
    bundle = tmp_path / "b.json"
    code = main(["device", "add", name, "--bundle", str(bundle), "--config", str(config)])
    assert code == 2
    assert "reserved" in capsys.readouterr().err
    assert not bundle.exists()
    assert DeviceRegistry(tmp_path / "registry").list() == []
    with pytest.raises(ValueError, match="reserved"):
        DeviceRegistry(tmp_path / "registry").add(name)
    with pytest.raises(ValueError, match="reserved"):
        check_device_id(name)


def test_certificates_carry_their_role_and_a_name_never_changes_role(tmp_path: Path) -> None:
    ca = CertificateAuthority.create(tmp_path / "ca")
    device = ca.issue_device("gw-1")
    receiver = ca.issue_client("receiver")
    server = ca.issue_server()
    assert (role_of(device.cert_pem), role_of(receiver.cert_pem)) == ("device", "receiver")
    assert role_of(server.cert_pem) == "broker"
    with pytest.raises(ValueError, match="reserved"):
        ca.issue_client("receiver", role="device")
    with pytest.raises(ValueError, match="reserved"):
        ca.issue_device("receiver-7")
    with pytest.raises(ValueError, match="reserved service name"):
        ca.issue_client("gw-2", role="receiver")  # a receiver named like a device
    assert ca.service_identities("receiver") == ["receiver"]
    with pytest.raises(ValueError, match="reserved service name"):
        device_acl(["gw-1"])  # the ACL never grants receiver rights to a device's name


async def _first(client: aiomqtt.Client) -> aiomqtt.Message:
    async with asyncio.timeout(20):
        return await anext(aiter(client.messages))


@needs_mosquitto
async def test_a_device_certificate_gets_nothing_of_the_receivers_or_other_devices(
    tmp_path: Path,
) -> None:
    broker = MosquittoBroker(tmp_path / "mq", receivers=("receiver",))
    async with (
        broker,
        broker.client("receiver") as rx,
        broker.client("gw-evil") as evil,
        broker.client("gw-2") as victim,
    ):
        await rx.subscribe("edgeos/v1/+/batch", qos=1)
        for topic in (
            "$share/receivers/edgeos/v1/+/batch",
            "edgeos/v1/+/batch",
            "edgeos/v1/gw-2/batch",
            "edgeos/v1/gw-2/cmd",
            "edgeos/v1/gw-2/ack",
            "edgeos/v1/+/cmd/result",
            "#",
            "edgeos/v1/gw-evil/ack",  # its own: the marker comes here
        ):
            with contextlib.suppress(aiomqtt.MqttError):
                await evil.subscribe(topic, qos=1)
        await victim.publish("edgeos/v1/gw-2/batch", b"secret batch", qos=1)
        await victim.publish("edgeos/v1/gw-2/cmd/result", b"secret result", qos=1)
        got = await _first(rx)  # the receiver has it: the broker routed it to everyone
        assert got.payload == b"secret batch"
        await rx.publish("edgeos/v1/gw-2/cmd", b"secret command", qos=1)
        await rx.publish("edgeos/v1/gw-2/ack", b"secret ack", qos=1)
        await rx.publish("edgeos/v1/gw-evil/ack", b"marker", qos=1)
        # Per-connection order: anything the device could read came before the marker.
        first = await _first(evil)
        assert (str(first.topic), first.payload) == ("edgeos/v1/gw-evil/ack", b"marker")


@contextlib.contextmanager
def _mosquitto(config: Path, port: int, log: Path) -> Iterator[None]:
    binary = mosquitto_path()
    assert binary is not None
    proc = subprocess.Popen([binary, "-c", str(config)], stderr=log.open("wb"))
    try:
        deadline = time.monotonic() + 20
        while True:
            assert proc.poll() is None, log.read_text()
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                break
            assert time.monotonic() < deadline, "mosquitto did not listen"
            time.sleep(0.02)
        yield
    finally:
        proc.terminate()
        proc.wait(10)


@needs_mosquitto
async def test_init_writes_a_broker_acl_and_config_that_a_real_mosquitto_enforces(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    port = free_port()
    root = tmp_path / "cloud"
    assert main(["init", str(root), "--broker", f"mqtts://127.0.0.1:{port}"]) == 0
    capsys.readouterr()
    acl = (root / "broker" / "acl").read_text()
    assert acl == device_acl(["receiver"])
    snippet = (root / "broker" / "mosquitto.conf").read_text()
    assert "require_certificate true" in snippet and "use_identity_as_username true" in snippet
    assert "allow_anonymous false" in snippet and f"listener {port}" in snippet
    config = root / "receiver.toml"
    bundle = tmp_path / "gw-1.json"
    assert main(["device", "add", "gw-1", "--bundle", str(bundle), "--config", str(config)]) == 0
    assert main(["device", "add", "receiver", "--config", str(config)]) == 2
    capsys.readouterr()
    # The production snippet, plus what a test run as root needs (keys stay 0600 root's).
    conf = tmp_path / "mosquitto.conf"
    extra = "user root\n" if os.geteuid() == 0 else ""
    conf.write_text(snippet + extra + "persistence false\n", encoding="utf-8")
    from edgeos.provision import install_bundle

    creds = tmp_path / "creds"
    install_bundle(bundle, creds)
    pki = root / "pki"
    with _mosquitto(conf, port, tmp_path / "mosquitto.log"):

        def tls(cert: Path, key: Path) -> aiomqtt.TLSParameters:
            return aiomqtt.TLSParameters(
                ca_certs=str(root / "registry" / "ca" / "ca.crt"),
                certfile=str(cert),
                keyfile=str(key),
            )

        device_tls = tls(creds / "client.crt", creds / "client.key")
        receiver_tls = tls(pki / "receiver.crt", pki / "receiver.key")
        async with (
            aiomqtt.Client("127.0.0.1", port, tls_params=receiver_tls, identifier="rx") as rx,
            aiomqtt.Client("127.0.0.1", port, tls_params=device_tls, identifier="gw-1") as gw,
        ):
            await rx.subscribe("$share/receivers/edgeos/v1/+/batch", qos=1)
            with contextlib.suppress(aiomqtt.MqttError):
                await gw.subscribe("$share/receivers/edgeos/v1/+/batch", qos=1)
            await gw.subscribe("edgeos/v1/gw-1/ack", qos=1)
            await gw.publish("edgeos/v1/gw-1/batch", b"b1", qos=1)
            got = await _first(rx)
            assert (str(got.topic), got.payload) == ("edgeos/v1/gw-1/batch", b"b1")
            await rx.publish("edgeos/v1/gw-1/ack", b"ack", qos=1)
            first = await _first(gw)
            assert (str(first.topic), first.payload) == ("edgeos/v1/gw-1/ack", b"ack")
