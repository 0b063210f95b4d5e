"""The driver contract: what a protocol driver gives the core, and how drivers are found.

A driver translates one connection's protocol into columnar :class:`ReadResult` blocks. It owns
no retries, timeouts or reconnect policy (the supervisor in :mod:`edgeos.supervisor` does), and
it never lets a library exception escape: connection problems are raised as
:class:`~edgeos.errors.TransportError`, per-tag problems become a bad quality with a reason.

Drivers register in the ``edgeos.drivers`` entry-point group; the name is the ``driver`` key of a
connection in the configuration.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cache
from importlib.metadata import entry_points
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel

from edgeos.clock import Clock
from edgeos.config import AnyTag, ConnectionConfig
from edgeos.errors import WriteRefused
from edgeos_protocol.quality import Quality

__all__ = [
    "Driver",
    "DriverStats",
    "Quality",
    "ReadResult",
    "TagBinding",
    "Value",
    "available_drivers",
    "check_write",
    "load_driver_class",
]

Value = float | int | bool | str


@dataclass(frozen=True, slots=True)
class TagBinding:
    """A configured tag and its column in the twin."""

    index: int
    tag: AnyTag


@dataclass(slots=True)
class ReadResult:
    """One block of samples, columnar.

    ``indices`` are twin columns; ``values`` are engineering values (scale and offset applied,
    booleans as 0/1; NaN where the quality is bad); ``text`` holds string tags' values by index.
    ``source_ts`` is the device's timestamp where the protocol carries one, else the time the
    response arrived (wall clock, seconds).
    """

    indices: npt.NDArray[np.int32]
    values: npt.NDArray[np.float64]
    quality: npt.NDArray[np.uint8]
    source_ts: npt.NDArray[np.float64]
    text: dict[int, str] = field(default_factory=dict)
    #: Why tags went bad in this read, by reason (``"exception_2"``, ``"decode"``, …).
    bad_reasons: Counter[str] = field(default_factory=Counter)

    @classmethod
    def empty(cls) -> ReadResult:
        return cls(
            np.empty(0, np.int32), np.empty(0, np.float64), np.empty(0, np.uint8), np.empty(0)
        )

    def __len__(self) -> int:
        return int(self.indices.shape[0])


@dataclass(slots=True)
class DriverStats:
    """Counters a driver keeps; the supervisor adds connection-level ones."""

    requests: int = 0
    responses: int = 0
    #: Errors by kind: ``timeout``, ``protocol``, ``exception_<code>``, ``decode``, ``connect`` …
    errors: Counter[str] = field(default_factory=Counter)
    bytes_in: int = 0
    bytes_out: int = 0
    writes: int = 0
    writes_refused: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "responses": self.responses,
            "errors": dict(self.errors),
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "writes": self.writes,
            "writes_refused": self.writes_refused,
        }


SubscriptionSink = Callable[[ReadResult], None]


@runtime_checkable
class Driver(Protocol):
    """What every protocol driver implements.

    Construction never touches the network. ``connect`` may be called again after ``close`` or
    after a :class:`~edgeos.errors.TransportError`; the driver re-creates whatever it needs
    (sockets, sessions, subscriptions) there.
    """

    #: Pydantic model validating ``connection.options``.
    options_model: ClassVar[type[BaseModel]]
    stats: DriverStats

    def __init__(
        self, connection: ConnectionConfig, tags: Sequence[TagBinding], *, clock: Clock
    ) -> None: ...

    async def connect(self) -> None:
        """Open the connection (and re-create subscriptions); raise ``TransportError``."""
        ...

    async def close(self) -> None:
        """Close everything; never raises."""
        ...

    async def read(self, scan_group: str) -> ReadResult:
        """Read every polled tag of ``scan_group`` in as few requests as the device allows."""
        ...

    async def write(self, binding: TagBinding, value: Value) -> None:
        """Write one value (limits already checked by the caller with :func:`check_write`)."""
        ...

    def set_subscription_sink(self, sink: SubscriptionSink | None) -> None:
        """Where subscription notifications go (drivers without subscriptions ignore it)."""
        ...


@cache
def available_drivers() -> frozenset[str]:
    return frozenset(ep.name for ep in entry_points(group="edgeos.drivers"))


@cache
def load_driver_class(name: str) -> type[Driver]:
    matches = [ep for ep in entry_points(group="edgeos.drivers") if ep.name == name]
    if not matches:
        raise KeyError(f"no driver named {name!r} in the 'edgeos.drivers' entry points")
    cls: type[Driver] = matches[0].load()
    return cls


def check_write(
    tag: AnyTag,
    value: Value,
    *,
    last_value: float | None = None,
    last_time: float | None = None,
    now: float | None = None,
) -> Value:
    """Validate a value against a tag's declared limits before it goes on the wire.

    Returns the value coerced to the tag's type; raises :class:`WriteRefused` with a reason.
    ``max_rate`` is checked against the last written (or read) value and when it was seen.
    """
    if not tag.writable:
        raise WriteRefused(tag.name, "tag is not writable")
    dtype = tag.data_type
    if dtype == "string":
        if not isinstance(value, str):
            raise WriteRefused(tag.name, f"expected a string, got {type(value).__name__}")
        return value
    if dtype == "bool":
        if isinstance(value, bool) or value in (0, 1):
            return bool(value)
        raise WriteRefused(tag.name, f"expected a boolean, got {value!r}")
    if isinstance(value, str | bool):
        raise WriteRefused(tag.name, f"expected a number, got {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise WriteRefused(tag.name, f"value {value!r} is not finite")
    limits = tag.limits
    if limits is not None and not limits.min <= number <= limits.max:
        raise WriteRefused(
            tag.name, f"value {number:g} outside hard limits [{limits.min:g}, {limits.max:g}]"
        )
    if (
        tag.max_rate is not None
        and last_value is not None
        and last_time is not None
        and now is not None
    ):
        elapsed = max(now - last_time, 1e-9)
        rate = abs(number - last_value) / elapsed
        if rate > tag.max_rate:
            raise WriteRefused(
                tag.name,
                f"change {number - last_value:+g} in {elapsed:.3g} s exceeds max_rate "
                f"{tag.max_rate:g}/s",
            )
    if dtype in ("int16", "uint16", "int32", "uint32", "int64"):
        return number if tag.modbus is not None and tag.modbus.scale != 1.0 else round(number)
    return number
