"""One pymodbus client and the hooks that make its failures fast, counted and translated.

pymodbus on its own waits for its timeout on a lost connection or on bytes that are not a
Modbus answer. Two of its trace hooks make those failures fast: ``trace_connect`` fails the
request in flight when the connection drops (and tells the driver, which sets its
``connection_lost`` signal), and ``trace_packet`` checks every TCP answer's header (protocol
id, length, transaction id, unit) before pymodbus parses it. After any transport failure the
link is closed, so a late answer can never be taken for the next one.

Every library exception is translated in :func:`translate`; nothing foreign escapes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
from pymodbus.exceptions import ConnectionException, ModbusException, ModbusIOException
from pymodbus.pdu import ModbusPDU

from edgeos.driver import DriverStats
from edgeos.errors import ConnectError, ProtocolError, TimeoutError_, TransportError
from edgeos.histogram import Histogram

from .plan import ReadRequest

__all__ = ["Client", "Link", "read_call", "translate"]

Client = AsyncModbusTcpClient | AsyncModbusSerialClient


class _WireViolation(Exception):
    """Raised into a pending request by the trace hooks (translated to ProtocolError)."""


class _ConnectionLost(Exception):
    """Raised into a pending request when the connection drops (translated to ConnectError)."""


def translate(exc: BaseException, what: str) -> TransportError:
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


class Link:
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
        on_lost: Callable[[str], None] | None = None,
    ) -> None:
        self._make_client = make_client
        self._on_lost = on_lost
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
            error = translate(exc, self._describe)
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
            # close() drops the client before pymodbus reports the disconnect, so a client
            # still held here means the peer (or the network) ended it, not us.
            if self._client is not None and self._on_lost is not None:
                self._on_lost(f"{self._describe}: the peer closed the connection")

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


def read_call(req: ReadRequest) -> Callable[[Client], Awaitable[ModbusPDU]]:
    if req.table == "holding":
        return lambda c: c.read_holding_registers(req.start, count=req.count, device_id=req.unit)
    if req.table == "input":
        return lambda c: c.read_input_registers(req.start, count=req.count, device_id=req.unit)
    if req.table == "coil":
        return lambda c: c.read_coils(req.start, count=req.count, device_id=req.unit)
    return lambda c: c.read_discrete_inputs(req.start, count=req.count, device_id=req.unit)
