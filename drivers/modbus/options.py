"""Options of the Modbus drivers (``connection.options``) and endpoint parsing."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import Field

from edgeos.driver import DriverOptions

__all__ = [
    "ModbusRtuOptions",
    "ModbusTcpOptions",
    "RtuEndpoint",
    "TcpEndpoint",
    "parse_rtu_endpoint",
    "parse_tcp_endpoint",
]


class _CommonOptions(DriverOptions):
    #: Registers of unused gap that may be read to merge two ranges into one request. Set 0 for
    #: devices that answer exception 2 when a request spans an unmapped register.
    max_gap: Annotated[int, Field(ge=0, le=124)] = 8
    #: Registers per read request (the protocol allows 125; some devices accept fewer).
    max_registers: Annotated[int, Field(ge=1, le=125)] = 125
    #: Coils / discrete inputs per read request (the protocol allows 2000).
    max_coils: Annotated[int, Field(ge=1, le=2000)] = 2000
    #: Read written registers back and raise ``ReadbackMismatch`` when they differ.
    readback_writes: bool = False
    #: Use function 16 (write multiple registers) even for one register; for devices that do
    #: not implement function 6.
    always_write_multiple: bool = False
    #: Deadline of one request on the wire (seconds): pymodbus's own timeout.
    request_timeout_s: Annotated[float, Field(gt=0, le=60)] = 3.0
    #: Time allowed to open the connection(s) (seconds).
    connect_timeout_s: Annotated[float, Field(gt=0, le=60)] = 3.0


class ModbusTcpOptions(_CommonOptions):
    """Options of ``modbus_tcp`` connections."""

    #: Parallel TCP connections to the device; the requests of one scan are spread over them.
    #: Many PLCs allow 4–16 clients; some gateways allow one only.
    connections: Annotated[int, Field(ge=1, le=16)] = 1


class ModbusRtuOptions(_CommonOptions):
    """Options of ``modbus_rtu`` connections (one serial line, one request at a time)."""

    baudrate: Annotated[int, Field(ge=300, le=4_000_000)] = 19200
    parity: Literal["N", "E", "O"] = "N"
    bytesize: Literal[7, 8] = 8
    stopbits: Literal[1, 2] = 1
    #: Silence kept between frames (ms). ``None``: 3.5 character times, and 1.75 ms above
    #: 19200 baud, as the Modbus serial line specification says.
    inter_frame_ms: Annotated[float, Field(ge=0, le=1000)] | None = None
    #: Discard the echo of our own frames (RS-485 adapters without echo suppression).
    handle_local_echo: bool = False

    def inter_frame_s(self) -> float:
        """The silence between frames, in seconds."""
        if self.inter_frame_ms is not None:
            return self.inter_frame_ms / 1000.0
        if self.baudrate > 19200:
            return 0.00175
        bits_per_char = 1 + self.bytesize + (0 if self.parity == "N" else 1) + self.stopbits
        return 3.5 * bits_per_char / self.baudrate


@dataclass(frozen=True, slots=True)
class TcpEndpoint:
    host: str
    port: int


@dataclass(frozen=True, slots=True)
class RtuEndpoint:
    device: str


def parse_tcp_endpoint(endpoint: str) -> TcpEndpoint:
    """Parse ``tcp://host[:port]`` (port 502 when omitted); raise ``ValueError`` with a hint."""
    parts = urlsplit(endpoint)
    if parts.scheme != "tcp":
        raise ValueError(f"Modbus TCP endpoint must look like 'tcp://host:502' (got {endpoint!r})")
    try:
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"invalid port in {endpoint!r}: {exc}") from None
    if not parts.hostname:
        raise ValueError(f"no host in {endpoint!r} (expected 'tcp://host:502')")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"unexpected path or query in {endpoint!r} (expected 'tcp://host:502')")
    return TcpEndpoint(parts.hostname, 502 if port is None else port)


def parse_rtu_endpoint(endpoint: str) -> RtuEndpoint:
    """Parse ``rtu:///dev/ttyUSB0``; raise ``ValueError`` with a hint."""
    parts = urlsplit(endpoint)
    if parts.scheme != "rtu":
        raise ValueError(
            f"Modbus RTU endpoint must look like 'rtu:///dev/ttyUSB0' (got {endpoint!r})"
        )
    if parts.netloc:
        raise ValueError(
            f"{endpoint!r} has a host part; a serial port needs three slashes: 'rtu:///dev/ttyUSB0'"
        )
    if not parts.path.startswith("/") or parts.path == "/":
        raise ValueError(f"no serial device path in {endpoint!r} (e.g. 'rtu:///dev/ttyUSB0')")
    return RtuEndpoint(parts.path)
