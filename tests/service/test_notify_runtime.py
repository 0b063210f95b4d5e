"""`edgeos run` under a real NOTIFY_SOCKET, the way systemd runs it (Type=notify, WatchdogSec)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgeos_sim import SimLine, SimOptions
from edgeos_sim.line import write_line_config


class NotifySocket:
    """The receiving end of sd_notify, as systemd has it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.messages: list[tuple[float, str]] = []

    def collect(self, seconds: float) -> list[str]:
        """Everything that arrives within ``seconds``."""
        got: list[str] = []
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                msg = self.sock.recv(4096).decode()
            except TimeoutError:
                break
            self.messages.append((time.monotonic(), msg))
            got.append(msg)
        return got

    def wait_for(self, prefix: str, seconds: float) -> str:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            for msg in self.collect(0.2):
                if msg.startswith(prefix) or f"\n{prefix}" in msg:
                    return msg
        raise AssertionError(f"no {prefix!r} within {seconds} s; got {self.messages[-5:]}")

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifySocket]:
    n = NotifySocket(tmp_path / "notify.sock")
    yield n
    n.close()


async def test_ready_watchdog_stall_and_orderly_stop(tmp_path: Path, notify: NotifySocket) -> None:
    async with SimLine(SimOptions(nests=1, tags_per_nest=20, opcua_port=None)) as line:
        config = tmp_path / "edgeos.toml"
        write_line_config(
            config,
            modbus_port=line.modbus_port,
            opcua_url=None,
            state_dir=tmp_path / "state",
            nests=1,
            tags_per_nest=20,
            overrides={"uplink": {"enabled": False}},
        )
        env = {
            **os.environ,
            "NOTIFY_SOCKET": str(notify.path),
            "WATCHDOG_USEC": "200000",  # systemd: WatchdogSec=0.2s -> ping every 0.1 s
        }
        env.pop("WATCHDOG_PID", None)
        proc = subprocess.Popen(  # noqa: ASYNC220 - returns at once; waits go via to_thread
            [sys.executable, "-m", "edgeos", "run", "--config", str(config)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        try:
            ready = await asyncio.to_thread(notify.wait_for, "READY=1", 30)
            assert "STATUS=running: 20 tags, 1/1 connections up" in ready
            pings = [m for m in await asyncio.to_thread(notify.collect, 1.0) if m == "WATCHDOG=1"]
            assert len(pings) >= 3, notify.messages[-10:]

            # A frozen process (what a stalled loop looks like from outside) sends nothing.
            proc.send_signal(signal.SIGSTOP)
            await asyncio.to_thread(notify.collect, 0.3)  # drain what was in flight
            frozen = await asyncio.to_thread(notify.collect, 1.0)
            assert "WATCHDOG=1" not in frozen
            proc.send_signal(signal.SIGCONT)
            await asyncio.to_thread(notify.wait_for, "WATCHDOG=1", 5)

            proc.send_signal(signal.SIGTERM)
            await asyncio.to_thread(notify.wait_for, "STOPPING=1", 10)
            out, _ = await asyncio.to_thread(proc.communicate, timeout=20)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == 0, out.decode()[-2000:]
    assert b"Traceback" not in out
    assert (tmp_path / "state" / "twin.snapshot").exists()
