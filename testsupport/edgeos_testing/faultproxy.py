"""A loopback TCP proxy that injects network faults, for tests and HIL rigs.

``FaultProxy(target_host, target_port)`` listens on ``127.0.0.1:0``; point the client at
:attr:`FaultProxy.port` instead of the server and change the proxy's behaviour while the test
runs. It knows nothing about the protocol it carries (Modbus, MQTT, …): faults act on the
chunks of bytes as they are read from either side.

Directions: ``"up"`` is client → server, ``"down"`` server → client, ``"both"`` either.
Random choices (which chunk to drop, which byte to flip) come from one ``random.Random(seed)``
so a failing test replays exactly. :attr:`FaultProxy.counts` says what the proxy did.

Example::

    async with FaultProxy("127.0.0.1", server_port, seed=1) as proxy:
        proxy.set_latency(0.05)
        proxy.stall("down")          # answers stop arriving
        ...
        proxy.heal()                 # back to a clean pipe
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import struct
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Literal, Self

__all__ = ["Direction", "FaultProxy"]

Direction = Literal["up", "down", "both"]
_DIRECTIONS: tuple[Literal["up", "down"], ...] = ("up", "down")
_CHUNK = 65536


@dataclass(slots=True)
class _Faults:
    """Faults of one direction."""

    latency: float = 0.0
    drop: float = 0.0
    truncate: int | None = None
    corrupt: float = 0.0
    bandwidth: float | None = None
    transform: Callable[[bytes], bytes] | None = None


class _Conn:
    """One proxied connection: the client's and the server's stream ends."""

    def __init__(
        self,
        client_w: asyncio.StreamWriter,
        server_w: asyncio.StreamWriter | None,
    ) -> None:
        self.client_w = client_w
        self.server_w = server_w

    def writer(self, direction: Literal["up", "down"]) -> asyncio.StreamWriter | None:
        return self.server_w if direction == "up" else self.client_w

    def abort(self) -> None:
        for w in (self.client_w, self.server_w):
            if w is not None:
                w.transport.abort()


class FaultProxy:
    """Async context manager: a TCP proxy on ``127.0.0.1:0`` with run-time faults."""

    def __init__(self, target_host: str, target_port: int, *, seed: int = 0) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.host = "127.0.0.1"
        self.port = 0
        #: What the proxy did: connections, refused, blackholed, chunks, bytes_up/down, dropped,
        #: truncated, corrupted, transformed, delayed, stalled, cut, injected.
        self.counts: Counter[str] = Counter()
        self._rng = random.Random(seed)
        self._faults = {d: _Faults() for d in _DIRECTIONS}
        self._flowing = {d: asyncio.Event() for d in _DIRECTIONS}
        for event in self._flowing.values():
            event.set()
        self._refuse: Literal["refuse", "blackhole"] | None = None
        self._server: asyncio.Server | None = None
        self._conns: set[_Conn] = set()
        self._handlers: set[asyncio.Task[None]] = set()
        self._pumps: set[asyncio.Task[None]] = set()

    # lifecycle ------------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._handle, self.host, 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop listening, cut every connection and wait for the pumps to end."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for conn in list(self._conns):
            conn.abort()
        # Cancel the pumps, not the handlers: asyncio's stream server logs an error for a
        # cancelled handler task, while a handler whose pumps were cancelled ends cleanly.
        for pump in list(self._pumps):
            pump.cancel()
        handlers = list(self._handlers)
        if handlers:
            await asyncio.gather(*handlers, return_exceptions=True)
        if server is not None:
            await server.wait_closed()

    # faults ---------------------------------------------------------------------------------

    def _each(self, direction: Direction) -> list[_Faults]:
        return [self._faults[d] for d in _DIRECTIONS if direction in (d, "both")]

    def set_latency(self, seconds: float, direction: Direction = "both") -> None:
        """Delay every chunk by ``seconds`` (order is kept)."""
        for f in self._each(direction):
            f.latency = seconds

    def set_drop(self, fraction: float, direction: Direction = "both") -> None:
        """Silently drop this fraction of chunks (0–1)."""
        for f in self._each(direction):
            f.drop = fraction

    def set_truncate(self, max_bytes: int | None, direction: Direction = "both") -> None:
        """Forward at most ``max_bytes`` of each chunk, drop the rest (``None``: off)."""
        for f in self._each(direction):
            f.truncate = max_bytes

    def set_corrupt(self, fraction: float, direction: Direction = "both") -> None:
        """In this fraction of chunks, flip every bit of one randomly chosen byte."""
        for f in self._each(direction):
            f.corrupt = fraction

    def set_bandwidth(self, bytes_per_s: float | None, direction: Direction = "both") -> None:
        """Cap throughput at ``bytes_per_s`` (``None``: unlimited)."""
        for f in self._each(direction):
            f.bandwidth = bytes_per_s

    def set_transform(
        self, transform: Callable[[bytes], bytes] | None, direction: Direction = "both"
    ) -> None:
        """Pass every chunk through ``transform`` (protocol-aware rewrites live in the test)."""
        for f in self._each(direction):
            f.transform = transform

    def stall(self, direction: Direction = "both") -> None:
        """Stop forwarding; bytes wait in the proxy until :meth:`resume` or :meth:`heal`."""
        for d in _DIRECTIONS:
            if direction in (d, "both"):
                self._flowing[d].clear()

    def resume(self, direction: Direction = "both") -> None:
        """Forward again after :meth:`stall` (held bytes go first)."""
        for d in _DIRECTIONS:
            if direction in (d, "both"):
                self._flowing[d].set()

    def partition(self, mode: Literal["refuse", "blackhole"] = "refuse") -> None:
        """Cut current connections and refuse new ones.

        ``refuse`` resets new connections at once; ``blackhole`` accepts them and never
        forwards a byte (a peer that vanished behind a switch).
        """
        self._refuse = mode
        self.cut()

    def cut(self) -> None:
        """Reset every current connection (both sides see a connection reset)."""
        for conn in list(self._conns):
            conn.abort()
            self.counts["cut"] += 1

    def heal(self) -> None:
        """Remove every fault; current connections keep going, new ones are accepted."""
        self._faults = {d: _Faults() for d in _DIRECTIONS}
        self._refuse = None
        self.resume()

    def inject(self, data: bytes, direction: Literal["up", "down"] = "down") -> None:
        """Write ``data`` into every current connection, as if the peer had sent it."""
        for conn in list(self._conns):
            writer = conn.writer(direction)
            if writer is not None and not writer.is_closing():
                writer.write(data)
                self.counts["injected"] += 1

    @property
    def connections(self) -> int:
        """Connections currently open through the proxy."""
        return len(self._conns)

    # plumbing -------------------------------------------------------------------------------

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        conn = _Conn(client_w, None)
        try:
            if self._refuse == "refuse":
                self.counts["refused"] += 1
                _reset(client_w)
                return
            self._conns.add(conn)
            if self._refuse == "blackhole":
                self.counts["blackholed"] += 1
                await client_r.read()  # until the client gives up
                return
            try:
                server_r, server_w = await asyncio.open_connection(
                    self.target_host, self.target_port
                )
            except OSError:
                self.counts["target_unreachable"] += 1
                _reset(client_w)
                return
            conn.server_w = server_w
            self.counts["connections"] += 1
            async with asyncio.TaskGroup() as tg:
                for pump in (
                    tg.create_task(self._pump(client_r, conn, "up")),
                    tg.create_task(self._pump(server_r, conn, "down")),
                ):
                    self._pumps.add(pump)
                    pump.add_done_callback(self._pumps.discard)
        finally:
            self._conns.discard(conn)
            conn.abort()
            self._handlers.discard(task)

    async def _pump(
        self, reader: asyncio.StreamReader, conn: _Conn, direction: Literal["up", "down"]
    ) -> None:
        writer = conn.writer(direction)
        assert writer is not None
        try:
            while data := await reader.read(_CHUNK):
                if not self._flowing[direction].is_set():
                    self.counts["stalled"] += 1
                    await self._flowing[direction].wait()
                out = self._apply(data, direction)
                faults = self._faults[direction]
                if faults.latency:
                    self.counts["delayed"] += 1
                    await asyncio.sleep(faults.latency)
                if faults.bandwidth and out:
                    # The chunk leaves once a link of that speed would have carried it.
                    await asyncio.sleep(len(out) / faults.bandwidth)
                if out:
                    writer.write(out)
                    await writer.drain()
                    self.counts[f"bytes_{direction}"] += len(out)
        except (ConnectionError, OSError):
            pass  # one side went away: end both (the handler aborts the pair)
        finally:
            # Half-close lets the other pump see EOF; abort in the handler cleans up.
            conn.abort()

    def _apply(self, data: bytes, direction: Literal["up", "down"]) -> bytes:
        f = self._faults[direction]
        self.counts["chunks"] += 1
        if f.drop and self._rng.random() < f.drop:
            self.counts["dropped"] += 1
            return b""
        if f.truncate is not None and len(data) > f.truncate:
            self.counts["truncated"] += 1
            data = data[: f.truncate]
        if f.corrupt and data and self._rng.random() < f.corrupt:
            buf = bytearray(data)
            i = self._rng.randrange(len(buf))
            buf[i] ^= 0xFF
            data = bytes(buf)
            self.counts["corrupted"] += 1
        if f.transform is not None:
            data = f.transform(data)
            self.counts["transformed"] += 1
        return data


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST instead of FIN, as a refusing firewall or a crashed peer would."""
    sock = writer.get_extra_info("socket")
    if isinstance(sock, socket.socket):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()
