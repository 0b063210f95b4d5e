"""Wire format v1: sealed, compressed, columnar batches and authenticated control messages.

Shared by the device (uplink) and the receiver; the normative spec is ``docs/wire-format.md``.

Batches::

    header = Header(...).pack()                      # fixed layout, the AEAD associated data
    body   = encode_body(batch)                      # msgpack (columnar) → zstd
    sealed = seal(header, body, epoch_key)           # header || AEAD(epoch_key, nonce=seq)

    header = parse_header(sealed)                    # refuses unknown versions / suites
    key    = derive_epoch_key(device_key, ...)       # see edgeos_protocol.crypto / epoch_key_for
    header, batch = open_sealed(sealed, key)         # AuthenticationFailed / MalformedBatch
    rows = batch.rows()                              # flat numpy columns, one per sample

A :class:`Batch` holds a tag table (twin index, name, kind, resolution, unit of every tag in
the batch — metadata travels in *every* batch so each batch is self-describing) and
:class:`Group` s: samples of one set of tags read together, ``R`` rows (scans, one time each)
× ``C`` columns (tags). ``quality == MISSING`` marks a tag not sampled in a row; a value is
present exactly when its quality is usable (``< Quality.BAD``), otherwise it is NaN.

Control messages (acks, commands, command results) are sealed with :func:`seal_control`
under a per-message key derived from the device key and opened with :func:`open_control`.

Errors: :class:`~edgeos_protocol.errors.UnsupportedVersion` (unknown version/suite/kind, never
guessed), :class:`~edgeos_protocol.errors.AuthenticationFailed` (wrong key, forged, corrupted)
and :class:`~edgeos_protocol.errors.MalformedBatch` (bad framing, oversized, bad body).

This module is the wire format's public face; the code lives by responsibility in
:mod:`.header` (batch header), :mod:`.batch` (the decoded batch), :mod:`.body` (body codec, with
the integer columns of :mod:`.columns`), :mod:`.sealing` (AEAD envelope) and :mod:`.control`
(control messages and the replay guard).
"""

from __future__ import annotations

from edgeos_protocol.batch import MISSING, Batch, Group, Rows, TagTable, ValueKind
from edgeos_protocol.body import (
    DEFAULT_LIMITS,
    MAX_BODY_BYTES,
    MAX_SAMPLES,
    DecodeLimits,
    LimitExceeded,
    decode_body,
    encode_body,
)
from edgeos_protocol.control import (
    CONTROL_MAGIC,
    DOWNLINK_KINDS,
    MAX_ACK_QUARANTINED,
    MAX_CONTROL_BYTES,
    UPLINK_KINDS,
    Ack,
    AckStatus,
    Control,
    ControlKind,
    ReplayGuard,
    counter_from_time,
    open_control,
    parse_control_header,
    seal_control,
)
from edgeos_protocol.header import (
    BATCH_MAGIC,
    FORMAT_VERSION,
    MAX_SEALED_BYTES,
    Header,
    parse_header,
)
from edgeos_protocol.sealing import epoch_key_for, open_body, open_sealed, seal, seal_batch

__all__ = [
    "BATCH_MAGIC",
    "CONTROL_MAGIC",
    "DEFAULT_LIMITS",
    "DOWNLINK_KINDS",
    "FORMAT_VERSION",
    "MAX_ACK_QUARANTINED",
    "MAX_BODY_BYTES",
    "MAX_CONTROL_BYTES",
    "MAX_SAMPLES",
    "MAX_SEALED_BYTES",
    "MISSING",
    "UPLINK_KINDS",
    "Ack",
    "AckStatus",
    "Batch",
    "Control",
    "ControlKind",
    "DecodeLimits",
    "Group",
    "Header",
    "LimitExceeded",
    "ReplayGuard",
    "Rows",
    "TagTable",
    "ValueKind",
    "counter_from_time",
    "decode_body",
    "encode_body",
    "epoch_key_for",
    "open_body",
    "open_control",
    "open_sealed",
    "parse_control_header",
    "parse_header",
    "seal",
    "seal_batch",
    "seal_control",
]
