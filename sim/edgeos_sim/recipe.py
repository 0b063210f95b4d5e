"""The recipe and quality model; the code lives in :mod:`edgeos_cloud.fleet.physics.recipe`.

The cloud's twin simulator runs the same physics and may not import this distribution, so the
pure physics moved there (issue #17); this module keeps the simulator's import path.
"""

from __future__ import annotations

from edgeos_cloud.fleet.physics.recipe import (
    ELASTICITY_MAX,
    ELASTICITY_MIN,
    NOMINAL_CURE_F,
    PRESSURE_TAU_F,
    RESIDUAL_BAR,
    CycleRecord,
    LineState,
    Setpoints,
    default_policy,
    optimal_setpoints,
    quality,
    target_cure_s,
    target_pressure,
    target_temperature,
)

__all__ = [
    "ELASTICITY_MAX",
    "ELASTICITY_MIN",
    "NOMINAL_CURE_F",
    "PRESSURE_TAU_F",
    "RESIDUAL_BAR",
    "CycleRecord",
    "LineState",
    "Setpoints",
    "default_policy",
    "optimal_setpoints",
    "quality",
    "target_cure_s",
    "target_pressure",
    "target_temperature",
]
