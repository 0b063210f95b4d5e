"""Opening batches: size and framing checks, key lookup, AEAD, decode, flatten.

Pure and blocking (no I/O besides the registry's ``stat``): the receiver runs it in its writer
thread, the benchmark and the fuzz tests call it directly. Every way a message can be bad ends
in :class:`Rejected` with a reason from :data:`REJECT_REASONS`; nothing else escapes.
"""

from __future__ import annotations

import numpy as np

from edgeos.errors import AuthenticationFailed, MalformedBatch, UnsupportedVersion, WireError
from edgeos.receiver.registry import DeviceRegistry, KeyLookupError
from edgeos.receiver.storage.base import IngestBatch
from edgeos.uplink.crypto import EpochKeyCache
from edgeos.uplink.wire import (
    MAX_SEALED_BYTES,
    UPLINK_KINDS,
    Control,
    decode_body,
    open_body,
    open_control,
    parse_header,
)

__all__ = ["REJECT_REASONS", "BatchOpener", "Rejected"]

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
