"""Device keys, per-epoch key derivation and the AEAD suites of the uplink.

Shared with the receiver. The rules that keep a (key, nonce) pair from ever repeating:

* A device key (32 bytes, file mode 0600) is never used to encrypt directly. Every process
  start opens a new :class:`Epoch`: a random 64-bit epoch id and a random 16-byte salt, and the
  epoch key ``HKDF-SHA256(device key, salt, info)`` with ``info`` binding the suite, key id,
  epoch id and device id. Nothing about an epoch is persisted, so a state directory restored
  from an old copy, or cloned onto a second device with the same key, still derives a fresh
  key (the salt is new), and sequence numbers restarting at 1 are harmless.
* Within an epoch the batch sequence number is the nonce (8 bytes, big-endian, after 4 zero
  bytes) and only ever increases; an epoch is retired after :data:`MAX_SEQ_PER_EPOCH`
  batches, far below both the 64-bit counter and the per-key limits of either cipher
  (2^32 messages of at most :data:`~edgeos_protocol.wire.MAX_SEALED_BYTES` each).
* Control messages (acks, commands, results) carry their own random salt, so each message has
  its own key; their counter is the nonce and the replay guard.

Key ids are fingerprints of the key (:func:`key_id_for`), so the device and the receiver agree
on them without extra files; a :class:`Keyring` holds the current key and retired ones (kept
until batches and acks sealed under them are drained).
"""

from __future__ import annotations

import hashlib
import os
import secrets
import stat
import struct
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from edgeos_protocol.errors import ProvisioningError

__all__ = [
    "KEY_BYTES",
    "MAX_SEQ_PER_EPOCH",
    "SALT_BYTES",
    "Aead",
    "Epoch",
    "EpochKeyCache",
    "Keyring",
    "Suite",
    "derive_control_key",
    "derive_epoch_key",
    "key_id_for",
    "load_device_key",
    "make_aead",
    "nonce_for",
    "write_device_key",
]

KEY_BYTES = 32
SALT_BYTES = 16
#: An epoch is retired after this many batches (2^32: 400 years at one batch per 3 s).
MAX_SEQ_PER_EPOCH = 1 << 32


class Suite(IntEnum):
    """AEAD cipher suites; the value is the suite id on the wire."""

    CHACHA20_POLY1305 = 1
    AES_256_GCM = 2

    @property
    def config_name(self) -> str:
        return _SUITE_NAMES[self]

    @classmethod
    def from_name(cls, name: str) -> Suite:
        """The suite for a config name (``"chacha20-poly1305"`` or ``"aes-256-gcm"``)."""
        for suite, suite_name in _SUITE_NAMES.items():
            if suite_name == name:
                return suite
        names = sorted(_SUITE_NAMES.values())
        raise ValueError(f"unknown cipher {name!r}; expected one of {names}")


_SUITE_NAMES = {Suite.CHACHA20_POLY1305: "chacha20-poly1305", Suite.AES_256_GCM: "aes-256-gcm"}

Aead = ChaCha20Poly1305 | AESGCM


def make_aead(suite: Suite, key: bytes) -> Aead:
    """The AEAD object of ``suite`` keyed with ``key`` (32 bytes)."""
    if suite is Suite.CHACHA20_POLY1305:
        return ChaCha20Poly1305(key)
    if suite is Suite.AES_256_GCM:
        return AESGCM(key)
    raise ValueError(f"unknown suite {suite!r}")  # pragma: no cover - IntEnum is closed


def nonce_for(counter: int) -> bytes:
    """The 12-byte nonce for a sequence number or control counter (u64)."""
    return b"\0\0\0\0" + struct.pack(">Q", counter)


def key_id_for(device_key: bytes) -> int:
    """A 32-bit fingerprint naming a device key on the wire (not secret, not a MAC)."""
    return int.from_bytes(hashlib.sha256(b"edgeos/v1 key id\0" + device_key).digest()[:4], "big")


def _hkdf(device_key: bytes, salt: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=salt, info=info).derive(
        device_key
    )


def derive_epoch_key(
    device_key: bytes, *, suite: Suite, device: str, key_id: int, epoch: int, salt: bytes
) -> bytes:
    """The key of one epoch: HKDF-SHA256(device key, salt, info).

    ``info = b"edgeos/v1 batch\\0" || suite (u8) || key_id (u32) || epoch (u64) || device``.
    """
    if len(salt) != SALT_BYTES:
        raise ValueError(f"epoch salt must be {SALT_BYTES} bytes, got {len(salt)}")
    info = b"edgeos/v1 batch\0" + struct.pack(">BIQ", suite, key_id, epoch) + device.encode()
    return _hkdf(device_key, salt, info)


def derive_control_key(
    device_key: bytes, *, suite: Suite, device: str, key_id: int, kind: int, salt: bytes
) -> bytes:
    """The key of one control message (its own random salt, so keys never repeat).

    ``info = b"edgeos/v1 control\\0" || suite (u8) || key_id (u32) || kind (u8) || device``.
    """
    if len(salt) != SALT_BYTES:
        raise ValueError(f"control salt must be {SALT_BYTES} bytes, got {len(salt)}")
    info = b"edgeos/v1 control\0" + struct.pack(">BIB", suite, key_id, kind) + device.encode()
    return _hkdf(device_key, salt, info)


# --------------------------------------------------------------------------- key files


def load_device_key(path: str | Path) -> bytes:
    """Read a 32-byte device key; refuse (:class:`ProvisioningError`) anything unsafe.

    The file must be a regular file of exactly 32 raw bytes, not readable or writable by group
    or others. The error message says what to run to fix it.
    """
    path = Path(path)
    try:
        # O_NONBLOCK: a FIFO planted at the key path opens at once (and is refused below by
        # fstat) instead of blocking start-up until a writer appears.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError as exc:
        raise ProvisioningError(
            f"device key {path} does not exist; provision 32 random bytes there with mode 0600 "
            f"(e.g. `head -c 32 /dev/urandom > {path} && chmod 600 {path}`)"
        ) from exc
    except OSError as exc:
        raise ProvisioningError(f"cannot open device key {path}: {exc.strerror}") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ProvisioningError(f"device key {path} is not a regular file")
        if st.st_mode & 0o077:
            raise ProvisioningError(
                f"device key {path} is accessible by group/others "
                f"(mode {stat.S_IMODE(st.st_mode):04o}); fix with `chmod 600 {path}`"
            )
        os.set_blocking(fd, True)
        data = os.read(fd, KEY_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) != KEY_BYTES:
        raise ProvisioningError(
            f"device key {path} holds {len(data) if len(data) <= KEY_BYTES else 'more than 32'} "
            f"bytes; it must be exactly {KEY_BYTES} raw bytes "
            f"(e.g. `head -c 32 /dev/urandom > {path}`)"
        )
    return data


def write_device_key(path: str | Path, key: bytes | None = None) -> bytes:
    """Create a key file (mode 0600, never overwriting, never through a link) and return the key."""
    key = secrets.token_bytes(KEY_BYTES) if key is None else key
    if len(key) != KEY_BYTES:
        raise ValueError(f"a device key is {KEY_BYTES} bytes")
    fd = os.open(Path(path), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, key)
        os.fsync(fd)
    finally:
        os.close(fd)
    return key


@dataclass
class Keyring:
    """Device keys by key id: the current one seals, every one (incl. retired) opens."""

    current_id: int
    keys: dict[int, bytes] = field(default_factory=dict)

    @classmethod
    def load(cls, current: str | Path, retired: Iterable[str | Path] = ()) -> Keyring:
        """Load the current key file and retired ones (all checked like the current one)."""
        key = load_device_key(current)
        ring = cls(key_id_for(key), {key_id_for(key): key})
        for path in retired:
            old = load_device_key(path)
            ring.keys.setdefault(key_id_for(old), old)
        return ring

    @classmethod
    def of(cls, current: bytes, *retired: bytes) -> Keyring:
        """A keyring from raw keys (tests, the receiver's own key store)."""
        ring = cls(key_id_for(current), {key_id_for(current): current})
        for old in retired:
            ring.keys.setdefault(key_id_for(old), old)
        return ring

    @property
    def current(self) -> bytes:
        return self.keys[self.current_id]

    def get(self, key_id: int) -> bytes | None:
        return self.keys.get(key_id)

    def retire(self, key_id: int) -> None:
        """Forget a retired key once nothing sealed under it is pending."""
        if key_id == self.current_id:
            raise ValueError("cannot retire the current key")
        self.keys.pop(key_id, None)


# --------------------------------------------------------------------------- epochs


class Epoch:
    """One sealing epoch: random id and salt, derived key, increasing sequence numbers.

    Create one at every start with :meth:`new` (never from persisted state). Sequence numbers
    start at 1; :meth:`next_seq` raises ``OverflowError`` when the epoch is exhausted, and
    callers open a new epoch once :attr:`exhausted` is true.
    """

    __slots__ = (
        "_aead",
        "device",
        "epoch",
        "key",
        "key_id",
        "last_seq",
        "max_seq",
        "salt",
        "suite",
    )

    def __init__(
        self,
        *,
        device_key: bytes,
        device: str,
        key_id: int,
        suite: Suite,
        epoch: int,
        salt: bytes,
        max_seq: int = MAX_SEQ_PER_EPOCH,
    ) -> None:
        self.device = device
        self.key_id = key_id
        self.suite = suite
        self.epoch = epoch
        self.salt = salt
        self.key = derive_epoch_key(
            device_key, suite=suite, device=device, key_id=key_id, epoch=epoch, salt=salt
        )
        self._aead = make_aead(suite, self.key)
        self.last_seq = 0
        self.max_seq = max_seq

    @classmethod
    def new(
        cls,
        keyring: Keyring,
        device: str,
        suite: Suite = Suite.CHACHA20_POLY1305,
        *,
        max_seq: int = MAX_SEQ_PER_EPOCH,
    ) -> Epoch:
        """A fresh epoch under the keyring's current key (random id and salt)."""
        return cls(
            device_key=keyring.current,
            device=device,
            key_id=keyring.current_id,
            suite=suite,
            epoch=secrets.randbits(64),
            salt=secrets.token_bytes(SALT_BYTES),
            max_seq=max_seq,
        )

    @property
    def aead(self) -> Aead:
        return self._aead

    @property
    def exhausted(self) -> bool:
        return self.last_seq >= self.max_seq

    def next_seq(self) -> int:
        """Take the next sequence number (the nonce of the next batch)."""
        if self.last_seq >= self.max_seq:
            raise OverflowError(f"epoch {self.epoch:#x} exhausted after {self.max_seq} batches")
        self.last_seq += 1
        return self.last_seq


class EpochKeyCache:
    """LRU of derived epoch keys for openers (the receiver), keyed by the header's fields."""

    def __init__(self, maxsize: int = 4096) -> None:
        self._maxsize = maxsize
        self._data: OrderedDict[tuple[str, int, int, int, bytes], bytes] = OrderedDict()

    def get(
        self, device_key: bytes, *, suite: Suite, device: str, key_id: int, epoch: int, salt: bytes
    ) -> bytes:
        k = (device, key_id, int(suite), epoch, salt)
        found = self._data.get(k)
        if found is not None:
            self._data.move_to_end(k)
            return found
        key = derive_epoch_key(
            device_key, suite=suite, device=device, key_id=key_id, epoch=epoch, salt=salt
        )
        self._data[k] = key
        if len(self._data) > self._maxsize:
            self._data.popitem(last=False)
        return key
