"""The recipe and quality model; the code lives in :mod:`edgeos_cloud.fleet.physics.recipe`.

The cloud's twin simulator runs the same physics and may not import this distribution, so the
pure physics moved there (issue #17); this module keeps the simulator's import path.
"""

from __future__ import annotations

from edgeos_cloud.fleet.physics import recipe as _physics
from edgeos_cloud.fleet.physics.recipe import *  # noqa: F403 -- a shim re-exports, never copies

# Constants the simulator's callers import from here, outside the physics module's ``__all__``.
from edgeos_cloud.fleet.physics.recipe import NOMINAL_CURE_F, PRESSURE_TAU_F, RESIDUAL_BAR

__all__ = ["NOMINAL_CURE_F", "PRESSURE_TAU_F", "RESIDUAL_BAR"]
__all__ += _physics.__all__
