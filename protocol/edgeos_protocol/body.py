"""The batch body codec: columnar msgpack, then zstd (wire format v1, ``docs/wire-format.md``).

:func:`encode_body` quantizes, delta-codes and compresses a :class:`~.batch.Batch`;
:func:`decode_body` refuses anything inconsistent with :class:`MalformedBatch` and bounds what
it decompresses and allocates (:data:`MAX_BODY_BYTES`, :data:`MAX_SAMPLES`).
"""

from __future__ import annotations

import io
from typing import Any

import msgpack  # type: ignore[import-untyped, unused-ignore]
import numpy as np
import numpy.typing as npt
import zstandard

from edgeos_protocol.batch import Batch, Group, TagTable, ValueKind
from edgeos_protocol.columns import delta, pack_ints, unpack_ints
from edgeos_protocol.errors import MalformedBatch
from edgeos_protocol.quality import Quality

__all__ = ["MAX_BODY_BYTES", "MAX_SAMPLES", "decode_body", "encode_body"]

#: Largest decompressed body accepted (zstd bomb protection).
MAX_BODY_BYTES = 64 << 20
#: Most samples (rows × columns over all groups) one batch may declare.
MAX_SAMPLES = 4_000_000
_USABLE_BELOW = int(Quality.BAD)
# Quantized integers stay exactly representable as float64; larger ones travel as specials.
_MAX_Q = float(1 << 53)


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
    codes = unpack_ints(obj, count, what)
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
