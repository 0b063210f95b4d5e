"""Tags as the runtime sees them, and the driver-neutral view of a tag's address.

A tag's address belongs to its driver: ``modbus = {…}`` is validated by the Modbus driver's
address model, ``opcua = {…}`` by the OPC UA driver's, and a third-party driver brings its own
key and model (see :mod:`edgeos.driver`). The core never looks inside an address; it only asks
the questions of :class:`TagAddress` — what data type the value has, how coarse one raw count
is, whether the scan loop polls it, and how it changes for one equipment instance.

This module imports neither the configuration loader nor the driver registry, so both can
import it (that is what breaks the old config ↔ driver import cycle).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol, Self

from pydantic import BaseModel, ConfigDict, model_validator

__all__ = [
    "FLOAT_TYPES",
    "INTEGER_TYPES",
    "DataType",
    "DerivedAddress",
    "EquipmentInstance",
    "InstanceError",
    "Limits",
    "Tag",
    "TagAddress",
    "TagSpec",
    "effective_resolution",
]

DataType = Literal[
    "int16", "uint16", "int32", "uint32", "int64", "float32", "float64", "bool", "string"
]
INTEGER_TYPES = frozenset({"int16", "uint16", "int32", "uint32", "int64"})
FLOAT_TYPES = frozenset({"float32", "float64"})


@dataclass(frozen=True, slots=True)
class EquipmentInstance:
    """One stamp of an equipment template: what an address may depend on.

    ``index`` counts from 0 for the first instance; ``address_stride`` and ``unit`` are the
    ``[[equipment]]`` keys of that name (drivers without registers or unit ids ignore them).
    """

    name: str
    n: int
    index: int
    address_stride: int = 0
    unit: int | None = None


class InstanceError(ValueError):
    """An address that does not fit one equipment instance; ``field`` is the key at fault."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class TagAddress(Protocol):
    """What the core asks of any driver's address (model or runtime record)."""

    @property
    def data_type(self) -> DataType:
        """The type of the value in engineering units (``float64``, ``bool``, ``string``…)."""
        ...

    @property
    def scale(self) -> float:
        """Engineering units per raw count (1.0 when the protocol carries the value as is)."""
        ...

    @property
    def polled(self) -> bool:
        """True when the scan loop reads it; False when the device pushes it (subscriptions)."""
        ...

    def runtime(self, instance: EquipmentInstance | None = None) -> TagAddress:
        """The compact runtime form of this address, for a plain tag or one instance.

        Raises :class:`InstanceError` when the address does not fit ``instance``.
        """
        ...


class TagSpec(Protocol):
    """A tag as drivers and the twin read it: the runtime :class:`Tag` or a validated
    ``TagConfig`` (tests and tools build bindings from either)."""

    @property
    def name(self) -> str: ...
    @property
    def connection(self) -> str: ...
    @property
    def address(self) -> TagAddress: ...
    @property
    def address_key(self) -> str: ...
    @property
    def unit(self) -> str: ...
    @property
    def description(self) -> str: ...
    @property
    def resolution(self) -> float | None: ...
    @property
    def deadband(self) -> float: ...
    @property
    def scan_group(self) -> str: ...
    @property
    def writable(self) -> bool: ...
    @property
    def limits(self) -> Limits | None: ...
    @property
    def max_rate(self) -> float | None: ...
    @property
    def data_type(self) -> DataType: ...
    @property
    def scale(self) -> float: ...
    @property
    def polled(self) -> bool: ...
    @property
    def effective_resolution(self) -> float: ...


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)


class DerivedAddress(_Model):
    """A tag the runtime computes itself (gate verdicts, model outputs), not read from a device.

    Derived tags are added by the runtime, not written in configuration files; they live in
    the twin and travel in batches like any other tag, so a PLC, MES or the cloud reads them
    where it reads everything else.
    """

    source: Literal["inference"] = "inference"
    type: DataType = "float64"

    @property
    def data_type(self) -> DataType:
        return self.type

    @property
    def scale(self) -> float:
        return 1.0

    @property
    def polled(self) -> bool:
        return False

    def runtime(self, instance: EquipmentInstance | None = None) -> DerivedAddress:
        return self


class Limits(_Model):
    min: float
    max: float

    @model_validator(mode="after")
    def _order(self) -> Self:
        if not self.min < self.max:
            raise ValueError(f"min ({self.min}) must be below max ({self.max})")
        return self


def effective_resolution(resolution: float | None, address: TagAddress) -> float:
    """Resolution used for quantization: the declared one, else one raw count."""
    if resolution is not None:
        return resolution
    dtype = address.data_type
    if dtype in INTEGER_TYPES:
        return abs(address.scale)
    return 1.0


@dataclass(frozen=True, slots=True)
class Tag:
    """The runtime form of a tag: a slotted, frozen record.

    Configuration files are validated as pydantic models at the boundary; inside the runtime
    every tag is one of these (16,000 of them take ~5 MB instead of ~17 MB as models).
    ``address`` is the driver's runtime address record; ``address_key`` the key it was given
    under in the file (``modbus``, ``opcua``, …; ``derived`` for runtime-computed tags).
    """

    name: str
    connection: str
    address: TagAddress
    address_key: str
    unit: str = ""
    description: str = ""
    resolution: float | None = None
    deadband: float = 0.0
    scan_group: str = "default"
    writable: bool = False
    limits: Limits | None = None
    max_rate: float | None = None

    @property
    def data_type(self) -> DataType:
        return self.address.data_type

    @property
    def scale(self) -> float:
        """Engineering units per raw count (1.0 for protocols that carry values as is)."""
        return self.address.scale

    @property
    def polled(self) -> bool:
        return self.address.polled

    @property
    def derived(self) -> DerivedAddress | None:
        return self.address if isinstance(self.address, DerivedAddress) else None

    @property
    def effective_resolution(self) -> float:
        """Resolution used for quantization when none is declared."""
        return effective_resolution(self.resolution, self.address)
