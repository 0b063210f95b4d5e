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

Errors: :class:`~edgeos.errors.UnsupportedVersion` (unknown version/suite/kind, never guessed),
:class:`~edgeos.errors.AuthenticationFailed` (wrong key, forged, corrupted) and
:class:`~edgeos.errors.MalformedBatch` (bad framing, oversized, bad body).
"""

from __future__ import annotations

import io
import math
import re
import secrets
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

import msgpack  # type: ignore[import-untyped, unused-ignore]
import numpy as np
import numpy.typing as npt
import zstandard
from cryptography.exceptions import InvalidTag

from edgeos_protocol.crypto import (
    SALT_BYTES,
    Epoch,
    Suite,
    derive_control_key,
    derive_epoch_key,
    make_aead,
    nonce_for,
)
from edgeos_protocol.errors import AuthenticationFailed, MalformedBatch, UnsupportedVersion
from edgeos_protocol.quality import Quality

__all__ = [
    "BATCH_MAGIC",
    "CONTROL_MAGIC",
    "DOWNLINK_KINDS",
    "FORMAT_VERSION",
    "MAX_BODY_BYTES",
    "MAX_CONTROL_BYTES",
    "MAX_SAMPLES",
    "MAX_SEALED_BYTES",
    "MISSING",
    "UPLINK_KINDS",
    "Batch",
    "Control",
    "ControlKind",
    "Group",
    "Header",
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

BATCH_MAGIC = b"EOSB"
CONTROL_MAGIC = b"EOSC"
FORMAT_VERSION = 1
#: Largest sealed batch accepted (header + ciphertext + tag).
MAX_SEALED_BYTES = 16 << 20
#: Largest decompressed body accepted (zstd bomb protection).
MAX_BODY_BYTES = 64 << 20
#: Most samples (rows × columns over all groups) one batch may declare.
MAX_SAMPLES = 4_000_000
#: Largest sealed control message accepted.
MAX_CONTROL_BYTES = 64 << 10
#: Quality code of a tag that was not sampled in a row of a group.
MISSING = 255
_TAG_BYTES = 16
_USABLE_BELOW = int(Quality.BAD)
# Quantized integers stay exactly representable as float64; larger ones travel as specials.
_MAX_Q = float(1 << 53)
_DEVICE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]{0,63}$")

# magic, version, suite, flags, device length, key id, epoch, salt, seq, created (µs)
_HEADER = struct.Struct(">4sBBBBIQ16sQq")
# magic, version, suite, kind, device length, key id, salt, counter, created (µs)
_CONTROL = struct.Struct(">4sBBBBI16sQq")


class ValueKind(IntEnum):
    """How a tag's values are coded."""

    NUMBER = 0
    BOOL = 1
    STRING = 2


class ControlKind(IntEnum):
    """Control message kinds; the value is on the wire."""

    #: receiver → device: ``{"epoch": int, "seq": int}``, highest contiguous stored seq.
    ACK = 1
    #: receiver → device: ``{"id": str, "version": int, "desired": {...}}``.
    COMMAND = 2
    #: device → receiver: ``{"id": str, "version": int, "ok": bool, "results": {...}}``.
    COMMAND_RESULT = 3


DOWNLINK_KINDS = frozenset({ControlKind.ACK, ControlKind.COMMAND})
UPLINK_KINDS = frozenset({ControlKind.COMMAND_RESULT})


# --------------------------------------------------------------------------- header


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
    device = _parse_device(payload, _HEADER.size, dev_len)
    if seq == 0:
        raise MalformedBatch("sequence number 0 is never used")
    if len(payload) < _HEADER.size + dev_len + _TAG_BYTES:
        raise MalformedBatch("batch is too short to hold a ciphertext")
    return Header(FORMAT_VERSION, suite_, device, key_id, epoch, salt, seq, created)


def _parse_device(payload: bytes, offset: int, length: int) -> str:
    raw = payload[offset : offset + length]
    if len(raw) != length:
        raise MalformedBatch("device id is truncated")
    try:
        device = raw.decode("ascii")
    except UnicodeDecodeError:
        raise MalformedBatch("device id is not ASCII") from None
    if not _DEVICE_RE.match(device):
        raise MalformedBatch(f"device id {device!r} is not a valid device id")
    return device


# --------------------------------------------------------------------------- batches


@dataclass(slots=True)
class Group:
    """Samples of one set of tags read together: ``R`` rows (scans) × ``C`` columns (tags).

    ``tags`` are positions in the batch's tag table; ``times_us`` are the rows' scan times
    (µs since the Unix epoch); ``values`` hold engineering values (NaN where the quality is
    not usable, for string tags, and where missing); ``quality`` holds
    :class:`~edgeos.driver.Quality` codes or :data:`MISSING`; ``text`` holds string values by
    ``(row, column)``.
    """

    times_us: npt.NDArray[np.int64]
    tags: npt.NDArray[np.int32]
    values: npt.NDArray[np.float64]
    quality: npt.NDArray[np.uint8]
    text: dict[tuple[int, int], str] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.times_us.shape[0]), int(self.tags.shape[0])


@dataclass(slots=True)
class Rows:
    """A batch flattened to one entry per present sample (what the receiver stores).

    ``tag`` is a position in the batch's tag table (``batch.tag_indices[rows.tag]`` gives twin
    indices, ``batch.tag_names`` names); ``text`` maps a row number to a string value.
    """

    tag: npt.NDArray[np.int32]
    ts_us: npt.NDArray[np.int64]
    value: npt.NDArray[np.float64]
    quality: npt.NDArray[np.uint8]
    text: dict[int, str]

    def __len__(self) -> int:
        return int(self.tag.shape[0])


class TagTable:
    """The tags of a batch, columnar: twin index, name, value kind, resolution, unit.

    Treat it as immutable: its wire encoding is computed once and reused, so a batcher that
    keeps one table for consecutive batches pays for encoding the names only once.
    """

    __slots__ = (
        "_dots",
        "_encoded",
        "_leaves",
        "_pcode",
        "_prefixes",
        "indices",
        "kinds",
        "leaf_codes",
        "names",
        "resolutions",
        "units",
    )

    def __init__(
        self,
        indices: npt.ArrayLike,
        names: list[str],
        kinds: npt.ArrayLike,
        resolutions: npt.ArrayLike,
        units: list[str],
    ) -> None:
        self.indices: npt.NDArray[np.int32] = np.asarray(indices, np.int32)
        self.names = list(names)
        self.kinds: npt.NDArray[np.uint8] = np.asarray(kinds, np.uint8)
        self.resolutions: npt.NDArray[np.float64] = np.asarray(resolutions, np.float64)
        self.units = list(units)
        n = self.indices.shape[0]
        if not (
            len(self.names) == len(self.units) == n
            and self.kinds.shape == (n,)
            and self.resolutions.shape == (n,)
        ):
            raise ValueError("tag table columns differ in length")
        numeric = self.kinds == ValueKind.NUMBER
        if np.any(numeric & ~(np.isfinite(self.resolutions) & (self.resolutions > 0))):
            raise ValueError("numeric tags need a finite resolution > 0")
        self._encoded: dict[str, Any] | None = None
        # Split at the first dot: equipment instance + template tag name, so 80 nests × 200
        # template tags become 80 + 200 strings. A name without a dot is all leaf.
        split = [n.partition(".") if "." in n else ("", "", n) for n in self.names]
        self._prefixes, self._pcode = _dict_code([p for p, _, _ in split])
        self._leaves, self.leaf_codes = _dict_code([leaf for _, _, leaf in split])
        self._dots = np.asarray([bool(sep) for _, sep, _ in split], np.uint8)

    def __len__(self) -> int:
        return int(self.indices.shape[0])

    def position(self) -> dict[int, int]:
        """Twin index → position in this table."""
        return {int(ix): pos for pos, ix in enumerate(self.indices.tolist())}

    def _doc(self) -> dict[str, Any]:
        if self._encoded is None:
            units, ucode = _dict_code(self.units)
            res_table: dict[float, int] = {}
            rcode = np.asarray(
                [res_table.setdefault(r, len(res_table)) for r in self.resolutions.tolist()],
                np.int64,
            )
            self._encoded = {
                "n": len(self),
                "idx": _pack_ints(_delta(self.indices.astype(np.int64))),
                "pfx": self._prefixes,
                "pi": _pack_ints(self._pcode),
                "leaf": self._leaves,
                "li": _pack_ints(self.leaf_codes),
                "dot": np.packbits(self._dots).tobytes(),
                "kind": self.kinds.tobytes(),
                "unit": units,
                "ui": _pack_ints(ucode),
                "res": list(res_table),
                "ri": _pack_ints(rcode),
            }
        return self._encoded


@dataclass(slots=True)
class Batch:
    """The decoded body of a batch: a tag table, sample groups, events and metadata.

    ``events`` are msgpack-able dicts with at least ``"type"`` (``"gate"``, ``"write"``,
    ``"alarm"``, …) and ``"ts_us"``; ``meta`` is free-form batch metadata (counters, scan group
    names, the firmware version).
    """

    tags: TagTable
    groups: list[Group] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def tag_indices(self) -> npt.NDArray[np.int32]:
        return self.tags.indices

    @property
    def tag_names(self) -> list[str]:
        return self.tags.names

    @property
    def tag_kinds(self) -> npt.NDArray[np.uint8]:
        return self.tags.kinds

    @property
    def tag_resolutions(self) -> npt.NDArray[np.float64]:
        return self.tags.resolutions

    @property
    def tag_units(self) -> list[str]:
        return self.tags.units

    @property
    def sample_count(self) -> int:
        """Samples present (not :data:`MISSING`) over all groups."""
        return sum(int(np.count_nonzero(g.quality != MISSING)) for g in self.groups)

    def rows(self) -> Rows:
        """Every present sample as flat columns, group by group, row-major within a group."""
        tags: list[npt.NDArray[np.int32]] = []
        ts: list[npt.NDArray[np.int64]] = []
        vals: list[npt.NDArray[np.float64]] = []
        qual: list[npt.NDArray[np.uint8]] = []
        text: dict[int, str] = {}
        base = 0
        for g in self.groups:
            present = g.quality != MISSING
            r, c = np.nonzero(present)
            tags.append(g.tags[c])
            ts.append(g.times_us[r])
            vals.append(g.values[r, c])
            qual.append(g.quality[r, c])
            if g.text:
                # Row number of (r, c) in this group's flattened present samples.
                order = np.cumsum(present.ravel()) - 1
                width = present.shape[1]
                for (row, col), s in g.text.items():
                    if present[row, col]:
                        text[base + int(order[row * width + col])] = s
            base += int(r.shape[0])
        if not tags:
            return Rows(
                np.empty(0, np.int32),
                np.empty(0, np.int64),
                np.empty(0),
                np.empty(0, np.uint8),
                {},
            )
        return Rows(
            np.concatenate(tags).astype(np.int32, copy=False),
            np.concatenate(ts),
            np.concatenate(vals),
            np.concatenate(qual),
            text,
        )


# ---- integer columns: zigzag-coded, narrowest width, stored as byte planes
#
# Zigzag maps small negative and positive deltas to small unsigned numbers; storing the low
# bytes of every value first, then the next bytes, ... puts the mostly-zero high bytes in long
# runs that zstd squeezes to almost nothing (measured: -25 % on a real line's deltas).

_WIDTHS = (1, 2, 4, 8)


def _pack_ints(a: npt.NDArray[np.int64]) -> list[Any]:
    if a.size == 0:
        return [1, b""]
    a = np.asarray(a, np.int64)
    lo, hi = int(a.min()), int(a.max())
    width = next(w for w in _WIDTHS if -(1 << (8 * w - 1)) <= lo and hi < 1 << (8 * w - 1))
    zigzag = ((a << 1) ^ (a >> 63)).view(np.uint64).astype(f"<u{width}")
    planes = zigzag.view(np.uint8).reshape(-1, width).T
    return [width, planes.tobytes()]


def _unpack_ints(obj: Any, count: int, what: str) -> npt.NDArray[np.int64]:
    if not (isinstance(obj, list) and len(obj) == 2 and obj[0] in _WIDTHS):
        raise MalformedBatch(f"{what}: not an integer column")
    width, raw = obj
    if not isinstance(raw, bytes) or len(raw) != width * count:
        raise MalformedBatch(f"{what}: expected {count} values of {width} bytes")
    planes = np.frombuffer(raw, np.uint8).reshape(width, count)
    zigzag = np.ascontiguousarray(planes.T).view(f"<u{width}").reshape(count).astype(np.uint64)
    out: npt.NDArray[np.int64] = (
        (zigzag >> np.uint64(1)) ^ (np.uint64(0) - (zigzag & np.uint64(1)))
    ).view(np.int64)
    return out


def _dict_code(items: list[str]) -> tuple[list[str], npt.NDArray[np.int64]]:
    table: dict[str, int] = {}
    codes = [table.setdefault(s, len(table)) for s in items]
    return list(table), np.asarray(codes, np.int64)


def _delta(a: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    return np.diff(a, prepend=np.int64(0)) if a.size else a


def encode_body(batch: Batch, *, level: int = 3) -> bytes:
    """Encode a batch body: columnar msgpack, then zstd at ``level``.

    Numeric values are quantized to their tag's resolution (error ≤ resolution / 2) and
    delta-coded per column; booleans are bit-packed; strings are dictionary-coded; quality and
    missing samples are explicit. Usable values that cannot be quantized (±inf, NaN, beyond
    2^53 steps) travel exactly as float64 "specials".
    """
    table = batch.tags
    tag_doc = table._doc()
    strings: dict[str, int] = {}
    groups = [_encode_group(g, table, strings) for g in batch.groups]
    doc = {
        "tags": tag_doc,
        "str": list(strings),
        "g": groups,
        "ev": batch.events,
        "meta": batch.meta,
    }
    packed = msgpack.packb(doc, use_bin_type=True)
    return zstandard.ZstdCompressor(level=level).compress(packed)


def _encode_group(g: Group, table: TagTable, strings: dict[str, int]) -> dict[str, Any]:
    kinds, res, n_tags = table.kinds, table.resolutions, len(table)
    n_rows, n_cols = g.shape
    if g.values.shape != (n_rows, n_cols) or g.quality.shape != (n_rows, n_cols):
        raise ValueError(f"group values/quality must be {n_rows}×{n_cols}")
    if n_cols and (int(g.tags.min()) < 0 or int(g.tags.max()) >= n_tags):
        raise ValueError("group refers to a tag outside the tag table")
    quality = np.asarray(g.quality, np.uint8)
    usable = quality < _USABLE_BELOW
    col_kind = kinds[g.tags]
    doc: dict[str, Any] = {
        "t": _pack_ints(_delta(np.asarray(g.times_us, np.int64))),
        "c": _pack_ints(_delta(g.tags.astype(np.int64))),
        # Column-major so each tag's column is contiguous (runs compress well).
        "q": np.ascontiguousarray(quality.T).tobytes(),
    }
    num_cols = np.flatnonzero(col_kind == ValueKind.NUMBER)
    if num_cols.size:
        vals = np.asarray(g.values[:, num_cols], np.float64)
        ok = usable[:, num_cols]
        with np.errstate(invalid="ignore", over="ignore"):
            scaled = np.rint(vals / res[g.tags[num_cols]])
        finite = np.isfinite(scaled) & (np.abs(scaled) < _MAX_Q)
        special = ok & ~finite
        ok_q = ok & finite
        # Forward-fill gaps so a gap costs a zero delta; the quality says the value is absent.
        scaled = np.where(ok_q, scaled, 0.0)
        rows = np.where(ok_q, np.arange(n_rows)[:, None], 0)
        np.maximum.accumulate(rows, axis=0, out=rows)
        q = np.take_along_axis(scaled, rows, axis=0).astype(np.int64)
        # First values sorted by leaf name, then delta-coded: the same quantity on similar
        # machines (nest01.temp, nest02.temp, ...) sits side by side and differs little.
        order = np.argsort(table.leaf_codes[g.tags[num_cols]], kind="stable")
        doc["n0"] = _pack_ints(_delta(q[0][order]) if n_rows else q.reshape(-1))
        doc["nd"] = _pack_ints(np.diff(q, axis=0).T.reshape(-1))
        if special.any():
            pos = np.flatnonzero(special.T)
            doc["sx"] = [
                _pack_ints(_delta(pos.astype(np.int64))),
                vals.T.reshape(-1)[pos].astype("<f8").tobytes(),
            ]
    bool_cols = np.flatnonzero(col_kind == ValueKind.BOOL)
    if bool_cols.size:
        bits = (g.values[:, bool_cols] != 0) & usable[:, bool_cols]
        bits &= ~np.isnan(g.values[:, bool_cols])
        doc["b"] = np.packbits(bits.T.reshape(-1)).tobytes()
    str_cols = np.flatnonzero(col_kind == ValueKind.STRING)
    if str_cols.size:
        ok = usable[:, str_cols].T  # column-major order of usable string samples
        codes = [
            strings.setdefault(g.text.get((int(r), int(str_cols[c])), ""), len(strings))
            for c, r in zip(*np.nonzero(ok), strict=True)
        ]
        doc["s"] = _pack_ints(np.asarray(codes, np.int64))
    return doc


def decode_body(data: bytes) -> Batch:
    """Decompress (bounded by :data:`MAX_BODY_BYTES`) and decode a body; raise
    :class:`MalformedBatch` on anything inconsistent."""
    raw = _decompress(data)
    try:
        doc = msgpack.unpackb(raw, raw=False, strict_map_key=True, use_list=True)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise MalformedBatch(f"body is not valid msgpack: {exc}") from None
    try:
        return _decode_doc(doc)
    except MalformedBatch:
        raise
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
        raise MalformedBatch(f"body structure is invalid: {type(exc).__name__}: {exc}") from None


def _decompress(data: bytes) -> bytes:
    try:
        declared = zstandard.frame_content_size(data)
    except zstandard.ZstdError as exc:
        raise MalformedBatch(f"body is not a zstd frame: {exc}") from None
    if declared > MAX_BODY_BYTES:
        raise MalformedBatch(f"body declares {declared} bytes; the limit is {MAX_BODY_BYTES}")
    try:
        dctx = zstandard.ZstdDecompressor()
        with dctx.stream_reader(io.BytesIO(data), read_across_frames=False) as reader:
            out = reader.read(MAX_BODY_BYTES + 1)
    except zstandard.ZstdError as exc:
        raise MalformedBatch(f"body does not decompress: {exc}") from None
    if len(out) > MAX_BODY_BYTES:
        raise MalformedBatch(f"body decompresses past {MAX_BODY_BYTES} bytes")
    if declared >= 0 and len(out) != declared:
        raise MalformedBatch("body is truncated")
    return out


def _str_list(obj: Any, what: str) -> list[str]:
    if not isinstance(obj, list) or not all(isinstance(s, str) for s in obj):
        raise MalformedBatch(f"{what}: expected a list of strings")
    return obj


def _codes(obj: Any, count: int, table_len: int, what: str) -> npt.NDArray[np.int64]:
    codes = _unpack_ints(obj, count, what)
    if codes.size and (int(codes.min()) < 0 or int(codes.max()) >= table_len):
        raise MalformedBatch(f"{what}: code outside its table")
    return codes


def _decode_doc(doc: Any) -> Batch:
    if not isinstance(doc, dict):
        raise MalformedBatch("body is not a map")
    t = doc["tags"]
    n = t["n"]
    if not isinstance(n, int) or not 0 <= n <= MAX_SAMPLES:
        raise MalformedBatch("tag count out of range")
    indices = np.cumsum(_unpack_ints(t["idx"], n, "tag indices"))
    if indices.size and (int(indices.min()) < 0 or int(indices.max()) > 0x7FFFFFFF):
        raise MalformedBatch("tag index out of range")
    prefixes = _str_list(t["pfx"], "tag prefixes")
    leaves = _str_list(t["leaf"], "tag leaves")
    pcode = _codes(t["pi"], n, len(prefixes), "tag prefix codes")
    lcode = _codes(t["li"], n, len(leaves), "tag leaf codes")
    dots = np.unpackbits(np.frombuffer(t["dot"], np.uint8), count=n).astype(bool)
    names = [
        f"{prefixes[p]}.{leaves[leaf]}" if d else leaves[leaf]
        for p, leaf, d in zip(pcode.tolist(), lcode.tolist(), dots.tolist(), strict=True)
    ]
    kinds = np.frombuffer(t["kind"], np.uint8).copy()
    if kinds.shape[0] != n or (kinds.size and int(kinds.max()) > max(ValueKind)):
        raise MalformedBatch("tag kinds are invalid")
    unit_table = _str_list(t["unit"], "units")
    units = [unit_table[i] for i in _codes(t["ui"], n, len(unit_table), "unit codes").tolist()]
    res_table = np.asarray(t["res"], np.float64)
    res = res_table[_codes(t["ri"], n, len(res_table), "resolution codes")]
    if np.any((kinds == ValueKind.NUMBER) & ~(np.isfinite(res) & (res > 0))):
        raise MalformedBatch("numeric tag without a finite resolution > 0")
    table = TagTable(indices, names, kinds, res, units)
    strings = _str_list(doc["str"], "string table")
    groups_doc = doc["g"]
    if not isinstance(groups_doc, list):
        raise MalformedBatch("groups are not a list")
    budget = [MAX_SAMPLES]
    groups = [_decode_group(g, table, strings, budget) for g in groups_doc]
    events = doc["ev"]
    meta = doc["meta"]
    if not isinstance(events, list) or not all(isinstance(e, dict) for e in events):
        raise MalformedBatch("events are not a list of maps")
    if not isinstance(meta, dict):
        raise MalformedBatch("meta is not a map")
    return Batch(table, groups, events, meta)


def _decode_group(d: Any, table: TagTable, strings: list[str], budget: list[int]) -> Group:
    kinds, res, n_tags = table.kinds, table.resolutions, len(table)
    if not isinstance(d, dict):
        raise MalformedBatch("group is not a map")
    t_obj, c_obj = d["t"], d["c"]
    if not (
        isinstance(t_obj, list)
        and isinstance(c_obj, list)
        and len(t_obj) == 2
        and len(c_obj) == 2
        and isinstance(t_obj[0], int)
        and isinstance(c_obj[0], int)
        and isinstance(t_obj[1], bytes)
        and isinstance(c_obj[1], bytes)
        and t_obj[0] > 0
        and c_obj[0] > 0
    ):
        raise MalformedBatch("group times/columns are invalid")
    n_rows = len(t_obj[1]) // t_obj[0]
    n_cols = len(c_obj[1]) // c_obj[0]
    budget[0] -= n_rows * n_cols
    if budget[0] < 0:
        raise MalformedBatch(f"batch declares more than {MAX_SAMPLES} samples")
    times = np.cumsum(_unpack_ints(t_obj, n_rows, "row times"))
    cols = np.cumsum(_unpack_ints(c_obj, n_cols, "group columns"))
    if cols.size and (int(cols.min()) < 0 or int(cols.max()) >= n_tags):
        raise MalformedBatch("group column outside the tag table")
    q_raw = d["q"]
    if not isinstance(q_raw, bytes) or len(q_raw) != n_rows * n_cols:
        raise MalformedBatch("quality matrix has the wrong size")
    quality = np.frombuffer(q_raw, np.uint8).reshape(n_cols, n_rows).T.copy()
    usable = quality < _USABLE_BELOW
    values = np.full((n_rows, n_cols), np.nan)
    col_kind = kinds[cols]
    text: dict[tuple[int, int], str] = {}
    num_cols = np.flatnonzero(col_kind == ValueKind.NUMBER)
    if num_cols.size:
        k = num_cols.size
        first = _unpack_ints(d["n0"], k if n_rows else 0, "first values")
        deltas = _unpack_ints(d["nd"], k * max(n_rows - 1, 0), "value deltas")
        if n_rows:
            q = np.empty((n_rows, k), np.int64)
            q[0, np.argsort(table.leaf_codes[cols[num_cols]], kind="stable")] = np.cumsum(first)
            q[1:] = deltas.reshape(k, n_rows - 1).T
            np.cumsum(q, axis=0, out=q)
            vals = q * res[cols[num_cols]]
            sx = d.get("sx")
            if sx is not None:
                if not (isinstance(sx, list) and len(sx) == 2 and isinstance(sx[1], bytes)):
                    raise MalformedBatch("specials are invalid")
                count = len(sx[1]) // 8
                pos = np.cumsum(_unpack_ints(sx[0], count, "special positions"))
                if pos.size and (int(pos.min()) < 0 or int(pos.max()) >= vals.size):
                    raise MalformedBatch("special position out of range")
                flat = vals.T.copy().reshape(-1)
                flat[pos] = np.frombuffer(sx[1], "<f8")
                vals = flat.reshape(k, n_rows).T
            values[:, num_cols] = np.where(usable[:, num_cols], vals, np.nan)
    bool_cols = np.flatnonzero(col_kind == ValueKind.BOOL)
    if bool_cols.size:
        count = bool_cols.size * n_rows
        raw = d["b"]
        if not isinstance(raw, bytes) or len(raw) != (count + 7) // 8:
            raise MalformedBatch("boolean bits have the wrong size")
        bits = np.unpackbits(np.frombuffer(raw, np.uint8), count=count)
        bvals = bits.reshape(bool_cols.size, n_rows).T.astype(np.float64)
        values[:, bool_cols] = np.where(usable[:, bool_cols], bvals, np.nan)
    str_cols = np.flatnonzero(col_kind == ValueKind.STRING)
    if str_cols.size:
        cs, rs = np.nonzero(usable[:, str_cols].T)
        codes = _codes(d["s"], int(cs.shape[0]), len(strings), "string codes")
        for c, r, code in zip(cs.tolist(), rs.tolist(), codes.tolist(), strict=True):
            text[(r, int(str_cols[c]))] = strings[code]
    return Group(times, cols.astype(np.int32), values, quality, text)


# --------------------------------------------------------------------------- sealing


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


def epoch_key_for(header: Header, device_key: bytes) -> bytes:
    """Derive the epoch key a header was sealed under, from the device key of its key id."""
    return derive_epoch_key(
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


# --------------------------------------------------------------------------- control


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
    if not _DEVICE_RE.match(device):
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
    if len(message) < _CONTROL.size + _TAG_BYTES:
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
    device = _parse_device(message, _CONTROL.size, dev_len)
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
