"""FaultProxy against a real loopback echo/sink server."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Callable

import pytest

from edgeos_testing.faultproxy import FaultProxy


class _Peer:
    """A loopback server that echoes (or only records) what it receives."""

    def __init__(self, echo: bool = True) -> None:
        self.echo = echo
        self.received = bytearray()
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    async def _handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(w)
        try:
            while data := await r.read(65536):
                self.received += data
                if self.echo:
                    w.write(data)
                    await w.drain()
        except ConnectionError:
            pass
        finally:
            w.transport.abort()
            self._writers.discard(w)
            self._tasks.discard(task)

    async def __aenter__(self) -> _Peer:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for w in list(self._writers):
            w.transport.abort()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()


async def _until(cond: Callable[[], bool], limit: float = 5.0) -> None:
    """Wait for a condition (a generous safety limit, not a timing assertion)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    while not cond():
        assert loop.time() < deadline, "condition not reached"
        await asyncio.sleep(0.002)


@pytest.fixture
async def echo() -> AsyncIterator[_Peer]:
    async with _Peer() as peer:
        yield peer


async def _open(proxy: FaultProxy) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(proxy.host, proxy.port)


async def _roundtrip(r: asyncio.StreamReader, w: asyncio.StreamWriter, data: bytes) -> bytes:
    w.write(data)
    await w.drain()
    return await asyncio.wait_for(r.readexactly(len(data)), 5)


async def test_clean_pipe_forwards_and_counts(echo: _Peer) -> None:
    async with FaultProxy("127.0.0.1", echo.port) as proxy:
        r, w = await _open(proxy)
        assert await _roundtrip(r, w, b"hello") == b"hello"
        assert proxy.counts["connections"] == 1
        assert proxy.counts["bytes_up"] == 5
        assert proxy.counts["bytes_down"] == 5
        w.close()


async def test_latency_delays_every_chunk(echo: _Peer) -> None:
    async with FaultProxy("127.0.0.1", echo.port) as proxy:
        proxy.set_latency(0.05, "down")
        r, w = await _open(proxy)
        started = time.monotonic()
        assert await _roundtrip(r, w, b"x") == b"x"
        # A lower bound only: sleeping never returns early.
        assert time.monotonic() - started >= 0.045
        assert proxy.counts["delayed"] == 1
        w.close()


async def test_drop_is_deterministic_with_a_seed() -> None:
    async with _Peer(echo=False) as sink, FaultProxy("127.0.0.1", sink.port, seed=42) as proxy:
        proxy.set_drop(0.5, "up")
        _, w = await _open(proxy)
        for i in range(40):
            w.write(bytes([i]))
            await w.drain()
            await _until(lambda i=i: proxy.counts["chunks"] == i + 1)
        expected_rng = random.Random(42)
        expected = bytes(i for i in range(40) if not expected_rng.random() < 0.5)
        await _until(lambda: len(sink.received) == len(expected))
        assert bytes(sink.received) == expected
        assert proxy.counts["dropped"] == 40 - len(expected)
        assert 0 < proxy.counts["dropped"] < 40
        w.close()


async def test_truncate_and_corrupt(echo: _Peer) -> None:
    async with FaultProxy("127.0.0.1", echo.port, seed=3) as proxy:
        r, w = await _open(proxy)
        proxy.set_truncate(4, "up")
        w.write(b"0123456789")
        await w.drain()
        assert await asyncio.wait_for(r.readexactly(4), 5) == b"0123"
        proxy.heal()
        proxy.set_corrupt(1.0, "down")
        got = await _roundtrip(r, w, b"abcdefgh")
        diff = [(a, b) for a, b in zip(got, b"abcdefgh", strict=True) if a != b]
        assert len(diff) == 1 and diff[0][0] ^ diff[0][1] == 0xFF
        assert proxy.counts["truncated"] == 1
        assert proxy.counts["corrupted"] == 1
        w.close()


async def test_transform_rewrites_chunks(echo: _Peer) -> None:
    async with FaultProxy("127.0.0.1", echo.port) as proxy:
        proxy.set_transform(lambda b: b.upper(), "down")
        r, w = await _open(proxy)
        assert await _roundtrip(r, w, b"abc") == b"ABC"
        w.close()


async def test_stall_holds_bytes_until_resume(echo: _Peer) -> None:
    async with FaultProxy("127.0.0.1", echo.port) as proxy:
        r, w = await _open(proxy)
        proxy.stall("down")
        w.write(b"ping")
        await w.drain()
        await _until(lambda: proxy.counts["stalled"] == 1)
        assert echo.received == b"ping"  # upstream still flows
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(r.read(4), 0.05)
        proxy.resume()
        assert await asyncio.wait_for(r.readexactly(4), 5) == b"ping"
        w.close()


async def test_bandwidth_cap_slows_transfer(echo: _Peer) -> None:
    async with FaultProxy("127.0.0.1", echo.port) as proxy:
        proxy.set_bandwidth(20_000, "up")
        r, w = await _open(proxy)
        payload = bytes(range(256)) * 8  # 2048 bytes → at least ~0.1 s at 20 kB/s
        started = time.monotonic()
        assert await _roundtrip(r, w, payload) == payload
        assert time.monotonic() - started >= 0.09
        w.close()


async def test_cut_resets_current_connections_only(echo: _Peer) -> None:
    async with FaultProxy("127.0.0.1", echo.port) as proxy:
        r, w = await _open(proxy)
        assert await _roundtrip(r, w, b"a") == b"a"
        proxy.cut()
        with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
            await asyncio.wait_for(r.readexactly(1), 5)
        assert proxy.counts["cut"] == 1
        r2, w2 = await _open(proxy)
        assert await _roundtrip(r2, w2, b"b") == b"b"
        w.close()
        w2.close()


async def test_partition_refuses_then_heals(echo: _Peer) -> None:
    async with FaultProxy("127.0.0.1", echo.port) as proxy:
        proxy.partition()
        r, w = await _open(proxy)
        with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
            await _roundtrip(r, w, b"a")
        assert proxy.counts["refused"] == 1
        w.close()
        proxy.heal()
        r, w = await _open(proxy)
        assert await _roundtrip(r, w, b"ok") == b"ok"
        w.close()


async def test_blackhole_accepts_but_never_forwards(echo: _Peer) -> None:
    async with FaultProxy("127.0.0.1", echo.port) as proxy:
        proxy.partition("blackhole")
        r, w = await _open(proxy)
        w.write(b"lost")
        await w.drain()
        await _until(lambda: proxy.counts["blackholed"] == 1)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(r.read(1), 0.05)
        assert echo.received == b""
        w.close()


async def test_inject_writes_into_live_connections(echo: _Peer) -> None:
    async with FaultProxy("127.0.0.1", echo.port) as proxy:
        r, w = await _open(proxy)
        assert await _roundtrip(r, w, b"a") == b"a"
        proxy.inject(b"\xde\xad")
        assert await asyncio.wait_for(r.readexactly(2), 5) == b"\xde\xad"
        assert proxy.counts["injected"] == 1
        w.close()


async def test_unreachable_target_resets_client() -> None:
    async with _Peer() as peer:
        port = peer.port
    async with FaultProxy("127.0.0.1", port) as proxy:
        r, w = await _open(proxy)
        with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
            await _roundtrip(r, w, b"a")
        assert proxy.counts["target_unreachable"] == 1
        w.close()
