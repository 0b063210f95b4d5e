"""The driver SDK: what a protocol driver declares and gets, and how drivers are found.

A driver is a class registered in the ``edgeos.drivers`` entry-point group; the entry point's
name is the ``driver`` key of a connection in the configuration. The class declares, as class
attributes, everything the core needs before it builds one (see :class:`Driver`):

* ``options_model`` — a pydantic model (subclass of :class:`DriverOptions`) for the
  connection's ``options`` table; the core validates it with key paths in every error;
* ``address_key`` and ``address_model`` — the key a tag's address is written under
  (``modbus = {…}``) and the pydantic model that validates it; the model's instances satisfy
  :class:`~edgeos.tags.TagAddress`, the driver-neutral view the core reads;
* ``check_endpoint`` — what is wrong with an endpoint string, or ``None``;
* ``title`` — the protocol's name in messages ("connection 'plc' is Modbus TCP").

An instance is built from one frozen :class:`DriverContext` (connection name, endpoint, the
validated options, tag bindings, scan periods, clock) and never touches the network there.
It owns no retries, reconnect policy or scan deadlines (the supervisor in
:mod:`edgeos.supervisor` does); it applies ``options.request_timeout_s`` to each request on the
wire, sets :attr:`Driver.connection_lost` when it notices between calls that the link died, and
never lets a library exception escape: connection problems are raised as
:class:`~edgeos.errors.TransportError`, per-tag problems become a bad quality with a reason.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from importlib.metadata import entry_points
from types import MappingProxyType
from typing import Any, ClassVar, Protocol, TypeVar, runtime_checkable

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field

from edgeos.clock import Clock
from edgeos.errors import WriteRefused
from edgeos.tags import INTEGER_TYPES, TagSpec
from edgeos_protocol.quality import Quality

__all__ = [
    "Driver",
    "DriverContext",
    "DriverOptions",
    "DriverStats",
    "LossSignal",
    "Quality",
    "ReadResult",
    "TagBinding",
    "Value",
    "address_models",
    "available_drivers",
    "check_write",
    "clear_driver_caches",
    "load_driver_class",
]

log = logging.getLogger("edgeos.driver")

Value = float | int | bool | str


@dataclass(frozen=True, slots=True)
class TagBinding:
    """A configured tag and its column in the twin."""

    index: int
    tag: TagSpec


class DriverOptions(BaseModel):
    """Base of every driver's ``options_model``: the settings the core reads too.

    A driver subclasses it, adds its own keys and may change the defaults (Modbus answers in
    milliseconds, an OPC UA server with thousands of nodes may need seconds).
    """

    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)

    #: Deadline of ONE request on the wire (seconds). The driver applies it to every request;
    #: the supervisor applies it to a write (one request). A whole scan has its own deadline,
    #: ``scan_timeout_s`` of the connection.
    request_timeout_s: float = Field(default=3.0, gt=0, le=600)
    #: Deadline of opening the connection (sockets, handshakes, subscriptions), in seconds.
    connect_timeout_s: float = Field(default=5.0, gt=0, le=600)


_O = TypeVar("_O", bound=DriverOptions)


@dataclass(frozen=True, slots=True)
class DriverContext:
    """Everything a driver is built from; frozen, validated before it gets here."""

    #: Connection name (for messages and logs).
    connection: str
    endpoint: str
    #: The connection's ``options``, validated by the driver's ``options_model``.
    options: DriverOptions
    bindings: tuple[TagBinding, ...]
    clock: Clock
    #: Period of every scan group (ms): drivers that sample on the server side use it.
    scan_periods_ms: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}))

    @classmethod
    def for_driver(
        cls,
        driver: type[Driver],
        *,
        connection: str,
        endpoint: str,
        bindings: Sequence[TagBinding],
        clock: Clock,
        options: Mapping[str, Any] | None = None,
        scan_periods_ms: Mapping[str, float] | None = None,
    ) -> DriverContext:
        """Validate raw ``options`` with ``driver.options_model`` and build a context.

        Raises pydantic's ``ValidationError`` on bad options.
        """
        return cls(
            connection,
            endpoint,
            driver.options_model.model_validate(dict(options or {})),
            tuple(bindings),
            clock,
            MappingProxyType(dict(scan_periods_ms or {})),
        )

    def options_as(self, model: type[_O]) -> _O:
        """The options as the driver's own model (a driver calls this with its model)."""
        if not isinstance(self.options, model):
            raise TypeError(
                f"connection {self.connection!r}: options are {type(self.options).__name__}, "
                f"expected {model.__name__}"
            )
        return self.options


class LossSignal:
    """Set by a driver when it notices, between calls, that its link died; cleared at connect.

    The supervisor waits on it so a dropped link is reconnected at once rather than at the
    next scan, and logs :attr:`reason` as what happened.
    """

    def __init__(self) -> None:
        self._event = asyncio.Event()
        self.reason = ""

    def set(self, reason: str = "") -> None:
        if not self._event.is_set():
            self.reason = reason
            self._event.set()

    def clear(self) -> None:
        self._event.clear()
        self.reason = ""

    def is_set(self) -> bool:
        return self._event.is_set()

    async def wait(self) -> str:
        await self._event.wait()
        return self.reason


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
    """What every protocol driver declares and implements.

    Construction never touches the network. ``connect`` may be called again after ``close`` or
    after a :class:`~edgeos.errors.TransportError`; the driver re-creates whatever it needs
    (sockets, sessions, subscriptions) there and clears :attr:`connection_lost`.
    """

    #: The protocol's name in messages ("Modbus TCP", "OPC UA").
    title: ClassVar[str]
    #: Pydantic model validating ``connection.options``.
    options_model: ClassVar[type[DriverOptions]]
    #: The key a tag's address is written under (``modbus``, ``opcua``, …).
    address_key: ClassVar[str]
    #: Pydantic model validating that address; instances satisfy ``edgeos.tags.TagAddress``.
    address_model: ClassVar[type[BaseModel]]

    stats: DriverStats
    #: Set when the link is found dead outside a call; cleared by ``connect``.
    connection_lost: LossSignal

    def __init__(self, context: DriverContext) -> None: ...

    @staticmethod
    def check_endpoint(endpoint: str) -> str | None:
        """What is wrong with ``endpoint`` for this driver, or ``None``."""
        ...

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


@cache
def address_models() -> Mapping[str, type[BaseModel]]:
    """Address key → address model, over every installed driver that loads.

    Drivers sharing a key (``modbus_tcp`` and ``modbus_rtu``) share its model; the first by
    driver name wins otherwise. A driver that fails to load is skipped here (and named as
    broken where a connection uses it).
    """
    models: dict[str, type[BaseModel]] = {}
    for name in sorted(available_drivers()):
        try:
            cls = load_driver_class(name)
        except Exception as exc:  # a broken plugin must not break every other driver
            log.debug("driver %r failed to load: %r", name, exc)
            continue
        models.setdefault(cls.address_key, cls.address_model)
    return MappingProxyType(models)


def clear_driver_caches() -> None:
    """Forget the installed drivers (after installing one at run time, e.g. in tests)."""
    available_drivers.cache_clear()
    load_driver_class.cache_clear()
    address_models.cache_clear()


def check_write(
    tag: TagSpec,
    value: Value,
    *,
    last_value: float | None = None,
    last_time: float | None = None,
    now: float | None = None,
) -> Value:
    """Validate a value against a tag's declared limits before it goes on the wire.

    Returns the value coerced to the tag's type; raises :class:`WriteRefused` with a reason.
    ``max_rate`` is checked against the tag's last write, ``last_value`` at ``last_time``;
    ``last_time`` and ``now`` are monotonic seconds, never wall time (the twin's
    :class:`edgeos.twin.WriteLog` keeps that record; without it, limits and type only).
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
    if dtype in INTEGER_TYPES:
        return number if tag.scale != 1.0 else round(number)
    return number
