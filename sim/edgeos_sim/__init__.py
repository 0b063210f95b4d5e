"""A simulated tyre-curing line served over real Modbus TCP and OPC UA servers.

* :mod:`edgeos_cloud.fleet.physics` — the pure physics (tag layout, presses and raw-material
  batches, quality model and true optimum), shared with the cloud's twin simulator;
  ``edgeos_sim.layout``/``physics``/``recipe`` re-export it;
* :mod:`edgeos_sim.servers` — :class:`SimLine`, the line on pymodbus and asyncua servers;
* :mod:`edgeos_sim.truth` — the log of every served value and its reader;
* :mod:`edgeos_sim.cli` — ``edgeos sim``.

``SimLine`` and ``SimOptions`` are imported lazily so model code that only needs the physics
does not pay for importing the protocol stacks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from edgeos_cloud.fleet.physics.layout import Layout, TagSpec, build_layout
from edgeos_cloud.fleet.physics.line import LinePhysics
from edgeos_cloud.fleet.physics.recipe import (
    CycleRecord,
    LineState,
    Setpoints,
    default_policy,
    optimal_setpoints,
    quality,
)
from edgeos_sim.truth import GroundTruth, Series, TruthLog

if TYPE_CHECKING:
    from edgeos_sim.servers import SimLine, SimOptions

__all__ = [
    "CycleRecord",
    "GroundTruth",
    "Layout",
    "LinePhysics",
    "LineState",
    "Series",
    "Setpoints",
    "SimLine",
    "SimOptions",
    "TagSpec",
    "TruthLog",
    "build_layout",
    "default_policy",
    "optimal_setpoints",
    "quality",
]


def __getattr__(name: str) -> Any:
    if name in ("SimLine", "SimOptions"):
        from edgeos_sim import servers

        return getattr(servers, name)
    raise AttributeError(f"module 'edgeos_sim' has no attribute {name!r}")
