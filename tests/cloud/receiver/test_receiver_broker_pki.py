"""The test broker enforces TLS client certificates, per-device ACLs and the CRL."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiomqtt
import pytest

from edgeos_cloud.receiver.pki import CertificateAuthority
from edgeos_testing.mosquitto import MosquittoBroker


async def test_acl_confines_devices_to_their_topics(tmp_path: Path) -> None:
    async with MosquittoBroker(tmp_path) as broker:
        async with (
            broker.client("receiver") as rx,
            broker.client("dev1") as d1,
            broker.client("dev2") as d2,
        ):
            await rx.subscribe("$share/g/edgeos/v1/+/batch", qos=1)
            await d2.subscribe("edgeos/v1/dev1/ack", qos=1)  # not its own: never delivered
            await d2.subscribe("edgeos/v1/dev2/ack", qos=1)
            await d1.publish("edgeos/v1/dev2/batch", b"spoofed", qos=1)
            await d1.publish("edgeos/v1/dev1/ack", b"self-ack", qos=1)
            await d1.publish("edgeos/v1/dev1/batch", b"mine", qos=1)
            await rx.publish("edgeos/v1/dev1/ack", b"for-dev1", qos=1)
            await rx.publish("edgeos/v1/dev2/ack", b"for-dev2", qos=1)
            async with asyncio.timeout(10):
                got = [(str(m.topic), m.payload) async for m in _take(rx.messages, 1)]
                acks = [(str(m.topic), m.payload) async for m in _take(d2.messages, 1)]
        # Ordered per connection: the denied publishes came first and were dropped.
        assert got == [("edgeos/v1/dev1/batch", b"mine")]
        assert acks == [("edgeos/v1/dev2/ack", b"for-dev2")]


async def _take(messages, n):  # type: ignore[no-untyped-def]
    count = 0
    async for m in messages:
        yield m
        count += 1
        if count >= n:
            return


async def test_tls_requires_a_certificate_from_the_ca_and_honours_the_crl(tmp_path: Path) -> None:
    async with MosquittoBroker(tmp_path / "mq") as broker:
        stranger = CertificateAuthority.create(tmp_path / "other", "stranger CA")
        issued = stranger.issue_client("dev1", tmp_path / "other")
        params = aiomqtt.TLSParameters(
            ca_certs=str(broker.ca.ca_file),
            certfile=str(issued.cert_file),
            keyfile=str(issued.key_file),
        )
        with pytest.raises(aiomqtt.MqttError):
            async with aiomqtt.Client(broker.host, broker.port, tls_params=params, timeout=3):
                pass
        async with broker.client("dev1"):
            pass
        creds = broker.credentials("dev1")
        broker.revoke("dev1")  # CRL rewritten, broker restarted on the same port
        assert broker.running
        params = aiomqtt.TLSParameters(
            ca_certs=str(creds.ca_file), certfile=str(creds.cert_file), keyfile=str(creds.key_file)
        )
        with pytest.raises(aiomqtt.MqttError):
            async with aiomqtt.Client(broker.host, broker.port, tls_params=params, timeout=3):
                pass
        async with broker.client("dev2"):  # others are unaffected
            pass


def test_plain_broker_sync_restart_and_kill(tmp_path: Path) -> None:
    with MosquittoBroker(tmp_path, tls=False, acl=False) as broker:
        port = broker.port
        assert broker.url == f"mqtt://127.0.0.1:{port}"
        broker.restart()
        assert broker.running and broker.port == port
        broker.kill()
        assert not broker.running
        broker.start()
        assert broker.running
    assert not broker.running
    with pytest.raises(RuntimeError):
        broker.ca  # noqa: B018 - plain brokers have no CA


def test_ca_issues_and_revokes(tmp_path: Path) -> None:
    from cryptography import x509

    ca = CertificateAuthority.create(tmp_path)
    with pytest.raises(FileExistsError):
        CertificateAuthority.create(tmp_path)
    a = ca.issue_client("dev-a")
    server = ca.issue_server(["127.0.0.1", "broker.local"])
    cert = x509.load_pem_x509_certificate(server.cert_pem)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["broker.local"]
    assert ca.revoke("dev-a") == [a.serial]
    assert ca.revoke("dev-a") == []
    crl = x509.load_pem_x509_crl(ca.crl_file.read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(a.serial) is not None
    assert crl.is_signature_valid(ca._cert.public_key())  # type: ignore[arg-type]
    assert (tmp_path / "ca.key").stat().st_mode & 0o777 == 0o600
