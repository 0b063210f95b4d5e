"""The Digital Twin Simulator: agrees with the stepped physics, calibrates from the receiver's
data, and screens two winners and their combination before any line runs them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgeos_cloud.fleet.competition import CombinationRefused, combine, screen
from edgeos_cloud.fleet.physics.layout import KEY_TAG_COUNT, build_layout
from edgeos_cloud.fleet.physics.line import LinePhysics
from edgeos_cloud.fleet.twinsim import (
    Candidate,
    TwinParams,
    TwinSimulator,
    calibrate_from_storage,
)
from edgeos_sim.simline import FleetRecorder, SimLine, record_run


def test_twin_tyres_match_the_stepped_line_physics_for_the_same_material() -> None:
    physics = LinePhysics(
        build_layout(20, KEY_TAG_COUNT), seed=2, material_mean=1.0, material_std=0.5
    )
    physics.run(40.0 * 60, dt=0.5)
    stepped = np.array([c.elasticity for c in physics.cycles if c.cycle > 1])
    twin = TwinSimulator(TwinParams(material_mean=1.0, material_std=0.5), nests=20, seed=2)
    run = twin.run(Candidate.default(), 400)
    # Different random batches, same physics: the means agree within the batches' spread.
    assert abs(run.elasticity.mean() - stepped.mean()) < 0.25
    assert run.elasticity.mean() < 6.3  # the default recipe does not suit this rubber


def test_material_parameters_keep_the_default_line_bit_for_bit() -> None:
    layout = build_layout(4, KEY_TAG_COUNT)
    a, b = LinePhysics(layout, seed=9), LinePhysics(layout, seed=9, material_mean=0.0)
    a.run(200.0, dt=0.5)
    b.run(200.0, dt=0.5)
    assert np.array_equal(a.values(), b.values())


def test_calibration_recovers_a_new_rubbers_mooney_offset_from_the_receiver_database(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'receiver.db'}"
    line = SimLine(8, seed=6)
    line.new_rubber(9.0)
    recorder = FleetRecorder(url, tmp_path / "registry", "gw-new-rubber", line.stations)
    try:
        record_run(line, recorder, 1800)
    finally:
        recorder.close()
    params = calibrate_from_storage(url, ["gw-new-rubber"], cycle_s=40.0)
    assert params.rows > 200
    assert params.mooney_offset == pytest.approx(9.0, abs=0.5)
    assert params.rms < 0.2
    truth = [c.batch_property for c in line.physics.cycles]
    assert params.material_mean == pytest.approx(float(np.mean(truth)), abs=0.2)


def test_combination_of_a_temperature_and_a_pressure_winner_is_screened_and_best() -> None:
    twin = TwinSimulator(TwinParams(material_mean=1.5, material_std=0.5), nests=20, seed=3)
    a = Candidate("line-a@2", {"heater.sp": 164.5})
    b = Candidate("line-b@2", {"press.sp": 16.6})
    result = screen(a, b, twin, cycles=150)
    by = {r.candidate: r for r in result.results}
    assert list(by) == ["default", "line-a@2", "line-b@2", "line-a@2+line-b@2"]
    assert result.combined == result.best == "line-a@2+line-b@2"
    both = by["line-a@2+line-b@2"]
    assert both.setpoints == {"heater.sp": 164.5, "press.sp": 16.6}
    for single in (by["line-a@2"], by["line-b@2"]):
        assert single.vs_first > 3 * single.vs_first_se > 0  # each beats the default
        # The paired difference of the combination over each single winner is clear.
        assert both.mean_reward - single.mean_reward > 0.1
    assert both.reject_rate < by["default"].reject_rate


def test_two_profiles_that_set_the_same_set_point_differently_are_not_combined() -> None:
    with pytest.raises(CombinationRefused, match=r"heater\.sp"):
        combine(Candidate("a", {"heater.sp": 164.0}), Candidate("b", {"heater.sp": 166.0}))
    same = combine(Candidate("a", {"heater.sp": 164.0}), Candidate("b", {"heater.sp": 164.0}))
    assert same.setpoints == {"heater.sp": 164.0}
