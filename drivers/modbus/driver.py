"""Modbus TCP and RTU drivers on pymodbus.

The drivers own no retries and no reconnect policy: pymodbus clients are built with
``retries=0`` and ``reconnect_delay=0`` and the supervisor decides when to reconnect. pymodbus's
``timeout`` stays on as a backstop so a stalled peer cannot hang a read when the caller set no
deadline.

pymodbus on its own waits for its timeout on a lost connection or on bytes that are not a
Modbus answer. Two of its trace hooks make those failures fast: ``trace_connect`` fails the
request in flight when the connection drops, and ``trace_packet`` checks every TCP answer's
header (protocol id, length, transaction id, unit) before pymodbus parses it. After any
transport failure the link is closed, so a late answer can never be taken for the next one.

Every library exception is translated in :func:`_translate`; nothing foreign escapes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, ClassVar

import numpy as np
from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
from pymodbus.exceptions import ConnectionException, ModbusException, ModbusIOException
from pymodbus.framer import FramerType
from pymodbus.pdu import ModbusPDU

from edgeos.clock import Clock
from edgeos.config import ConnectionConfig
from edgeos.driver import (
    DriverStats,
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

Client = AsyncModbusTcpClient | AsyncModbusSerialClient


class ReadbackMismatch(TagError):
    """A written value read back differently (the device clamped, ignored or rejected it)."""

    def __init__(self, tag: str, written: list[int], read: list[int]) -> None:
        self.tag = tag
        self.written = written
        self.read = read
        super().__init__(f"write to {tag!r}: wrote registers {written}, read back {read}")


class _WireViolation(Exception):
    """Raised into a pending request by the trace hooks (translated to ProtocolError)."""


class _ConnectionLost(Exception):
    """Raised into a pending request when the connection drops (translated to ConnectError)."""


def _translate(exc: BaseException, what: str) -> TransportError:
    """The one place where library exceptions become edgeos transport errors."""
    if isinstance(exc, TransportError):
        return exc
    if isinstance(exc, _WireViolation):
        return ProtocolError(f"{what}: {exc}")
    if isinstance(exc, _ConnectionLost | ConnectionException | ConnectionError):
        return ConnectError(f"{what}: connection lost ({exc})")
    if isinstance(exc, TimeoutError):
        return TimeoutError_(f"{what}: no answer in time")
    if isinstance(exc, ModbusIOException):
        # With retries=0 pymodbus reports its own timeout as an IO exception "No response ...".
        if "no response" in str(exc).lower():
            return TimeoutError_(f"{what}: no answer in time")
        return ProtocolError(f"{what}: {exc}")
    if isinstance(exc, ModbusException):
        return ProtocolError(f"{what}: {exc}")
    if isinstance(exc, OSError):
        return ConnectError(f"{what}: {exc}")
    # Anything else came out of pymodbus parsing bytes it should not have accepted.
    return ProtocolError(f"{what}: {type(exc).__name__}: {exc}")


class _Link:
    """One pymodbus client plus the hooks that make failures fast and counted."""

    def __init__(
        self,
        make_client: Callable[..., Client],
        stats: DriverStats,
        latency: Histogram,
        *,
        describe: str,
        check_mbap: bool,
        inter_frame_s: float = 0.0,
    ) -> None:
        self._make_client = make_client
        self._stats = stats
        self._latency = latency
        self._describe = describe
        self._check_mbap = check_mbap
        self._gap = inter_frame_s
        self._client: Client | None = None
        self._broken: TransportError | None = None
        self._rx_pending = 0
        self._last_io = 0.0
        self._expect_fc = 0

    @property
    def connected(self) -> bool:
        return self._client is not None and self._client.connected

    async def open(self) -> None:
        self.close()
        self._broken = None
        client = self._make_client(
            trace_packet=self._trace_packet,
            trace_pdu=self._trace_pdu,
            trace_connect=self._trace_connect,
        )
        self._client = client
        try:
            ok = await client.connect()
        except asyncio.CancelledError:
            self.close()
            raise
        except Exception as exc:
            self.close()
            raise ConnectError(f"cannot connect to {self._describe}: {exc}") from exc
        if not ok:
            self.close()
            raise ConnectError(f"cannot connect to {self._describe} (refused or unreachable)")

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            # Fail a request still waiting so its caller does not sit out the timeout.
            self._fail_pending(_ConnectionLost("closed"))
            client.close()

    async def execute(
        self,
        call: Callable[[Client], Awaitable[ModbusPDU]],
        *,
        keep_on_timeout: bool = False,
    ) -> ModbusPDU:
        """Run one request; raise a ``TransportError`` (and close) when the link failed."""
        client = self._client
        if self._broken is not None:
            raise self._broken
        if client is None or not client.connected:
            raise ConnectError(f"{self._describe}: not connected")
        if self._gap:
            # Serial line: keep 3.5 character times of silence after the last frame, or the
            # device merges our request with the tail of the previous frame.
            wait = self._last_io + self._gap - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
        self._stats.requests += 1
        started = time.perf_counter()
        try:
            response = await call(client)
        except asyncio.CancelledError:
            # The answer may still arrive; a closed link cannot mistake it for the next one.
            self.close()
            raise
        except Exception as exc:
            error = _translate(exc, self._describe)
            self._stats.errors[error.kind] += 1
            if not (keep_on_timeout and isinstance(error, TimeoutError_)):
                self.close()
                self._broken = error
            raise error from exc
        self._latency.record(time.perf_counter() - started)
        self._stats.responses += 1
        return response

    def fail(self, error: TransportError) -> TransportError:
        """Mark the link unusable after the driver found a bad answer; returns ``error``."""
        self._stats.errors[error.kind] += 1
        self.close()
        self._broken = error
        return error

    # pymodbus hooks ------------------------------------------------------------------------

    def _pending(self) -> asyncio.Future[Any] | None:
        ctx = getattr(self._client, "ctx", None)
        fut: asyncio.Future[Any] | None = getattr(ctx, "response_future", None)
        return fut if fut is not None and not fut.done() else None

    def _fail_pending(self, exc: Exception) -> None:
        fut = self._pending()
        if fut is not None:
            fut.set_exception(exc)
            # Mark it retrieved: a waiting request still gets the exception; when nobody waits
            # any more (the caller's deadline passed) asyncio would otherwise log "Future
            # exception was never retrieved" at ERROR for every dropped connection.
            fut.exception()

    def _trace_connect(self, connected: bool) -> None:
        if not connected:
            self._fail_pending(_ConnectionLost("peer closed the connection"))

    def _trace_pdu(self, sending: bool, pdu: ModbusPDU) -> ModbusPDU:
        if sending:
            self._expect_fc = pdu.function_code
        else:
            self._rx_pending = 0
        return pdu

    def _trace_packet(self, sending: bool, data: bytes) -> bytes:
        self._last_io = time.monotonic()
        if sending:
            self._stats.bytes_out += len(data)
            self._rx_pending = 0
            return data
        # pymodbus hands over its whole receive buffer each time; count only what is new.
        self._stats.bytes_in += max(len(data) - self._rx_pending, 0)
        self._rx_pending = len(data)
        if self._check_mbap and len(data) >= 7:
            problem = self._check_header(data)
            if problem is not None:
                violation = _WireViolation(problem)
                if self._pending() is None:
                    self._broken = ProtocolError(f"{self._describe}: {problem}")
                self._fail_pending(violation)
                self.close()
                return b""
        return data

    def _check_header(self, data: bytes) -> str | None:
        tid = int.from_bytes(data[0:2], "big")
        pid = int.from_bytes(data[2:4], "big")
        length = int.from_bytes(data[4:6], "big")
        unit = data[6]
        if pid != 0 or not 3 <= length <= 254:
            return f"garbage on the wire (protocol id {pid}, length {length})"
        if self._pending() is None:
            return "unsolicited bytes from the peer"
        ctx = getattr(self._client, "ctx", None)
        expected_tid = getattr(ctx, "request_transaction_id", tid)
        if tid != expected_tid:
            return f"wrong transaction id {tid} (expected {expected_tid})"
        expected_unit = getattr(ctx, "request_dev_id", unit)
        if expected_unit and unit != expected_unit:
            return f"answer from unit {unit} (asked unit {expected_unit})"
        # pymodbus raises inside the transport callback on a PDU it cannot decode, which
        # would surface as a lost connection; catch what makes it fail first.
        if len(data) >= 9:
            fc = data[7]
            if fc & 0x7F != self._expect_fc:
                return f"function {fc} answered function {self._expect_fc}"
            if fc in (1, 2, 3, 4) and length != 3 + data[8]:
                return f"byte count {data[8]} disagrees with frame length {length}"
        return None


def _read_call(req: ReadRequest) -> Callable[[Client], Awaitable[ModbusPDU]]:
    if req.table == "holding":
        return lambda c: c.read_holding_registers(req.start, count=req.count, device_id=req.unit)
    if req.table == "input":
        return lambda c: c.read_input_registers(req.start, count=req.count, device_id=req.unit)
    if req.table == "coil":
        return lambda c: c.read_coils(req.start, count=req.count, device_id=req.unit)
    return lambda c: c.read_discrete_inputs(req.start, count=req.count, device_id=req.unit)


class _ModbusDriver:
    """Shared machinery of the TCP and RTU drivers."""

    options_model: ClassVar[type[ModbusTcpOptions] | type[ModbusRtuOptions]]
    #: Whether a request timeout leaves the line usable (RTU: yes, TCP: no).
    _timeout_marks_tags: ClassVar[bool] = False

    stats: DriverStats
    #: Per-request latency (seconds), from sending a request to its answer.
    latency: Histogram

    def __init__(
        self, connection: ConnectionConfig, tags: Sequence[TagBinding], *, clock: Clock
    ) -> None:
        self.connection = connection
        self._clock = clock
        self._bindings = {b.index: b for b in tags}
        self.stats = DriverStats()
        self.latency = Histogram()
        self._options = self.options_model.model_validate(connection.options)
        self._plans: dict[str, ScanPlan] = build_plans(
            [b for b in tags if b.tag.modbus is not None],
            max_gap=self._options.max_gap,
            max_registers=self._options.max_registers,
            max_coils=self._options.max_coils,
        )
        self._links: list[_Link] = []
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

    def _make_links(self) -> list[_Link]:
        raise NotImplementedError

    async def connect(self) -> None:
        """Open every connection; raise :class:`ConnectError` (nothing left open) on failure."""
        await self.close()
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

    async def close(self) -> None:
        """Close every connection; never raises."""
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
            raise ConnectError(f"{self.connection.name}: not connected")
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
            raise TimeoutError_(f"{self.connection.name}: no answer to any request of the scan")
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
        link: _Link,
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
                resp = await link.execute(_read_call(req), keep_on_timeout=self._timeout_marks_tags)
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
                        f"{self.connection.name}: function {resp.function_code} answered "
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
            f"{self.connection.name}: asked {req.count} {req.table} values at {req.start} "
            f"(unit {req.unit}), got {got}"
        )

    async def write(self, binding: TagBinding, value: Value) -> None:
        """Write one value: limits checked and encoded before the wire, optionally read back.

        Raises :class:`WriteRefused` (nothing sent), :class:`DeviceException` (the device
        answered with an exception), :class:`ReadbackMismatch`, or a ``TransportError``.
        """
        tag = binding.tag
        addr = tag.modbus
        try:
            if addr is None:
                raise WriteRefused(tag.name, "tag has no Modbus address")
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
            raise ConnectError(f"{self.connection.name}: not connected")
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
        self, link: _Link, binding: TagBinding, words: list[int], checked: Value
    ) -> None:
        addr = binding.tag.modbus
        assert addr is not None
        count = 1 if addr.table == "coil" else len(words)
        req = ReadRequest(addr.unit, addr.table, addr.address, count, 0, 1)
        resp = await link.execute(_read_call(req))
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

    options_model: ClassVar[type[ModbusTcpOptions]] = ModbusTcpOptions
    _options: ModbusTcpOptions

    def __init__(
        self, connection: ConnectionConfig, tags: Sequence[TagBinding], *, clock: Clock
    ) -> None:
        super().__init__(connection, tags, clock=clock)
        self._endpoint = parse_tcp_endpoint(connection.endpoint)

    @staticmethod
    def check_endpoint(endpoint: str) -> str | None:
        """What is wrong with ``endpoint`` for this driver, or ``None``."""
        try:
            parse_tcp_endpoint(endpoint)
        except ValueError as exc:
            return str(exc)
        return None

    def _make_links(self) -> list[_Link]:
        ep, opts = self._endpoint, self._options

        def make(**hooks: Any) -> Client:
            return AsyncModbusTcpClient(
                ep.host,
                port=ep.port,
                name=self.connection.name,
                timeout=opts.request_timeout_s,
                retries=0,
                reconnect_delay=0,
                **hooks,
            )

        return [
            _Link(
                make,
                self.stats,
                self.latency,
                describe=f"{self.connection.name} (tcp://{ep.host}:{ep.port})",
                check_mbap=True,
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
            raise ConnectError(f"{self.connection.name}: connect timed out") from exc


class ModbusRtuDriver(_ModbusDriver):
    """Modbus RTU over a serial port (``rtu:///dev/ttyUSB0``).

    A request that times out marks only its tags ``BAD_COMM`` (reason ``timeout``): on a
    multi-drop line one silent unit must not blank the others. A scan in which no request got
    an answer raises :class:`TimeoutError_`.
    """

    options_model: ClassVar[type[ModbusRtuOptions]] = ModbusRtuOptions
    _options: ModbusRtuOptions
    _timeout_marks_tags = True

    def __init__(
        self, connection: ConnectionConfig, tags: Sequence[TagBinding], *, clock: Clock
    ) -> None:
        super().__init__(connection, tags, clock=clock)
        self._endpoint = parse_rtu_endpoint(connection.endpoint)

    @staticmethod
    def check_endpoint(endpoint: str) -> str | None:
        """What is wrong with ``endpoint`` for this driver, or ``None``."""
        try:
            parse_rtu_endpoint(endpoint)
        except ValueError as exc:
            return str(exc)
        return None

    def _make_links(self) -> list[_Link]:
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
                name=self.connection.name,
                timeout=opts.request_timeout_s,
                retries=0,
                reconnect_delay=0,
                **hooks,
            )

        return [
            _Link(
                make,
                self.stats,
                self.latency,
                describe=f"{self.connection.name} (rtu://{ep.device})",
                check_mbap=False,
                inter_frame_s=opts.inter_frame_s(),
            )
        ]
