"""Opening batches: size and framing checks, key lookup, AEAD, decode, flatten.

Pure and blocking (no I/O besides the registry's ``stat``): the receiver runs it in its writer
thread, the benchmark and the fuzz tests call it directly. Every way a message can be bad ends
in :class:`Rejected` with a reason from :data:`REJECT_REASONS`; nothing else escapes.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from edgeos_cloud.receiver.registry import DeviceRegistry, KeyLookupError
from edgeos_cloud.receiver.storage.base import DeviceStatus, IngestBatch, merge_ranges
from edgeos_protocol.crypto import EpochKeyCache
from edgeos_protocol.errors import (
    AuthenticationFailed,
    MalformedBatch,
    UnsupportedVersion,
    WireError,
)
from edgeos_protocol.wire import (
    MAX_SEALED_BYTES,
    UPLINK_KINDS,
    Control,
    decode_body,
    open_body,
    open_control,
    parse_header,
)

__all__ = [
    "MAX_SKIP_RANGES",
    "MAX_STATUS_BYTES",
    "REJECT_REASONS",
    "BatchOpener",
    "Rejected",
    "parse_skips",
    "parse_status",
]

#: Most ranges one batch may announce in ``meta["skip"]`` (the batcher merges adjacent ones).
MAX_SKIP_RANGES = 65_536
#: A status message is a few dozen bytes of JSON; anything far larger is refused unparsed.
MAX_STATUS_BYTES = 64 << 10
_SQL_MAX = 1 << 63
_U64 = 1 << 64

#: Every reason a message is rejected for (label values of ``rejects_total``).
REJECT_REASONS = (
    "oversized",  # larger than limits.max_payload_bytes (or the wire maximum)
    "truncated",  # shorter than its framing says
    "malformed",  # framing or (authenticated) body is wrong
    "unsupported_version",  # unknown format version, suite, flags or control kind
    "unknown_device",  # no such device in the registry
    "revoked",  # the device's keys are disabled
    "wrong_key",  # the device has no key with the header's key id
    "forged",  # AEAD authentication failed, or the header names another device than the topic
    "replayed",  # (device, epoch, seq) already stored: not stored again, acknowledged again
    "topic",  # a message on a topic the receiver does not handle
)


class Rejected(Exception):
    """A message was refused; ``reason`` is one of :data:`REJECT_REASONS`."""

    def __init__(self, reason: str, device: str, message: str) -> None:
        self.reason = reason
        self.device = device
        super().__init__(message)


def parse_skips(meta: dict[str, Any], epoch: int, seq: int) -> list[tuple[int, int, int]]:
    """Validate ``meta["skip"]`` (``[[epoch, first, last], …]``), merged per epoch.

    Raises ValueError when the list is not well formed, or names the batch's own sequence
    number or a later one of its epoch: a gap is announced only after it happened, and an
    ack past a number the device still holds would delete that data from its spool.
    """
    raw = meta.get("skip")
    if raw is None:
        return []
    if not isinstance(raw, list | tuple) or len(raw) > MAX_SKIP_RANGES:
        raise ValueError(f"not a list of at most {MAX_SKIP_RANGES} ranges")
    by_epoch: dict[int, list[tuple[int, int]]] = {}
    for item in raw:
        if (
            not isinstance(item, list | tuple)
            or len(item) != 3
            or not all(type(v) is int for v in item)
        ):
            raise ValueError(f"{item!r} is not [epoch, first, last]")
        e, first, last = item
        if not (0 <= e < _U64 and 1 <= first <= last < _SQL_MAX):
            raise ValueError(f"{item!r} is out of range")
        if e == epoch and last >= seq:
            raise ValueError(f"{item!r} reaches this batch's own sequence number {seq}")
        by_epoch.setdefault(e, []).append((first, last))
    return [(e, f, last) for e in sorted(by_epoch) for f, last in merge_ranges(by_epoch[e])]


def parse_status(payload: bytes, topic_device: str, received_us: int) -> DeviceStatus:
    """A device's status message: ``{"state": "online"|"offline", "ts": seconds, …}``.

    Plain JSON, not sealed: the broker's ACL (only the device's certificate may publish on
    its status topic) is what makes it the device's. Raises :class:`Rejected` (``malformed``,
    or ``forged`` when it names another device than its topic).
    """
    if len(payload) > MAX_STATUS_BYTES:
        raise Rejected("oversized", topic_device, f"status of {len(payload)} bytes")
    try:
        doc = json.loads(payload)
    except (ValueError, RecursionError) as exc:
        raise Rejected("malformed", topic_device, f"status is not JSON: {exc}") from None
    if not isinstance(doc, dict) or doc.get("state") not in ("online", "offline"):
        raise Rejected("malformed", topic_device, "status lacks state online/offline")
    named = doc.get("device", topic_device)
    if named != topic_device:
        raise Rejected("forged", topic_device, f"status names device {named!r} on its topic")
    ts = doc.get("ts")
    device_ts_us = None
    if isinstance(ts, int | float) and not isinstance(ts, bool) and abs(ts) < 1e11:
        device_ts_us = round(ts * 1e6)
    epoch = doc.get("epoch")
    return DeviceStatus(
        topic_device,
        doc["state"] == "online",
        received_us,
        device_ts_us,
        epoch[:32] if isinstance(epoch, str) else None,
    )


class BatchOpener:
    """Turns sealed payloads into :class:`IngestBatch` es, or raises :class:`Rejected`."""

    def __init__(self, registry: DeviceRegistry, max_payload_bytes: int = MAX_SEALED_BYTES) -> None:
        self.registry = registry
        self.max_payload_bytes = min(max_payload_bytes, MAX_SEALED_BYTES)
        self._keys = EpochKeyCache()

    def open(
        self, payload: bytes, received_us: int, topic_device: str | None = None
    ) -> IngestBatch:
        """Check, authenticate and decode one batch.

        ``topic_device`` is the device named by the MQTT topic (which the broker's ACL ties to
        the sender's certificate); a header naming another device is refused as forged.
        """
        device = topic_device or ""
        if len(payload) > self.max_payload_bytes:
            raise Rejected("oversized", device, f"{len(payload)} bytes > {self.max_payload_bytes}")
        try:
            header = parse_header(payload)
        except UnsupportedVersion as exc:
            raise Rejected("unsupported_version", device, str(exc)) from None
        except MalformedBatch as exc:
            text = str(exc)
            reason = "truncated" if ("short" in text or "truncated" in text) else "malformed"
            raise Rejected(reason, device, text) from None
        if topic_device is not None and header.device != topic_device:
            raise Rejected(
                "forged", topic_device, f"header names device {header.device!r} on its topic"
            )
        device = header.device
        if header.seq >= _SQL_MAX:
            # Stored in signed 64-bit columns; epochs retire at 2^32 batches anyway.
            raise Rejected("malformed", device, f"sequence number {header.seq} out of range")
        try:
            device_key = self.registry.key_for(device, header.key_id)
        except KeyLookupError as exc:
            raise Rejected(exc.reason, device, str(exc)) from None
        epoch_key = self._keys.get(
            device_key,
            suite=header.suite,
            device=device,
            key_id=header.key_id,
            epoch=header.epoch,
            salt=header.salt,
        )
        try:
            _, body = open_body(payload, epoch_key)
        except AuthenticationFailed as exc:
            raise Rejected("forged", device, str(exc)) from None
        try:
            batch = decode_body(body)
            rows = batch.rows()
        except UnsupportedVersion as exc:
            raise Rejected("unsupported_version", device, str(exc)) from None
        except WireError as exc:
            raise Rejected("malformed", device, str(exc)) from None
        except (ValueError, TypeError, IndexError, KeyError, OverflowError) as exc:
            # decode_body translates its own errors; this is the last line for anything a
            # crafted (but authenticated) body still manages to trip over.
            raise Rejected("malformed", device, f"{type(exc).__name__}: {exc}") from None
        try:
            skips = parse_skips(batch.meta, header.epoch, header.seq)
        except ValueError as exc:
            raise Rejected("malformed", device, f"meta.skip: {exc}") from None
        tags = batch.tags
        return IngestBatch(
            device=device,
            epoch=header.epoch,
            seq=header.seq,
            created_us=header.created_us,
            received_us=received_us,
            nbytes=len(payload),
            tag_names=tags.names,
            tag_kinds=tags.kinds,
            tag_units=tags.units,
            tag_resolutions=tags.resolutions,
            tag_indices=tags.indices,
            tag=rows.tag,
            ts_us=rows.ts_us.astype(np.int64, copy=False),
            value=rows.value,
            quality=rows.quality,
            text=rows.text,
            events=batch.events,
            meta=batch.meta,
            skips=skips,
        )

    def open_result(self, payload: bytes, topic_device: str) -> Control:
        """Authenticate a device's command result (``…/cmd/result``) or raise Rejected."""
        if len(payload) > self.max_payload_bytes:
            raise Rejected("oversized", topic_device, f"{len(payload)} bytes")

        def lookup(key_id: int) -> bytes | None:
            try:
                return self.registry.key_for(topic_device, key_id)
            except KeyLookupError:
                return None

        record = self.registry.get(topic_device)
        if record is None:
            raise Rejected("unknown_device", topic_device, "unknown device")
        if record.status != "active":
            raise Rejected("revoked", topic_device, "device is revoked")
        try:
            return open_control(payload, lookup, device=topic_device, kinds=UPLINK_KINDS)
        except UnsupportedVersion as exc:
            raise Rejected("unsupported_version", topic_device, str(exc)) from None
        except AuthenticationFailed as exc:
            raise Rejected("forged", topic_device, str(exc)) from None
        except WireError as exc:
            raise Rejected("malformed", topic_device, str(exc)) from None
