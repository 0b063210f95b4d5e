"""The rig's subprocesses: the simulator, the receivers, and one-shot CLIs.

Every process runs in its own session with its output in a log file, and is always killed by
its owner's ``kill`` (SIGKILL also wakes a stopped process).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import IO

from edgeos_testing.rigspec import PeersSpec

__all__ = ["LoggedProcess", "ReceiverProcess", "SimProcess", "exe", "run_cli"]

BIN = Path(sys.executable).parent


def exe(name: str) -> str:
    """The console script ``name`` of this interpreter's environment, else ``name`` on PATH."""
    found = BIN / name
    return str(found) if found.exists() else name


class LoggedProcess:
    """A subprocess with its output in a log file; always killed by :meth:`kill`."""

    def __init__(self, name: str, argv: list[str], log: Path, env: Mapping[str, str] | None = None):
        self.name = name
        self.argv = argv
        self.log = log
        self.env = dict(env) if env is not None else None
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_fh: IO[bytes] | None = None

    def start(self, *, stdout: int | None = None) -> subprocess.Popen[bytes]:
        self._log_fh = open(self.log, "ab")  # noqa: SIM115 - closed in _reap
        self._log_fh.write(f"--- start {time.strftime('%H:%M:%S')} ---\n".encode())
        self._log_fh.flush()
        env = {**os.environ, **(self.env or {})}
        self.proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=stdout if stdout is not None else self._log_fh,
            stderr=self._log_fh,
            env=env,
            start_new_session=True,
        )
        return self.proc

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def signal(self, sig: int) -> None:
        if self.running:
            assert self.proc is not None
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, sig)

    def wait(self, timeout: float) -> int | None:
        if self.proc is None:
            return None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> None:
        """SIGKILL (also wakes a stopped process) and reap."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGKILL)
        self._reap()

    def terminate(self, timeout: float = 15.0) -> int | None:
        """SIGTERM (SIGCONT first, a stopped process cannot exit), SIGKILL after ``timeout``."""
        rc = None
        if self.proc is not None and self.proc.poll() is None:
            self.signal(signal.SIGCONT)
            self.signal(signal.SIGTERM)
            rc = self.wait(timeout)
        self.kill()
        return rc

    def _reap(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
            if self.proc.stdout is not None:
                self.proc.stdout.close()
        if self._log_fh is not None:
            self._log_fh.close()
            self._log_fh = None

    def log_tail(self, lines: int = 25) -> str:
        try:
            text = self.log.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def run_cli(argv: list[str], *, timeout: float = 60.0) -> str:
    """Run a CLI to completion; its stdout, or RuntimeError with its stderr."""
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr.strip()}")
    return proc.stdout


class SimProcess:
    """``edgeos sim --json --truth FILE`` on free ports; the truth file is flushed at stop."""

    def __init__(self, spec: PeersSpec, workdir: Path) -> None:
        self.spec = spec
        self.truth_path = workdir / "line.truth"
        argv = [
            exe("edgeos"),
            "sim",
            "--nests",
            str(spec.nests),
            "--tags-per-nest",
            str(spec.tags_per_nest),
            "--modbus-port",
            "0",
            "--opcua-port",
            "0",
            "--tick-hz",
            str(spec.tick_hz),
            "--seed",
            str(spec.seed),
            "--json",
            "--truth",
            str(self.truth_path),
        ]
        if not spec.opcua:
            argv.append("--no-opcua")
        self._proc = LoggedProcess("sim", argv, workdir / "sim.log")
        self.modbus_port = 0
        self.opcua_url: str | None = None

    async def start(self) -> None:
        """Start and read the endpoints back (bound it with ``asyncio.timeout``)."""
        proc = self._proc.start(stdout=subprocess.PIPE)
        assert proc.stdout is not None
        stdout = proc.stdout

        def first_line() -> bytes:
            return stdout.readline()

        line = await asyncio.to_thread(first_line)
        if not line:
            raise RuntimeError(f"edgeos sim exited at start:\n{self._proc.log_tail()}")
        info = json.loads(line)
        self.modbus_port = int(info["modbus"]["port"])
        self.opcua_url = info.get("opcua_url")

    async def stop(self) -> None:
        """SIGTERM: the simulator flushes and closes its truth file."""
        await asyncio.to_thread(self._proc.terminate, 20.0)

    def kill(self) -> None:
        self._proc.kill()


class ReceiverProcess:
    """``edgeos-receiver run --config FILE`` as a subprocess."""

    def __init__(self, config: Path, log: Path) -> None:
        self.config = config
        self._proc = LoggedProcess(
            "receiver", [exe("edgeos-receiver"), "run", "--config", str(config)], log
        )

    @property
    def running(self) -> bool:
        return self._proc.running

    def start(self) -> None:
        if not self._proc.running:
            self._proc.start()

    def kill(self) -> None:
        self._proc.kill()

    def stop(self) -> None:
        self._proc.terminate(15.0)

    def log_tail(self, lines: int = 25) -> str:
        return self._proc.log_tail(lines)
