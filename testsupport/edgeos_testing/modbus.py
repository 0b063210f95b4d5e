"""Real Modbus peers for tests, HIL rigs and benchmarks (no mocks).

:class:`ModbusTestServer` runs a pymodbus server in-process on ``127.0.0.1:0`` (TCP) or on a
serial device (RTU) and records every request it receives, so tests can count requests on the
server side. :class:`SerialLine` is a pair of pseudo-terminals joined by a byte pump, standing
in for an RS-485 cable; it can inject garbage in either direction.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import time
import tty
from collections.abc import Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

from pymodbus.framer import FramerType
from pymodbus.pdu import ModbusPDU
from pymodbus.server import ModbusSerialServer, ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

__all__ = ["ModbusTestServer", "SeenRequest", "SerialLine", "UnitSpec"]


@dataclass(frozen=True, slots=True)
class UnitSpec:
    """Tables of one simulated unit; each table spans addresses ``0 .. size-1``.

    ``holes`` are (table, start, count) ranges that do not exist: the server answers
    exception 2 (illegal data address) for any request touching them. ``clamp_holding``
    makes the unit store written holding registers clamped to that value, as devices with
    internal limits do (read-back verification then sees a difference).
    """

    unit: int = 1
    holding: int = 1000
    input: int = 100
    coils: int = 256
    discrete: int = 64
    holes: tuple[tuple[str, int, int], ...] = ()
    clamp_holding: int | None = None


@dataclass(frozen=True, slots=True)
class SeenRequest:
    """A request as the server received it."""

    function_code: int
    unit: int
    address: int
    count: int


def _register_blocks(size: int, holes: Iterable[tuple[int, int]]) -> list[SimData]:
    """Registers ``0..size-1`` as zeros, with invalid ranges for ``holes``."""
    blocks: list[SimData] = []
    pos = 0
    for start, count in sorted(holes):
        if start > pos:
            blocks.append(SimData(pos, count=start - pos, values=0, datatype=DataType.REGISTERS))
        blocks.append(SimData(start, count=count, datatype=DataType.INVALID))
        pos = start + count
    if size > pos:
        blocks.append(SimData(pos, count=size - pos, values=0, datatype=DataType.REGISTERS))
    return blocks


def _bit_blocks(size: int) -> list[SimData]:
    # Non-shared mode packs 16 bits per register and addresses single bits; round up so
    # every register is whole.
    return [SimData(0, count=max(16, (size + 15) // 16 * 16), values=False, datatype=DataType.BITS)]


async def _clamp(  # noqa: PLR0917 - the signature pymodbus calls actions with
    limit: int,
    function_code: int,
    start_address: int,
    address: int,
    count: int,
    registers: list[int],
    set_values: list[int] | list[bool] | None,
) -> None:
    if function_code in (6, 16) and set_values:
        values: list[int] = set_values  # type: ignore[assignment]  # registers, not bits
        for i, v in enumerate(values):
            values[i] = min(int(v), limit)


def _device(spec: UnitSpec) -> SimDevice:
    holes: dict[str, list[tuple[int, int]]] = {}
    for table, start, count in spec.holes:
        holes.setdefault(table, []).append((start, count))
    action = None
    if spec.clamp_holding is not None:
        action = functools.partial(_clamp, spec.clamp_holding)
    return SimDevice(
        spec.unit,
        action=action,
        simdata=(
            _bit_blocks(spec.coils),
            _bit_blocks(spec.discrete),
            _register_blocks(spec.holding, holes.get("holding", [])),
            _register_blocks(spec.input, holes.get("input", [])),
        ),
    )


class ModbusTestServer:
    """An in-process pymodbus server (async context manager).

    TCP by default on ``127.0.0.1:0`` (read :attr:`port` back); pass ``serial_port`` for RTU.
    :meth:`stop` and :meth:`start` restart it on the same port.
    """

    def __init__(
        self,
        units: Iterable[UnitSpec] = (UnitSpec(),),
        *,
        serial_port: str | None = None,
        baudrate: int = 115200,
    ) -> None:
        self.units = tuple(units)
        self.serial_port = serial_port
        self.baudrate = baudrate
        self.port = 0
        #: Every request received, oldest first.
        self.requests: list[SeenRequest] = []
        self._server: ModbusTcpServer | ModbusSerialServer | None = None

    def _trace_pdu(self, sending: bool, pdu: ModbusPDU) -> ModbusPDU:
        if not sending:
            count = pdu.count or len(pdu.registers) or len(pdu.bits)
            self.requests.append(SeenRequest(pdu.function_code, pdu.dev_id, pdu.address, count))
        return pdu

    async def start(self) -> None:
        """Start serving (again); TCP restarts keep the port."""
        devices = [_device(u) for u in self.units]
        server: ModbusTcpServer | ModbusSerialServer
        if self.serial_port is not None:
            server = ModbusSerialServer(
                devices,
                framer=FramerType.RTU,
                port=self.serial_port,
                baudrate=self.baudrate,
                trace_pdu=self._trace_pdu,
            )
        else:
            server = ModbusTcpServer(
                devices, address=("127.0.0.1", self.port), trace_pdu=self._trace_pdu
            )
        await server.serve_forever(background=True)
        self._server = server
        if self.serial_port is None:
            listener: Any = server.transport  # an asyncio.Server once listening
            self.port = int(listener.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        """Stop serving and drop every client connection."""
        server, self._server = self._server, None
        if server is not None:
            await server.shutdown()  # type: ignore[no-untyped-call]
            await asyncio.sleep(0)

    @property
    def endpoint(self) -> str:
        """``tcp://127.0.0.1:<port>`` of a TCP server."""
        return f"tcp://127.0.0.1:{self.port}"

    def reads(self) -> list[SeenRequest]:
        """The read requests received (function codes 1–4)."""
        return [r for r in self.requests if r.function_code in (1, 2, 3, 4)]

    def writes(self) -> list[SeenRequest]:
        """The write requests received (function codes 5, 6, 15, 16)."""
        return [r for r in self.requests if r.function_code in (5, 6, 15, 16)]

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()


class SerialLine:
    """Two pseudo-terminals joined by a byte pump: a serial cable with a tap.

    The server opens :attr:`device_a`, the driver :attr:`device_b`. :meth:`inject_to_b` and
    :meth:`inject_to_a` put garbage on the line towards one side. ``drop_to_b`` silences the
    line towards ``b`` (a unit that stopped answering).
    """

    def __init__(self) -> None:
        self._fds: list[int] = []
        self.device_a = ""
        self.device_b = ""
        self._master_a = self._master_b = -1
        self.drop_to_b = False
        self.bytes_to_a = 0
        self.bytes_to_b = 0
        #: (time.monotonic(), "a" or "b", bytes) of every chunk carried, oldest first.
        self.log: list[tuple[float, str, bytes]] = []

    def _pump(self, src: int, dst: int, to_b: bool) -> None:
        try:
            data = os.read(src, 4096)
        except OSError:
            # The other end closed the pty; the reader is removed on exit.
            return
        self.log.append((time.monotonic(), "b" if to_b else "a", data))
        if to_b:
            self.bytes_to_b += len(data)
            if self.drop_to_b:
                return
        else:
            self.bytes_to_a += len(data)
        with contextlib.suppress(OSError):
            os.write(dst, data)

    def inject_to_a(self, data: bytes) -> None:
        """Write raw bytes towards side ``a`` (the server)."""
        os.write(self._master_a, data)

    def inject_to_b(self, data: bytes) -> None:
        """Write raw bytes towards side ``b`` (the driver)."""
        os.write(self._master_b, data)

    async def __aenter__(self) -> Self:
        loop = asyncio.get_running_loop()
        master_a, slave_a = os.openpty()
        master_b, slave_b = os.openpty()
        self._fds = [master_a, slave_a, master_b, slave_b]
        for fd in (master_a, master_b):
            tty.setraw(fd)
            os.set_blocking(fd, False)
        self._master_a, self._master_b = master_a, master_b
        self.device_a, self.device_b = os.ttyname(slave_a), os.ttyname(slave_b)
        loop.add_reader(master_a, self._pump, master_a, master_b, True)
        loop.add_reader(master_b, self._pump, master_b, master_a, False)
        return self

    async def __aexit__(self, *exc: Any) -> None:
        loop = asyncio.get_running_loop()
        for fd in (self._master_a, self._master_b):
            loop.remove_reader(fd)
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds = []
