"""Sealing and opening batches: ``header || AEAD(epoch_key, nonce(seq), body, aad=header)``.

The epoch key is derived from the device key (:mod:`edgeos_protocol.crypto`); the sequence
number in the header is the nonce.
"""

from __future__ import annotations

from cryptography.exceptions import InvalidTag

from edgeos_protocol.batch import Batch
from edgeos_protocol.body import decode_body
from edgeos_protocol.crypto import Epoch, EpochKeyCache, derive_epoch_key, make_aead, nonce_for
from edgeos_protocol.errors import AuthenticationFailed
from edgeos_protocol.header import FORMAT_VERSION, MAX_SEALED_BYTES, Header, parse_header

__all__ = ["epoch_key_for", "open_body", "open_sealed", "seal", "seal_batch"]


def seal(header: Header, body: bytes, epoch_key: bytes) -> bytes:
    """``header || AEAD(epoch_key, nonce(seq), body, aad=header)``."""
    aad = header.pack()
    sealed = aad + make_aead(header.suite, epoch_key).encrypt(nonce_for(header.seq), body, aad)
    if len(sealed) > MAX_SEALED_BYTES:
        raise ValueError(f"sealed batch of {len(sealed)} bytes exceeds {MAX_SEALED_BYTES}")
    return sealed


def seal_batch(epoch: Epoch, body: bytes, created_us: int) -> tuple[Header, bytes]:
    """Take the epoch's next sequence number and seal ``body`` under it."""
    header = Header(
        FORMAT_VERSION,
        epoch.suite,
        epoch.device,
        epoch.key_id,
        epoch.epoch,
        epoch.salt,
        epoch.next_seq(),
        created_us,
    )
    aad = header.pack()
    sealed = aad + epoch.aead.encrypt(nonce_for(header.seq), body, aad)
    if len(sealed) > MAX_SEALED_BYTES:
        raise ValueError(f"sealed batch of {len(sealed)} bytes exceeds {MAX_SEALED_BYTES}")
    return header, sealed


def epoch_key_for(
    header: Header, device_key: bytes, *, cache: EpochKeyCache | None = None
) -> bytes:
    """Derive the epoch key a header was sealed under, from the device key of its key id.

    With ``cache`` (an opener's LRU), a key already derived for the same header fields is reused.
    """
    derive = derive_epoch_key if cache is None else cache.get
    return derive(
        device_key,
        suite=header.suite,
        device=header.device,
        key_id=header.key_id,
        epoch=header.epoch,
        salt=header.salt,
    )


def open_body(payload: bytes, epoch_key: bytes) -> tuple[Header, bytes]:
    """Authenticate and decrypt a sealed batch; returns the header and compressed body."""
    header = parse_header(payload)
    n = header.size
    try:
        body = make_aead(header.suite, epoch_key).decrypt(
            nonce_for(header.seq), payload[n:], payload[:n]
        )
    except InvalidTag:
        raise AuthenticationFailed(
            f"batch {header.device}/{header.epoch:#x}/{header.seq} failed authentication "
            "(wrong key, forged or corrupted)"
        ) from None
    return header, body


def open_sealed(payload: bytes, epoch_key: bytes) -> tuple[Header, Batch]:
    """Authenticate, decrypt and decode a sealed batch."""
    header, body = open_body(payload, epoch_key)
    return header, decode_body(body)
