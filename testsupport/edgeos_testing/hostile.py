"""Hostile but authentic batch bodies: what a gateway whose key an attacker holds can send
(receiver tests and fuzzing; used with ``SimDevice.seal_body`` or ``seal_batch``).

Each builder returns a zstd-compressed body (to be sealed under the device's real key) that
the real encoder or hand-written msgpack produces: poison that decodes but used to break
storage, and amplification that used to turn a few hundred sealed bytes into millions of rows.
"""

from __future__ import annotations

import struct
from typing import Any

import msgpack  # type: ignore[import-untyped, unused-ignore]
import numpy as np
import zstandard

from edgeos_protocol.batch import Batch, Group, TagTable, ValueKind
from edgeos_protocol.columns import pack_ints
from edgeos_protocol.wire import encode_body
from edgeos_testing.devsim import simple_batch

#: 2023-11-14T22:13:20Z: inside the default plausible window.
T0 = 1_700_000_000_000_000
HOUR_US = 3_600_000_000


def healthy(i: int = 0) -> Batch:
    return simple_batch({"temp": [20.0 + i, 20.5 + i]}, [T0 + i * 1000, T0 + i * 1000 + 500])


def with_meta(meta: dict[Any, Any]) -> bytes:
    batch = healthy()
    batch.meta = meta
    return encode_body(batch)


def with_event(event: dict[Any, Any]) -> bytes:
    batch = healthy()
    batch.events = [event]
    return encode_body(batch)


def deep(levels: int) -> Any:
    doc: Any = 1
    for _ in range(levels):
        doc = {"k": doc}
    return doc


def with_names(name: str = "temp", unit: str = "") -> bytes:
    table = TagTable([0], [name], [ValueKind.NUMBER], [0.01], [unit])
    group = Group(
        np.array([T0], np.int64), np.array([0], np.int32), np.array([[1.0]]), np.zeros((1, 1), "u1")
    )
    return encode_body(Batch(table, [group], [], {}))


def _pack(parts: list[bytes]) -> bytes:
    return zstandard.ZstdCompressor(level=19).compress(b"".join(parts))


def _doc_prefix(tags: dict[str, Any] | None = None) -> list[bytes]:
    """A body map of 5 entries up to its ``ev`` value (events follow, then ``meta``)."""
    tag_doc = tags or {
        "n": 0,
        "idx": pack_ints(np.zeros(0, np.int64)),
        "pfx": [],
        "pi": pack_ints(np.zeros(0, np.int64)),
        "leaf": [],
        "li": pack_ints(np.zeros(0, np.int64)),
        "dot": b"",
        "kind": b"",
        "unit": [],
        "ui": pack_ints(np.zeros(0, np.int64)),
        "res": [],
        "ri": pack_ints(np.zeros(0, np.int64)),
    }
    return [
        b"\x85",
        msgpack.packb("tags"),
        msgpack.packb(tag_doc, use_bin_type=True),
        msgpack.packb("str"),
        b"\x90",
        msgpack.packb("g"),
        b"\x90",
        msgpack.packb("ev"),
    ]


def many_events(count: int) -> bytes:
    """``count`` minimal events ``{"type": "e"}``: a few KB compressed."""
    event = msgpack.packb({"type": "e"})
    return _pack(
        [*_doc_prefix(), b"\xdd" + struct.pack(">I", count), event * count, b"\xa4meta\x80"]
    )


def many_tags(count: int) -> bytes:
    """A tag table declaring ``count`` tags (names from 1,000 prefixes x 1,000 leaves)."""
    side = 1000
    n = np.arange(count, dtype=np.int64)
    tags = {
        "n": count,
        "idx": pack_ints(np.ones(count, np.int64)),
        "pfx": [f"p{i}" for i in range(side)],
        "pi": pack_ints(n // side),
        "leaf": [f"l{i}" for i in range(side)],
        "li": pack_ints(n % side),
        "dot": np.packbits(np.ones(count, np.uint8)).tobytes(),
        "kind": bytes(count),
        "unit": [""],
        "ui": pack_ints(np.zeros(count, np.int64)),
        "res": [0.01],
        "ri": pack_ints(np.zeros(count, np.int64)),
    }
    return _pack([*_doc_prefix(tags), b"\x90", b"\xa4meta\x80"])


def empty_maps(count: int) -> bytes:
    """One array of ``count`` empty maps (64 MiB of them took > 3 GiB to build)."""
    return _pack([*_doc_prefix(), b"\xdd" + struct.pack(">I", count), b"\x80" * count])


def nested_empty_maps(outer: int, inner: int) -> bytes:
    """``outer`` arrays of ``inner`` empty maps each: no single container is over-long."""
    chunk = b"\xdd" + struct.pack(">I", inner) + b"\x80" * inner
    return _pack(
        [*_doc_prefix(), b"\xdd" + struct.pack(">I", outer), chunk * outer, b"\xa4meta\x80"]
    )


def rows_hours_apart(rows: int, start_us: int, step_us: int = HOUR_US + 60_000_000) -> bytes:
    """One tag sampled ``rows`` times, rows more than an hour apart: one block each."""
    times = start_us + np.arange(rows, dtype=np.int64) * step_us
    table = TagTable([0], ["t"], [ValueKind.NUMBER], [1.0], [""])
    group = Group(times, np.array([0], np.int32), np.ones((rows, 1)), np.zeros((rows, 1), "u1"))
    return encode_body(Batch(table, [group], [], {}))


def skip_epochs(count: int, own_epoch: int) -> bytes:
    """A skip list naming ``count`` other epochs (each locked, advanced and acked)."""
    return with_meta({"skip": [[e, 1, 1] for e in range(count + 1) if e != own_epoch][:count]})
