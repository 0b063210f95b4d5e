"""The Modbus address of a tag (``modbus = {…}`` in the configuration) and its runtime form.

Both Modbus drivers declare ``address_key = "modbus"`` and :class:`ModbusAddress` as their
``address_model``; the core validates every ``modbus`` table with it and keeps the compact
:class:`ModbusRef` in its runtime tags.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Annotated, Literal, Protocol, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from edgeos.tags import DataType, EquipmentInstance, InstanceError

__all__ = ["REGISTER_COUNT", "AnyModbus", "ModbusAddress", "ModbusRef", "Table"]

Table = Literal["holding", "input", "coil", "discrete"]

#: Registers one value of each type occupies (strings: ``length`` registers).
REGISTER_COUNT: dict[str, int] = {
    "int16": 1,
    "uint16": 1,
    "int32": 2,
    "uint32": 2,
    "int64": 4,
    "float32": 2,
    "float64": 4,
    "bool": 1,
}
_REGISTER_SPACE = 65536


def _register_count(table: str, dtype: str, length: int | None) -> int:
    if table in ("coil", "discrete"):
        return 1
    if dtype == "string":
        assert length is not None
        return length
    return REGISTER_COUNT[dtype]


class _RegisterFields(Protocol):
    @property
    def table(self) -> Table: ...
    @property
    def type(self) -> DataType: ...
    @property
    def length(self) -> int | None: ...


class _Registers:
    """What the validated address and its runtime record answer alike.

    A mixin without fields of its own (the pydantic model's field order stays its own).
    """

    __slots__ = ()

    @property
    def register_count(self: _RegisterFields) -> int:
        return _register_count(self.table, self.type, self.length)

    # edgeos.tags.TagAddress ----------------------------------------------------------------

    @property
    def data_type(self: _RegisterFields) -> DataType:
        return self.type

    @property
    def polled(self) -> bool:
        return True


class ModbusAddress(BaseModel, _Registers):
    """Where a tag's value lives in one Modbus device, and how it is encoded."""

    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)

    unit: Annotated[int, Field(ge=0, le=255)] = 1
    table: Table = "holding"
    address: Annotated[int, Field(ge=0, le=65535)]
    type: DataType = "uint16"
    byte_order: Literal["big", "little"] = "big"
    word_order: Literal["big", "little"] = "big"
    #: Registers of a ``string`` tag (two characters each).
    length: Annotated[int, Field(ge=1, le=123)] | None = None
    scale: float = 1.0
    offset: float = 0.0

    @model_validator(mode="after")
    def _check(self) -> Self:
        bit_table = self.table in ("coil", "discrete")
        if bit_table and self.type != "bool":
            raise ValueError(f"table {self.table!r} holds bits; type must be 'bool'")
        if self.type == "string" and self.length is None:
            raise ValueError("a string tag needs 'length' (number of registers)")
        if self.type != "string" and self.length is not None:
            raise ValueError("'length' applies to string tags only")
        if self.scale == 0:
            raise ValueError("scale must not be 0")
        end = self.address + self.register_count
        if end > _REGISTER_SPACE:
            raise ValueError(f"address {self.address} + {self.register_count} registers > 65536")
        return self

    def runtime(self, instance: EquipmentInstance | None = None) -> ModbusRef:
        """The compact record; for an equipment instance, shifted and on its unit id."""
        ref = ModbusRef(
            self.unit,
            self.table,
            self.address,
            self.type,
            self.byte_order,
            self.word_order,
            self.length,
            self.scale,
            self.offset,
        )
        return ref if instance is None else ref.runtime(instance)


@dataclass(frozen=True, slots=True)
class ModbusRef(_Registers):
    """The runtime form of :class:`ModbusAddress` (validated already; ~5× smaller)."""

    unit: int
    table: Table
    address: int
    type: DataType
    byte_order: Literal["big", "little"]
    word_order: Literal["big", "little"]
    length: int | None
    scale: float
    offset: float

    def runtime(self, instance: EquipmentInstance | None = None) -> ModbusRef:
        """Shifted by ``address_stride`` per instance, on the instance's unit id if it has one.

        Raises :class:`~edgeos.tags.InstanceError` when the shifted value passes the end of
        the register space.
        """
        if instance is None:
            return self
        shifted = self.address + instance.address_stride * instance.index
        if shifted + self.register_count > _REGISTER_SPACE:
            raise InstanceError(
                "address",
                f"shifted to {shifted}, the last instance passes register 65535",
            )
        unit = self.unit if instance.unit is None else instance.unit
        if shifted == self.address and unit == self.unit:
            return self
        return replace(self, address=shifted, unit=unit)


#: A Modbus address in either form (they have the same fields).
AnyModbus = ModbusRef | ModbusAddress
