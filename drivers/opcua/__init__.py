"""OPC UA driver (asyncua): batched polled reads, batched subscriptions, typed writes.

Registered as ``opcua`` in the ``edgeos.drivers`` entry points. See ``docs/drivers.md``.
"""

from __future__ import annotations

from .driver import OpcUaDriver, OpcUaStats
from .options import OpcUaOptions, check_endpoint

__all__ = ["OpcUaDriver", "OpcUaOptions", "OpcUaStats", "check_endpoint"]
