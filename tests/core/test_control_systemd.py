"""The control socket and sd_notify, against a real Unix socket and a real NOTIFY_SOCKET."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Any

import pytest

from edgeos.control import ControlError, ControlServer, request
from edgeos.systemd import Notifier, watchdog_interval_s


async def _start(path: Path) -> tuple[asyncio.Task[None], ControlServer]:
    async def status(_: dict[str, Any]) -> dict[str, Any]:
        return {"state": "running", "tags": 3}

    async def echo(req: dict[str, Any]) -> Any:
        return req["value"]

    async def boom(_: dict[str, Any]) -> Any:
        raise RuntimeError("kaput")

    server = ControlServer(path, {"status": status, "echo": echo, "boom": boom})
    ready = asyncio.Event()
    task = asyncio.create_task(server.run(ready))
    await ready.wait()
    return task, server


async def test_control_socket_round_trip_and_errors(tmp_path: Path) -> None:
    path = tmp_path / "ctl.sock"
    task, _ = await _start(path)
    try:
        assert (path.stat().st_mode & 0o777) == 0o660
        result = await asyncio.to_thread(request, path, "status")
        assert result == {"state": "running", "tags": 3}
        assert await asyncio.to_thread(request, path, "echo", value=[1, 2]) == [1, 2]
        with pytest.raises(ControlError, match="unknown op 'nope'"):
            await asyncio.to_thread(request, path, "nope")
        with pytest.raises(ControlError, match="KeyError"):
            await asyncio.to_thread(request, path, "echo")
        with pytest.raises(ControlError, match="internal error"):
            await asyncio.to_thread(request, path, "boom")

        # Garbage on the wire gets an error answer, and the server keeps serving.
        def raw() -> bytes:
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(str(path))
                s.sendall(b"\x00\xffnot json\n")
                return s.recv(4096)

        assert b"not JSON" in await asyncio.to_thread(raw)
        assert (await asyncio.to_thread(request, path, "status"))["tags"] == 3
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert not path.exists()


def test_control_client_says_when_nothing_listens(tmp_path: Path) -> None:
    with pytest.raises(ControlError, match="is edgeos running"):
        request(tmp_path / "absent.sock", "status")


@pytest.fixture
def notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> socket.socket:
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(2.0)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    yield sock
    sock.close()


def _drain(sock: socket.socket) -> list[str]:
    out = []
    sock.settimeout(0.05)
    while True:
        try:
            out.append(sock.recv(4096).decode())
        except TimeoutError:
            return out


async def test_ready_status_and_health_driven_watchdog(notify_socket: socket.socket) -> None:
    notifier = Notifier()
    assert notifier.enabled
    notifier.ready("scanning 3 tags")
    assert notify_socket.recv(4096).decode() == "READY=1\nSTATUS=scanning 3 tags"
    notifier.status("scanning 3 tags")  # unchanged: not repeated
    notifier.status("connection plc down")
    assert notify_socket.recv(4096).decode() == "STATUS=connection plc down"

    healthy = True
    task = asyncio.create_task(notifier.watchdog_task(lambda: healthy, 0.01))
    try:
        while notifier.pings < 3:
            await asyncio.sleep(0.01)
        healthy = False  # the scan loop stalls: pings must stop
        missed_before = notifier.missed
        while notifier.missed < missed_before + 3:
            await asyncio.sleep(0.01)
        pings_while_unhealthy = notifier.pings
        await asyncio.sleep(0.05)
        assert notifier.pings == pings_while_unhealthy
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    messages = _drain(notify_socket)
    assert messages.count("WATCHDOG=1") == notifier.pings >= 3


def test_watchdog_interval_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    monkeypatch.setenv("WATCHDOG_USEC", "10000000")
    assert watchdog_interval_s() == 5.0
    monkeypatch.setenv("WATCHDOG_PID", "1")  # meant for another process
    assert watchdog_interval_s() is None
    monkeypatch.delenv("WATCHDOG_USEC")
    assert watchdog_interval_s() is None


def test_notifier_is_silent_outside_systemd(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    notifier = Notifier()
    notifier.ready("x")
    notifier.ping()
    assert not notifier.enabled and notifier.pings == 1
