"""A small fleet on real plumbing: one broker, one receiver, one TUF repository, N gateways.

Every part is the real product, started the way an operator would: ``edgeos-receiver init`` and
``device add`` + ``edgeos provision`` per gateway, Mosquitto trusting the receiver's CA,
``edgeos-receiver run``, a TUF repository (``OtaRepository.init``) served by the repository's own
HTTP server, and per gateway an ``edgeos sim`` line (its own seed and cycle time) and an
``edgeos run`` runtime with inference, the guard and OTA on (its own ``[ota] group`` = channel).
Updates reach a gateway through ``edgeos ota check`` (what ``edgeos-update.timer`` runs), which
installs a models bundle and tells the running runtime over its control socket. Every gateway's
slots are provisioned with a stub ``full`` release (as a factory would), so a ``config`` bundle
(a profile) can be composed into a slot and trialled: :meth:`FleetRig.restart` is what systemd
does after an install (stop, ``edgeos ota boot-check``, start) and :meth:`FleetRig.commit` what
the commit watcher and the report timer do (``edgeos ota commit --wait``, ``edgeos ota
report``); the repository server takes the sealed reports (``POST /reports``) for its campaigns.

The test synchronises on stored rows (:meth:`FleetRig.events`), not on sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeos_testing.procs import LoggedProcess, ReceiverProcess, exe, run_cli

__all__ = ["FleetGateway", "FleetRig"]

HARDWARE = "rpi4-aarch64"


def _q(value: Path | str) -> str:
    return json.dumps(str(value))


@dataclass
class FleetGateway:
    device_id: str
    workdir: Path
    config: Path
    sim: LoggedProcess
    runtime: LoggedProcess
    started_at: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def channel(self) -> str:
        return self.device_id


class FleetRig:
    """Start with ``async with FleetRig(dir) as rig``; every process is killed on exit."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.receiver_dir = workdir / "receiver"
        self.repo_dir = workdir / "ota-repo"
        self.storage_url = f"sqlite:///{workdir / 'receiver.db'}"
        self.gateways: dict[str, FleetGateway] = {}
        #: Every process started, killed by :meth:`close` even when a gateway's setup failed.
        self._procs: list[LoggedProcess] = []
        self.broker: Any = None
        self.receiver: ReceiverProcess | None = None
        self._server: Any = None
        self.repository_url = ""
        #: The stub ``full`` release every gateway's slots are provisioned with.
        self.release: Path | None = None
        # ``device add`` rewrites the registry's files: one at a time when gateways start
        # concurrently.
        self._registry_lock = asyncio.Lock()

    async def __aenter__(self) -> FleetRig:
        try:
            await asyncio.to_thread(self._start)
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _start(self) -> None:
        from edgeos_cloud.ota.reports import ReportIntake
        from edgeos_cloud.ota.repository import OtaRepository, serve
        from edgeos_cloud.receiver.pki import CertificateAuthority
        from edgeos_testing.mosquitto import MosquittoBroker
        from edgeos_testing.ota import build_stub_release

        run_cli([exe("edgeos-receiver"), "init", str(self.receiver_dir), "--broker", "mqtts://x"])
        ca = CertificateAuthority(self.receiver_dir / "registry" / "ca")
        self.broker = MosquittoBroker(self.workdir / "mq", ca=ca)
        self.broker.start()
        r = self.receiver_dir
        config = self.workdir / "receiver.toml"
        config.write_text(
            "\n".join(
                [
                    'log_level = "INFO"',
                    "[broker]",
                    f"url = {_q(self.broker.url)}",
                    "reconnect_s = 0.5",
                    "[broker.tls]",
                    f"ca_file = {_q(r / 'registry/ca/ca.crt')}",
                    f"cert_file = {_q(r / 'pki/receiver.crt')}",
                    f"key_file = {_q(r / 'pki/receiver.key')}",
                    "[storage]",
                    f"url = {_q(self.storage_url)}",
                    "[registry]",
                    f"dir = {_q(r / 'registry')}",
                    "[metrics]",
                    'listen = ""',
                    "",
                ]
            ),
            encoding="utf-8",
        )
        self.receiver = ReceiverProcess(config, self.workdir / "receiver.log")
        self.receiver.start()
        OtaRepository.init(self.repo_dir, self.workdir / "offline-root-keys")
        # Reports move campaigns: sealed under a device key from the receiver's registry.
        intake = ReportIntake.from_registry(self.repo_dir, r / "registry")
        self._server = serve(self.repo_dir, on_report=intake.accept)
        self.repository_url = str(self._server.url)
        self.release = build_stub_release(self.workdir / "factory")

    # ------------------------------------------------------------------ gateways

    def _provision(self, device_id: str, directory: Path) -> Path:
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
                str(self.receiver_dir / "receiver.toml"),
            ]
        )
        creds = directory / "creds"
        run_cli([exe("edgeos"), "provision", str(bundle), "--target", str(creds)])
        return creds

    async def add_gateway(
        self,
        device_id: str,
        *,
        seed: int,
        models: Mapping[str, Path],
        nests: int = 2,
        cycle_s: float = 6.0,
        tick_hz: float = 20.0,
        alpha: float = 0.005,
        interval_s: float = 2.0,
        sim_args: Sequence[str] = (),
        health_window_s: float = 4.0,
        update_first: bool = False,
    ) -> FleetGateway:
        """Provision ``device_id``, start its simulated line and its runtime (champions:
        ``models`` task → manifest). ``sim_args`` go to ``edgeos sim`` (e.g. the raw material).
        ``update_first``: ``edgeos ota check`` before the first start (what its channel offers
        is installed) and the boot check — a config bundle then starts as a trial that
        :meth:`commit` commits."""
        from edgeos_sim.line import write_line_config

        directory = self.workdir / device_id
        directory.mkdir(parents=True)
        async with self._registry_lock:
            creds = await asyncio.to_thread(self._provision, device_id, directory)
        sim = LoggedProcess(
            "sim",
            [
                exe("edgeos"),
                "sim",
                "--nests",
                str(nests),
                "--tags-per-nest",
                "20",
                "--modbus-port",
                "0",
                "--no-opcua",
                "--tick-hz",
                str(tick_hz),
                "--cycle-s",
                str(cycle_s),
                "--seed",
                str(seed),
                "--json",
                *sim_args,
            ],
            directory / "sim.log",
        )
        self._procs.append(sim)
        proc = sim.start(stdout=subprocess.PIPE)
        assert proc.stdout is not None
        line = await asyncio.to_thread(proc.stdout.readline)
        if not line:
            raise RuntimeError(f"edgeos sim exited at start:\n{sim.log_tail()}")
        modbus_port = int(json.loads(line)["modbus"]["port"])
        state = directory / "state"
        (state / "slots").mkdir(parents=True)
        shutil.copy2(self.repo_dir / "metadata" / "root.json", state / "root.json")
        config = directory / "edgeos.toml"
        await asyncio.to_thread(
            write_line_config,
            config,
            modbus_port=modbus_port,
            opcua_url=None,
            state_dir=state,
            nests=nests,
            tags_per_nest=20,
            overrides={
                "device": {"id": device_id, "hardware": HARDWARE},
                "uplink": {
                    "broker": self.broker.url,
                    "key_file": str(creds / "device.key"),
                    "interval_s": interval_s,
                    "tls": {
                        "ca_file": str(creds / "ca.crt"),
                        "cert_file": str(creds / "client.crt"),
                        "key_file": str(creds / "client.key"),
                    },
                },
                "inference": {
                    "enabled": True,
                    "models": [
                        {"name": task, "manifest": str(path), "role": "champion"}
                        for task, path in sorted(models.items())
                    ],
                    "guard": {"enabled": True, "alpha": alpha},
                },
                "ota": {
                    "enabled": True,
                    "repository_url": self.repository_url,
                    "trusted_root": str(state / "root.json"),
                    "group": device_id,
                    "health_window_s": health_window_s,
                },
                "control": {"metrics_listen": ""},
            },
        )
        assert self.release is not None
        await asyncio.to_thread(self._ota, config, "provision", str(self.release))
        if update_first:
            await asyncio.to_thread(self._ota, config, "check", "--json")
            await asyncio.to_thread(self._ota, config, "boot-check")
        runtime = LoggedProcess(
            "runtime", [exe("edgeos"), "run", "--config", str(config)], directory / "runtime.log"
        )
        self._procs.append(runtime)
        runtime.start()
        gw = FleetGateway(device_id, directory, config, sim, runtime)
        self.gateways[device_id] = gw
        return gw

    @staticmethod
    def _ota(config: Path, *args: str, timeout: float = 120.0) -> str:
        return run_cli([exe("edgeos"), "ota", *args, "--config", str(config)], timeout=timeout)

    def restart(self, gw: FleetGateway) -> None:
        """What systemd does after an install: stop the runtime, ``edgeos ota boot-check``
        (ExecStartPre: the trial slot becomes current), start it again."""
        gw.runtime.terminate(15.0)
        self._ota(gw.config, "boot-check")
        gw.runtime.start()

    def commit(self, gw: FleetGateway) -> str:
        """``edgeos ota commit --wait`` (commit after ``health_window_s`` of continuous health)
        then ``edgeos ota report`` (the sealed outcome to the repository's campaigns)."""
        self._ota(gw.config, "commit", "--wait", timeout=180.0)
        return self._ota(gw.config, "report")

    def slot_status(self, gw: FleetGateway) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads(self._ota(gw.config, "status", "--json"))
        return doc

    def ota_check(self, gw: FleetGateway) -> list[dict[str, Any]]:
        """``edgeos ota check --json`` on the gateway (what its update timer runs)."""
        out = run_cli(
            [exe("edgeos"), "ota", "check", "--json", "--config", str(gw.config)], timeout=120
        )
        doc: list[dict[str, Any]] = json.loads(out)
        return doc

    def status(self, gw: FleetGateway) -> dict[str, Any]:
        """``edgeos status --json`` of the running runtime."""
        out = run_cli([exe("edgeos"), "status", "--json", "--config", str(gw.config)])
        doc: dict[str, Any] = json.loads(out)
        return doc

    # ------------------------------------------------------------------ stored rows

    def events(self, device: str, kind: str | None = None) -> list[dict[str, Any]]:
        """Events the receiver stored for ``device`` (of type ``kind``)."""
        from edgeos_cloud.receiver.storage import open_storage

        storage = open_storage(self.storage_url)
        try:
            rows = storage.events(device)
        except Exception:
            return []
        finally:
            storage.close()
        return [e for e in rows if kind is None or e.get("type") == kind]

    async def wait_until(
        self, what: str, predicate: Callable[[], bool], *, timeout_s: float
    ) -> None:
        """Poll stored rows (or files) until ``predicate()``; fail naming ``what`` and the logs."""
        try:
            async with asyncio.timeout(timeout_s):
                # The rows live in another process's database: nothing to await but a re-read.
                while not await asyncio.to_thread(predicate):  # noqa: ASYNC110
                    await asyncio.sleep(0.5)
        except TimeoutError:
            raise AssertionError(f"timed out waiting for {what}\n{self.log_tails()}") from None

    def log_tails(self) -> str:
        parts = []
        if self.receiver is not None:
            parts.append(f"--- receiver\n{self.receiver.log_tail(15)}")
        for gw in self.gateways.values():
            parts.append(f"--- {gw.device_id} runtime\n{gw.runtime.log_tail(15)}")
        return "\n".join(parts)

    async def close(self) -> None:
        for gw in self.gateways.values():
            await asyncio.to_thread(gw.runtime.terminate, 15.0)
        for proc in self._procs:
            proc.kill()
        if self.receiver is not None:
            await asyncio.to_thread(self.receiver.stop)
        if self._server is not None:
            self._server.close()
        if self.broker is not None:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self.broker.stop)
