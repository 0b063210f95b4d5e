"""The presses of the simulated line; the code lives in :mod:`edgeos_cloud.fleet.physics.line`.

The cloud's twin simulator runs the same physics and may not import this distribution, so the
pure physics moved there (issue #17); this module keeps the simulator's import path.
"""

from __future__ import annotations

from edgeos_cloud.fleet.physics.line import LinePhysics
from edgeos_cloud.fleet.physics.recipe import ELASTICITY_MAX, ELASTICITY_MIN, CycleRecord

__all__ = ["ELASTICITY_MAX", "ELASTICITY_MIN", "CycleRecord", "LinePhysics"]
