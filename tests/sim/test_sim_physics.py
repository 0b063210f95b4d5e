"""Physics of the curing presses: determinism, dynamics, set-point writes, quality."""

from __future__ import annotations

import numpy as np
import pytest

from edgeos_cloud.fleet.physics.layout import Alarm, CycleState, build_layout
from edgeos_cloud.fleet.physics.line import LinePhysics
from edgeos_cloud.fleet.physics.recipe import (
    ELASTICITY_MIN,
    default_policy,
    optimal_setpoints,
    quality,
)


def _line(nests: int = 4, **kw: float) -> LinePhysics:
    return LinePhysics(build_layout(nests, 40), cycle_s=kw.pop("cycle_s", 4.0), **kw)  # type: ignore[arg-type]


def test_same_seed_same_line_other_seed_other_line() -> None:
    a, b, c = _line(seed=7), _line(seed=7), _line(seed=8)
    for line in (a, b, c):
        line.run(30.0)
    assert np.array_equal(a.values(), b.values())
    assert not np.array_equal(a.values(), c.values())
    assert [r.elasticity for r in a.cycles] == [r.elasticity for r in b.cycles]


def test_platen_temperature_follows_its_setpoint() -> None:
    line = _line(noise=0.0, cycle_s=40.0)
    layout = line.layout
    sp, pv = layout.index("nest01.heater.sp"), layout.index("nest01.heater.pv")
    line.write(sp, 185.0)
    line.run(2.0)
    early = line.values()[pv]
    line.run(60.0)
    late = line.values()[pv]
    assert 160.0 < early < late
    assert late == pytest.approx(185.0, abs=1.0)
    # The other nests kept the plant recipe.
    assert line.values()[layout.index("nest02.heater.pv")] == pytest.approx(160.0, abs=1.0)


def test_pressure_setpoint_write_changes_the_cure_pressure() -> None:
    line = _line(noise=0.0)
    line.write(line.layout.index("nest02.press.sp"), 25.0)
    peak = np.zeros(line.n)
    for _ in range(200):
        line.step(0.1)
        curing = line.state == CycleState.CURE
        peak = np.where(curing, np.maximum(peak, line.press_pv), peak)
    assert peak[1] == pytest.approx(25.0, abs=0.5)
    assert peak[0] == pytest.approx(15.0, abs=0.5)


def test_writes_are_refused_outside_limits_and_on_measurements() -> None:
    line = _line()
    with pytest.raises(ValueError, match="outside"):
        line.write(line.layout.index("nest01.heater.sp"), 250.0)
    with pytest.raises(KeyError):
        line.write(line.layout.index("nest01.heater.pv"), 150.0)


def test_cycles_complete_and_count_tyres() -> None:
    line = _line()
    line.run(40.0)  # ~10 cycles of 4 s
    values = line.values()
    tyres = values[[line.layout.index(f"nest0{n}.tyres.produced") for n in range(1, 5)]]
    assert (tyres >= 7).all()
    states = {r.nest for r in line.cycles}
    assert states == {1, 2, 3, 4}


def test_quality_peaks_at_the_batch_optimum_and_moves_with_the_batch() -> None:
    cs = 40.0
    best = quality(162.0, 15.5, cs * 0.6 * 1.04, batch_property=0.0, freshness=0.0, cycle_s=cs)
    for off in ((10, 0, 0), (0, 3, 0), (0, 0, 3)):
        worse = quality(
            162.0 + off[0],
            15.5 + off[1],
            cs * 0.6 * 1.04 + off[2],
            batch_property=0.0,
            freshness=0.0,
            cycle_s=cs,
        )
        assert worse < best
    # Same recipe, different raw material: a different tyre.
    other = quality(162.0, 15.5, cs * 0.6 * 1.04, batch_property=1.5, freshness=0.0, cycle_s=cs)
    assert other < best
    # A fresh batch wants a hotter start.
    fresh_cold = quality(162.0, 15.5, 25.0, batch_property=0.0, freshness=1.0, cycle_s=cs)
    fresh_hot = quality(168.0, 15.5, 25.0, batch_property=0.0, freshness=1.0, cycle_s=cs)
    assert fresh_hot > fresh_cold


def test_optimal_policy_beats_the_plant_recipe() -> None:
    results = {}
    for policy in (default_policy, optimal_setpoints):
        line = _line(nests=6, seed=3, batch_cycles=4.0)
        for k in range(1500):
            if k % 5 == 0:
                line.set_setpoints(policy(line.line_state()))
            line.step(0.1)
        e = np.array([r.elasticity for r in line.cycles])
        results[policy.__name__] = (e.mean(), np.mean(e < ELASTICITY_MIN), len(e))
    assert results["optimal_setpoints"][0] > results["default_policy"][0] + 0.2
    assert results["optimal_setpoints"][1] < results["default_policy"][1]
    assert {r.batch_id for r in line.cycles} > {1}  # several raw-material batches were used


def test_a_pressure_leak_shows_in_quality_and_alarms() -> None:
    line = _line(seed=1)
    line.set_setpoints(optimal_setpoints(line.line_state()))
    line.inject_defect(2, "pressure_leak", 0.4)
    alarms = 0
    for k in range(400):
        if k % 5 == 0:
            line.set_setpoints(optimal_setpoints(line.line_state()))
        line.step(0.1)
        alarms |= int(line.values()[line.layout.index("nest02.alarm.bits")])
    leaky = [r.elasticity for r in line.cycles if r.nest == 2]
    healthy = [r.elasticity for r in line.cycles if r.nest != 2]
    assert max(leaky) < ELASTICITY_MIN < min(healthy)
    assert alarms & Alarm.PRESSURE_LOW
    line.clear_defects()
    assert line.leak.sum() == 0.0


def test_batch_changes_are_visible_in_mooney_and_batch_id() -> None:
    line = _line(seed=5, batch_cycles=2.0)
    line.run(60.0)
    records = list(line.cycles)
    assert len({r.batch_id for r in records}) >= 3
    p = np.array([r.batch_property for r in records])
    mooney = np.array([r.mooney for r in records])
    assert np.corrcoef(p, mooney)[0, 1] > 0.9
