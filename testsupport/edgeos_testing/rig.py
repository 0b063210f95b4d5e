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

The oracle (:mod:`edgeos_testing.oracle`) is fed by :meth:`Rig.collect`; :func:`finish` ends a
scenario with its verdict (:class:`~edgeos_testing.report.Outcome`).

Parts: :mod:`.rigspec` (the rig file), :mod:`.procs` (simulator and receiver processes),
:mod:`.dut` (local and SSH devices under test, the systemd stand-in), :mod:`.report`
(verdicts and the run's report); this module starts and stops them together.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Self

from edgeos_testing.dut import LocalDut, SshDut
from edgeos_testing.oracle import evaluate, tag_jobs_of
from edgeos_testing.procs import ReceiverProcess, SimProcess, exe, run_cli
from edgeos_testing.receiverdb import DeviceTime
from edgeos_testing.report import Outcome
from edgeos_testing.rigspec import DutSpec, PeersSpec, ReceiverSpec, RigSpec
from edgeos_testing.spoolread import merge_inspections

# The rig file, processes, DUTs and reports have their own modules; the names tests/e2e
# imports from here stay importable here.
__all__ = [
    "Credentials",
    "DutSpec",
    "PeersSpec",
    "ReceiverSpec",
    "Rig",
    "RigSpec",
    "finish",
    "run_cli",
    "spool_quota_options",
]


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
                exe("edgeos-receiver"),
                "init",
                str(receiver_dir),
                "--broker",
                "mqtts://127.0.0.1:8883",
            ]
        )
        bundle = directory / f"{device_id}.credentials.json"
        run_cli(
            [
                exe("edgeos-receiver"),
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
        run_cli([exe("edgeos"), "provision", str(bundle), "--target", str(device_dir)])
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
        from edgeos_testing.receiverdb import read_receiver

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
    tag_jobs = None
    if rig.runtime_config.exists():
        from edgeos.config import load_config

        tag_jobs = tag_jobs_of(await asyncio.to_thread(load_config, rig.runtime_config))
    if truth is None:
        from edgeos_cloud.fleet.physics.layout import build_layout
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
            tag_jobs=tag_jobs,
        )
    )
    return Outcome(name, figures, out_notes, problems, time.time() - rig.t0)
