"""Read planning and vectorised decoding/encoding of Modbus registers.

Planning happens once, at construction: per scan group and per (unit, table) the tags are
sorted by address and merged into the fewest requests the limits allow. Every register
response of one scan lands in one flat ``uint16`` buffer (and every bit response in one
``uint8`` buffer) at an offset fixed by the plan, so a whole scan decodes with one fancy-index
gather per (type, byte order, word order) group — no Python loop over tags except for strings.

Byte and word order are folded into the gather: for each tag the plan stores which wire bytes
form its value in big-endian order, so ``wire[byte_index].view(">i4")`` is the decoded column.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import numpy.typing as npt

from edgeos.driver import Quality, ReadResult, TagBinding, Value
from edgeos.errors import WriteRefused

from .address import AnyModbus, ModbusAddress, ModbusRef

__all__ = [
    "ReadRequest",
    "ScanPlan",
    "build_plans",
    "byte_permutation",
    "decode_scan",
    "encode_value",
]

Table = Literal["holding", "input", "coil", "discrete"]
BIT_TABLES: frozenset[str] = frozenset({"coil", "discrete"})

#: numpy type code of each register type (big-endian after the byte permutation).
_NUMPY: dict[str, str] = {
    "int16": ">i2",
    "uint16": ">u2",
    "int32": ">i4",
    "uint32": ">u4",
    "int64": ">i8",
    "float32": ">f4",
    "float64": ">f8",
    "bool": ">u2",
}
_INT_RANGE: dict[str, tuple[int, int]] = {
    "int16": (-(1 << 15), (1 << 15) - 1),
    "uint16": (0, (1 << 16) - 1),
    "int32": (-(1 << 31), (1 << 31) - 1),
    "uint32": (0, (1 << 32) - 1),
    "int64": (-(1 << 63), (1 << 63) - 1),
}
_FLOAT32_MAX = float(np.finfo(np.float32).max)
_GOOD = np.uint8(Quality.GOOD)
_BAD_DECODE = np.uint8(Quality.BAD_DECODE)


def byte_permutation(n_regs: int, byte_order: str, word_order: str) -> npt.NDArray[np.intp]:
    """Wire-byte index of each byte of the big-endian value.

    ``perm[j]`` is where, among the ``2 * n_regs`` bytes on the wire, the ``j``-th most
    significant byte of the value sits: ABCD (big/big) is ``[0, 1, 2, 3]``, CDAB (word order
    little) ``[2, 3, 0, 1]``, BADC (byte order little) ``[1, 0, 3, 2]``.
    """
    regs = np.arange(n_regs, dtype=np.intp)
    if word_order == "little":
        regs = regs[::-1]
    within = np.array([0, 1] if byte_order == "big" else [1, 0], dtype=np.intp)
    perm: npt.NDArray[np.intp] = (regs[:, None] * 2 + within[None, :]).reshape(-1)
    return perm


@dataclass(frozen=True, slots=True)
class ReadRequest:
    """One read request of a scan and where its answer goes in the scan buffers."""

    unit: int
    table: Table
    start: int
    #: Registers (register tables) or bits (bit tables).
    count: int
    #: Offset of the answer in the scan's register or bit buffer.
    buffer_offset: int
    #: Number of tags the answer feeds (for bad-reason counts).
    n_tags: int

    @property
    def is_bits(self) -> bool:
        return self.table in BIT_TABLES


@dataclass(frozen=True, slots=True)
class _Group:
    """Tags of one scan decoded together: same kind and numpy type."""

    kind: Literal["number", "bool_register", "bit", "string"]
    out_start: int
    out_end: int
    #: number/bool_register: (k, nbytes) indices into the wire bytes; bit: (k,) indices.
    index: npt.NDArray[np.intp]
    #: string: one row of wire-byte indices per tag (lengths differ).
    rows: tuple[npt.NDArray[np.intp], ...] = ()
    dtype: str = ">u2"
    scale: npt.NDArray[np.float64] | float = 1.0
    offset: npt.NDArray[np.float64] | float = 0.0
    is_float: bool = False


@dataclass(slots=True)
class ScanPlan:
    """Everything needed to read and decode one scan group, fixed at construction."""

    requests: list[ReadRequest]
    groups: list[_Group]
    #: Twin column of each output position.
    indices: npt.NDArray[np.int32]
    #: Request feeding each output position.
    tag_request: npt.NDArray[np.intp]
    register_words: int
    bit_count: int
    #: Output positions of each request, for per-request diagnostics.
    request_tags: list[npt.NDArray[np.intp]] = field(default_factory=list)


@dataclass(slots=True)
class _Item:
    binding: TagBinding
    address: AnyModbus


def _coalesce(
    items: Sequence[_Item], *, limit: int, max_gap: int
) -> list[tuple[int, int, list[_Item]]]:
    """Greedy merge of address-sorted tags into (start, count, tags) requests.

    Greedy is optimal here: with tags sorted by start, closing a block as late as the limits
    allow never forces more blocks later.
    """
    blocks: list[tuple[int, int, list[_Item]]] = []
    start = end = -1
    members: list[_Item] = []
    for item in sorted(items, key=lambda i: (i.address.address, i.address.register_count)):
        a = item.address.address
        e = a + item.address.register_count
        if members and a - end <= max_gap and max(end, e) - start <= limit:
            end = max(end, e)
            members.append(item)
            continue
        if members:
            blocks.append((start, end - start, members))
        start, end, members = a, e, [item]
    if members:
        blocks.append((start, end - start, members))
    return blocks


def build_plans(
    bindings: Sequence[TagBinding], *, max_gap: int, max_registers: int, max_coils: int
) -> dict[str, ScanPlan]:
    """Plan every scan group of ``bindings`` (tags without a Modbus address are ignored).

    A single tag longer than ``max_registers`` (a long string) gets a request of its own.
    """
    by_group: dict[str, dict[tuple[int, str], list[_Item]]] = {}
    for b in bindings:
        addr = b.tag.address
        if not isinstance(addr, ModbusRef | ModbusAddress):
            continue
        key = (addr.unit, addr.table)
        by_group.setdefault(b.tag.scan_group, {}).setdefault(key, []).append(_Item(b, addr))
    return {
        group: _plan_group(keyed, max_gap=max_gap, max_registers=max_registers, max_coils=max_coils)
        for group, keyed in by_group.items()
    }


def _plan_group(
    keyed: dict[tuple[int, str], list[_Item]], *, max_gap: int, max_registers: int, max_coils: int
) -> ScanPlan:
    requests: list[ReadRequest] = []
    # (request id, byte/bit base, item) of every tag, later split into decode groups.
    placed: list[tuple[int, int, _Item]] = []
    words = bits = 0
    for (unit, table), items in sorted(keyed.items()):
        is_bits = table in BIT_TABLES
        limit = max_coils if is_bits else max_registers
        for start, count, members in _coalesce(items, limit=limit, max_gap=max_gap):
            rid = len(requests)
            base = bits if is_bits else words
            requests.append(
                ReadRequest(unit, table, start, count, base, len(members))  # type: ignore[arg-type]
            )
            for item in members:
                placed.append((rid, base + item.address.address - start, item))
            if is_bits:
                bits += count
            else:
                words += count

    # Decode groups: one per (kind, numpy type); order and scale are per-tag arrays.
    buckets: dict[tuple[str, str], list[tuple[int, int, _Item]]] = {}
    for entry in placed:
        addr = entry[2].address
        if addr.table in BIT_TABLES:
            key = ("bit", "")
        elif addr.type == "string":
            key = ("string", "")
        elif addr.type == "bool":
            key = ("bool_register", ">u2")
        else:
            key = ("number", _NUMPY[addr.type])
        buckets.setdefault(key, []).append(entry)

    groups: list[_Group] = []
    indices: list[int] = []
    tag_request: list[int] = []
    pos = 0
    for (kind, dtype), entries in sorted(buckets.items()):
        k = len(entries)
        indices.extend(e[2].binding.index for e in entries)
        tag_request.extend(e[0] for e in entries)
        if kind == "bit":
            index = np.array([e[1] for e in entries], dtype=np.intp)
            groups.append(_Group("bit", pos, pos + k, index))
        elif kind == "string":
            # Rows differ in length, so strings keep a list-like object array of index rows.
            # Word order does not apply to text: characters run through the registers in order.
            rows = tuple(
                e[1] * 2
                + byte_permutation(e[2].address.register_count, e[2].address.byte_order, "big")
                for e in entries
            )
            groups.append(_Group("string", pos, pos + k, np.empty(0, np.intp), rows=rows))
        else:
            n_regs = np.dtype(dtype).itemsize // 2
            index = np.stack(
                [
                    e[1] * 2
                    + byte_permutation(n_regs, e[2].address.byte_order, e[2].address.word_order)
                    for e in entries
                ]
            )
            scale = np.array([e[2].address.scale for e in entries], dtype=np.float64)
            offset = np.array([e[2].address.offset for e in entries], dtype=np.float64)
            groups.append(
                _Group(
                    kind,  # type: ignore[arg-type]
                    pos,
                    pos + k,
                    index,
                    dtype=dtype,
                    # Uniform scale/offset become scalars: cheaper than a per-tag multiply.
                    scale=_squeeze(scale, 1.0) if kind == "number" else 1.0,
                    offset=_squeeze(offset, 0.0) if kind == "number" else 0.0,
                    is_float=dtype.startswith(">f"),
                )
            )
        pos += k

    tag_req = np.array(tag_request, dtype=np.intp)
    request_tags = [np.flatnonzero(tag_req == r) for r in range(len(requests))]
    return ScanPlan(
        requests=requests,
        groups=groups,
        indices=np.array(indices, dtype=np.int32),
        tag_request=tag_req,
        register_words=words,
        bit_count=bits,
        request_tags=request_tags,
    )


def _squeeze(values: npt.NDArray[np.float64], neutral: float) -> npt.NDArray[np.float64] | float:
    if values.size and np.all(values == values[0]):
        return float(values[0])
    return values if values.size else neutral


def decode_scan(
    plan: ScanPlan,
    *,
    registers: npt.NDArray[np.uint16],
    bits: npt.NDArray[np.uint8],
    request_quality: npt.NDArray[np.uint8],
    request_ts: npt.NDArray[np.float64],
    request_reason: Sequence[str | None],
) -> ReadResult:
    """Turn the filled scan buffers into a :class:`ReadResult`.

    ``request_quality`` holds ``Quality.GOOD`` or the bad quality of each request (its tags take
    it); ``request_reason`` the reason counted for a bad request's tags.
    """
    n = int(plan.indices.shape[0])
    values = np.empty(n, dtype=np.float64)
    quality = request_quality[plan.tag_request]
    text: dict[int, str] = {}
    reasons: Counter[str] = Counter()
    # The wire bytes: each register big-endian, as the device sent them.
    wire = registers.astype(">u2").view(np.uint8)
    for g in plan.groups:
        out = values[g.out_start : g.out_end]
        if g.kind == "bit":
            out[:] = bits[g.index]
        elif g.kind == "bool_register":
            out[:] = wire[g.index].view(g.dtype).reshape(-1) != 0
        elif g.kind == "number":
            raw = wire[g.index].view(g.dtype).reshape(-1)
            np.multiply(raw, g.scale, out=out)
            out += g.offset
            if g.is_float:
                bad = ~np.isfinite(out)
                if bad.any():
                    q = quality[g.out_start : g.out_end]
                    newly = bad & (q == _GOOD)
                    q[newly] = _BAD_DECODE
                    reasons["decode"] += int(newly.sum())
        else:
            out[:] = math.nan
            q = quality[g.out_start : g.out_end]
            for i in range(g.out_end - g.out_start):
                if q[i] != _GOOD:
                    continue
                decoded = _decode_string(wire[g.rows[i]].tobytes())
                if decoded is None:
                    q[i] = _BAD_DECODE
                    reasons["decode"] += 1
                else:
                    text[int(plan.indices[g.out_start + i])] = decoded
    bad_requests = np.flatnonzero(request_quality != _GOOD)
    for r in bad_requests:
        reason = request_reason[int(r)]
        if reason:
            reasons[reason] += plan.requests[int(r)].n_tags
    if bad_requests.size or reasons:
        values[quality != _GOOD] = np.nan
    return ReadResult(
        indices=plan.indices,
        values=values,
        quality=quality,
        source_ts=request_ts[plan.tag_request],
        text=text,
        bad_reasons=reasons,
    )


def _decode_string(raw: bytes) -> str | None:
    """Device strings are NUL- or space-padded; undecodable bytes make the tag bad."""
    raw = raw.split(b"\0", 1)[0].rstrip(b" ")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def encode_value(tag_name: str, address: AnyModbus, value: Value) -> list[int]:
    """Registers to write for ``value`` (the inverse of decoding: offset, scale, orders).

    Raises :class:`WriteRefused` when the raw value does not fit the register type or a string
    is longer than the tag, so nothing out of range reaches the wire.
    """
    n_regs = address.register_count
    if address.type == "string":
        if not isinstance(value, str):
            raise WriteRefused(tag_name, f"expected a string, got {type(value).__name__}")
        data = value.encode("utf-8")
        if len(data) > 2 * n_regs:
            raise WriteRefused(
                tag_name, f"string of {len(data)} bytes does not fit {n_regs} registers"
            )
        big = data.ljust(2 * n_regs, b"\0")
        perm = byte_permutation(n_regs, address.byte_order, "big")
    elif address.type == "bool":
        big = (1 if value else 0).to_bytes(2, "big")
        perm = byte_permutation(1, address.byte_order, address.word_order)
    else:
        if isinstance(value, str):
            raise WriteRefused(tag_name, f"expected a number, got {value!r}")
        raw = (float(value) - address.offset) / address.scale
        dtype = np.dtype(_NUMPY[address.type])
        if address.type in _INT_RANGE:
            lo, hi = _INT_RANGE[address.type]
            if not math.isfinite(raw):
                raise WriteRefused(tag_name, f"raw value {raw!r} is not finite")
            rounded = round(raw)
            if not lo <= rounded <= hi:
                raise WriteRefused(
                    tag_name, f"raw value {rounded} does not fit {address.type} [{lo}, {hi}]"
                )
            big = np.array([rounded], dtype=dtype).tobytes()
        else:
            if address.type == "float32" and math.isfinite(raw) and abs(raw) > _FLOAT32_MAX:
                raise WriteRefused(tag_name, f"raw value {raw:g} overflows float32")
            big = np.array([raw], dtype=dtype).tobytes()
        perm = byte_permutation(n_regs, address.byte_order, address.word_order)
    wire = bytearray(2 * n_regs)
    for j, src in enumerate(perm):
        wire[int(src)] = big[j]
    return [int.from_bytes(wire[i : i + 2], "big") for i in range(0, len(wire), 2)]
