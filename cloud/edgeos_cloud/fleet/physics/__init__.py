"""The physics of a tyre-curing line, pure numpy: tag layout, recipe/quality model, presses.

It lives in the cloud because the cloud's twin simulator (:mod:`edgeos_cloud.fleet.twinsim`)
runs it, and the cloud may import neither the simulator distribution nor the gateway; the
simulator (``edgeos_sim``: protocol servers, demo, in-process line) imports it from here.

* :mod:`.layout` — every tag: name, unit, Modbus register, OPC UA node id;
* :mod:`.recipe` — the quality model: set-points, targets, the true optimum;
* :mod:`.line` — :class:`LinePhysics`, the presses and the raw-material batches;
* :mod:`.cure` — a tyre's cure in closed form for a recipe written at load, and its reward.
"""

from __future__ import annotations

from edgeos_cloud.fleet.physics.cure import (
    E_BEST,
    expected_elasticity,
    lagged_optimum,
    reward,
)
from edgeos_cloud.fleet.physics.layout import Layout, TagSpec, build_layout
from edgeos_cloud.fleet.physics.line import LinePhysics
from edgeos_cloud.fleet.physics.recipe import (
    ELASTICITY_MAX,
    ELASTICITY_MIN,
    CycleRecord,
    LineState,
    Setpoints,
    default_policy,
    optimal_setpoints,
    quality,
)

__all__ = [
    "ELASTICITY_MAX",
    "ELASTICITY_MIN",
    "E_BEST",
    "CycleRecord",
    "Layout",
    "LinePhysics",
    "LineState",
    "Setpoints",
    "TagSpec",
    "build_layout",
    "default_policy",
    "expected_elasticity",
    "lagged_optimum",
    "optimal_setpoints",
    "quality",
    "reward",
]
