"""The batch body codec: columnar msgpack, then zstd (wire format v1, ``docs/wire-format.md``).

:func:`encode_body` quantizes, delta-codes and compresses a :class:`~.batch.Batch`;
:func:`decode_body` refuses anything inconsistent with :class:`MalformedBatch` and bounds what
it decompresses and allocates by construction (:class:`DecodeLimits`): the msgpack document is
first *scanned* without building anything — every value counted against an object budget,
every container length, string length and the nesting depth checked, map keys required to be
strings — and only a document that passed is materialised (by the C unpacker, with the same
length limits). A limit that is exceeded raises :class:`LimitExceeded` naming it.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import msgpack  # type: ignore[import-untyped, unused-ignore]
import numpy as np
import numpy.typing as npt
import zstandard

from edgeos_protocol.batch import Batch, Group, TagTable, ValueKind
from edgeos_protocol.columns import delta, pack_ints, unpack_ints
from edgeos_protocol.errors import MalformedBatch
from edgeos_protocol.quality import Quality

__all__ = [
    "DEFAULT_LIMITS",
    "MAX_BODY_BYTES",
    "MAX_SAMPLES",
    "DecodeLimits",
    "LimitExceeded",
    "decode_body",
    "encode_body",
]

#: Largest decompressed body accepted (zstd bomb protection).
MAX_BODY_BYTES = 64 << 20
#: Most samples (rows × columns over all groups) one batch may declare.
MAX_SAMPLES = 4_000_000
_USABLE_BELOW = int(Quality.BAD)
# Quantized integers stay exactly representable as float64; larger ones travel as specials.
_MAX_Q = float(1 << 53)


class LimitExceeded(MalformedBatch):
    """An authenticated body exceeds one of the reader's :class:`DecodeLimits`.

    ``limit`` names the field (``"max_events"``, …): the receiver reports it as its config key.
    """

    def __init__(self, limit: str, message: str) -> None:
        self.limit = limit
        super().__init__(message)


@dataclass(frozen=True, slots=True)
class DecodeLimits:
    """What one body may hold; every count is checked before the thing it counts is built.

    The defaults are far above what a gateway sends (a 16,000-tag batch is ~600 msgpack
    values) and far below what exhausts a reader (64 MiB of empty maps would need > 3 GiB).
    """

    #: Decompressed body size (the wire's cap is :data:`MAX_BODY_BYTES`).
    max_body_bytes: int = MAX_BODY_BYTES
    #: Every msgpack value (containers, keys, scalars) of the document, counted while scanning.
    max_objects: int = 500_000
    #: Nesting depth of the document (the body map is depth 1; ``meta`` is at depth 2).
    max_depth: int = 32
    #: Entries of one array, or key/value pairs of one map.
    max_container_len: int = 1_000_000
    #: UTF-8 bytes of one string (names, units, string values, event fields).
    max_string_bytes: int = 1 << 20
    #: Tags in the tag table.
    max_tags: int = 100_000
    #: Sample groups.
    max_groups: int = 4096
    #: Events.
    max_events: int = 10_000
    #: Sample slots (rows x columns over all groups).
    max_samples: int = MAX_SAMPLES


DEFAULT_LIMITS = DecodeLimits()


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
        "t": pack_ints(delta(np.asarray(g.times_us, np.int64))),
        "c": pack_ints(delta(g.tags.astype(np.int64))),
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
        doc["n0"] = pack_ints(delta(q[0][order]) if n_rows else q.reshape(-1))
        doc["nd"] = pack_ints(np.diff(q, axis=0).T.reshape(-1))
        if special.any():
            pos = np.flatnonzero(special.T)
            doc["sx"] = [
                pack_ints(delta(pos.astype(np.int64))),
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
        doc["s"] = pack_ints(np.asarray(codes, np.int64))
    return doc


def decode_body(data: bytes, limits: DecodeLimits = DEFAULT_LIMITS) -> Batch:
    """Decompress and decode a body within ``limits``; raise :class:`MalformedBatch` (or its
    :class:`LimitExceeded`) on anything inconsistent or too large. Nothing else escapes, not
    even a ``MemoryError``: what is built is bounded before it is built."""
    raw = _decompress(data, min(limits.max_body_bytes, MAX_BODY_BYTES))
    scan_msgpack(raw, limits)
    try:
        doc = msgpack.unpackb(
            raw,
            raw=False,
            strict_map_key=True,
            use_list=True,
            max_str_len=limits.max_string_bytes,
            max_bin_len=len(raw),
            max_array_len=limits.max_container_len,
            max_map_len=limits.max_container_len,
            max_ext_len=0,
        )
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise MalformedBatch(f"body is not valid msgpack: {exc}") from None
    try:
        return _decode_doc(doc, limits)
    except MalformedBatch:
        raise
    except MemoryError:
        # Bounded above (samples, objects), so this is the machine, not the batch's size
        # alone; still the batch's failure, never the reader's.
        raise MalformedBatch("body needs more memory than is available") from None
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, OverflowError) as exc:
        raise MalformedBatch(f"body structure is invalid: {type(exc).__name__}: {exc}") from None


def _decompress(data: bytes, limit: int = MAX_BODY_BYTES) -> bytes:
    try:
        declared = zstandard.frame_content_size(data)
    except zstandard.ZstdError as exc:
        raise MalformedBatch(f"body is not a zstd frame: {exc}") from None
    if declared > limit:
        raise LimitExceeded(
            "max_body_bytes", f"body declares {declared} bytes; the limit is {limit}"
        )
    try:
        dctx = zstandard.ZstdDecompressor()
        with dctx.stream_reader(io.BytesIO(data), read_across_frames=False) as reader:
            out = reader.read(limit + 1)
    except zstandard.ZstdError as exc:
        raise MalformedBatch(f"body does not decompress: {exc}") from None
    if len(out) > limit:
        raise LimitExceeded("max_body_bytes", f"body decompresses past {limit} bytes")
    if declared >= 0 and len(out) != declared:
        raise MalformedBatch("body is truncated")
    return out


# msgpack first bytes → (kind, size of the length field or of the value).
# kind: 0 scalar of fixed size, 1 str, 2 bin, 3 array, 4 map, 5 refused (ext, 0xc1).
_FIXED = {0xC0: 1, 0xC2: 1, 0xC3: 1, 0xCA: 5, 0xCB: 9, 0xCC: 2, 0xCD: 3, 0xCE: 5, 0xCF: 9}
_FIXED.update({0xD0: 2, 0xD1: 3, 0xD2: 5, 0xD3: 9})
_LENGTHED = {
    0xD9: (1, 1),
    0xDA: (1, 2),
    0xDB: (1, 4),
    0xC4: (2, 1),
    0xC5: (2, 2),
    0xC6: (2, 4),
    0xDC: (3, 2),
    0xDD: (3, 4),
    0xDE: (4, 2),
    0xDF: (4, 4),
}


def scan_msgpack(raw: bytes, limits: DecodeLimits = DEFAULT_LIMITS) -> int:
    """Walk one msgpack document without building it; return its number of values.

    Raises :class:`LimitExceeded` past ``max_objects``, ``max_depth``, ``max_container_len``
    or ``max_string_bytes``, and :class:`MalformedBatch` for bad framing, trailing bytes, ext
    types, or a map key that is not a string (JSON and SQL cannot hold the others).
    Cost is one step per value: bytes and strings are skipped by their length.
    """
    n = len(raw)
    pos = 0
    objects = 0
    budget = limits.max_objects
    max_len = limits.max_container_len
    max_str = limits.max_string_bytes
    max_depth = limits.max_depth
    # Per open container: items left, and whether it is a map (keys at even counts left).
    stack: list[tuple[int, bool]] = []
    left, is_map = 1, False
    while True:
        while left == 0:
            if not stack:
                if pos != n:
                    raise MalformedBatch(f"body has {n - pos} bytes after its document")
                return objects
            left, is_map = stack.pop()
        if pos >= n:
            raise MalformedBatch("body is truncated inside its document")
        is_key = is_map and left % 2 == 0
        left -= 1
        objects += 1
        if objects > budget:
            raise LimitExceeded("max_objects", f"body holds more than {budget} values")
        b = raw[pos]
        if b <= 0x7F or b >= 0xE0:
            kind, length, pos = 0, 0, pos + 1
        elif 0xA0 <= b <= 0xBF:
            kind, length, pos = 1, b & 0x1F, pos + 1
        elif 0x90 <= b <= 0x9F:
            kind, length, pos = 3, b & 0x0F, pos + 1
        elif 0x80 <= b <= 0x8F:
            kind, length, pos = 4, b & 0x0F, pos + 1
        elif b in _FIXED:
            kind, length, pos = 0, 0, pos + _FIXED[b]
        elif b in _LENGTHED:
            kind, width = _LENGTHED[b]
            length = int.from_bytes(raw[pos + 1 : pos + 1 + width], "big")
            pos += 1 + width
        else:
            raise MalformedBatch(f"body holds an unsupported msgpack type 0x{b:02x}")
        if is_key and kind != 1:
            raise MalformedBatch("body holds a map key that is not a string")
        if kind in (1, 2):
            if kind == 1 and length > max_str:
                raise LimitExceeded(
                    "max_string_bytes", f"a string of {length} bytes (limit {max_str})"
                )
            pos += length
        elif kind in (3, 4):
            if length > max_len:
                raise LimitExceeded(
                    "max_container_len", f"a container of {length} entries (limit {max_len})"
                )
            if len(stack) + 1 > max_depth:
                raise LimitExceeded("max_depth", f"body nests deeper than {max_depth}")
            stack.append((left, is_map))
            left, is_map = (length * 2, True) if kind == 4 else (length, False)
        if pos > n:
            raise MalformedBatch("body is truncated inside its document")


def _str_list(obj: Any, what: str) -> list[str]:
    if not isinstance(obj, list) or not all(isinstance(s, str) for s in obj):
        raise MalformedBatch(f"{what}: expected a list of strings")
    return obj


def _codes(obj: Any, count: int, table_len: int, what: str) -> npt.NDArray[np.int64]:
    codes = unpack_ints(obj, count, what)
    if codes.size and (int(codes.min()) < 0 or int(codes.max()) >= table_len):
        raise MalformedBatch(f"{what}: code outside its table")
    return codes


def _decode_doc(doc: Any, limits: DecodeLimits = DEFAULT_LIMITS) -> Batch:
    if not isinstance(doc, dict):
        raise MalformedBatch("body is not a map")
    t = doc["tags"]
    n = t["n"]
    if not isinstance(n, int) or n < 0:
        raise MalformedBatch("tag count out of range")
    if n > limits.max_tags:
        raise LimitExceeded("max_tags", f"{n} tags (limit {limits.max_tags})")
    indices = np.cumsum(unpack_ints(t["idx"], n, "tag indices"))
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
    if len(groups_doc) > limits.max_groups:
        raise LimitExceeded("max_groups", f"{len(groups_doc)} groups (limit {limits.max_groups})")
    events = doc["ev"]
    meta = doc["meta"]
    if not isinstance(events, list) or not all(isinstance(e, dict) for e in events):
        raise MalformedBatch("events are not a list of maps")
    if len(events) > limits.max_events:
        raise LimitExceeded("max_events", f"{len(events)} events (limit {limits.max_events})")
    budget = [min(limits.max_samples, MAX_SAMPLES)]
    groups = [_decode_group(g, table, strings, budget) for g in groups_doc]
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
        raise LimitExceeded("max_samples", "batch declares more sample slots than its limit")
    times = np.cumsum(unpack_ints(t_obj, n_rows, "row times"))
    cols = np.cumsum(unpack_ints(c_obj, n_cols, "group columns"))
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
        first = unpack_ints(d["n0"], k if n_rows else 0, "first values")
        deltas = unpack_ints(d["nd"], k * max(n_rows - 1, 0), "value deltas")
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
                pos = np.cumsum(unpack_ints(sx[0], count, "special positions"))
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
