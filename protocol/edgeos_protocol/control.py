"""Control messages (acks, commands, command results), authenticated per message.

Each message is sealed with :func:`seal_control` under a key derived from the device key and a
fresh random salt, and opened with :func:`open_control`; its counter is the nonce and, through
:class:`ReplayGuard`, the replay protection.
"""

from __future__ import annotations

import math
import secrets
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import IntEnum, StrEnum
from typing import Any

import msgpack  # type: ignore[import-untyped, unused-ignore]
from cryptography.exceptions import InvalidTag

from edgeos_protocol.crypto import SALT_BYTES, Suite, derive_control_key, make_aead, nonce_for
from edgeos_protocol.errors import AuthenticationFailed, MalformedBatch, UnsupportedVersion
from edgeos_protocol.header import AEAD_TAG_BYTES, DEVICE_RE, FORMAT_VERSION, parse_device

__all__ = [
    "CONTROL_MAGIC",
    "DOWNLINK_KINDS",
    "MAX_ACK_QUARANTINED",
    "MAX_CONTROL_BYTES",
    "UPLINK_KINDS",
    "Ack",
    "AckStatus",
    "Control",
    "ControlKind",
    "ReplayGuard",
    "counter_from_time",
    "open_control",
    "parse_control_header",
    "seal_control",
]

CONTROL_MAGIC = b"EOSC"
#: Largest sealed control message accepted.
MAX_CONTROL_BYTES = 64 << 10

# magic, version, suite, kind, device length, key id, salt, counter, created (µs)
_CONTROL = struct.Struct(">4sBBBBI16sQq")


class ControlKind(IntEnum):
    """Control message kinds; the value is on the wire."""

    #: receiver → device: ``{"epoch": int, "seq": int}``, highest contiguous stored seq;
    #: optionally ``"status": "quarantined", "quarantined": [seq, …]`` (:class:`Ack`).
    ACK = 1
    #: receiver → device: ``{"id": str, "version": int, "desired": {...}}``.
    COMMAND = 2
    #: device → receiver: ``{"id": str, "version": int, "ok": bool, "results": {...}}``.
    COMMAND_RESULT = 3
    #: device → OTA repository (``POST /reports``): an update outcome, ``{"device", "group",
    #: "hardware", "outcome", "version", "reason", "detail", "at"}``. Not an MQTT uplink kind:
    #: the receiver never accepts it (see ``edgeos_cloud.ota.reports``).
    OTA_REPORT = 16
    #: device → cloud (``POST /certificates``): ``{"device", "csr"}`` — a PKCS#10 request (PEM)
    #: for a new MQTT client certificate, signed by the new private key the device made for
    #: it. Not an MQTT uplink kind (see ``edgeos_cloud.renewal``).
    CERT_REQUEST = 17
    #: cloud → device, the answer to a ``CERT_REQUEST``: ``{"device", "request": counter of
    #: the request it answers, "cert": PEM, "ca": PEM trust bundle}``, sealed with the same
    #: device key, so neither a forged nor a replayed answer is installed.
    CERT_RESPONSE = 18


#: Most sequence numbers one ack may name as quarantined (one transaction's worth at most).
MAX_ACK_QUARANTINED = 4096


class AckStatus(StrEnum):
    """What an ack says about the batches it answers (``"status"``; absent = ``stored``)."""

    #: Stored (or a replay of a stored batch): the normal ack.
    STORED = "stored"
    #: The batches named in ``"quarantined"`` authenticated but could not be decoded or
    #: stored: the receiver kept their sealed bytes (to re-ingest after a fix) and counts
    #: them as present, so the device drops them from its spool and moves on.
    QUARANTINED = "quarantined"


@dataclass(frozen=True, slots=True)
class Ack:
    """An ACK's payload: the epoch's contiguous mark and the batches the receiver quarantined.

    On the wire ``{"epoch", "seq"}`` plus, only when ``quarantined`` is not empty,
    ``"status": "quarantined"`` and ``"quarantined": [seq, …]`` (sequence numbers of the same
    epoch). Readers ignore keys they do not know, so an older device applies such an ack as
    a plain one; an unknown ``status`` is read as ``stored``.
    """

    epoch: int
    seq: int
    quarantined: tuple[int, ...] = ()

    @property
    def status(self) -> AckStatus:
        return AckStatus.QUARANTINED if self.quarantined else AckStatus.STORED

    def payload(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"epoch": self.epoch, "seq": self.seq}
        if self.quarantined:
            doc["status"] = AckStatus.QUARANTINED.value
            doc["quarantined"] = list(self.quarantined[:MAX_ACK_QUARANTINED])
        return doc

    @classmethod
    def parse(cls, payload: Mapping[str, Any]) -> Ack:
        """Read an ACK payload; raise :class:`MalformedBatch` when it is not one."""
        epoch, seq = payload.get("epoch"), payload.get("seq")
        if type(epoch) is not int or type(seq) is not int or epoch < 0 or seq < 0:
            raise MalformedBatch("ack epoch/seq must be non-negative integers")
        quarantined: tuple[int, ...] = ()
        if payload.get("status") == AckStatus.QUARANTINED.value:
            raw = payload.get("quarantined")
            if (
                not isinstance(raw, list)
                or len(raw) > MAX_ACK_QUARANTINED
                or not all(type(v) is int and v > 0 for v in raw)
            ):
                raise MalformedBatch("ack quarantined list must be positive sequence numbers")
            quarantined = tuple(sorted(set(raw)))
        return cls(epoch, seq, quarantined)


DOWNLINK_KINDS = frozenset({ControlKind.ACK, ControlKind.COMMAND})
UPLINK_KINDS = frozenset({ControlKind.COMMAND_RESULT})


@dataclass(frozen=True, slots=True)
class Control:
    """An opened control message."""

    kind: ControlKind
    device: str
    key_id: int
    counter: int
    created_us: int
    payload: dict[str, Any]


def seal_control(
    kind: ControlKind,
    payload: Mapping[str, Any],
    device_key: bytes,
    device: str,
    counter: int,
    *,
    key_id: int,
    suite: Suite = Suite.CHACHA20_POLY1305,
    created_us: int = 0,
) -> bytes:
    """Seal a control message under a fresh per-message key derived from ``device_key``.

    ``counter`` (u64, > 0) must increase for each message a sender emits of a ``kind``; openers
    refuse counters they have already passed (:class:`ReplayGuard`). A time-based counter
    (microseconds, forced to increase) needs no persistence.
    """
    if not 0 < counter < 1 << 64:
        raise ValueError("control counter must be in 1..2^64-1")
    if not DEVICE_RE.match(device):
        raise ValueError(f"invalid device id {device!r}")
    salt = secrets.token_bytes(SALT_BYTES)
    dev = device.encode()
    aad = (
        _CONTROL.pack(
            CONTROL_MAGIC, FORMAT_VERSION, suite, kind, len(dev), key_id, salt, counter, created_us
        )
        + dev
    )
    key = derive_control_key(
        device_key, suite=suite, device=device, key_id=key_id, kind=kind, salt=salt
    )
    body = msgpack.packb(dict(payload), use_bin_type=True)
    sealed = aad + make_aead(suite, key).encrypt(nonce_for(counter), body, aad)
    if len(sealed) > MAX_CONTROL_BYTES:
        raise ValueError(f"control message of {len(sealed)} bytes exceeds {MAX_CONTROL_BYTES}")
    return sealed


def parse_control_header(message: bytes) -> tuple[ControlKind, str, int]:
    """``(kind, device, key_id)`` of a control message, unauthenticated (for key lookup)."""
    kind, device, key_id, _suite, _salt, _counter, _created, _n = _parse_control(message)
    return kind, device, key_id


def _parse_control(message: bytes) -> tuple[ControlKind, str, int, Suite, bytes, int, int, int]:
    if len(message) > MAX_CONTROL_BYTES:
        raise MalformedBatch(f"control message of {len(message)} bytes is too large")
    if len(message) < _CONTROL.size + AEAD_TAG_BYTES:
        raise MalformedBatch("control message is too short")
    magic, version, suite, kind, dev_len, key_id, salt, counter, created = _CONTROL.unpack_from(
        message
    )
    if magic != CONTROL_MAGIC:
        raise MalformedBatch(f"bad control magic {magic!r}")
    if version != FORMAT_VERSION:
        raise UnsupportedVersion(f"control format version {version} is not supported")
    try:
        suite_ = Suite(suite)
        kind_ = ControlKind(kind)
    except ValueError:
        raise UnsupportedVersion(f"control suite {suite} / kind {kind} not supported") from None
    device = parse_device(message, _CONTROL.size, dev_len)
    return kind_, device, key_id, suite_, salt, counter, created, _CONTROL.size + dev_len


def open_control(
    message: bytes,
    keys: Mapping[int, bytes] | Callable[[int], bytes | None],
    *,
    device: str | None = None,
    kinds: frozenset[ControlKind] | None = None,
) -> Control:
    """Authenticate and decode a control message.

    ``keys`` maps key ids to device keys (a :class:`~edgeos_protocol.crypto.Keyring`'s
    ``keys`` or a lookup function). ``device`` (when given) must match the message's device and
    ``kinds`` its kind, so an ack for another device, or a device's own message reflected
    back, is refused as :class:`AuthenticationFailed`.
    """
    kind, dev, key_id, suite, salt, counter, created, n = _parse_control(message)
    if device is not None and dev != device:
        raise AuthenticationFailed(f"control message is for device {dev!r}, not {device!r}")
    if kinds is not None and kind not in kinds:
        raise AuthenticationFailed(f"control message kind {kind.name} not accepted here")
    device_key = keys(key_id) if callable(keys) else keys.get(key_id)
    if device_key is None:
        raise AuthenticationFailed(f"unknown key id {key_id:#010x} for device {dev!r}")
    key = derive_control_key(
        device_key, suite=suite, device=dev, key_id=key_id, kind=kind, salt=salt
    )
    try:
        body = make_aead(suite, key).decrypt(nonce_for(counter), message[n:], message[:n])
    except InvalidTag:
        raise AuthenticationFailed(f"{kind.name} message failed authentication") from None
    try:
        payload = msgpack.unpackb(body, raw=False, strict_map_key=True)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise MalformedBatch(f"control payload is not msgpack: {exc}") from None
    if not isinstance(payload, dict):
        raise MalformedBatch("control payload is not a map")
    return Control(kind, dev, key_id, counter, created, payload)


class ReplayGuard:
    """Refuses control counters that do not increase, per ``(device, kind)``."""

    def __init__(self) -> None:
        self._last: dict[tuple[str, int], int] = {}

    def check(self, control: Control) -> bool:
        """True (and remembered) when the counter is new; False for a replay."""
        k = (control.device, int(control.kind))
        if control.counter <= self._last.get(k, 0):
            return False
        self._last[k] = control.counter
        return True

    def last(self, device: str, kind: ControlKind) -> int:
        return self._last.get((device, int(kind)), 0)


def counter_from_time(last: int, now_s: float) -> int:
    """A control counter from the wall clock (µs), forced above ``last``."""
    return max(last + 1, math.floor(now_s * 1e6))
