"""The gateway renews its client certificate over the air, and survives every failure of it.

Real pieces only: the project's CA and registry, the repository's HTTP server answering
``POST /certificates`` (or a hostile one answering with forged or replayed bytes), a real
Mosquitto the new certificate must connect to, and a real full filesystem (tmpfs).
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiomqtt
import pytest
from cryptography import x509

from edgeos.provision import install_bundle
from edgeos.renewal import CertificateRenewer, RenewalFailed, RenewalSettings
from edgeos_cloud.ota.repository import serving
from edgeos_cloud.receiver.pki import CertificateAuthority
from edgeos_cloud.receiver.provisioning import create_device
from edgeos_cloud.receiver.registry import DeviceRegistry
from edgeos_cloud.renewal import CertificateRenewal
from edgeos_protocol.crypto import Keyring
from edgeos_testing.mosquitto import MosquittoBroker, mosquitto_path
from edgeos_testing.net import free_port

pytestmark = pytest.mark.skipif(mosquitto_path() is None, reason="mosquitto not installed")

FILES = ("client.crt", "client.key", "ca.crt")


@dataclass
class Cloud:
    ca: CertificateAuthority
    registry: DeviceRegistry
    renewal: CertificateRenewal
    broker: MosquittoBroker


@pytest.fixture
def cloud(tmp_path: Path) -> Iterator[Cloud]:
    registry = DeviceRegistry(tmp_path / "registry")
    ca = CertificateAuthority.create(tmp_path / "registry" / "ca")
    with MosquittoBroker(tmp_path / "mq", ca=ca) as broker:
        yield Cloud(ca, registry, CertificateRenewal(tmp_path / "registry", tmp_path), broker)


def _device(cloud: Cloud, creds: Path, url: str, device: str = "gw-1") -> CertificateRenewer:
    bundle = creds.parent / f"{device}.json"
    create_device(cloud.registry, cloud.ca, device, cloud.broker.url, bundle)
    installed = install_bundle(bundle, creds)
    return CertificateRenewer(
        RenewalSettings(
            device=device,
            url=url,
            cert_file=installed.cert_file,
            key_file=installed.cert_key_file,
            ca_file=installed.ca_file,
            broker=cloud.broker.url,
            renew_before_days=900,  # an 825-day certificate is due at once
        ),
        Keyring.load(installed.key_file),
    )


def _snapshot(creds: Path) -> dict[str, bytes]:
    return {name: (creds / name).read_bytes() for name in FILES}


async def _connects_with(broker: MosquittoBroker, creds: Path, device: str = "gw-1") -> bool:
    tls = aiomqtt.TLSParameters(
        ca_certs=str(creds / "ca.crt"),
        certfile=str(creds / "client.crt"),
        keyfile=str(creds / "client.key"),
    )
    try:
        async with broker.client(device, tls_params=tls, timeout=5):
            return True
    except aiomqtt.MqttError:
        return False


async def test_due_certificate_is_renewed_with_a_new_key_installed_and_connects(
    cloud: Cloud, tmp_path: Path
) -> None:
    creds = tmp_path / "creds"
    with serving(tmp_path, on_certificate=cloud.renewal.answer) as server:
        renewer = _device(cloud, creds, server.url)
        before = _snapshot(creds)
        assert renewer.due()
        cert = await renewer.renew_once()
    after = _snapshot(creds)
    assert (
        after["client.key"] != before["client.key"] and after["client.crt"] != before["client.crt"]
    )
    assert x509.load_pem_x509_certificate(after["client.crt"]).serial_number == cert.serial_number
    # The old pair is kept until the publisher has connected with the new one.
    assert (creds / "client.crt.prev").read_bytes() == before["client.crt"]
    assert not list(creds.glob("*.new"))
    assert await _connects_with(cloud.broker, creds)
    [event] = renewer.drain_events()
    assert event["type"] == "cert_renewal" and event["outcome"] == "renewed"
    assert renewer.status()["client_certificate_expires"] == cert.not_valid_after_utc.timestamp()
    assert cert.serial_number in cloud.registry.get("gw-1").cert_serials  # type: ignore[union-attr]


async def test_cloud_down_when_renewal_is_due_keeps_working_credentials_and_retries(
    cloud: Cloud, tmp_path: Path
) -> None:
    creds = tmp_path / "creds"
    renewer = _device(cloud, creds, f"http://127.0.0.1:{free_port()}")
    before = _snapshot(creds)
    with pytest.raises(RenewalFailed) as failed:
        await renewer.renew_once()
    assert failed.value.reason == "network"
    assert _snapshot(creds) == before and not list(creds.glob("*.new"))
    assert await _connects_with(cloud.broker, creds)
    assert renewer.drain_events()[0]["outcome"] == "failed"
    # The cloud is back: the retry renews.
    with serving(tmp_path, on_certificate=cloud.renewal.answer) as server:
        renewer = CertificateRenewer(_with_url(renewer.settings, server.url), renewer.keyring)
        await renewer.renew_once()
    assert _snapshot(creds)["client.crt"] != before["client.crt"]


def _with_url(settings: RenewalSettings, url: str) -> RenewalSettings:
    from dataclasses import replace

    return replace(settings, url=url)


async def test_forged_renewal_answer_is_refused_and_nothing_is_installed(
    cloud: Cloud, tmp_path: Path
) -> None:
    """A server (or man in the middle) without the device key answers with its own seal."""
    creds = tmp_path / "creds"
    forger = CertificateRenewal(tmp_path / "registry", tmp_path / "forger")
    _other = _device(cloud, tmp_path / "other", "http://unused", device="gw-2")

    def forge(body: bytes) -> bytes:
        # A genuine certificate for gw-2's request, sealed for gw-2: not for this device.
        return forger.answer(_other_request(_other))

    with serving(tmp_path, on_certificate=forge) as server:
        renewer = _device(cloud, creds, server.url)
        before = _snapshot(creds)
        with pytest.raises(RenewalFailed) as failed:
            await renewer.renew_once()
    assert failed.value.reason == "forged"
    assert _snapshot(creds) == before and not list(creds.glob("*.new"))


def _other_request(renewer: CertificateRenewer) -> bytes:
    """A sealed CERT_REQUEST of ``renewer``'s device (what the device itself would post)."""
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    from edgeos_protocol.control import ControlKind, seal_control

    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, renewer.settings.device)]))
        .sign(key, hashes.SHA256())
    )
    return seal_control(
        ControlKind.CERT_REQUEST,
        {
            "device": renewer.settings.device,
            "csr": csr.public_bytes(serialization.Encoding.PEM).decode(),
        },
        renewer.keyring.current,
        renewer.settings.device,
        int.from_bytes(os.urandom(6), "big") + 1,
        key_id=renewer.keyring.current_id,
    )


async def test_replayed_renewal_answer_is_refused_and_nothing_is_installed(
    cloud: Cloud, tmp_path: Path
) -> None:
    """An attacker recorded a genuine answer to an earlier request and plays it back."""
    creds = tmp_path / "creds"
    recorded: list[bytes] = []

    def record_then_replay(body: bytes) -> bytes:
        if not recorded:
            recorded.append(cloud.renewal.answer(body))
        return recorded[0]

    with serving(tmp_path, on_certificate=record_then_replay) as server:
        renewer = _device(cloud, creds, server.url)
        await renewer.renew_once()  # the genuine exchange the attacker records
        installed = _snapshot(creds)
        with pytest.raises(RenewalFailed) as failed:
            await renewer.renew_once()
    assert failed.value.reason == "replayed"
    assert _snapshot(creds) == installed and not list(creds.glob("*.new"))
    assert await _connects_with(cloud.broker, creds)


@contextlib.contextmanager
def _tiny_tmpfs(path: Path, size: str = "64k") -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs (needs root/CAP_SYS_ADMIN): {mounted.stderr!r}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _fill(path: Path) -> None:
    """Fill the filesystem: a real ENOSPC (raised by a write or by the final flush)."""
    with contextlib.suppress(OSError), open(path, "wb") as f:
        while True:
            f.write(b"\0" * 1024)
            f.flush()


async def test_disk_full_while_installing_keeps_working_credentials_and_retries(
    cloud: Cloud, tmp_path: Path
) -> None:
    with (
        _tiny_tmpfs(tmp_path / "creds") as creds,
        serving(tmp_path, on_certificate=cloud.renewal.answer) as server,
    ):
        renewer = _device(cloud, creds, server.url)
        before = _snapshot(creds)
        filler = creds / "filler"
        _fill(filler)
        with pytest.raises(RenewalFailed) as failed:
            await renewer.renew_once()
        assert failed.value.reason == "io_error" and str(errno.ENOSPC) in str(failed.value)
        assert _snapshot(creds) == before
        assert not [p for p in creds.iterdir() if p.name.startswith(".") or p.suffix == ".new"]
        assert await _connects_with(cloud.broker, creds)
        filler.unlink()  # space again: the retry installs
        await renewer.renew_once()
        assert _snapshot(creds)["client.crt"] != before["client.crt"]
        assert await _connects_with(cloud.broker, creds)


def test_crash_between_the_renames_is_finished_at_the_next_start(tmp_path: Path) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    for name in FILES:
        (creds / name).write_bytes(b"old " + name.encode())
    # The key was renamed into place, the certificate and CA were not yet.
    (creds / "client.key").write_bytes(b"new client.key")
    (creds / "client.crt.new").write_bytes(b"new client.crt")
    (creds / "ca.crt.new").write_bytes(b"new ca.crt")
    renewer = CertificateRenewer(
        RenewalSettings(
            device="gw-1",
            url="http://unused",
            cert_file=creds / "client.crt",
            key_file=creds / "client.key",
            ca_file=creds / "ca.crt",
        ),
        Keyring.of(os.urandom(32)),
    )
    renewer.recover()
    assert {name: (creds / name).read_bytes() for name in FILES} == {
        name: b"new " + name.encode() for name in FILES
    }
    assert not list(creds.glob("*.new"))
