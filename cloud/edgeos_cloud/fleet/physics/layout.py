"""Tag layout of the simulated tyre line: names, units, Modbus registers and OPC UA node ids.

One function, :func:`build_layout`, is the single source of truth for every tag the simulator
serves. The servers, the ground-truth reader, the example generator and the tests all derive
their addresses from it, so they cannot disagree.

Every tag is exactly one 16-bit holding register (``int16`` or ``uint16`` with a ``scale``),
so a line of 80 nests × 200 tags is 16,000 contiguous registers that a client reads in 128
requests of 125 registers (``flat`` layout: one unit, nest ``n`` at ``(n-1) * tags_per_nest``).
The ``unit-per-nest`` layout gives every nest its own unit id (= nest number) with addresses
``0 .. tags_per_nest - 1``, like a line where each press has its own PLC behind a gateway.

The first :data:`KEY_TAG_COUNT` tags of a nest are the process tags the physics models
(set-points, measurements, cycle state, quality); the rest are auxiliary process signals.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from functools import cached_property
from typing import Literal

import numpy as np
import numpy.typing as npt

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

LayoutMode = Literal["flat", "unit-per-nest"]
RegisterType = Literal["int16", "uint16"]
OpcUaType = Literal["float64", "int32", "bool"]

#: Largest read a Modbus client may ask for (Modbus spec: 125 holding registers).
MAX_REGISTERS_PER_REQUEST = 125
#: Namespace the OPC UA server registers first, so it gets index 2 (``ns=2;s=...``).
OPCUA_NAMESPACE_URI = "urn:edgeos:sim:tyre-line"


class CycleState(IntEnum):
    """Phase of a curing press, as served in ``cycle.state``."""

    IDLE = 0
    LOAD = 1
    CURE = 2
    COOL = 3
    UNLOAD = 4


class Alarm(IntEnum):
    """Bits of ``alarm.bits``."""

    OVERTEMP = 1 << 0
    PRESSURE_LOW = 1 << 1
    HEATER_DEVIATION = 1 << 2
    QUALITY_REJECT = 1 << 3
    NEW_BATCH = 1 << 4


@dataclass(frozen=True, slots=True)
class _KeyTag:
    name: str
    unit: str
    description: str
    type: RegisterType
    scale: float
    opcua_type: OpcUaType = "float64"
    deadband_steps: float = 1.0
    limits: tuple[float, float] | None = None
    max_rate: float | None = None


# Order matters: slot k of every nest. The physics writes its columns in this order.
KEY_TAGS: tuple[_KeyTag, ...] = (
    _KeyTag(
        "heater.sp",
        "°C",
        "platen heater set-point",
        "int16",
        0.1,
        limits=(120.0, 200.0),
        max_rate=5.0,
    ),
    _KeyTag("heater.pv", "°C", "platen temperature", "int16", 0.1, deadband_steps=2),
    _KeyTag("heater.out", "%", "heater power output", "uint16", 0.1, deadband_steps=5),
    _KeyTag(
        "press.sp",
        "bar",
        "bladder pressure set-point",
        "int16",
        0.1,
        limits=(5.0, 30.0),
        max_rate=2.0,
    ),
    _KeyTag("press.pv", "bar", "bladder pressure", "int16", 0.1),
    _KeyTag(
        "cure.sp", "s", "cure time set-point", "uint16", 0.1, limits=(1.0, 600.0), max_rate=10.0
    ),
    _KeyTag("cure.elapsed", "s", "time in the cure phase", "uint16", 0.1, deadband_steps=0),
    _KeyTag("cool.temp", "°C", "cooling water return temperature", "int16", 0.1, deadband_steps=2),
    _KeyTag(
        "cycle.state",
        "",
        "0 idle, 1 load, 2 cure, 3 cool, 4 unload",
        "uint16",
        1.0,
        opcua_type="int32",
        deadband_steps=0,
    ),
    _KeyTag(
        "cycle.count", "", "cycles completed", "uint16", 1.0, opcua_type="int32", deadband_steps=0
    ),
    _KeyTag(
        "tyres.produced",
        "",
        "tyres produced (rejects included)",
        "uint16",
        1.0,
        opcua_type="int32",
        deadband_steps=0,
    ),
    _KeyTag(
        "quality.elasticity",
        "MPa",
        "elastic modulus of the last tyre",
        "uint16",
        0.01,
        deadband_steps=0,
    ),
    _KeyTag(
        "quality.ok",
        "",
        "last tyre within specification",
        "uint16",
        1.0,
        opcua_type="bool",
        deadband_steps=0,
    ),
    _KeyTag(
        "batch.id",
        "",
        "raw-material (rubber compound) batch",
        "uint16",
        1.0,
        opcua_type="int32",
        deadband_steps=0,
    ),
    _KeyTag(
        "batch.mooney",
        "MU",
        "Mooney viscosity of the loaded batch (lab value)",
        "uint16",
        0.1,
        deadband_steps=0,
    ),
    _KeyTag(
        "alarm.bits",
        "",
        "alarm bit field (see docs/simulator.md)",
        "uint16",
        1.0,
        opcua_type="int32",
        deadband_steps=0,
    ),
    _KeyTag("steam.flow", "kg/h", "steam flow into the bladder", "uint16", 0.1, deadband_steps=5),
    _KeyTag("bladder.temp", "°C", "bladder (inner) temperature", "int16", 0.1, deadband_steps=2),
    _KeyTag(
        "cure.state", "%", "state of cure of the tyre in the press", "uint16", 0.1, deadband_steps=5
    ),
    _KeyTag("cycle.last_s", "s", "duration of the last cycle", "uint16", 0.1, deadband_steps=0),
)
KEY_TAG_COUNT = len(KEY_TAGS)


@dataclass(frozen=True, slots=True)
class _AuxCategory:
    prefix: str
    suffix: str
    unit: str
    description: str
    type: RegisterType
    scale: float
    opcua_type: OpcUaType = "float64"
    deadband_steps: float = 2.0


#: Auxiliary signals cycle through these categories: aux tag ``j`` is category ``j % 6``.
AUX_CATEGORIES: tuple[_AuxCategory, ...] = (
    _AuxCategory("zone", ".temp", "°C", "mould zone temperature", "int16", 0.1),
    _AuxCategory("flow", ".rate", "l/min", "cooling/utility flow", "uint16", 0.1),
    _AuxCategory("motor", ".current", "A", "motor current", "uint16", 0.01),
    _AuxCategory("valve", ".pos", "%", "valve position", "uint16", 0.1),
    _AuxCategory("counter", ".value", "", "event counter", "uint16", 1.0, "int32", 0.0),
    _AuxCategory("flag", ".on", "", "status flag", "uint16", 1.0, "bool", 0.0),
)


@dataclass(frozen=True, slots=True)
class TagSpec:
    """Everything about one served tag."""

    #: Column in the line's value vector (twin order: nest-major, then slot).
    index: int
    nest: int
    slot: int
    #: Full name, ``nest01.heater.sp``.
    name: str
    #: Name relative to the nest, ``heater.sp`` (template tag name in configs).
    local_name: str
    unit: str
    description: str
    #: Smallest change the register can represent (= ``scale``).
    resolution: float
    deadband: float
    writable: bool
    limits: tuple[float, float] | None
    max_rate: float | None
    modbus_unit: int
    modbus_table: Literal["holding"]
    modbus_address: int
    modbus_type: RegisterType
    scale: float
    node_id: str
    opcua_type: OpcUaType
    #: One of the modelled process tags (not an auxiliary signal).
    key: bool


@dataclass(frozen=True)
class Layout:
    """All tags of a line, plus vectorised register encoding and decoding."""

    nests: int
    tags_per_nest: int
    mode: LayoutMode
    tags: tuple[TagSpec, ...]
    _by_name: dict[str, int] = field(repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.tags)

    @property
    def size(self) -> int:
        """Number of tags (= number of registers)."""
        return len(self.tags)

    def index(self, name: str) -> int:
        """Column of a tag by full name; raises ``KeyError``."""
        return self._by_name[name]

    def tag(self, name: str) -> TagSpec:
        return self.tags[self._by_name[name]]

    def nest_name(self, nest: int) -> str:
        """Name prefix of a nest (``nest07``; three digits from 100 nests on)."""
        return f"nest{nest:0{max(2, len(str(self.nests)))}d}"

    def slot(self, local_name: str) -> int:
        """Slot of a tag inside every nest (``heater.sp`` → 0); raises ``KeyError``."""
        return self._by_name[f"{self.nest_name(1)}.{local_name}"]

    @property
    def units(self) -> tuple[int, ...]:
        """Modbus unit ids served, ascending."""
        return (1,) if self.mode == "flat" else tuple(range(1, self.nests + 1))

    def unit_range(self, unit: int) -> tuple[int, int]:
        """``(first tag index, register count)`` of one unit; addresses start at 0."""
        if self.mode == "flat":
            if unit != 1:
                raise KeyError(unit)
            return 0, self.size
        if not 1 <= unit <= self.nests:
            raise KeyError(unit)
        return (unit - 1) * self.tags_per_nest, self.tags_per_nest

    def tag_at(self, unit: int, address: int) -> int:
        """Tag index served at a Modbus unit/address; raises ``KeyError``."""
        first, count = self.unit_range(unit)
        if not 0 <= address < count:
            raise KeyError((unit, address))
        return first + address

    def requests(
        self, max_registers: int = MAX_REGISTERS_PER_REQUEST
    ) -> list[tuple[int, int, int]]:
        """The fewest ``(unit, address, count)`` reads covering every register."""
        out: list[tuple[int, int, int]] = []
        for unit in self.units:
            _, count = self.unit_range(unit)
            out.extend(
                (unit, a, min(max_registers, count - a)) for a in range(0, count, max_registers)
            )
        return out

    # ------------------------------------------------------------- vectorised columns

    @cached_property
    def scale(self) -> npt.NDArray[np.float64]:
        return np.array([t.scale for t in self.tags], dtype=np.float64)

    @cached_property
    def signed(self) -> npt.NDArray[np.bool_]:
        return np.array([t.modbus_type == "int16" for t in self.tags], dtype=np.bool_)

    @cached_property
    def writable_mask(self) -> npt.NDArray[np.bool_]:
        return np.array([t.writable for t in self.tags], dtype=np.bool_)

    @cached_property
    def key_mask(self) -> npt.NDArray[np.bool_]:
        return np.array([t.key for t in self.tags], dtype=np.bool_)

    @cached_property
    def _lo(self) -> npt.NDArray[np.float64]:
        return np.where(self.signed, -32768.0, 0.0)

    @cached_property
    def _hi(self) -> npt.NDArray[np.float64]:
        return np.where(self.signed, 32767.0, 65535.0)

    def encode(
        self, values: npt.NDArray[np.float64], indices: npt.NDArray[np.intp] | None = None
    ) -> npt.NDArray[np.uint16]:
        """Engineering values → raw 16-bit registers (rounded, saturated, two's complement).

        ``indices`` says which tags ``values`` are (default: all, in layout order). Counters
        (unsigned, scale 1) are served modulo 65536 like a PLC's 16-bit counter; everything
        else saturates at the register's range rather than wrapping (a wrapped temperature
        would be a lie).
        """
        sel = slice(None) if indices is None else indices
        scale, signed = self.scale[sel], self.signed[sel]
        raw = np.rint(np.nan_to_num(np.asarray(values, dtype=np.float64)) / scale)
        raw = np.where(~signed & (scale == 1.0), np.mod(raw, 65536.0), raw)
        raw = np.clip(raw, self._lo[sel], self._hi[sel])
        return raw.astype(np.int32).astype(np.uint16)

    def decode(
        self, registers: npt.NDArray[np.uint16], indices: npt.NDArray[np.intp] | None = None
    ) -> npt.NDArray[np.float64]:
        """Raw registers → engineering values (``indices``: which tags the registers are)."""
        regs = np.asarray(registers, dtype=np.uint16)
        scale = self.scale if indices is None else self.scale[indices]
        signed = self.signed if indices is None else self.signed[indices]
        raw = np.where(signed, regs.view(np.int16).astype(np.float64), regs.astype(np.float64))
        return raw * scale

    def quantize(self, values: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        """What a client reads back for these values (encode, then decode)."""
        return self.decode(self.encode(values))


def build_layout(nests: int = 80, tags_per_nest: int = 200, mode: LayoutMode = "flat") -> Layout:
    """Every tag of a line of ``nests`` presses with ``tags_per_nest`` tags each.

    Raises ``ValueError`` when the line does not fit the register space or the unit-id range.
    """
    if nests < 1:
        raise ValueError("nests must be at least 1")
    if tags_per_nest < KEY_TAG_COUNT:
        raise ValueError(f"tags_per_nest must be at least {KEY_TAG_COUNT} (the process tags)")
    if mode == "flat" and nests * tags_per_nest > 65536:
        raise ValueError("flat layout: nests × tags_per_nest must fit 65,536 registers")
    if mode == "unit-per-nest" and nests > 247:
        raise ValueError("unit-per-nest layout: at most 247 nests (Modbus unit ids 1..247)")
    if mode not in ("flat", "unit-per-nest"):
        raise ValueError(f"unknown layout mode {mode!r}")
    width = max(2, len(str(nests)))
    tags: list[TagSpec] = []
    for nest in range(1, nests + 1):
        prefix = f"nest{nest:0{width}d}"
        for slot in range(tags_per_nest):
            index = (nest - 1) * tags_per_nest + slot
            if mode == "flat":
                unit, address = 1, index
            else:
                unit, address = nest, slot
            if slot < KEY_TAG_COUNT:
                kt = KEY_TAGS[slot]
                local, unit_s, desc, rtype, scale, uatype = (
                    kt.name,
                    kt.unit,
                    kt.description,
                    kt.type,
                    kt.scale,
                    kt.opcua_type,
                )
                deadband = kt.deadband_steps * scale
                limits, max_rate, key = kt.limits, kt.max_rate, True
            else:
                j = slot - KEY_TAG_COUNT
                cat = AUX_CATEGORIES[j % len(AUX_CATEGORIES)]
                local = f"{cat.prefix}{j // len(AUX_CATEGORIES) + 1:02d}{cat.suffix}"
                unit_s, desc, rtype, scale, uatype = (
                    cat.unit,
                    cat.description,
                    cat.type,
                    cat.scale,
                    cat.opcua_type,
                )
                deadband = cat.deadband_steps * scale
                limits, max_rate, key = None, None, False
            tags.append(
                TagSpec(
                    index=index,
                    nest=nest,
                    slot=slot,
                    name=f"{prefix}.{local}",
                    local_name=local,
                    unit=unit_s,
                    description=desc,
                    resolution=scale,
                    deadband=round(deadband, 6),
                    writable=limits is not None,
                    limits=limits,
                    max_rate=max_rate,
                    modbus_unit=unit,
                    modbus_table="holding",
                    modbus_address=address,
                    modbus_type=rtype,
                    scale=scale,
                    node_id=f"ns=2;s=Line/{prefix}/{local}",
                    opcua_type=uatype,
                    key=key,
                )
            )
    by_name = {t.name: t.index for t in tags}
    return Layout(nests, tags_per_nest, mode, tuple(tags), by_name)
