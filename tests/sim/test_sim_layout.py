"""The register map: one register per tag, contiguous, and few requests for a whole line."""

from __future__ import annotations

import numpy as np
import pytest

from edgeos_cloud.fleet.physics.layout import KEY_TAG_COUNT, MAX_REGISTERS_PER_REQUEST, build_layout


def test_flat_layout_of_a_full_line_is_contiguous_on_one_unit() -> None:
    layout = build_layout(80, 200, "flat")
    assert layout.size == 16_000
    assert [t.modbus_address for t in layout.tags] == list(range(16_000))
    assert {t.modbus_unit for t in layout.tags} == {1}
    assert {t.modbus_type for t in layout.tags} <= {"int16", "uint16"}
    assert layout.tags[0].name == "nest01.heater.sp"
    assert layout.tags[200].name == "nest02.heater.sp"
    assert layout.tag("nest80.heater.pv").modbus_address == 79 * 200 + 1
    assert layout.tag("nest03.press.sp").node_id == "ns=2;s=Line/nest03/press.sp"
    assert len({t.name for t in layout.tags}) == 16_000
    assert len({t.node_id for t in layout.tags}) == 16_000


def test_a_full_line_is_read_in_at_most_130_requests() -> None:
    requests = build_layout(80, 200, "flat").requests()
    assert len(requests) <= 130
    assert all(count <= MAX_REGISTERS_PER_REQUEST for _, _, count in requests)
    assert sum(count for _, _, count in requests) == 16_000


def test_unit_per_nest_layout_gives_each_nest_its_own_unit() -> None:
    layout = build_layout(5, 30, "unit-per-nest")
    tag = layout.tag("nest04.press.pv")
    assert (tag.modbus_unit, tag.modbus_address) == (4, layout.slot("press.pv"))
    assert layout.units == (1, 2, 3, 4, 5)
    assert layout.tag_at(4, tag.modbus_address) == tag.index
    with pytest.raises(KeyError):
        layout.tag_at(6, 0)


def test_only_the_three_setpoints_are_writable_and_have_limits() -> None:
    layout = build_layout(2, 40)
    writable = [t.local_name for t in layout.tags if t.writable and t.nest == 1]
    assert writable == ["heater.sp", "press.sp", "cure.sp"]
    assert all(t.limits is not None and t.max_rate is not None for t in layout.tags if t.writable)
    assert sum(t.key for t in layout.tags if t.nest == 1) == KEY_TAG_COUNT


def test_encoding_quantizes_saturates_and_wraps_counters() -> None:
    layout = build_layout(1, 20)
    values = np.zeros(layout.size)
    values[layout.slot("heater.pv")] = -12.34  # int16 ×0.1
    values[layout.slot("cycle.count")] = 65_537  # 16-bit counter wraps
    values[layout.slot("heater.out")] = 1e9  # uint16 saturates, never wraps
    regs = layout.encode(values)
    assert regs[layout.slot("heater.pv")] == (-123) & 0xFFFF
    decoded = layout.decode(regs)
    assert decoded[layout.slot("heater.pv")] == pytest.approx(-12.3)
    assert decoded[layout.slot("cycle.count")] == 1
    assert decoded[layout.slot("heater.out")] == pytest.approx(6553.5)


def test_layout_rejects_lines_that_do_not_fit() -> None:
    with pytest.raises(ValueError, match="65,536"):
        build_layout(400, 200, "flat")
    with pytest.raises(ValueError, match="at least"):
        build_layout(2, 10)
