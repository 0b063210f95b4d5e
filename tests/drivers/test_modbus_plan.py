"""Planning (coalescing) and the numpy codec, without a network."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drivers.modbus import ModbusAddress
from drivers.modbus.plan import build_plans, byte_permutation, decode_scan, encode_value
from edgeos.config import TagConfig
from edgeos.driver import Quality, TagBinding
from edgeos.errors import WriteRefused


def _tag(i: int, **modbus: Any) -> TagBinding:
    extra: dict[str, Any] = {}
    if modbus.get("type", "uint16") in ("float32", "float64"):
        extra["resolution"] = 0.001
    group = modbus.pop("group", "default")
    return TagBinding(
        i, TagConfig(name=f"t{i}", connection="c", scan_group=group, modbus=modbus, **extra)
    )


def _plan(bindings: list[TagBinding], **kw: int) -> Any:
    limits = {"max_gap": 8, "max_registers": 125, "max_coils": 2000} | kw
    return build_plans(bindings, **limits)


def _spans(plan: Any) -> list[tuple[int, str, int, int]]:
    return [(r.unit, r.table, r.start, r.count) for r in plan.requests]


def test_contiguous_tags_make_one_request() -> None:
    tags = [_tag(i, address=10 + i) for i in range(50)]
    assert _spans(_plan(tags)["default"]) == [(1, "holding", 10, 50)]


def test_gap_up_to_max_gap_is_bridged() -> None:
    # 0..1 (int32), gap of 8 registers (2..9), then 10: one request; gap of 9: two.
    merged = _plan([_tag(0, address=0, type="int32"), _tag(1, address=10)])["default"]
    assert _spans(merged) == [(1, "holding", 0, 11)]
    split = _plan([_tag(0, address=0, type="int32"), _tag(1, address=11)])["default"]
    assert _spans(split) == [(1, "holding", 0, 2), (1, "holding", 11, 1)]
    none = _plan([_tag(0, address=0), _tag(1, address=2)], max_gap=0)["default"]
    assert len(none.requests) == 2


def test_register_limit_125_and_multi_register_values_not_split() -> None:
    tags = [_tag(i, address=i) for i in range(300)]
    assert [r.count for r in _plan(tags)["default"].requests] == [125, 125, 50]
    # float64 tags (4 registers): 31 fit in 124 registers; the 32nd would cross 125.
    floats = [_tag(i, address=4 * i, type="float64") for i in range(40)]
    counts = [r.count for r in _plan(floats)["default"].requests]
    assert counts == [124, 36]
    assert all(c <= 125 for c in counts)


def test_coil_limit_2000() -> None:
    tags = [_tag(i, address=i, table="coil", type="bool") for i in range(2500)]
    assert [r.count for r in _plan(tags)["default"].requests] == [2000, 500]
    assert [r.count for r in _plan(tags, max_coils=1000)["default"].requests] == [1000] * 2 + [500]


def test_units_tables_and_scan_groups_are_planned_apart() -> None:
    tags = [
        _tag(0, address=0, unit=1),
        _tag(1, address=1, unit=2),
        _tag(2, address=2, table="input"),
        _tag(3, address=3, group="fast"),
    ]
    plans = _plan(tags)
    assert sorted(_spans(plans["default"])) == [
        (1, "holding", 0, 1),
        (1, "input", 2, 1),
        (2, "holding", 1, 1),
    ]
    assert _spans(plans["fast"]) == [(1, "holding", 3, 1)]


def test_tag_longer_than_the_limit_gets_its_own_request() -> None:
    tags = [_tag(0, address=0, type="string", length=20), _tag(1, address=20)]
    assert _spans(_plan(tags, max_registers=10)["default"]) == [
        (1, "holding", 0, 20),
        (1, "holding", 20, 1),
    ]


def test_byte_permutations_match_modbus_conventions() -> None:
    assert byte_permutation(2, "big", "big").tolist() == [0, 1, 2, 3]  # ABCD
    assert byte_permutation(2, "big", "little").tolist() == [2, 3, 0, 1]  # CDAB
    assert byte_permutation(2, "little", "big").tolist() == [1, 0, 3, 2]  # BADC
    assert byte_permutation(2, "little", "little").tolist() == [3, 2, 1, 0]  # DCBA


# Known register images of 3.14 as float32 and 0x01020304 as int32, per order.
_VECTORS = [
    ("float32", "big", "big", 3.14, [0x4048, 0xF5C3]),
    ("float32", "big", "little", 3.14, [0xF5C3, 0x4048]),
    ("float32", "little", "big", 3.14, [0x4840, 0xC3F5]),
    ("float32", "little", "little", 3.14, [0xC3F5, 0x4840]),
    ("int32", "big", "big", 0x01020304, [0x0102, 0x0304]),
    ("int32", "big", "little", 0x01020304, [0x0304, 0x0102]),
    ("int16", "little", "big", 0x0102, [0x0201]),
    ("int16", "big", "big", -2, [0xFFFE]),
    ("uint32", "big", "big", 0xFFFFFFFE, [0xFFFF, 0xFFFE]),
    ("int64", "big", "little", -2, [0xFFFE, 0xFFFF, 0xFFFF, 0xFFFF]),
]


def _decode_one(addr_kw: dict[str, Any], registers: list[int]) -> tuple[float, int, dict[int, str]]:
    binding = _tag(7, address=0, **addr_kw)
    plan = build_plans([binding], max_gap=8, max_registers=125, max_coils=2000)["default"]
    regs = np.zeros(plan.register_words, np.uint16)
    regs[: len(registers)] = registers
    res = decode_scan(
        plan,
        registers=regs,
        bits=np.zeros(plan.bit_count, np.uint8),
        request_quality=np.zeros(1, np.uint8),
        request_ts=np.ones(1),
        request_reason=[None],
    )
    return float(res.values[0]), int(res.quality[0]), res.text


@pytest.mark.parametrize(("dtype", "bo", "wo", "value", "regs"), _VECTORS)
def test_known_register_images(dtype: str, bo: str, wo: str, value: float, regs: list[int]) -> None:
    kw = {"type": dtype, "byte_order": bo, "word_order": wo}
    assert encode_value("t", ModbusAddress(address=0, **kw), value) == regs
    decoded, quality, _ = _decode_one(kw, regs)
    assert quality == Quality.GOOD
    assert decoded == pytest.approx(value, rel=1e-6)


_ORDERS = st.sampled_from(["big", "little"])
_RANGES = {
    "int16": (-(2**15), 2**15 - 1),
    "uint16": (0, 2**16 - 1),
    "int32": (-(2**31), 2**31 - 1),
    "uint32": (0, 2**32 - 1),
    "int64": (-(2**53), 2**53),  # exact in float64
}


@settings(max_examples=300, deadline=None)
@given(
    dtype=st.sampled_from(sorted(_RANGES)),
    bo=_ORDERS,
    wo=_ORDERS,
    data=st.data(),
    scale=st.sampled_from([1.0, 0.1, 2.5, -0.5]),
    offset=st.sampled_from([0.0, -40.0, 1000.0]),
)
def test_integer_round_trip(
    dtype: str, bo: str, wo: str, data: st.DataObject, scale: float, offset: float
) -> None:
    lo, hi = _RANGES[dtype]
    raw = data.draw(st.integers(lo, hi))
    value = raw * scale + offset
    kw = {"type": dtype, "byte_order": bo, "word_order": wo, "scale": scale, "offset": offset}
    regs = encode_value("t", ModbusAddress(address=0, **kw), value)
    decoded, quality, _ = _decode_one(kw, regs)
    assert quality == Quality.GOOD
    assert decoded == pytest.approx(value, rel=1e-9, abs=1e-9)


@settings(max_examples=200, deadline=None)
@given(
    dtype=st.sampled_from(["float32", "float64"]),
    bo=_ORDERS,
    wo=_ORDERS,
    value=st.floats(-(2.0**100), 2.0**100, allow_nan=False, width=32),
    scale=st.sampled_from([1.0, 0.01]),
)
def test_float_round_trip(dtype: str, bo: str, wo: str, value: float, scale: float) -> None:
    kw = {"type": dtype, "byte_order": bo, "word_order": wo, "scale": scale}
    regs = encode_value("t", ModbusAddress(address=0, **kw), value)
    decoded, quality, _ = _decode_one(kw, regs)
    assert quality == Quality.GOOD
    assert decoded == pytest.approx(value, rel=1e-6)


@pytest.mark.parametrize("bo", ["big", "little"])
def test_string_and_bool_round_trip(bo: str) -> None:
    kw = {"type": "string", "length": 4, "byte_order": bo}
    regs = encode_value("t", ModbusAddress(address=0, **kw), "Line7")
    _, quality, text = _decode_one(kw, regs)
    assert quality == Quality.GOOD and text == {7: "Line7"}
    bool_regs = encode_value("t", ModbusAddress(address=0, type="bool"), True)
    assert bool_regs == [1]
    assert _decode_one({"type": "bool"}, [5])[0] == 1.0


def test_nan_and_inf_are_bad_decode() -> None:
    for regs in ([0x7FC0, 0x0000], [0x7F80, 0x0000], [0xFF80, 0x0000]):
        value, quality, _ = _decode_one({"type": "float32"}, regs)
        assert quality == Quality.BAD_DECODE and math.isnan(value)


def test_undecodable_string_is_bad_decode() -> None:
    _, quality, text = _decode_one({"type": "string", "length": 1}, [0xFFFE])
    assert quality == Quality.BAD_DECODE and text == {}


def test_encode_refuses_values_the_type_cannot_hold() -> None:
    with pytest.raises(WriteRefused, match="does not fit int16"):
        encode_value("t", ModbusAddress(address=0, type="int16"), 40000)
    with pytest.raises(WriteRefused, match="does not fit uint16"):
        encode_value("t", ModbusAddress(address=0, type="uint16", scale=0.1), -0.5)
    with pytest.raises(WriteRefused, match="does not fit 2 registers"):
        encode_value("t", ModbusAddress(address=0, type="string", length=2), "toolong")
    with pytest.raises(WriteRefused, match="overflows float32"):
        encode_value("t", ModbusAddress(address=0, type="float32"), 1e39)
