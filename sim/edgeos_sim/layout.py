"""The simulated line's tag layout; the code lives in :mod:`edgeos_cloud.fleet.physics.layout`.

The cloud's twin simulator runs the same physics and may not import this distribution, so the
pure physics moved there (issue #17); this module keeps the simulator's import path.
"""

from __future__ import annotations

from edgeos_cloud.fleet.physics.layout import (
    AUX_CATEGORIES,
    KEY_TAG_COUNT,
    KEY_TAGS,
    MAX_REGISTERS_PER_REQUEST,
    OPCUA_NAMESPACE_URI,
    Alarm,
    CycleState,
    Layout,
    LayoutMode,
    TagSpec,
    build_layout,
)

__all__ = [
    "AUX_CATEGORIES",
    "KEY_TAGS",
    "KEY_TAG_COUNT",
    "MAX_REGISTERS_PER_REQUEST",
    "OPCUA_NAMESPACE_URI",
    "Alarm",
    "CycleState",
    "Layout",
    "LayoutMode",
    "TagSpec",
    "build_layout",
]
