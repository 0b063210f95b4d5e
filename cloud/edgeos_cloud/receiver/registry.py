"""The receiver's device registry: one JSON file per device holding its keys and status.

Layout (directory mode 0700, files 0600)::

    <registry>/devices/<device id>.json
        {"device": "...", "status": "active" | "revoked", "created_at": ..., "revoked_at": ...,
         "keys": [{"key_id": 123, "key": "<base64 32 bytes>", "status": "active"}, ...],
         "cert_serials": [...]}

Files are written atomically (temp file + rename), so ``edgeos-receiver device revoke`` from
another process is picked up by a running receiver on its next lookup of that device: lookups
compare the file's ``stat`` signature with the cached one (one ``stat`` per batch, no timer).
"""

from __future__ import annotations

import base64
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from edgeos_protocol.credentials import DEVICE_ID_RE, check_device_id
from edgeos_protocol.crypto import KEY_BYTES, key_id_for
from edgeos_protocol.fsutil import write_private

__all__ = ["DEVICE_ID_RE", "DeviceRecord", "DeviceRegistry", "KeyLookupError"]

LookupReason = Literal["unknown_device", "revoked", "wrong_key"]


class KeyLookupError(Exception):
    """No usable key for a (device, key id); ``reason`` is the reject reason to count."""

    def __init__(self, reason: LookupReason, message: str) -> None:
        self.reason: LookupReason = reason
        super().__init__(message)


@dataclass(frozen=True, slots=True)
class DeviceRecord:
    """One device's registry entry."""

    device: str
    status: Literal["active", "revoked"]
    created_at: float
    keys: dict[int, bytes] = field(default_factory=dict)
    current_key_id: int = 0
    revoked_at: float | None = None
    cert_serials: tuple[int, ...] = ()

    @property
    def current_key(self) -> bytes:
        return self.keys[self.current_key_id]

    def to_json(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "status": self.status,
            "created_at": self.created_at,
            "revoked_at": self.revoked_at,
            "current_key_id": self.current_key_id,
            "keys": [
                {"key_id": kid, "key": base64.b64encode(key).decode()}
                for kid, key in self.keys.items()
            ],
            "cert_serials": list(self.cert_serials),
        }

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> DeviceRecord:
        keys = {int(k["key_id"]): base64.b64decode(k["key"]) for k in doc["keys"]}
        for kid, key in keys.items():
            if len(key) != KEY_BYTES or key_id_for(key) != kid:
                raise ValueError(f"device {doc['device']!r}: key {kid} is corrupt")
        status = doc["status"]
        if status not in ("active", "revoked"):
            raise ValueError(f"device {doc['device']!r}: unknown status {status!r}")
        return cls(
            device=str(doc["device"]),
            status=status,
            created_at=float(doc["created_at"]),
            keys=keys,
            current_key_id=int(doc["current_key_id"]),
            revoked_at=None if doc.get("revoked_at") is None else float(doc["revoked_at"]),
            cert_serials=tuple(int(s) for s in doc.get("cert_serials", ())),
        )


class DeviceRegistry:
    """Device keys and status, stored under ``directory/devices``."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self._devices = self.directory / "devices"
        self._cache: dict[str, tuple[tuple[int, int, int], DeviceRecord]] = {}

    def _path(self, device: str) -> Path:
        if not DEVICE_ID_RE.match(device):
            raise ValueError(f"invalid device id {device!r}")
        return self._devices / f"{device}.json"

    def _save(self, record: DeviceRecord) -> None:
        self._devices.mkdir(parents=True, exist_ok=True, mode=0o700)
        data = json.dumps(record.to_json(), indent=1).encode()
        write_private(self._path(record.device), data)
        self._cache.pop(record.device, None)

    def add(self, device: str, key: bytes | None = None) -> DeviceRecord:
        """Register a new device with a fresh 32-byte key (refuses an existing id).

        Raises ``ValueError`` for an invalid id or one reserved for service identities
        (``receiver`` …): a device must never share a name with a receiver.
        """
        check_device_id(device)
        if self._path(device).exists():
            raise FileExistsError(f"device {device!r} is already registered")
        key = os.urandom(KEY_BYTES) if key is None else key
        if len(key) != KEY_BYTES:
            raise ValueError(f"a device key is {KEY_BYTES} bytes")
        kid = key_id_for(key)
        record = DeviceRecord(device, "active", time.time(), {kid: key}, kid)
        self._save(record)
        return record

    def set_cert_serials(self, device: str, serials: tuple[int, ...]) -> DeviceRecord:
        record = self._require(device)
        updated = DeviceRecord(
            record.device,
            record.status,
            record.created_at,
            record.keys,
            record.current_key_id,
            record.revoked_at,
            serials,
        )
        self._save(updated)
        return updated

    def revoke(self, device: str) -> DeviceRecord:
        """Disable every key of ``device``; its batches are rejected as ``revoked``."""
        record = self._require(device)
        updated = DeviceRecord(
            record.device,
            "revoked",
            record.created_at,
            record.keys,
            record.current_key_id,
            time.time(),
            record.cert_serials,
        )
        self._save(updated)
        return updated

    def _require(self, device: str) -> DeviceRecord:
        record = self.get(device)
        if record is None:
            raise KeyError(f"device {device!r} is not registered")
        return record

    def get(self, device: str) -> DeviceRecord | None:
        """The device's record, re-read when its file changed; None when unknown."""
        try:
            path = self._path(device)
            st = os.stat(path)
        except (ValueError, FileNotFoundError):
            self._cache.pop(device, None)
            return None
        sig = (st.st_mtime_ns, st.st_size, st.st_ino)
        cached = self._cache.get(device)
        if cached is not None and cached[0] == sig:
            return cached[1]
        record = DeviceRecord.from_json(json.loads(path.read_text(encoding="utf-8")))
        self._cache[device] = (sig, record)
        return record

    def key_for(self, device: str, key_id: int) -> bytes:
        """The device key named ``key_id``; raises :class:`KeyLookupError` with a reason."""
        record = self.get(device)
        if record is None:
            raise KeyLookupError("unknown_device", f"device {device!r} is not registered")
        if record.status != "active":
            raise KeyLookupError("revoked", f"device {device!r} is revoked")
        key = record.keys.get(key_id)
        if key is None:
            raise KeyLookupError(
                "wrong_key", f"device {device!r} has no key with id {key_id:#010x}"
            )
        return key

    def list(self) -> list[DeviceRecord]:
        """Every registered device, sorted by id."""
        if not self._devices.exists():
            return []
        out = []
        for path in sorted(self._devices.glob("*.json")):
            record = self.get(path.stem)
            if record is not None:
                out.append(record)
        return out
