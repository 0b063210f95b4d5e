"""OPC UA driver (asyncua): batched polled reads, batched subscriptions, typed writes.

Registered as ``opcua`` in the ``edgeos.drivers`` entry points; tags address it with
``opcua = {…}`` (:class:`OpcUaAddress`). See ``docs/drivers.md``.
"""

from __future__ import annotations

from .address import OpcUaAddress
from .driver import OpcUaDriver, OpcUaStats
from .options import OpcUaOptions, check_endpoint

__all__ = ["OpcUaAddress", "OpcUaDriver", "OpcUaOptions", "OpcUaStats", "check_endpoint"]
