"""OPC UA values ↔ edgeos columns: DataValues to ReadResult blocks, written values to Variants."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence, Set
from typing import Any

import numpy as np
from asyncua import ua

from edgeos.driver import Quality, ReadResult, Value
from edgeos.errors import WriteRefused

from .errors import quality_of, status_name

__all__ = ["VARIANT_TYPES", "concat", "decode_datavalues", "to_variant"]

#: The variant type each declared data type is written with.
VARIANT_TYPES: dict[str, ua.VariantType] = {
    "int16": ua.VariantType.Int16,
    "uint16": ua.VariantType.UInt16,
    "int32": ua.VariantType.Int32,
    "uint32": ua.VariantType.UInt32,
    "int64": ua.VariantType.Int64,
    "float32": ua.VariantType.Float,
    "float64": ua.VariantType.Double,
    "bool": ua.VariantType.Boolean,
    "string": ua.VariantType.String,
}

_INT_RANGES: dict[str, tuple[int, int]] = {
    "int16": (-(1 << 15), (1 << 15) - 1),
    "uint16": (0, (1 << 16) - 1),
    "int32": (-(1 << 31), (1 << 31) - 1),
    "uint32": (0, (1 << 32) - 1),
    "int64": (-(1 << 63), (1 << 63) - 1),
}
_FLOAT32_MAX = 3.4028234663852886e38

_NAN = math.nan
_GOOD = int(Quality.GOOD)
_UNCERTAIN = int(Quality.UNCERTAIN)
_BAD_DECODE = int(Quality.BAD_DECODE)
_SEVERITY_MASK = 0xC0000000
_UNCERTAIN_BIT = 0x40000000


def decode_datavalues(
    handles: Sequence[int],
    datavalues: Sequence[ua.DataValue | None],
    string_tags: Set[int],
    received: float,
) -> ReadResult:
    """One columnar block from DataValues; ``handles[i]`` is the twin index of ``datavalues[i]``.

    This runs for every notification (tens of thousands per second), so it is one flat loop
    over plain lists, converted to arrays once at the end.
    """
    n = len(datavalues)
    values = [_NAN] * n
    quality = bytearray(n)
    stamps = [received] * n
    text: dict[int, str] = {}
    reasons: Counter[str] = Counter()
    for i in range(n):
        dv = datavalues[i]
        handle = handles[i]
        if dv is None:
            quality[i] = _BAD_DECODE
            reasons["decode"] += 1
            continue
        status = dv.StatusCode
        code = status.value if status is not None else 0
        if code & _SEVERITY_MASK:
            if not code & 0x80000000 and code & _UNCERTAIN_BIT:
                quality[i] = _UNCERTAIN
            else:
                quality[i] = quality_of(code)
                reasons[status_name(code)] += 1
                stamp = dv.SourceTimestamp or dv.ServerTimestamp
                if stamp is not None:
                    stamps[i] = stamp.timestamp()
                continue
        stamp = dv.SourceTimestamp or dv.ServerTimestamp
        if stamp is not None:
            stamps[i] = stamp.timestamp()
        variant = dv.Value
        value: Any = variant.Value if variant is not None else None
        kind = type(value)
        if handle in string_tags:
            if kind is str:
                text[handle] = value
                continue
            if kind is int or kind is float or kind is bool:
                text[handle] = str(value)
                continue
        elif kind is float or kind is int:
            values[i] = value
            continue
        elif kind is bool:
            values[i] = 1.0 if value else 0.0
            continue
        quality[i] = _BAD_DECODE
        reasons["null_value" if value is None else "decode"] += 1
    return ReadResult(
        np.asarray(handles, dtype=np.int32),
        np.asarray(values, dtype=np.float64),
        np.frombuffer(bytes(quality), dtype=np.uint8).copy(),
        np.asarray(stamps, dtype=np.float64),
        text,
        reasons,
    )


def to_variant(tag_name: str, dtype: str, value: Value) -> ua.Variant:
    """The Variant a checked value is written as; refuses values the type cannot hold."""
    vtype = VARIANT_TYPES[dtype]
    if dtype == "string":
        return ua.Variant(str(value), vtype)
    if dtype == "bool":
        return ua.Variant(bool(value), vtype)
    if isinstance(value, str):
        raise WriteRefused(tag_name, f"expected a number, got {value!r}")
    number = float(value)
    if dtype in _INT_RANGES:
        low, high = _INT_RANGES[dtype]
        integer = round(number)
        if not low <= integer <= high:
            raise WriteRefused(tag_name, f"value {integer} does not fit {dtype} [{low}, {high}]")
        return ua.Variant(integer, vtype)
    if dtype == "float32" and abs(number) > _FLOAT32_MAX:
        raise WriteRefused(tag_name, f"value {number:g} does not fit float32")
    return ua.Variant(number, vtype)


def concat(parts: list[ReadResult]) -> ReadResult:
    """One block of several (the parts of a scan read in chunks)."""
    if not parts:
        return ReadResult.empty()
    if len(parts) == 1:
        return parts[0]
    text: dict[int, str] = {}
    reasons: Counter[str] = Counter()
    for part in parts:
        text.update(part.text)
        reasons.update(part.bad_reasons)
    return ReadResult(
        np.concatenate([p.indices for p in parts]),
        np.concatenate([p.values for p in parts]),
        np.concatenate([p.quality for p in parts]),
        np.concatenate([p.source_ts for p in parts]),
        text,
        reasons,
    )
