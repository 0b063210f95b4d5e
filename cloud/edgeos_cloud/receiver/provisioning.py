"""Device provisioning: credential bundles made by the receiver, installed on the gateway.

``edgeos-receiver device add ID`` → :func:`create_device` registers a 32-byte device key,
issues an MQTT client certificate (``CN = ID``, ``OU = device``) from the receiver's CA and
writes a bundle:
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
from pathlib import Path

from edgeos_cloud.receiver.pki import CertificateAuthority
from edgeos_cloud.receiver.registry import DeviceRecord, DeviceRegistry
from edgeos_protocol.credentials import BUNDLE_FORMAT, check_device_id
from edgeos_protocol.fsutil import write_private

__all__ = ["create_device", "revoke_device"]


def create_device(
    registry: DeviceRegistry,
    ca: CertificateAuthority,
    device: str,
    broker_url: str,
    bundle: Path,
    *,
    ota_group: str | None = None,
) -> DeviceRecord:
    """Register ``device``, issue its client certificate and write its bundle (0600).

    ``ota_group`` (``device add --group``): the OTA channel the installer writes into
    ``[ota] group``; the fleet's bootstrap points it at the group's champion models and profile
    (docs/fleet.md#bootstrap). Not a secret; older installers ignore it.

    A reserved or invalid id, or a name the CA issued under another role, is refused
    (``ValueError``) before anything is written.
    """
    check_device_id(device)
    if ca.role_of_name(device) not in (None, "device"):
        raise ValueError(f"{device!r} is a {ca.role_of_name(device)} identity, not a device")
    record = registry.add(device)
    issued = ca.issue_device(device)
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
    if ota_group is not None:
        doc["ota_group"] = ota_group
    bundle.parent.mkdir(parents=True, exist_ok=True)
    write_private(bundle, json.dumps(doc, indent=1).encode())
    return record


def revoke_device(registry: DeviceRegistry, ca: CertificateAuthority, device: str) -> DeviceRecord:
    """Disable the device's keys and revoke its certificates (the CRL is rewritten)."""
    record = registry.revoke(device)
    for serial in record.cert_serials or tuple(ca.serials_of(device)):
        ca.revoke(serial=serial)
    return record
