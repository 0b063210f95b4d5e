"""The cloud's half of issue #21: CRL refresh + broker reload, CA rollover, renewal endpoint.

Real Mosquitto (SIGHUP measured, not assumed), the project's CA on disk, the repository's
HTTP server, sealed control messages built with the protocol's own functions.
"""

from __future__ import annotations

import datetime as dt
import json
from http import HTTPStatus
from pathlib import Path

import aiomqtt
import pytest
import urllib3
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from edgeos_cloud.cli import main as cloud_main
from edgeos_cloud.ota.repository import serving
from edgeos_cloud.receiver.pki import CertificateAuthority
from edgeos_cloud.receiver.provisioning import create_device, revoke_device
from edgeos_cloud.receiver.registry import DeviceRegistry
from edgeos_cloud.renewal import CertificateRenewal, RenewalRefused
from edgeos_protocol.control import ControlKind, open_control, seal_control
from edgeos_protocol.credentials import read_bundle
from edgeos_testing.mosquitto import MosquittoBroker, mosquitto_path

needs_mosquitto = pytest.mark.skipif(mosquitto_path() is None, reason="mosquitto not installed")


def _expired_crl(ca_dir: Path) -> bytes:
    """A CRL of the CA whose nextUpdate passed an hour ago (what 30 quiet days leave)."""
    ca_cert = x509.load_pem_x509_certificates((ca_dir / "ca.crt").read_bytes())[0]
    key = serialization.load_pem_private_key((ca_dir / "ca.key").read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    now = dt.datetime.now(dt.UTC)
    crl = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now - dt.timedelta(days=31))
        .next_update(now - dt.timedelta(hours=1))
        .sign(key, hashes.SHA256())
    )
    return crl.public_bytes(serialization.Encoding.PEM)


async def _connects(broker: MosquittoBroker, identity: str, **kwargs: object) -> bool:
    """Connected within 30 s: long enough that a slow (emulated, loaded) handshake is never
    mistaken for a refusal."""
    return await _try_connect(broker, identity, 30, **kwargs)


async def _refused(broker: MosquittoBroker, identity: str, **kwargs: object) -> bool:
    """No session within 5 s. A certificate the broker rejects gets no CONNACK (TLS 1.3: the
    client's handshake is done before the broker judges its certificate), so this waits the
    whole 5 s; a slow broker could pass it wrongly, never fail it."""
    return not await _try_connect(broker, identity, 5, **kwargs)


async def _try_connect(
    broker: MosquittoBroker, identity: str, within_s: float, **kwargs: object
) -> bool:
    try:
        async with broker.client(identity, timeout=within_s, **kwargs):
            return True
    except aiomqtt.MqttError:
        return False


@pytest.fixture
def receiver_dir(tmp_path: Path) -> Path:
    """``edgeos-cloud init``: CA, receiver + broker certificates, receiver.toml."""
    directory = tmp_path / "rx"
    assert cloud_main(["init", str(directory)]) == 0
    return directory


@needs_mosquitto
async def test_expired_crl_locks_out_every_device_until_pki_refresh_reloads_the_broker(
    receiver_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ca = CertificateAuthority(receiver_dir / "registry" / "ca")
    async with MosquittoBroker(tmp_path / "mq", ca=ca) as broker:
        broker.credentials("gw-1")
        async with broker.client("gw-held", timeout=30) as held:
            ca.crl_file.write_bytes(_expired_crl(ca.directory))
            broker.reload()
            assert await _refused(broker, "gw-1")  # the fleet goes dark on this date

            pid_file = tmp_path / "mosquitto.pid"
            pid_file.write_text(f"{broker.pid}\n")
            capsys.readouterr()
            assert (
                cloud_main(
                    [
                        "pki",
                        "refresh",
                        "--config",
                        str(receiver_dir / "receiver.toml"),
                        "--server-cert",
                        str(broker.server_cert_file),
                        "--broker-pid-file",
                        str(pid_file),
                        "--textfile",
                        str(tmp_path / "creds.prom"),
                    ]
                )
                == 0
            )
            out = json.loads(capsys.readouterr().out)
            assert out["changed"] == ["crl"] and out["broker_reloaded"] is True
            broker.reload()  # wait for the reload the command triggered (and do one more)
            assert await _connects(broker, "gw-1")
            # The connection that was up through both reloads still works.
            await held.publish("edgeos/v1/gw-held/status", b"{}", qos=1, timeout=30)
            # A revocation still takes effect at once (rewrite + reload).
            ca.revoke("gw-1")
            broker.reload()
            assert await _refused(broker, "gw-1")
    prom = (tmp_path / "creds.prom").read_text()
    assert 'edgeos_credential_expiry_timestamp_seconds{kind="crl"}' in prom
    assert 'kind="server_certificate"' in prom and 'kind="ca"' in prom


def test_pki_refresh_renews_the_broker_certificate_only_inside_its_window(
    receiver_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = str(receiver_dir / "receiver.toml")
    server = receiver_dir / "pki" / "server.crt"
    before = server.read_bytes()
    capsys.readouterr()
    assert cloud_main(["pki", "refresh", "--config", config]) == 0
    assert json.loads(capsys.readouterr().out)["changed"] == []
    assert server.read_bytes() == before
    # 825-day certificate, window of 900 days: due.
    assert cloud_main(["pki", "refresh", "--config", config, "--cert-within-days", "900"]) == 0
    changed = json.loads(capsys.readouterr().out)["changed"]
    assert "server_certificate" in changed and "receiver_certificate" in changed
    renewed = x509.load_pem_x509_certificate(server.read_bytes())
    old = x509.load_pem_x509_certificate(before)
    assert renewed.serial_number != old.serial_number
    san = x509.SubjectAlternativeName
    assert renewed.extensions.get_extension_for_class(san).value == (
        old.extensions.get_extension_for_class(san).value
    )


@needs_mosquitto
async def test_ca_rollover_trusts_old_and_new_ca_devices_during_the_overlap_and_keeps_crls(
    tmp_path: Path,
) -> None:
    async with MosquittoBroker(tmp_path / "mq") as broker:
        ca = broker.ca
        broker.credentials("gw-old")
        broker.credentials("gw-gone")
        ca.rollover("edgeos CA 2")
        broker.reload()
        new = ca.issue_device("gw-new", tmp_path / "new")
        assert new.cert_file is not None and new.key_file is not None
        new_creds = aiomqtt.TLSParameters(
            ca_certs=str(ca.ca_file), certfile=str(new.cert_file), keyfile=str(new.key_file)
        )
        assert await _connects(broker, "gw-new", tls_params=new_creds)
        assert await _connects(broker, "gw-old")
        # Revoking a certificate of the old CA still works during the overlap.
        ca.revoke("gw-gone")
        broker.reload()
        assert await _refused(broker, "gw-gone")
        assert len(x509.load_pem_x509_certificates(ca.ca_file.read_bytes())) == 2
        # The broker moves to the new CA once devices hold the bundle, then the overlap ends:
        # the old CA's devices are out, the new ones stay.
        server = broker.server_cert_file
        renewed = ca.renew_in_place(
            server, server.with_suffix(".key"), within=dt.timedelta(0), force=True
        )
        assert renewed is not None
        broker.reload()
        assert await _connects(broker, "gw-old")
        ca.retire()
        broker.reload()
        assert await _refused(broker, "gw-old")
        assert await _connects(broker, "gw-new", tls_params=new_creds)


# --------------------------------------------------------------------------- the endpoint


def _csr(device: str, key: ec.EllipticCurvePrivateKey | None = None) -> tuple[str, object]:
    key = key or ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device)]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode(), key


class _Fleet:
    def __init__(self, tmp_path: Path) -> None:
        self.registry = DeviceRegistry(tmp_path / "registry")
        self.ca = CertificateAuthority.create(tmp_path / "registry" / "ca")
        self.keys: dict[str, bytes] = {}
        for device in ("gw-1", "gw-2"):
            bundle = tmp_path / f"{device}.json"
            create_device(self.registry, self.ca, device, "mqtts://127.0.0.1:8883", bundle)
            self.keys[device] = read_bundle(bundle)["_key"]
        self.renewal = CertificateRenewal(tmp_path / "registry", tmp_path / "state")

    def request(self, device: str, csr: str, *, counter: int, sealer: str | None = None) -> bytes:
        from edgeos_protocol.crypto import key_id_for

        key = self.keys[sealer or device]
        return seal_control(
            ControlKind.CERT_REQUEST,
            {"device": device, "csr": csr},
            key,
            device,
            counter,
            key_id=key_id_for(key),
        )


def test_renewal_answers_a_sealed_csr_with_a_certificate_of_the_new_key_sealed_for_the_device(
    tmp_path: Path,
) -> None:
    fleet = _Fleet(tmp_path)
    csr, key = _csr("gw-1")
    with serving(tmp_path, on_certificate=fleet.renewal.answer) as server:
        response = urllib3.request(
            "POST", f"{server.url}/certificates", body=fleet.request("gw-1", csr, counter=7)
        )
    assert response.status == 200
    from edgeos_protocol.crypto import key_id_for

    k = fleet.keys["gw-1"]
    answer = open_control(
        response.data, {key_id_for(k): k}, kinds=frozenset({ControlKind.CERT_RESPONSE})
    )
    assert answer.payload["request"] == 7 and answer.payload["device"] == "gw-1"
    cert = x509.load_pem_x509_certificate(answer.payload["cert"].encode())
    assert cert.public_key() == key.public_key()  # type: ignore[attr-defined]
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)[0].value == (
        "device"
    )
    # The new serial belongs to the device: revoking it revokes the renewed certificate too.
    revoke_device(fleet.registry, fleet.ca, "gw-1")
    assert cert.serial_number in fleet.ca.revoked_serials()


@pytest.mark.parametrize(
    ("case", "status"),
    [
        ("sealed_by_another_device", HTTPStatus.FORBIDDEN),
        ("csr_names_another_device", HTTPStatus.FORBIDDEN),
        ("replayed_request", HTTPStatus.CONFLICT),
        ("key_certified_before", HTTPStatus.FORBIDDEN),
        ("revoked_device", HTTPStatus.FORBIDDEN),
        ("not_a_request", HTTPStatus.BAD_REQUEST),
    ],
)
def test_renewal_refuses_requests_it_must_not_answer(
    tmp_path: Path, case: str, status: HTTPStatus
) -> None:
    fleet = _Fleet(tmp_path)
    csr, key = _csr("gw-1")
    if case == "sealed_by_another_device":
        sealed = fleet.request("gw-1", csr, counter=1, sealer="gw-2")
    elif case == "csr_names_another_device":
        sealed = fleet.request("gw-1", _csr("gw-2")[0], counter=1)
    elif case == "replayed_request":
        sealed = fleet.request("gw-1", csr, counter=1)
        fleet.renewal.answer(sealed)
    elif case == "key_certified_before":
        fleet.renewal.answer(fleet.request("gw-1", csr, counter=1))
        sealed = fleet.request("gw-1", _csr("gw-1", key)[0], counter=2)  # type: ignore[arg-type]
    elif case == "revoked_device":
        revoke_device(fleet.registry, fleet.ca, "gw-1")
        sealed = fleet.request("gw-1", csr, counter=1)
    else:
        sealed = b"EOSC" + b"\0" * 60
    issued_before = len(json.loads((fleet.ca.directory / "issued.json").read_text()))
    with pytest.raises(RenewalRefused) as refused:
        fleet.renewal.answer(sealed)
    assert refused.value.status == status
    issued_after = len(json.loads((fleet.ca.directory / "issued.json").read_text()))
    assert issued_after == issued_before  # nothing was certified
