"""The hardware-in-the-loop rig: a device under test, its machines, a broker and a receiver.

A rig file (TOML, ``hil_tests/rigs/loopback.toml`` is the default) says what each part is::

    [rig]
    name = "loopback"

    [dut]                      # the device under test
    kind = "local"             # "local": `edgeos run` as a subprocess of the test
    device_id = "hil-gw-01"    # "ssh": an installed gateway (see SshDut)
    interval_s = 2

    [peers]                    # the machines
    kind = "sim"               # "sim": `edgeos sim --truth` (ground truth for the oracle)
    nests = 4                  # "external": real PLCs (endpoints below; no ground truth)
    tags_per_nest = 20
    opcua = true

    [broker]
    kind = "mosquitto"         # a real Mosquitto with TLS + ACL on a free port

    [receiver]
    storage = "sqlite"         # or a PostgreSQL admin DSN: a fresh database per rig

Wiring (loopback rig)::

    edgeos sim ◄─FaultProxy "machines"─ edgeos run ─FaultProxy "broker"─► Mosquitto ◄─ receiver(s)
     (truth)        (Modbus TCP)          (DUT)          (MQTT/TLS)      (TLS+ACL)   (SQLite/PG)

Credentials come from the receiver's own provisioning: ``edgeos-receiver init``, ``device add``
and ``edgeos provision`` (CLIs, as an operator would run them). The broker trusts the
receiver's CA. Every process is killed in :meth:`Rig.close` whatever happened.

Faults: :attr:`Rig.machine_proxy` / :attr:`Rig.broker_proxy` (latency, drop, corruption,
bandwidth, partition — :class:`~edgeos_testing.faultproxy.FaultProxy`), ``rig.broker``
(kill/restart), ``rig.receivers[i]`` (kill/start), ``rig.dut`` (kill -9, SIGSTOP/SIGCONT,
SIGTERM). With ``watchdog_s`` the local DUT runs under :class:`Supervisor`, a tiny systemd
stand-in: a real ``NOTIFY_SOCKET`` and ``WATCHDOG_USEC``; when pings stop it kills the
runtime (SIGABRT, then SIGKILL) and starts it again.

The oracle (:mod:`edgeos_testing.oracle`) is fed by :meth:`Rig.collect`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import IO, Any, Literal, Protocol, Self

from edgeos_testing.oracle import (
    DeviceTime,
    Figures,
    Incarnation,
    SpoolInspection,
    evaluate,
    inspect_spool,
    merge_inspections,
)

__all__ = [
    "BrokerSpec",
    "Credentials",
    "Dut",
    "DutSpec",
    "LocalDut",
    "Outcome",
    "PeersSpec",
    "ReceiverProcess",
    "ReceiverSpec",
    "Rig",
    "RigSpec",
    "SimProcess",
    "SshDut",
    "Supervisor",
    "finish",
    "load_rig",
    "parse_duration",
    "spool_quota_options",
    "write_report",
]

BIN = Path(sys.executable).parent


def _exe(name: str) -> str:
    found = BIN / name
    return str(found) if found.exists() else name


# --------------------------------------------------------------------------- rig file


@dataclass(frozen=True, slots=True)
class DutSpec:
    kind: Literal["local", "ssh"] = "local"
    device_id: str = "hil-gw-01"
    interval_s: float = 2.0
    # ssh only
    host: str = ""
    user: str = "root"
    port: int = 22
    identity_file: str = ""
    remote_config: str = "/etc/edgeos/edgeos.toml"
    remote_state_dir: str = "/var/lib/edgeos"
    remote_edgeos: str = "edgeos"
    service: str = "edgeos.service"


@dataclass(frozen=True, slots=True)
class PeersSpec:
    kind: Literal["sim", "external"] = "sim"
    nests: int = 4
    tags_per_nest: int = 20
    opcua: bool = True
    tick_hz: float = 10.0
    seed: int = 0
    # external only: where the real machines are (the rig proxies to them)
    modbus: str = ""
    opcua_url: str = ""


@dataclass(frozen=True, slots=True)
class BrokerSpec:
    kind: Literal["mosquitto"] = "mosquitto"


@dataclass(frozen=True, slots=True)
class ReceiverSpec:
    #: ``sqlite`` or a PostgreSQL admin DSN (a fresh database is created per rig).
    storage: str = "sqlite"
    count: int = 1


@dataclass(frozen=True, slots=True)
class RigSpec:
    name: str = "loopback"
    dut: DutSpec = field(default_factory=DutSpec)
    peers: PeersSpec = field(default_factory=PeersSpec)
    broker: BrokerSpec = field(default_factory=BrokerSpec)
    receiver: ReceiverSpec = field(default_factory=ReceiverSpec)
    #: Runtime configuration overrides (nested tables merged into the rendered config).
    runtime: Mapping[str, Any] = field(default_factory=dict)


def _section(cls: Any, doc: Mapping[str, Any], name: str) -> Any:
    raw = dict(doc.get(name, {}))
    known = set(cls.__dataclass_fields__)
    unknown = set(raw) - known
    if unknown:
        raise ValueError(f"rig file: unknown keys in [{name}]: {', '.join(sorted(unknown))}")
    return cls(**raw)


def load_rig(path: str | Path) -> RigSpec:
    """Parse a rig file (unknown keys are errors naming their table)."""
    doc = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    unknown = set(doc) - {"rig", "dut", "peers", "broker", "receiver", "runtime"}
    if unknown:
        raise ValueError(f"rig file {path}: unknown tables {', '.join(sorted(unknown))}")
    spec = RigSpec(
        name=str(doc.get("rig", {}).get("name", Path(path).stem)),
        dut=_section(DutSpec, doc, "dut"),
        peers=_section(PeersSpec, doc, "peers"),
        broker=_section(BrokerSpec, doc, "broker"),
        receiver=_section(ReceiverSpec, doc, "receiver"),
        runtime=dict(doc.get("runtime", {})),
    )
    if spec.dut.kind == "ssh" and not spec.dut.host:
        raise ValueError("rig file: [dut] kind = 'ssh' needs host")
    if spec.peers.kind == "external" and not spec.peers.modbus:
        raise ValueError("rig file: [peers] kind = 'external' needs modbus")
    return spec


# --------------------------------------------------------------------------- processes


class _Proc:
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
            _exe("edgeos"),
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
        self._proc = _Proc("sim", argv, workdir / "sim.log")
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
        self._proc = _Proc(
            "receiver", [_exe("edgeos-receiver"), "run", "--config", str(config)], log
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


# --------------------------------------------------------------------------- the DUT


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
    """

    def __init__(
        self,
        socket_path: Path,
        watchdog_s: float,
        *,
        kill_timeout_s: float = 1.0,
        restart_s: float = 0.5,
    ) -> None:
        self.socket_path = socket_path
        self.watchdog_s = watchdog_s
        self.kill_timeout_s = kill_timeout_s
        self.restart_s = restart_s
        self.fired = 0
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
                    self.last_ping = time.monotonic()
                elif not line.startswith("STATUS="):
                    self.messages.append(line)

    def expired(self, armed_at: float) -> bool:
        self.drain()
        since = max(self.last_ping, armed_at)
        return time.monotonic() - since > self.watchdog_s

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
        self._proc = _Proc(
            "runtime",
            [_exe("edgeos"), "run", "--config", str(config)],
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
            if sup.expired(self._started):
                sup.fired += 1
                self._proc.signal(signal.SIGABRT)
                await asyncio.to_thread(self._proc.wait, sup.kill_timeout_s)
                await asyncio.to_thread(self._proc.kill)
                self._ended("watchdog")
                await asyncio.sleep(sup.restart_s)
                self.restarts += 1
                sup.last_ping = 0.0
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


# --------------------------------------------------------------------------- credentials


@dataclass(frozen=True, slots=True)
class Credentials:
    """A receiver directory (CA, receiver certificate) and one provisioned device."""

    receiver_dir: Path
    device_id: str
    device_dir: Path

    @classmethod
    def provision(cls, directory: Path, device_id: str) -> Credentials:
        """``edgeos-receiver init`` + ``device add`` + ``edgeos provision`` (the real CLIs)."""
        receiver_dir = directory / "receiver"
        run_cli(
            [
                _exe("edgeos-receiver"),
                "init",
                str(receiver_dir),
                "--broker",
                "mqtts://127.0.0.1:8883",
            ]
        )
        bundle = directory / f"{device_id}.credentials.json"
        run_cli(
            [
                _exe("edgeos-receiver"),
                "device",
                "add",
                device_id,
                "--bundle",
                str(bundle),
                "--config",
                str(receiver_dir / "receiver.toml"),
            ]
        )
        device_dir = directory / "device-creds"
        run_cli([_exe("edgeos"), "provision", str(bundle), "--target", str(device_dir)])
        return cls(receiver_dir, device_id, device_dir)


# --------------------------------------------------------------------------- the rig


def _toml_str(path: Path | str) -> str:
    return json.dumps(str(path))


class Rig:
    """Everything of one rig, started in order and always torn down (see the module docs)."""

    def __init__(
        self,
        spec: RigSpec,
        *,
        workdir: Path | None = None,
        credentials: Credentials | None = None,
        storage_url: str | None = None,
        runtime_overrides: Mapping[str, Any] | None = None,
        receivers: int | None = None,
        watchdog_s: float | None = None,
        proxy_machines: bool = True,
        dut_env: Mapping[str, str] | None = None,
        state_fs_bytes: int | None = None,
    ) -> None:
        self.spec = spec
        # Short paths: unix sockets (control, notify) must fit in 108 bytes.
        self._own_workdir = workdir is None
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="hil-", dir="/tmp"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._credentials = credentials
        self._storage_url = storage_url
        self.runtime_overrides = dict(runtime_overrides or {})
        self.receiver_count = receivers or spec.receiver.count
        self.watchdog_s = watchdog_s
        self.proxy_machines = proxy_machines
        self.dut_env = dict(dut_env or {})
        #: Put the DUT's state directory on a tmpfs of this size: a disk that really fills.
        self.state_fs_bytes = state_fs_bytes
        self._state_fs_mounted = False
        self.sim: SimProcess | None = None
        self.broker: Any = None  # MosquittoBroker
        self.machine_proxy: Any = None  # FaultProxy
        self.broker_proxy: Any = None  # FaultProxy
        self.receivers: list[ReceiverProcess] = []
        self.dut: LocalDut | SshDut | None = None
        self.storage_url = ""
        self.runtime_config = self.workdir / "edgeos.toml"
        self.state_dir = self.workdir / "state"
        self._stack = contextlib.AsyncExitStack()
        self._pg_drop: tuple[str, str] | None = None
        self.t0 = 0.0

    @property
    def device_id(self) -> str:
        return self.spec.dut.device_id

    async def __aenter__(self) -> Self:
        try:
            await self._start()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _start(self) -> None:
        from edgeos_cloud.receiver.pki import CertificateAuthority
        from edgeos_testing.faultproxy import FaultProxy
        from edgeos_testing.mosquitto import MosquittoBroker

        spec = self.spec
        self.t0 = time.time()
        creds = self._credentials
        if creds is None:
            creds = await asyncio.to_thread(
                Credentials.provision, self.workdir / "pki", spec.dut.device_id
            )
        if creds.device_id != spec.dut.device_id:
            raise ValueError("credentials are for another device")
        # Machines.
        if spec.peers.kind == "sim":
            self.sim = SimProcess(spec.peers, self.workdir)
            async with asyncio.timeout(60):
                await self.sim.start()
            modbus_host, modbus_port = "127.0.0.1", self.sim.modbus_port
            opcua_url = self.sim.opcua_url
        else:
            hostport = spec.peers.modbus.removeprefix("tcp://")
            modbus_host, _, port = hostport.rpartition(":")
            modbus_port = int(port)
            opcua_url = spec.peers.opcua_url or None
        if self.proxy_machines:
            self.machine_proxy = await self._stack.enter_async_context(
                FaultProxy(modbus_host, modbus_port, seed=1)
            )
            modbus_port = self.machine_proxy.port
        # Broker (trusts the receiver's CA) and its proxy for the device.
        ca = CertificateAuthority(creds.receiver_dir / "registry" / "ca")
        self.broker = MosquittoBroker(self.workdir / "mq", ca=ca)
        await asyncio.to_thread(self.broker.start)
        self.broker_proxy = await self._stack.enter_async_context(
            FaultProxy(self.broker.host, self.broker.port, seed=2)
        )
        # Receiver(s).
        self.storage_url = await asyncio.to_thread(self._make_storage)
        rdir = creds.receiver_dir
        config = self.workdir / "receiver.toml"
        config.write_text(
            "\n".join(
                [
                    'log_level = "INFO"',
                    "[broker]",
                    f'url = "{self.broker.url}"',
                    "reconnect_s = 0.5",
                    "[broker.tls]",
                    f"ca_file = {_toml_str(rdir / 'registry/ca/ca.crt')}",
                    f"cert_file = {_toml_str(rdir / 'pki/receiver.crt')}",
                    f"key_file = {_toml_str(rdir / 'pki/receiver.key')}",
                    "[storage]",
                    f"url = {_toml_str(self.storage_url)}",
                    "[registry]",
                    f"dir = {_toml_str(rdir / 'registry')}",
                    "[metrics]",
                    'listen = ""',
                    "",
                ]
            ),
            encoding="utf-8",
        )
        for i in range(self.receiver_count):
            receiver = ReceiverProcess(config, self.workdir / f"receiver-{i}.log")
            self.receivers.append(receiver)
            receiver.start()
        # The device under test.
        if spec.dut.kind == "ssh":
            self.dut = SshDut(spec.dut, self.workdir)
        else:
            if self.state_fs_bytes is not None:
                await asyncio.to_thread(self._mount_state_fs, self.state_fs_bytes)
            self._write_runtime_config(creds, modbus_port, opcua_url)
            self.dut = LocalDut(
                spec.dut.device_id,
                self.runtime_config,
                self.state_dir,
                self.workdir,
                watchdog_s=self.watchdog_s,
                env=self.dut_env,
            )
        await self.dut.start()

    def _make_storage(self) -> str:
        if self._storage_url:
            return self._storage_url
        storage = self.spec.receiver.storage
        if storage == "sqlite":
            return f"sqlite:///{self.workdir / 'receiver.db'}"
        return self._stack_pg(storage)

    def _stack_pg(self, admin_dsn: str) -> str:
        import secrets

        import psycopg

        name = f"edgeos_hil_{secrets.token_hex(5)}"
        with psycopg.connect(admin_dsn, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
        self._pg_drop = (admin_dsn, name)
        base, _, _ = admin_dsn.rpartition("/")
        return f"{base}/{name}"

    def _write_runtime_config(
        self, creds: Credentials, modbus_port: int, opcua_url: str | None
    ) -> None:
        from edgeos_sim.line import write_line_config

        overrides: dict[str, Any] = {
            "device": {"id": self.spec.dut.device_id},
            "uplink": {
                "broker": f"mqtts://127.0.0.1:{self.broker_proxy.port}",
                "key_file": str(creds.device_dir / "device.key"),
                "interval_s": self.spec.dut.interval_s,
                "tls": {
                    "ca_file": str(creds.device_dir / "ca.crt"),
                    "cert_file": str(creds.device_dir / "client.crt"),
                    "key_file": str(creds.device_dir / "client.key"),
                },
            },
        }
        _merge(overrides, self.spec.runtime)
        _merge(overrides, self.runtime_overrides)
        write_line_config(
            self.runtime_config,
            modbus_port=modbus_port,
            opcua_url=opcua_url,
            state_dir=self.state_dir,
            nests=self.spec.peers.nests,
            tags_per_nest=self.spec.peers.tags_per_nest,
            overrides=overrides,
        )

    # ------------------------------------------------------------------ helpers

    async def wait_status(self, predicate: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        """Poll the DUT's status until ``predicate(doc)`` (bound it with ``asyncio.timeout``).

        Polling is deliberate: the state lives in another process.
        """
        assert self.dut is not None
        while True:
            with contextlib.suppress(RuntimeError):
                doc = await self.dut.status()
                if predicate(doc):
                    return doc
            await asyncio.sleep(0.25)

    async def wait_delivered(self) -> dict[str, Any]:
        """Wait until the DUT's spool holds nothing unacknowledged (everything stored)."""

        def done(doc: Mapping[str, Any]) -> bool:
            up = doc.get("uplink", {})
            return bool(
                up.get("state") == "connected"
                and up.get("backlog_batches") == 0
                and up.get("batches_sealed", 0) > 0
            )

        return await self.wait_status(done)

    async def wait_batches(self, count: int) -> dict[str, Any]:
        """Wait until the running incarnation has sealed ``count`` batches."""
        return await self.wait_status(
            lambda d: d.get("uplink", {}).get("batches_sealed", 0) >= count
        )

    async def collect(self) -> tuple[Any, Any]:
        """Stop the line (flushes the truth) and read (truth, receiver data) for the oracle."""
        from edgeos_sim.truth import GroundTruth
        from edgeos_testing.oracle import read_receiver

        truth = None
        if self.sim is not None:
            await self.sim.stop()
            truth = await asyncio.to_thread(GroundTruth.load, self.sim.truth_path)
        data = await asyncio.to_thread(read_receiver, self.storage_url, self.device_id)
        return truth, data

    def logs(self) -> dict[str, str]:
        out: dict[str, str] = {}
        if isinstance(self.dut, LocalDut):
            out["runtime"] = self.dut.log_tail()
        for i, r in enumerate(self.receivers):
            out[f"receiver-{i}"] = r.log_tail()
        if self.broker is not None:
            out["broker"] = self.broker.log_tail(10)
        return out

    async def close(self) -> None:
        """Kill everything this rig started (idempotent, never raises on cleanup)."""
        if self.dut is not None:
            with contextlib.suppress(Exception):
                await self.dut.close()
        for receiver in self.receivers:
            await asyncio.to_thread(receiver.kill)
        if self.sim is not None:
            await asyncio.to_thread(self.sim.kill)
        if self.broker is not None:
            await asyncio.to_thread(self.broker.kill)
        with contextlib.suppress(Exception):
            await self._stack.aclose()
        if self._state_fs_mounted:
            await asyncio.to_thread(self._unmount_state_fs)
        drop = self._pg_drop
        if drop is not None:
            self._pg_drop = None
            with contextlib.suppress(Exception):
                await asyncio.to_thread(_drop_pg, *drop)

    def _mount_state_fs(self, size: int) -> None:
        """A small tmpfs as the DUT's state directory (needs root or CAP_SYS_ADMIN)."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        try:
            options = f"size={size},mode=0700"
            done = subprocess.run(
                ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(self.state_dir)],
                capture_output=True,
                text=True,
                check=False,
            )
        except OSError as exc:  # no mount(8) on this machine
            raise PermissionError(f"cannot run mount: {exc}") from exc
        if done.returncode != 0:
            raise PermissionError(
                f"cannot mount a {size}-byte tmpfs for the DUT's state: "
                f"{(done.stderr or done.stdout).strip()} (needs root or CAP_SYS_ADMIN)"
            )
        self._state_fs_mounted = True

    def _unmount_state_fs(self) -> None:
        """Keep a copy of the state for post-mortem, then unmount (lazily: never raises)."""
        with contextlib.suppress(OSError):
            shutil.copytree(self.state_dir, self.workdir / "state-copy", dirs_exist_ok=True)
        subprocess.run(["umount", "-l", str(self.state_dir)], capture_output=True, check=False)
        self._state_fs_mounted = False

    def remove_workdir(self) -> None:
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)


def _drop_pg(admin_dsn: str, name: str) -> None:
    import psycopg

    with psycopg.connect(admin_dsn, autocommit=True, connect_timeout=5) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = dict(value) if isinstance(value, Mapping) else value
    return base


# --------------------------------------------------------------------------- verdicts


@dataclass(slots=True)
class Outcome:
    """One scenario's verdict: the oracle's figures plus what the scenario noted."""

    name: str
    figures: Figures
    notes: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return self.figures.clean and not self.problems

    def as_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "seconds": round(self.seconds, 1),
            "figures": self.figures.as_dict(),
            "notes": self.notes,
            "problems": self.problems,
        }


def spool_quota_options(policy: str, *, device_id: str | None = None) -> dict[str, Any]:
    """``Rig`` keyword arguments for a line fast enough to fill a 256 KiB spool in seconds
    (40 presses × 200 tags at 10 Hz, no OPC UA) with the given full policy."""
    dut = DutSpec() if device_id is None else DutSpec(device_id=device_id)
    return {
        "spec": RigSpec(dut=dut, peers=PeersSpec(nests=40, tags_per_nest=200, opcua=False)),
        "runtime_overrides": {
            "scan_groups": [
                {"name": "default", "period_ms": 100},
                {"name": "fast", "period_ms": 100, "priority": 80},
            ],
            "uplink": {
                "backlog_rate": 200,
                "spool": {
                    "max_bytes": 256 << 10,
                    "segment_bytes": 32 << 10,
                    "full_policy": policy,
                },
            },
        },
    }


async def finish(
    rig: Rig,
    name: str,
    *,
    drain_s: float = 90.0,
    window_checks: bool = True,
    notes: Mapping[str, Any] | None = None,
    fault_windows: Sequence[tuple[float, float]] = (),
    device_time: DeviceTime | None = None,
    corrupt_windows: Sequence[tuple[float, float]] = (),
) -> Outcome:
    """End a scenario: wait for the spool to drain, kill -9 the DUT, ask the oracle.

    The DUT is killed (not stopped) so that nothing is sealed after the last look: whatever
    the final spool inspection still holds is reported as *pending on disk*, not as lost.
    A spool that does not drain within ``drain_s`` is a problem of the scenario (acks stalled),
    and the figures still say what was and was not stored.
    """
    assert rig.dut is not None
    out_notes: dict[str, Any] = dict(notes or {})
    problems: list[str] = []
    status: dict[str, Any] = {}
    try:
        async with asyncio.timeout(drain_s):
            status = await rig.wait_delivered()
    except TimeoutError:
        with contextlib.suppress(RuntimeError):
            status = await rig.dut.status()
        up = status.get("uplink", {})
        problems.append(
            f"spool did not drain within {drain_s:.0f} s: backlog {up.get('backlog_batches')} "
            f"batches, state {up.get('state')}, acked {up.get('acked')}"
        )
    up = status.get("uplink", {})
    out_notes.update(
        {
            "sealed": up.get("batches_sealed"),
            "dropped": up.get("dropped"),
            "resent": up.get("resent"),
            "reconnects": up.get("publisher", {}).get("connects"),
        }
    )
    await rig.dut.kill()
    truth, data = await rig.collect()
    accepted = merge_inspections(rig.dut.inspections)
    pending = rig.dut.inspections[-1].pending() if rig.dut.inspections else {}
    if truth is None:
        from edgeos_sim.layout import build_layout
        from edgeos_sim.truth import GroundTruth

        truth = GroundTruth(build_layout(1, 20), [])
        window_checks = False
    figures = await asyncio.to_thread(
        partial(
            evaluate,
            truth,
            data,
            accepted=accepted,
            pending=pending,
            incarnations=rig.dut.incarnations,
            window_checks=window_checks,
            fault_windows=fault_windows,
            device_time=device_time,
            corrupt_windows=corrupt_windows,
        )
    )
    return Outcome(name, figures, out_notes, problems, time.time() - rig.t0)


def parse_duration(text: str) -> float:
    """``90``, ``90s``, ``15m``, ``1h``, ``1h30m`` → seconds."""
    import re

    text = text.strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    parts = re.findall(r"(\d+(?:\.\d+)?)([hms])", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"not a duration: {text!r} (e.g. 90s, 15m, 1h)")
    scale = {"h": 3600.0, "m": 60.0, "s": 1.0}
    return sum(float(n) * scale[u] for n, u in parts)


def write_report(directory: Path, doc: Mapping[str, Any]) -> tuple[Path, Path]:
    """Write the run's JSON report and Markdown summary (plus ``latest.*`` copies)."""
    from edgeos_testing.oracle import summary_markdown, write_json

    directory.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    json_path = directory / f"hil-{stamp}.json"
    md_path = directory / f"hil-{stamp}.md"
    write_json(json_path, doc)
    title = f"HIL run {stamp} — rig {doc.get('rig', {}).get('name')}, mode {doc.get('mode')}"
    text = summary_markdown(title, doc.get("scenarios", {}))
    soak = doc.get("soak")
    if soak:
        text += "\n## Soak\n\n" + "\n".join(
            f"* {k}: {v}" for k, v in soak.get("summary", {}).items()
        )
        text += "\n"
    md_path.write_text(text, encoding="utf-8")
    shutil.copyfile(json_path, directory / "latest.json")
    shutil.copyfile(md_path, directory / "latest.md")
    return json_path, md_path
