"""The device under test: a local ``edgeos run`` subprocess (optionally under a systemd
stand-in with a real watchdog), or an installed gateway reached over SSH."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import subprocess
import time
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any, Protocol

from edgeos_testing.oracle import Incarnation
from edgeos_testing.procs import LoggedProcess, exe, run_cli
from edgeos_testing.rigspec import DutSpec
from edgeos_testing.spoolread import SpoolInspection, inspect_spool

__all__ = ["Dut", "LocalDut", "SshDut", "Supervisor"]


class Dut(Protocol):
    """What a scenario can do to the device under test (local subprocess or SSH gateway)."""

    device_id: str
    incarnations: list[Incarnation]
    inspections: list[SpoolInspection]

    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    async def kill(self) -> None: ...
    async def freeze(self) -> None: ...
    async def thaw(self) -> None: ...
    async def status(self) -> dict[str, Any]: ...
    async def inspect_spool(self) -> SpoolInspection: ...
    async def close(self) -> None: ...


class Supervisor:
    """A systemd stand-in for one service: ``NOTIFY_SOCKET`` + ``WATCHDOG_USEC``, restarts.

    Listens on a real ``AF_UNIX`` datagram socket (what ``sd_notify`` writes to). When no
    ``WATCHDOG=1`` arrived for ``watchdog_s`` after READY, it does what systemd does on a
    watchdog timeout: SIGABRT, SIGKILL after ``kill_timeout_s``, then restarts the service
    after ``restart_s`` (``Restart=on-failure``). :attr:`fired` counts timeouts.

    As in systemd (``WatchdogSec=``: "activated when the start-up is completed"), the watchdog
    of an incarnation is armed by its ``READY=1``; start-up is bounded by ``start_timeout_s``
    instead (``TimeoutStartSec=``, counted in :attr:`start_timeouts`). Arming it at the spawn
    made a restarted runtime that needed more than ``watchdog_s`` to import and start on a
    busy machine look like a second watchdog failure.
    """

    def __init__(
        self,
        socket_path: Path,
        watchdog_s: float,
        *,
        kill_timeout_s: float = 1.0,
        restart_s: float = 0.5,
        start_timeout_s: float = 90.0,
    ) -> None:
        self.socket_path = socket_path
        self.watchdog_s = watchdog_s
        self.kill_timeout_s = kill_timeout_s
        self.restart_s = restart_s
        self.start_timeout_s = start_timeout_s
        self.fired = 0
        self.start_timeouts = 0
        #: The current incarnation said READY=1 (its watchdog is armed).
        self.armed = False
        self.pings = 0
        self.ready = 0
        self.last_ping = 0.0
        self.messages: list[str] = []
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        socket_path.unlink(missing_ok=True)
        self._sock.bind(str(socket_path))
        self._sock.setblocking(False)

    def env(self) -> dict[str, str]:
        return {
            "NOTIFY_SOCKET": str(self.socket_path),
            "WATCHDOG_USEC": str(int(self.watchdog_s * 1e6)),
        }

    def drain(self) -> None:
        """Read every notification waiting on the socket."""
        while True:
            try:
                data = self._sock.recv(4096)
            except BlockingIOError:
                return
            for line in data.decode(errors="replace").splitlines():
                if line == "WATCHDOG=1":
                    self.pings += 1
                    self.last_ping = time.monotonic()
                elif line == "READY=1":
                    self.ready += 1
                    self.armed = True
                    self.last_ping = time.monotonic()
                elif not line.startswith("STATUS="):
                    self.messages.append(line)

    def expired(self) -> bool:
        """The armed watchdog ran out (no ping for ``watchdog_s`` since READY or the last)."""
        self.drain()
        return self.armed and time.monotonic() - self.last_ping > self.watchdog_s

    def start_timed_out(self, spawned_at: float) -> bool:
        """No READY=1 within ``start_timeout_s`` of the spawn."""
        self.drain()
        return not self.armed and time.monotonic() - spawned_at > self.start_timeout_s

    def close(self) -> None:
        self._sock.close()
        self.socket_path.unlink(missing_ok=True)


class LocalDut:
    """``edgeos run --config FILE`` as a subprocess of the test (optionally supervised)."""

    def __init__(
        self,
        device_id: str,
        config: Path,
        state_dir: Path,
        workdir: Path,
        *,
        watchdog_s: float | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.device_id = device_id
        self.config = config
        self.state_dir = state_dir
        self.workdir = workdir
        self.incarnations: list[Incarnation] = []
        self.inspections: list[SpoolInspection] = []
        self.supervisor = (
            Supervisor(workdir / "notify.sock", watchdog_s) if watchdog_s is not None else None
        )
        proc_env = dict(env or {})
        if self.supervisor is not None:
            proc_env.update(self.supervisor.env())
        self._proc = LoggedProcess(
            "runtime",
            [exe("edgeos"), "run", "--config", str(config)],
            workdir / "runtime.log",
            proc_env or None,
        )
        self._started = 0.0
        self._watch: asyncio.Task[None] | None = None
        self.restarts = 0

    @property
    def control_socket(self) -> Path:
        return self.state_dir / "control.sock"

    @property
    def pid(self) -> int | None:
        return self._proc.pid

    @property
    def running(self) -> bool:
        return self._proc.running

    def _spawn(self) -> None:
        if self.supervisor is not None:
            # What the last incarnation said is read first: READY arms only the new one.
            self.supervisor.drain()
            self.supervisor.armed = False
        self.control_socket.unlink(missing_ok=True)
        self._proc.start()
        self._started = time.monotonic()
        self.incarnations.append(Incarnation(time.time(), None))

    def _ended(self, how: str) -> None:
        if self.incarnations and self.incarnations[-1].ended is None:
            last = self.incarnations[-1]
            self.incarnations[-1] = Incarnation(last.started, time.time(), how)
        self.inspections.append(inspect_spool(self.state_dir / "spool"))

    async def start(self) -> None:
        """Start and wait until the control socket says ``running``."""
        self._spawn()
        async with asyncio.timeout(60):
            await self.wait_running()
        if self.supervisor is not None and self._watch is None:
            self._watch = asyncio.create_task(self._watchdog(), name="hil-watchdog")

    async def wait_running(self) -> dict[str, Any]:
        """Poll the control socket until the runtime says ``running``."""
        while True:
            if not self._proc.running:
                raise RuntimeError(f"runtime exited at start:\n{self._proc.log_tail()}")
            with contextlib.suppress(RuntimeError):
                doc = await self.status()
                if doc.get("state") == "running":
                    return doc
            await asyncio.sleep(0.2)

    async def _watchdog(self) -> None:
        assert self.supervisor is not None
        sup = self.supervisor
        while True:
            await asyncio.sleep(0.1)
            if not self._proc.running:
                continue
            expired = sup.expired()
            if expired or sup.start_timed_out(self._started):
                if expired:
                    sup.fired += 1
                else:
                    sup.start_timeouts += 1
                self._proc.signal(signal.SIGABRT)
                await asyncio.to_thread(self._proc.wait, sup.kill_timeout_s)
                await asyncio.to_thread(self._proc.kill)
                self._ended("watchdog")
                await asyncio.sleep(sup.restart_s)
                self.restarts += 1
                sup.last_ping = 0.0
                sup.armed = False
                self._spawn()

    async def status(self) -> dict[str, Any]:
        from edgeos.control import ControlError, request

        try:
            doc = await asyncio.to_thread(
                partial(request, self.control_socket, "status", timeout_s=3.0)
            )
        except ControlError as exc:
            raise RuntimeError(str(exc)) from exc
        if not isinstance(doc, dict):
            raise RuntimeError("status is not an object")
        return doc

    async def stop(self) -> None:
        """SIGTERM: orderly shutdown (the open batch is sealed into the spool)."""
        await self._unwatch()
        await asyncio.to_thread(self._proc.terminate, 20.0)
        self._ended("sigterm")

    async def kill(self) -> None:
        """kill -9: whatever was not in the spool is gone, by design."""
        await self._unwatch()
        await asyncio.to_thread(self._proc.kill)
        self._ended("kill -9")

    async def freeze(self) -> None:
        self._proc.signal(signal.SIGSTOP)

    async def thaw(self) -> None:
        self._proc.signal(signal.SIGCONT)

    async def inspect_spool(self) -> SpoolInspection:
        return await asyncio.to_thread(inspect_spool, self.state_dir / "spool")

    async def _unwatch(self) -> None:
        task, self._watch = self._watch, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise  # we are being cancelled ourselves: do not swallow that

    async def resume_watch(self) -> None:
        if self.supervisor is not None and self._watch is None:
            self._watch = asyncio.create_task(self._watchdog(), name="hil-watchdog")

    async def close(self) -> None:
        await self._unwatch()
        if self._proc.running:
            await asyncio.to_thread(self._proc.kill)
            self._ended("kill -9")
        if self.supervisor is not None:
            self.supervisor.close()

    def log_tail(self, lines: int = 25) -> str:
        return self._proc.log_tail(lines)


class SshDut:
    """An installed gateway reached over SSH (real rig; not exercised by the loopback suite).

    The gateway runs ``edgeos.service`` under systemd (its real watchdog), with a configuration
    pointing at the rig host's proxies. Actions map to ``systemctl`` (``start``, ``stop``,
    ``kill -s KILL|STOP|CONT``) and ``edgeos status --json``; the spool is copied back with
    ``tar`` over SSH and inspected locally. Incarnation times are the test host's clock (keep
    both hosts on NTP).
    """

    def __init__(self, spec: DutSpec, workdir: Path) -> None:
        self.spec = spec
        self.device_id = spec.device_id
        self.workdir = workdir
        self.incarnations: list[Incarnation] = []
        self.inspections: list[SpoolInspection] = []

    def _ssh(self) -> list[str]:
        argv = ["ssh", "-p", str(self.spec.port), "-o", "BatchMode=yes"]
        if self.spec.identity_file:
            argv += ["-i", self.spec.identity_file]
        return [*argv, f"{self.spec.user}@{self.spec.host}"]

    async def _run(self, command: str) -> str:
        return await asyncio.to_thread(run_cli, [*self._ssh(), command])

    async def start(self) -> None:
        await self._run(f"systemctl start {self.spec.service}")
        self.incarnations.append(Incarnation(time.time(), None))
        async with asyncio.timeout(120):
            while (await self.status()).get("state") != "running":  # noqa: ASYNC110 - remote
                await asyncio.sleep(1)

    def _ended(self, how: str, inspection: SpoolInspection) -> None:
        if self.incarnations and self.incarnations[-1].ended is None:
            last = self.incarnations[-1]
            self.incarnations[-1] = Incarnation(last.started, time.time(), how)
        self.inspections.append(inspection)

    async def stop(self) -> None:
        await self._run(f"systemctl stop {self.spec.service}")
        self._ended("sigterm", await self.inspect_spool())

    async def kill(self) -> None:
        await self._run(f"systemctl kill -s KILL {self.spec.service}")
        self._ended("kill -9", await self.inspect_spool())

    async def freeze(self) -> None:
        await self._run(f"systemctl kill -s STOP {self.spec.service}")

    async def thaw(self) -> None:
        await self._run(f"systemctl kill -s CONT {self.spec.service}")

    async def status(self) -> dict[str, Any]:
        out = await self._run(
            f"{self.spec.remote_edgeos} status --json --config {self.spec.remote_config}"
        )
        doc = json.loads(out)
        if not isinstance(doc, dict):
            raise RuntimeError("status is not an object")
        return doc

    async def inspect_spool(self) -> SpoolInspection:
        target = self.workdir / f"spool-{len(self.inspections)}"
        target.mkdir(parents=True, exist_ok=True)
        remote = f"{self.spec.remote_state_dir}/spool"

        def fetch() -> None:
            ssh = subprocess.Popen(
                [*self._ssh(), f"tar -C {remote} -cf - ."], stdout=subprocess.PIPE
            )
            assert ssh.stdout is not None
            subprocess.run(["tar", "-C", str(target), "-xf", "-"], stdin=ssh.stdout, check=True)
            ssh.stdout.close()
            ssh.wait(60)

        await asyncio.to_thread(fetch)
        return inspect_spool(target)

    async def close(self) -> None:
        pass
