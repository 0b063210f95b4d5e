"""Opening batches: size and framing checks, key lookup, AEAD, decode, limits, flatten.

Pure and blocking (no I/O besides the registry's ``stat``): the receiver runs it in its writer
thread, the benchmark and the fuzz tests call it directly. Every way a message can be bad ends
in :class:`Rejected` with a reason from :data:`REJECT_REASONS`; nothing else escapes.

A batch that *authenticated* but cannot be decoded, or breaks a ``[limits]`` key, or holds
times outside the plausible window, raises :class:`Quarantined` (a :class:`Rejected`) carrying
a :class:`~edgeos_cloud.receiver.storage.base.QuarantineRecord`: the receiver keeps its sealed
bytes and acks it as quarantined, so the device moves on and nothing is lost. Every limit is
checked before the thing it counts is built (:class:`~edgeos_protocol.body.DecodeLimits`).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import numpy.typing as npt

from edgeos_cloud.receiver.config import LimitsConfig
from edgeos_cloud.receiver.registry import DeviceRegistry, KeyLookupError
from edgeos_cloud.receiver.storage.base import (
    DeviceStatus,
    IngestBatch,
    QuarantineRecord,
    Storage,
    merge_ranges,
    safe_dumps,
)
from edgeos_cloud.receiver.storage.blocks import MAX_SPAN_US
from edgeos_protocol.body import DecodeLimits, LimitExceeded
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
    "Quarantined",
    "Rejected",
    "parse_skips",
    "parse_status",
    "reingest",
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


class Quarantined(Rejected):
    """An authenticated batch the receiver keeps sealed instead of storing.

    ``reason`` is one of :data:`~edgeos_cloud.receiver.storage.base.QUARANTINE_REASONS`
    (``malformed``, ``limit``, ``timestamp``); ``record`` is what to keep.
    """

    def __init__(self, record: QuarantineRecord) -> None:
        super().__init__(record.reason, record.device, record.detail)
        self.record = record


class _LimitError(ValueError):
    """A ``[limits]`` key was exceeded (``key`` names it)."""

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        super().__init__(message)


def parse_skips(
    meta: dict[str, Any],
    epoch: int,
    seq: int,
    *,
    max_ranges: int = MAX_SKIP_RANGES,
    max_epochs: int | None = None,
) -> list[tuple[int, int, int]]:
    """Validate ``meta["skip"]`` (``[[epoch, first, last], …]``), merged per epoch.

    Raises ValueError when the list is not well formed, or names the batch's own sequence
    number or a later one of its epoch: a gap is announced only after it happened, and an
    ack past a number the device still holds would delete that data from its spool. More
    than ``max_ranges`` ranges, or more than ``max_epochs`` epochs besides the batch's own,
    raise the ValueError subclass ``_LimitError``.
    """
    raw = meta.get("skip")
    if raw is None:
        return []
    if not isinstance(raw, list | tuple):
        raise ValueError("not a list of ranges")
    if len(raw) > max_ranges:
        raise _LimitError("max_skip_ranges", f"{len(raw)} ranges (limit {max_ranges})")
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
        if max_epochs is not None and len(by_epoch.keys() - {epoch}) > max_epochs:
            raise _LimitError("max_skip_epochs", f"names more than {max_epochs} other epochs")
    return [(e, f, last) for e in sorted(by_epoch) for f, last in merge_ranges(by_epoch[e])]


class _TimeError(ValueError):
    """A time outside the plausible window (``limits.min_timestamp`` / ``max_ahead_s``)."""


def count_blocks(ts_us: npt.NDArray[np.int64], stop: int) -> int:
    """How many ``sample_blocks`` rows the samples need (as ``encode_blocks`` splits them),
    counting no further than ``stop``: one step per block, not per sample."""
    times = np.unique(ts_us)
    count, i = 0, 0
    while i < times.size and count < stop:
        count += 1
        i = int(np.searchsorted(times, int(times[i]) + MAX_SPAN_US, side="right"))
    return count


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
        # Stored as text: nothing PostgreSQL refuses (NUL) or a terminal misprints.
        epoch[:32] if isinstance(epoch, str) and epoch[:32].isprintable() else None,
    )


class BatchOpener:
    """Turns sealed payloads into :class:`IngestBatch` es, or raises :class:`Rejected`
    (:class:`Quarantined` for an authenticated batch that breaks ``limits``)."""

    def __init__(
        self,
        registry: DeviceRegistry,
        max_payload_bytes: int = MAX_SEALED_BYTES,
        *,
        limits: LimitsConfig | None = None,
    ) -> None:
        self.registry = registry
        self.max_payload_bytes = min(max_payload_bytes, MAX_SEALED_BYTES)
        self.limits = limits if limits is not None else LimitsConfig()
        lim = self.limits
        self.decode_limits = DecodeLimits(
            max_body_bytes=lim.max_body_bytes,
            max_objects=lim.max_objects,
            max_depth=lim.max_depth,
            max_container_len=lim.max_container_len,
            max_string_bytes=lim.max_string_bytes,
            max_tags=lim.max_tags,
            max_groups=lim.max_groups,
            max_events=lim.max_events,
            max_samples=lim.max_samples,
        )
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

        # Authenticated from here on: whatever is wrong is kept (quarantined), not dropped.
        def quarantine(reason: str, detail: str) -> Quarantined:
            return Quarantined(
                QuarantineRecord(
                    device,
                    header.epoch,
                    header.seq,
                    header.key_id,
                    header.created_us,
                    received_us,
                    reason,
                    detail,
                    payload,
                )
            )

        try:
            batch = decode_body(body, self.decode_limits)
            rows = batch.rows()
            skips = parse_skips(
                batch.meta,
                header.epoch,
                header.seq,
                max_ranges=self.limits.max_skip_ranges,
                max_epochs=self.limits.max_skip_epochs,
            )
            self._check(batch.tags.names, batch.tags.units, batch.events, batch.meta)
            self._check_times(rows.ts_us, batch.events, received_us)
        except LimitExceeded as exc:
            raise quarantine("limit", f"limits.{exc.limit}: {exc}") from None
        except _LimitError as exc:
            raise quarantine("limit", f"limits.{exc.key}: {exc}") from None
        except _TimeError as exc:
            raise quarantine("timestamp", str(exc)) from None
        except MemoryError:
            raise quarantine("malformed", "decoding needs more memory than is available") from None
        except UnsupportedVersion as exc:
            raise quarantine("malformed", f"unsupported body: {exc}") from None
        except WireError as exc:
            raise quarantine("malformed", str(exc)) from None
        except (ValueError, TypeError, IndexError, KeyError, OverflowError, RecursionError) as exc:
            # decode_body translates its own errors; this is the last line for anything a
            # crafted (but authenticated) body still manages to trip over.
            raise quarantine("malformed", f"{type(exc).__name__}: {exc}") from None
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
            payload=payload,
            key_id=header.key_id,
        )

    def _check(
        self,
        names: list[str],
        units: list[str],
        events: list[dict[str, Any]],
        meta: dict[str, Any],
    ) -> None:
        """Names, units and event types are text columns: bounded, no NUL (PostgreSQL text
        cannot hold one); events and ``meta`` are stored as JSON: bounded in size."""
        lim = self.limits
        # A type that is not a string is stored as its str() (a repr: no raw NUL).
        types = [t for ev in events if isinstance(t := ev.get("type", ""), str)]
        for what, texts in (("tag name", names), ("unit", units), ("event type", types)):
            if texts and max(map(len, texts)) * 4 > lim.max_name_bytes:
                longest = max(len(t.encode()) for t in texts)
                if longest > lim.max_name_bytes:
                    raise _LimitError(
                        "max_name_bytes",
                        f"a {what} of {longest} bytes (limit {lim.max_name_bytes})",
                    )
            if any("\x00" in t for t in texts):
                raise ValueError(f"a {what} holds a NUL character")
        for ev in events:
            size = len(safe_dumps(ev))
            if size > lim.max_event_bytes:
                raise _LimitError(
                    "max_event_bytes",
                    f"an event of {size} JSON bytes (limit {lim.max_event_bytes})",
                )
        size = len(safe_dumps(meta))
        if size > lim.max_meta_bytes:
            raise _LimitError(
                "max_meta_bytes", f"meta of {size} JSON bytes (limit {lim.max_meta_bytes})"
            )

    def _check_times(
        self, ts_us: npt.NDArray[np.int64], events: list[dict[str, Any]], received_us: int
    ) -> None:
        """Times outside [``min_timestamp``, received + ``max_ahead_s``] are refused, and a
        batch whose samples would need more than ``max_blocks`` blocks is over its limit."""
        lo = self.limits.min_timestamp_us
        hi = received_us + int(self.limits.max_ahead_s * 1e6)
        event_ts = [t for ev in events if type(t := ev.get("ts_us")) is int and not lo <= t <= hi]
        if event_ts:
            raise _TimeError(f"an event time {event_ts[0]} µs is outside [{lo}, {hi}]")
        if not ts_us.size:
            return
        first, last = int(ts_us.min()), int(ts_us.max())
        if first < lo or last > hi:
            bad = first if first < lo else last
            raise _TimeError(f"a sample time {bad} µs is outside [{lo}, {hi}]")
        if last - first > MAX_SPAN_US:
            blocks = count_blocks(ts_us, self.limits.max_blocks + 1)
            if blocks > self.limits.max_blocks:
                raise _LimitError(
                    "max_blocks",
                    f"samples span more than {self.limits.max_blocks} blocks of an hour",
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


def reingest(
    storage: Storage,
    opener: BatchOpener,
    *,
    device: str | None = None,
    epoch: int | None = None,
    seq: int | None = None,
) -> list[dict[str, Any]]:
    """Open quarantined batches again (with ``opener``'s current limits) and store those that
    now pass; the others stay quarantined with their new reason. One result per batch:
    ``{"device", "epoch", "seq", "outcome": "stored"|"quarantined"|"rejected", "detail"}``.

    The device acked them long ago (as quarantined); nothing is acknowledged here.
    """
    out: list[dict[str, Any]] = []
    for entry in storage.quarantined(device):
        if (epoch is not None and entry.epoch != epoch) or (seq is not None and entry.seq != seq):
            continue
        record = storage.quarantined_record(entry.device, entry.epoch, entry.seq)
        if record is None:  # re-ingested meanwhile (another receiver: the device re-sent it)
            continue
        result: dict[str, Any] = {"device": entry.device, "epoch": entry.epoch, "seq": entry.seq}
        try:
            batch = opener.open(record.payload, record.received_us, record.device)
        except Quarantined as exc:
            storage.store([], [exc.record])
            result.update(outcome="quarantined", detail=f"{exc.reason}: {exc}")
        except Rejected as exc:  # revoked device, key removed …: kept as it is
            result.update(outcome="rejected", detail=f"{exc.reason}: {exc}")
        else:
            (outcome,) = storage.store([batch])
            if outcome.quarantined is not None:
                result.update(outcome="quarantined", detail="unstorable: refused by the database")
            else:
                result.update(outcome="stored", detail=f"{outcome.samples} samples")
        out.append(result)
    return out
