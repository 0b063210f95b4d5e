"""Wire format v1: the batch header and the sealed batch envelope framing.

A sealed batch is ``header || AEAD(epoch_key, nonce=seq, body, aad=header)``; the header is
fixed layout plus the device id, and is the AEAD's associated data (``docs/wire-format.md``).
:mod:`.sealing` seals and opens; :mod:`.control` reuses the device-id rules for control
messages.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

from edgeos_protocol.crypto import Suite
from edgeos_protocol.errors import MalformedBatch, UnsupportedVersion

__all__ = ["BATCH_MAGIC", "FORMAT_VERSION", "MAX_SEALED_BYTES", "Header", "parse_header"]

BATCH_MAGIC = b"EOSB"
FORMAT_VERSION = 1
#: Largest sealed batch accepted (header + ciphertext + tag).
MAX_SEALED_BYTES = 16 << 20
#: Bytes of the AEAD tag at the end of every sealed batch and control message.
AEAD_TAG_BYTES = 16
#: What a device id may look like (on batches and control messages alike).
DEVICE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]{0,63}$")

# magic, version, suite, flags, device length, key id, epoch, salt, seq, created (µs)
_HEADER = struct.Struct(">4sBBBBIQ16sQq")


@dataclass(frozen=True, slots=True)
class Header:
    """The batch header, authenticated as associated data.

    ``seq`` (≥ 1) is the AEAD nonce; ``created_us`` is the wall time the batch was sealed, in
    microseconds since the Unix epoch.
    """

    version: int
    suite: Suite
    device: str
    key_id: int
    epoch: int
    salt: bytes
    seq: int
    created_us: int

    def pack(self) -> bytes:
        """The header's bytes (the AEAD associated data)."""
        dev = self.device.encode()
        return (
            _HEADER.pack(
                BATCH_MAGIC,
                self.version,
                self.suite,
                0,
                len(dev),
                self.key_id,
                self.epoch,
                self.salt,
                self.seq,
                self.created_us,
            )
            + dev
        )

    @property
    def size(self) -> int:
        return _HEADER.size + len(self.device.encode())


def parse_header(payload: bytes) -> Header:
    """Parse and check a sealed batch's header (nothing is decrypted).

    Raises :class:`UnsupportedVersion` for an unknown format version or suite and
    :class:`MalformedBatch` for anything else that is wrong with the framing.
    """
    if len(payload) > MAX_SEALED_BYTES:
        raise MalformedBatch(f"batch of {len(payload)} bytes exceeds {MAX_SEALED_BYTES}")
    if len(payload) < _HEADER.size:
        raise MalformedBatch(f"batch of {len(payload)} bytes is shorter than a header")
    magic, version, suite, flags, dev_len, key_id, epoch, salt, seq, created = _HEADER.unpack_from(
        payload
    )
    if magic != BATCH_MAGIC:
        raise MalformedBatch(f"bad magic {magic!r} (expected {BATCH_MAGIC!r})")
    if version != FORMAT_VERSION:
        raise UnsupportedVersion(
            f"batch format version {version} is not supported (this build reads {FORMAT_VERSION})"
        )
    try:
        suite_ = Suite(suite)
    except ValueError:
        raise UnsupportedVersion(f"cipher suite id {suite} is not supported") from None
    if flags != 0:
        raise UnsupportedVersion(f"header flags {flags:#x} are not supported")
    device = parse_device(payload, _HEADER.size, dev_len)
    if seq == 0:
        raise MalformedBatch("sequence number 0 is never used")
    if len(payload) < _HEADER.size + dev_len + AEAD_TAG_BYTES:
        raise MalformedBatch("batch is too short to hold a ciphertext")
    return Header(FORMAT_VERSION, suite_, device, key_id, epoch, salt, seq, created)


def parse_device(payload: bytes, offset: int, length: int) -> str:
    """The device id at ``payload[offset:offset + length]``, checked; :class:`MalformedBatch`."""
    raw = payload[offset : offset + length]
    if len(raw) != length:
        raise MalformedBatch("device id is truncated")
    try:
        device = raw.decode("ascii")
    except UnicodeDecodeError:
        raise MalformedBatch("device id is not ASCII") from None
    if not DEVICE_RE.match(device):
        raise MalformedBatch(f"device id {device!r} is not a valid device id")
    return device
