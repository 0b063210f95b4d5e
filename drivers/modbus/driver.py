"""Modbus TCP and RTU drivers on pymodbus.

The drivers own no retries and no reconnect policy: pymodbus clients are built with
``retries=0`` and ``reconnect_delay=0`` and the supervisor decides when to reconnect.
``options.request_timeout_s`` is each request's deadline (pymodbus's own ``timeout``), so a
stalled peer cannot hang a read; a whole scan's deadline is the supervisor's.

The wire-level machinery (one pymodbus client with fast-failure hooks, the one place where
library exceptions are translated) is :mod:`drivers.modbus.link`; read planning and numpy
decoding are :mod:`drivers.modbus.plan`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar

import numpy as np
from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
from pymodbus.framer import FramerType
from pymodbus.pdu import ModbusPDU

from edgeos.driver import (
    DriverContext,
    DriverStats,
    LossSignal,
    Quality,
    ReadResult,
    SubscriptionSink,
    TagBinding,
    Value,
    check_write,
)
from edgeos.errors import (
    ConnectError,
    DeviceException,
    ProtocolError,
    TagError,
    TimeoutError_,
    TransportError,
    WriteRefused,
)
from edgeos.histogram import Histogram

from .address import AnyModbus, ModbusAddress, ModbusRef
from .link import Client, Link, read_call
from .options import (
    ModbusRtuOptions,
    ModbusTcpOptions,
    parse_rtu_endpoint,
    parse_tcp_endpoint,
)
from .plan import BIT_TABLES, ReadRequest, ScanPlan, build_plans, decode_scan, encode_value

__all__ = ["ModbusRtuDriver", "ModbusTcpDriver", "ReadbackMismatch"]

_READ_FC = {"holding": 3, "input": 4, "coil": 1, "discrete": 2}
_BAD_DEVICE = np.uint8(Quality.BAD_DEVICE)
_BAD_COMM = np.uint8(Quality.BAD_COMM)


class ReadbackMismatch(TagError):
    """A written value read back differently (the device clamped, ignored or rejected it)."""

    def __init__(self, tag: str, written: list[int], read: list[int]) -> None:
        self.tag = tag
        self.written = written
        self.read = read
        super().__init__(f"write to {tag!r}: wrote registers {written}, read back {read}")


def _endpoint_problem(parse: Callable[[str], object], endpoint: str) -> str | None:
    try:
        parse(endpoint)
    except ValueError as exc:
        return str(exc)
    return None


def modbus_address(binding: TagBinding) -> AnyModbus:
    """The tag's Modbus address; ``ValueError`` for a tag of another driver."""
    address = binding.tag.address
    if not isinstance(address, ModbusRef | ModbusAddress):
        raise ValueError(f"tag {binding.tag.name!r} has no 'modbus' address")
    return address


class _ModbusDriver:
    """Shared machinery of the TCP and RTU drivers."""

    title: ClassVar[str]
    options_model: ClassVar[type[ModbusTcpOptions] | type[ModbusRtuOptions]]
    address_key: ClassVar[str] = "modbus"
    address_model: ClassVar[type[ModbusAddress]] = ModbusAddress
    #: Whether a request timeout leaves the line usable (RTU: yes, TCP: no).
    _timeout_marks_tags: ClassVar[bool] = False

    stats: DriverStats
    #: Per-request latency (seconds), from sending a request to its answer.
    latency: Histogram
    #: Set when a connection drops between requests; cleared by :meth:`connect`.
    connection_lost: LossSignal

    def __init__(self, context: DriverContext) -> None:
        self.name = context.connection
        self._clock = context.clock
        self._options = context.options_as(self.options_model)
        self._bindings = {b.index: b for b in context.bindings}
        for binding in context.bindings:
            modbus_address(binding)  # refuse a tag of another driver at construction
        self.stats = DriverStats()
        self.latency = Histogram()
        self.connection_lost = LossSignal()
        self._plans: dict[str, ScanPlan] = build_plans(
            list(context.bindings),
            max_gap=self._options.max_gap,
            max_registers=self._options.max_registers,
            max_coils=self._options.max_coils,
        )
        self._links: list[Link] = []
        self._open = False
        self._last_write: dict[int, tuple[float, float]] = {}

    # introspection -------------------------------------------------------------------------

    @property
    def scan_groups(self) -> list[str]:
        """Scan groups this driver has tags in."""
        return sorted(self._plans)

    def requests_per_scan(self, scan_group: str) -> int:
        """How many requests one read of ``scan_group`` sends."""
        plan = self._plans.get(scan_group)
        return 0 if plan is None else len(plan.requests)

    def plan(self, scan_group: str) -> list[ReadRequest]:
        """The requests of one scan of ``scan_group`` (for diagnostics and tests)."""
        plan = self._plans.get(scan_group)
        return [] if plan is None else list(plan.requests)

    # Driver protocol -----------------------------------------------------------------------

    def _make_links(self) -> list[Link]:
        raise NotImplementedError

    def _client_options(self) -> dict[str, Any]:
        # No retries and no reconnects of pymodbus's own: both are the supervisor's.
        return {
            "name": self.name,
            "timeout": self._options.request_timeout_s,
            "retries": 0,
            "reconnect_delay": 0,
        }

    def _lost(self, reason: str) -> None:
        # Only a drop after connect() succeeded counts; one while connect() is still opening
        # the links fails connect() itself.
        if self._open:
            self.connection_lost.set(reason)

    async def connect(self) -> None:
        """Open every connection; raise :class:`ConnectError` (nothing left open) on failure."""
        await self.close()
        self.connection_lost.clear()
        links = self._make_links()
        self._links = links
        try:
            if len(links) == 1:
                await links[0].open()
            else:
                async with asyncio.TaskGroup() as tg:
                    for link in links:
                        tg.create_task(link.open())
        except BaseException as exc:
            for link in links:
                link.close()
            self._links = []
            error = _first_transport_error(exc) if isinstance(exc, BaseExceptionGroup) else exc
            if isinstance(error, TransportError):
                self.stats.errors[error.kind] += 1
            if error is exc:
                raise
            raise error from None
        self._open = True

    async def close(self) -> None:
        """Close every connection; never raises."""
        self._open = False
        links, self._links = self._links, []
        for link in links:
            link.close()
        # Let the transports' close callbacks run before a reconnect reuses the port.
        await asyncio.sleep(0)

    def set_subscription_sink(self, sink: SubscriptionSink | None) -> None:
        """Modbus has no subscriptions; ignored."""

    async def read(self, scan_group: str) -> ReadResult:
        """Read every tag of ``scan_group``.

        A Modbus exception answer makes only that request's tags bad (``BAD_DEVICE``, reason
        ``exception_<code>``); a broken connection raises a :class:`TransportError`.
        """
        plan = self._plans.get(scan_group)
        if plan is None or not plan.requests:
            return ReadResult.empty()
        links = self._links
        if not links:
            raise ConnectError(f"{self.name}: not connected")
        n_req = len(plan.requests)
        registers = np.zeros(plan.register_words, dtype=np.uint16)
        bits = np.zeros(plan.bit_count, dtype=np.uint8)
        quality = np.zeros(n_req, dtype=np.uint8)
        ts = np.zeros(n_req, dtype=np.float64)
        reasons: list[str | None] = [None] * n_req
        state = (plan, registers, bits, quality, ts, reasons)
        if len(links) == 1 or n_req == 1:
            answered = await self._run(links[0], range(n_req), state)
        else:
            # Round-robin keeps the parallel connections equally loaded for sorted plans.
            counts: list[int] = []
            try:
                async with asyncio.TaskGroup() as tg:
                    tasks = [
                        tg.create_task(self._run(link, range(i, n_req, len(links)), state))
                        for i, link in enumerate(links)
                    ]
            except BaseExceptionGroup as eg:
                raise _first_transport_error(eg) from None
            counts = [t.result() for t in tasks]
            answered = sum(counts)
        if answered == 0:
            # Every request timed out (RTU keeps going per request): the line is dead.
            raise TimeoutError_(f"{self.name}: no answer to any request of the scan")
        return decode_scan(
            plan,
            registers=registers,
            bits=bits,
            request_quality=quality,
            request_ts=ts,
            request_reason=reasons,
        )

    async def _run(
        self,
        link: Link,
        request_ids: range,
        state: tuple[
            ScanPlan,
            np.ndarray[Any, np.dtype[np.uint16]],
            np.ndarray[Any, np.dtype[np.uint8]],
            np.ndarray[Any, np.dtype[np.uint8]],
            np.ndarray[Any, np.dtype[np.float64]],
            list[str | None],
        ],
    ) -> int:
        plan, registers, bits, quality, ts, reasons = state
        answered = 0
        for i in request_ids:
            req = plan.requests[i]
            try:
                resp = await link.execute(read_call(req), keep_on_timeout=self._timeout_marks_tags)
            except TimeoutError_:
                if not self._timeout_marks_tags:
                    raise
                quality[i] = _BAD_COMM
                reasons[i] = "timeout"
                ts[i] = self._clock.time()
                continue
            answered += 1
            ts[i] = self._clock.time()
            # An answer (or exception) for another function is a garbled frame, not a verdict.
            if resp.function_code & 0x7F != _READ_FC[req.table]:
                raise link.fail(
                    ProtocolError(
                        f"{self.name}: function {resp.function_code} answered "
                        f"function {_READ_FC[req.table]}"
                    )
                )
            if resp.isError():
                code = int(getattr(resp, "exception_code", 0))
                quality[i] = _BAD_DEVICE
                reasons[i] = f"exception_{code}"
                self.stats.errors[f"exception_{code}"] += 1
                continue
            o = req.buffer_offset
            if req.is_bits:
                flags = resp.bits
                if len(flags) < req.count:
                    raise link.fail(self._short(req, len(flags)))
                bits[o : o + req.count] = flags[: req.count]
            else:
                words = resp.registers
                if len(words) != req.count:
                    raise link.fail(self._short(req, len(words)))
                registers[o : o + req.count] = words
        return answered

    def _short(self, req: ReadRequest, got: int) -> ProtocolError:
        return ProtocolError(
            f"{self.name}: asked {req.count} {req.table} values at {req.start} "
            f"(unit {req.unit}), got {got}"
        )

    async def write(self, binding: TagBinding, value: Value) -> None:
        """Write one value: limits checked and encoded before the wire, optionally read back.

        Raises :class:`WriteRefused` (nothing sent), :class:`DeviceException` (the device
        answered with an exception), :class:`ReadbackMismatch`, or a ``TransportError``.
        """
        tag = binding.tag
        try:
            try:
                addr = modbus_address(binding)
            except ValueError as exc:
                raise WriteRefused(tag.name, str(exc)) from None
            if addr.table in ("input", "discrete"):
                raise WriteRefused(tag.name, f"the {addr.table} table is read-only")
            now = self._clock.monotonic()
            last = self._last_write.get(binding.index)
            checked = check_write(
                tag,
                value,
                last_value=None if last is None else last[0],
                last_time=None if last is None else last[1],
                now=now,
            )
            words = [] if addr.table in BIT_TABLES else encode_value(tag.name, addr, checked)
        except WriteRefused:
            self.stats.writes_refused += 1
            raise
        if not self._links:
            raise ConnectError(f"{self.name}: not connected")
        link = self._links[0]
        unit, start = addr.unit, addr.address
        call: Callable[[Client], Awaitable[ModbusPDU]]
        if addr.table == "coil":
            flag = bool(checked)
            call = lambda c: c.write_coil(start, flag, device_id=unit)  # noqa: E731
        elif len(words) == 1 and not self._options.always_write_multiple:
            call = lambda c: c.write_register(start, words[0], device_id=unit)  # noqa: E731
        else:
            call = lambda c: c.write_registers(start, words, device_id=unit)  # noqa: E731
        resp = await link.execute(call)
        if resp.isError():
            code = int(getattr(resp, "exception_code", 0))
            self.stats.errors[f"exception_{code}"] += 1
            raise DeviceException(code, f"write to {tag.name!r}: device exception {code}")
        self.stats.writes += 1
        if not isinstance(checked, str):
            self._last_write[binding.index] = (float(checked), now)
        if self._options.readback_writes:
            await self._read_back(link, binding, words, checked)

    async def _read_back(
        self, link: Link, binding: TagBinding, words: list[int], checked: Value
    ) -> None:
        addr = modbus_address(binding)
        count = 1 if addr.table == "coil" else len(words)
        req = ReadRequest(addr.unit, addr.table, addr.address, count, 0, 1)
        resp = await link.execute(read_call(req))
        if resp.isError():
            code = int(getattr(resp, "exception_code", 0))
            self.stats.errors[f"exception_{code}"] += 1
            raise DeviceException(code, f"read-back of {binding.tag.name!r}: exception {code}")
        if addr.table == "coil":
            expected, got = [int(bool(checked))], [int(b) for b in resp.bits[:1]]
        else:
            expected, got = words, list(resp.registers)
        if got != expected:
            self.stats.errors["readback"] += 1
            raise ReadbackMismatch(binding.tag.name, expected, got)


def _first_transport_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            return _first_transport_error(exc)
        if isinstance(exc, TransportError):
            return exc
    return group


class ModbusTcpDriver(_ModbusDriver):
    """Modbus TCP (``tcp://host:port``), with optional parallel connections."""

    title: ClassVar[str] = "Modbus TCP"
    options_model: ClassVar[type[ModbusTcpOptions]] = ModbusTcpOptions
    _options: ModbusTcpOptions

    def __init__(self, context: DriverContext) -> None:
        super().__init__(context)
        self._endpoint = parse_tcp_endpoint(context.endpoint)

    @staticmethod
    def check_endpoint(endpoint: str) -> str | None:
        """What is wrong with ``endpoint`` for this driver, or ``None``."""
        return _endpoint_problem(parse_tcp_endpoint, endpoint)

    def _make_links(self) -> list[Link]:
        ep, opts = self._endpoint, self._options

        def make(**hooks: Any) -> Client:
            return AsyncModbusTcpClient(
                ep.host,
                port=ep.port,
                **self._client_options(),
                **hooks,
            )

        return [
            Link(
                make,
                self.stats,
                self.latency,
                describe=f"{self.name} (tcp://{ep.host}:{ep.port})",
                check_mbap=True,
                on_lost=self._lost,
            )
            for _ in range(opts.connections)
        ]

    async def connect(self) -> None:
        """Open ``options.connections`` TCP connections; raise :class:`ConnectError`."""
        opts = self._options
        try:
            async with asyncio.timeout(opts.connect_timeout_s + 0.5):
                await super().connect()
        except TimeoutError as exc:
            await self.close()
            raise ConnectError(f"{self.name}: connect timed out") from exc


class ModbusRtuDriver(_ModbusDriver):
    """Modbus RTU over a serial port (``rtu:///dev/ttyUSB0``).

    A request that times out marks only its tags ``BAD_COMM`` (reason ``timeout``): on a
    multi-drop line one silent unit must not blank the others. A scan in which no request got
    an answer raises :class:`TimeoutError_`.
    """

    title: ClassVar[str] = "Modbus RTU"
    options_model: ClassVar[type[ModbusRtuOptions]] = ModbusRtuOptions
    _options: ModbusRtuOptions
    _timeout_marks_tags = True

    def __init__(self, context: DriverContext) -> None:
        super().__init__(context)
        self._endpoint = parse_rtu_endpoint(context.endpoint)

    @staticmethod
    def check_endpoint(endpoint: str) -> str | None:
        """What is wrong with ``endpoint`` for this driver, or ``None``."""
        return _endpoint_problem(parse_rtu_endpoint, endpoint)

    def _make_links(self) -> list[Link]:
        ep, opts = self._endpoint, self._options

        def make(**hooks: Any) -> Client:
            return AsyncModbusSerialClient(
                ep.device,
                framer=FramerType.RTU,
                baudrate=opts.baudrate,
                bytesize=opts.bytesize,
                parity=opts.parity,
                stopbits=opts.stopbits,
                handle_local_echo=opts.handle_local_echo,
                **self._client_options(),
                **hooks,
            )

        return [
            Link(
                make,
                self.stats,
                self.latency,
                describe=f"{self.name} (rtu://{ep.device})",
                check_mbap=False,
                inter_frame_s=opts.inter_frame_s(),
                on_lost=self._lost,
            )
        ]
