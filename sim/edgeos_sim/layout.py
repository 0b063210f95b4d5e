"""The simulated line's tag layout; the code lives in :mod:`edgeos_cloud.fleet.physics.layout`.

The cloud's twin simulator runs the same physics and may not import this distribution, so the
pure physics moved there (issue #17); this module keeps the simulator's import path.
"""

from __future__ import annotations

from edgeos_cloud.fleet.physics import layout as _physics
from edgeos_cloud.fleet.physics.layout import *  # noqa: F403 -- a shim re-exports, never copies

__all__ = list(_physics.__all__)
