"""Plant-facing interfaces of the twin: a Sparkplug B edge node and an OPC UA server.

See ``docs/northbound.md``. ``Northbound(config.northbound, twin, device_id=…).run()`` is a child
of the runtime's TaskGroup; the OPC UA server (asyncua) runs in a child process of its own,
started only when configured.

Importing this package loads only the configuration models, so ``edgeos.config`` can import
them without a cycle (the runtime part needs the twin, which needs ``edgeos.config``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from edgeos.northbound.config import (
    NorthboundConfig,
    OpcUaServerConfig,
    OpcUaUser,
    PlantTlsConfig,
    SparkplugConfig,
    check_northbound,
)

if TYPE_CHECKING:
    from edgeos.northbound.runtime import Northbound, guard_stats_of

__all__ = [
    "Northbound",
    "NorthboundConfig",
    "OpcUaServerConfig",
    "OpcUaUser",
    "PlantTlsConfig",
    "SparkplugConfig",
    "check_northbound",
    "guard_stats_of",
]


def __getattr__(name: str) -> Any:
    if name in ("Northbound", "guard_stats_of"):
        from edgeos.northbound import runtime

        return getattr(runtime, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
