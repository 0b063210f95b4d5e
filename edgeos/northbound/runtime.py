"""The plant-facing interfaces as one part of the runtime: ``Northbound(...).run()``.

Built from ``[northbound]``, the twin and (optionally) the inference loop's guard; ``run`` is a
child of the runtime's root TaskGroup and runs each enabled interface as a child of its own.
The OPC UA server runs in a child process (asyncua is loaded there, never here; see
:mod:`edgeos.northbound.opcua`), started only when it is configured.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgeos.clock import Clock, SystemClock
from edgeos.errors import ConfigError
from edgeos.northbound.config import NorthboundConfig, check_northbound
from edgeos.northbound.hub import GuardStats, Hub
from edgeos.northbound.sparkplug import SparkplugNode
from edgeos.twin import Twin

if TYPE_CHECKING:
    from edgeos.inference_runtime import InferenceLoop
    from edgeos.northbound.opcua import OpcUaService

__all__ = ["Northbound", "guard_stats_of"]

log = logging.getLogger("edgeos.northbound")


def guard_stats_of(inference: InferenceLoop | None) -> GuardStats | None:
    """The guard's state as the interfaces read it (None without inference)."""
    if inference is None:
        return None
    engine = inference.engine

    def stats() -> dict[str, Any] | None:
        guard = engine.guard  # created when a correction champion appears
        return None if guard is None else guard.stats()

    return stats


class Northbound:
    """Sparkplug B edge node and OPC UA server of the twin (each only when enabled)."""

    def __init__(
        self,
        config: NorthboundConfig,
        twin: Twin,
        *,
        device_id: str,
        clock: Clock | None = None,
        inference: InferenceLoop | None = None,
        guard_stats: GuardStats | None = None,
        state_dir: Path | None = None,
    ) -> None:
        issues = check_northbound(config, twin.tags)
        if issues:
            raise ConfigError(issues)
        self.config = config
        self.twin = twin
        self.clock = clock or SystemClock()
        self.hub = Hub(twin)
        # Listen from now on: changes made before run() starts are not lost (the masks are
        # bounded by the tag count whatever happens).
        self.hub.attach()
        guard = guard_stats if guard_stats is not None else guard_stats_of(inference)
        self.sparkplug: SparkplugNode | None = None
        self.opcua: OpcUaService | None = None
        sp = config.sparkplug
        if sp is not None and sp.enabled:
            self.sparkplug = SparkplugNode(
                sp,
                twin,
                self.hub,
                edge_node_id=device_id,
                clock=self.clock,
                guard_stats=guard,
                state_dir=state_dir,
            )
        ua = config.opcua
        if ua is not None and ua.enabled:
            from edgeos.northbound.opcua import OpcUaService

            self.opcua = OpcUaService(
                ua, twin, self.hub, device_id=device_id, clock=self.clock, guard_stats=guard
            )

    async def run(self) -> None:
        """Run every enabled interface until cancelled."""
        self.hub.attach()
        try:
            async with asyncio.TaskGroup() as tg:
                if self.sparkplug is not None:
                    tg.create_task(self.sparkplug.run(), name="northbound:sparkplug")
                if self.opcua is not None:
                    tg.create_task(self.opcua.run(), name="northbound:opcua")
        finally:
            self.hub.detach()

    def stats(self) -> dict[str, Any]:
        """A section for ``edgeos status`` (``runtime.add_status_provider``)."""
        doc: dict[str, Any] = {"scans_seen": self.hub.records}
        if self.sparkplug is not None:
            doc["sparkplug"] = self.sparkplug.stats()
        if self.opcua is not None:
            doc["opcua"] = self.opcua.stats()
        return doc
