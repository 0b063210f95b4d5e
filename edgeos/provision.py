"""Install a credential bundle from the cloud on the gateway (``edgeos provision FILE``).

Writes (all mode 0600, the folder 0700) the files the runtime's ``[uplink]`` section points at::

    device.key  (32 raw bytes)   client.crt   client.key   ca.crt   credentials.json

``credentials.json`` holds the device id, key id and broker URL (no secrets) so the installer
of the runtime config can fill in ``device.id`` and ``uplink.broker``. The bundle's format is
:mod:`edgeos_protocol.credentials`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from edgeos_protocol.credentials import FILES, read_bundle
from edgeos_protocol.errors import ProvisioningError
from edgeos_protocol.fsutil import write_private

__all__ = ["InstalledCredentials", "install_bundle"]


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
        existing = [name for name in FILES if (target / name).exists()]
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
