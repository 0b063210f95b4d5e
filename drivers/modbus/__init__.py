"""Modbus TCP and RTU drivers (entry points ``modbus_tcp`` and ``modbus_rtu``).

Tags address them with ``modbus = {…}`` (:class:`ModbusAddress`). Reads are planned at
construction (contiguous and near-contiguous registers coalesced into the fewest requests) and
decoded with numpy, a whole scan at a time. See ``docs/drivers.md``.
"""

from .address import ModbusAddress, ModbusRef
from .driver import ModbusRtuDriver, ModbusTcpDriver, ReadbackMismatch
from .options import ModbusRtuOptions, ModbusTcpOptions
from .plan import ReadRequest

__all__ = [
    "ModbusAddress",
    "ModbusRef",
    "ModbusRtuDriver",
    "ModbusRtuOptions",
    "ModbusTcpDriver",
    "ModbusTcpOptions",
    "ReadRequest",
    "ReadbackMismatch",
]
