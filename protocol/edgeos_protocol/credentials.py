"""The credential bundle: what the cloud's ``device add`` writes and ``edgeos provision`` reads.

One JSON file (mode 0600)::

    {"format": "edgeos-credentials/1", "device": ID, "key_id": 123,
     "device_key": "<base64>", "client_cert": "<PEM>", "client_key": "<PEM>",
     "ca_cert": "<PEM>", "broker": "mqtts://host:8883"}

The gateway installs it as the files :data:`FILES` names (see :mod:`edgeos.provision`).
"""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from edgeos_protocol.crypto import KEY_BYTES, key_id_for
from edgeos_protocol.errors import ProvisioningError
from edgeos_protocol.fsutil import read_regular

__all__ = [
    "BUNDLE_FORMAT",
    "DEVICE_ID_RE",
    "FILES",
    "RESERVED_NAMES",
    "RESERVED_PREFIXES",
    "check_device_id",
    "is_service_identity",
    "read_bundle",
]

BUNDLE_FORMAT = "edgeos-credentials/1"
#: A bundle is a few kB (three PEM blocks and a key); anything far larger is not one.
MAX_BUNDLE_BYTES = 1 << 20
#: The files a bundle becomes on the gateway.
FILES = ("device.key", "client.crt", "client.key", "ca.crt", "credentials.json")
#: What a device id may look like (it is part of every MQTT topic and the certificate CN).
DEVICE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]{0,63}$")
#: Identities of the cloud's own services (receivers, the broker, the OTA server …). The broker
#: grants a service identity rights over every device's topics, so no device may ever carry one
#: of these names as its id (= its certificate CN = its MQTT username). Compared ignoring case.
RESERVED_NAMES = frozenset(
    {
        "admin",
        "broker",
        "cloud",
        "edgeos",
        "localhost",
        "mosquitto",
        "ota",
        "receiver",
        "receivers",
        "root",
        "server",
        "service",
    }
)
#: Name prefixes kept for services too (``receiver-2``, ``svc-ota``), ignoring case.
RESERVED_PREFIXES = ("receiver", "svc-", "svc_", "service-", "broker-")


def is_service_identity(name: str) -> bool:
    """True for a name in the services' namespace (which no device id may enter)."""
    lowered = name.lower()
    return lowered in RESERVED_NAMES or lowered.startswith(RESERVED_PREFIXES)


def check_device_id(device: object) -> str:
    """``device`` when it is a valid, unreserved device id; ``ValueError`` saying why not."""
    if not isinstance(device, str) or not DEVICE_ID_RE.match(device):
        raise ValueError(
            f"invalid device id {device!r}: 1-64 letters, digits, '-' or '_', "
            "starting with a letter or digit"
        )
    if is_service_identity(device):
        raise ValueError(
            f"device id {device!r} is reserved for the cloud's service identities "
            f"(names {sorted(RESERVED_NAMES)} and prefixes {list(RESERVED_PREFIXES)})"
        )
    return device


def read_bundle(bundle_path: str | Path) -> dict[str, Any]:
    """Read and check a bundle; raise :class:`ProvisioningError` saying what is wrong."""
    path = Path(bundle_path)
    try:
        # Non-blocking open + fstat: a FIFO or device at the path is refused, never waited on.
        doc = json.loads(read_regular(path, max_bytes=MAX_BUNDLE_BYTES).decode("utf-8"))
    except OSError as exc:
        raise ProvisioningError(f"cannot read bundle {path}: {exc.strerror or exc}") from exc
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
    try:
        device = check_device_id(doc["device"])
    except ValueError as exc:
        raise ProvisioningError(f"bundle {path}: {exc}") from None
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
