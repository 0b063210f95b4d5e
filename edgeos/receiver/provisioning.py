"""Device provisioning: credential bundles made by the receiver, installed on the gateway.

``edgeos-receiver device add ID`` → :func:`create_device` registers a 32-byte device key,
issues an MQTT client certificate (``CN = ID``) from the receiver's CA and writes a bundle:
one JSON file (mode 0600)::

    {"format": "edgeos-credentials/1", "device": ID, "key_id": 123,
     "device_key": "<base64>", "client_cert": "<PEM>", "client_key": "<PEM>",
     "ca_cert": "<PEM>", "broker": "mqtts://host:8883"}

``edgeos provision FILE`` on the gateway calls :func:`install_bundle`, which writes (all mode
0600, the folder 0700) the files the runtime's ``[uplink]`` section points at::

    device.key  (32 raw bytes)   client.crt   client.key   ca.crt   credentials.json

``credentials.json`` holds the device id, key id and broker URL (no secrets) so the installer
of the runtime config can fill in ``device.id`` and ``uplink.broker``.
"""

from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from edgeos.errors import ProvisioningError
from edgeos.receiver.pki import CertificateAuthority, write_private
from edgeos.receiver.registry import DEVICE_ID_RE, DeviceRecord, DeviceRegistry
from edgeos.uplink.crypto import KEY_BYTES, key_id_for

__all__ = [
    "BUNDLE_FORMAT",
    "InstalledCredentials",
    "create_device",
    "install_bundle",
    "read_bundle",
    "revoke_device",
]

BUNDLE_FORMAT = "edgeos-credentials/1"
_FILES = ("device.key", "client.crt", "client.key", "ca.crt", "credentials.json")


@dataclass(frozen=True, slots=True)
class InstalledCredentials:
    """Where :func:`install_bundle` put the credentials."""

    device: str
    key_id: int
    broker: str
    key_file: Path
    cert_file: Path
    cert_key_file: Path
    ca_file: Path


def create_device(
    registry: DeviceRegistry, ca: CertificateAuthority, device: str, broker_url: str, bundle: Path
) -> DeviceRecord:
    """Register ``device``, issue its client certificate and write its bundle (0600)."""
    record = registry.add(device)
    issued = ca.issue_client(device)
    record = registry.set_cert_serials(device, (issued.serial,))
    doc = {
        "format": BUNDLE_FORMAT,
        "device": device,
        "key_id": record.current_key_id,
        "device_key": base64.b64encode(record.current_key).decode(),
        "client_cert": issued.cert_pem.decode(),
        "client_key": issued.key_pem.decode(),
        "ca_cert": ca.cert_pem.decode(),
        "broker": broker_url,
    }
    bundle.parent.mkdir(parents=True, exist_ok=True)
    write_private(bundle, json.dumps(doc, indent=1).encode())
    return record


def revoke_device(registry: DeviceRegistry, ca: CertificateAuthority, device: str) -> DeviceRecord:
    """Disable the device's keys and revoke its certificates (the CRL is rewritten)."""
    record = registry.revoke(device)
    for serial in record.cert_serials or tuple(ca.serials_of(device)):
        ca.revoke(serial=serial)
    return record


def read_bundle(bundle_path: str | Path) -> dict[str, Any]:
    """Read and check a bundle; raise :class:`ProvisioningError` saying what is wrong."""
    path = Path(bundle_path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ProvisioningError(f"cannot read bundle {path}: {exc.strerror}") from exc
    except ValueError as exc:
        raise ProvisioningError(f"bundle {path} is not JSON: {exc}") from exc
    if not isinstance(doc, dict) or doc.get("format") != BUNDLE_FORMAT:
        raise ProvisioningError(f"{path} is not an {BUNDLE_FORMAT} bundle")
    missing = [
        k
        for k in (
            "device",
            "key_id",
            "device_key",
            "client_cert",
            "client_key",
            "ca_cert",
            "broker",
        )
        if k not in doc
    ]
    if missing:
        raise ProvisioningError(f"bundle {path} lacks {', '.join(missing)}")
    device = doc["device"]
    if not isinstance(device, str) or not DEVICE_ID_RE.match(device):
        raise ProvisioningError(f"bundle {path}: invalid device id {device!r}")
    try:
        key = base64.b64decode(doc["device_key"], validate=True)
    except (ValueError, TypeError) as exc:
        raise ProvisioningError(f"bundle {path}: device_key is not base64") from exc
    if len(key) != KEY_BYTES or key_id_for(key) != doc["key_id"]:
        raise ProvisioningError(f"bundle {path}: device key does not match its key id")
    try:
        cert = x509.load_pem_x509_certificate(doc["client_cert"].encode())
        x509.load_pem_x509_certificate(doc["ca_cert"].encode())
        serialization.load_pem_private_key(doc["client_key"].encode(), None)
    except (ValueError, TypeError) as exc:
        raise ProvisioningError(f"bundle {path}: certificate or key is malformed: {exc}") from exc
    cns = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    if not cns or cns[0].value != device:
        raise ProvisioningError(f"bundle {path}: certificate CN is not {device!r}")
    doc["_key"] = key
    return doc


def install_bundle(
    bundle_path: str | Path, target_dir: str | Path, *, overwrite: bool = False
) -> InstalledCredentials:
    """Install a bundle's credentials into ``target_dir`` (files 0600, folder 0700).

    Refuses (:class:`ProvisioningError`) a malformed bundle, and existing credentials unless
    ``overwrite`` is true, so re-running provisioning never silently replaces a device's key.
    """
    doc = read_bundle(bundle_path)
    target = Path(target_dir)
    target.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(target, 0o700)
    if not overwrite:
        existing = [name for name in _FILES if (target / name).exists()]
        if existing:
            raise ProvisioningError(
                f"{target} already holds {', '.join(existing)}; pass overwrite to replace them"
            )
    info = {"device": doc["device"], "key_id": doc["key_id"], "broker": doc["broker"]}
    write_private(target / "device.key", doc["_key"])
    write_private(target / "client.crt", doc["client_cert"].encode())
    write_private(target / "client.key", doc["client_key"].encode())
    write_private(target / "ca.crt", doc["ca_cert"].encode())
    write_private(target / "credentials.json", json.dumps(info, indent=1).encode())
    return InstalledCredentials(
        device=doc["device"],
        key_id=int(doc["key_id"]),
        broker=str(doc["broker"]),
        key_file=target / "device.key",
        cert_file=target / "client.crt",
        cert_key_file=target / "client.key",
        ca_file=target / "ca.crt",
    )
