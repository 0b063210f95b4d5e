"""A small fleet on the real plumbing whose wall clock moves by libfaketime (issue #21).

Every cloud process and the gateway read one offset file (:class:`~.clockjump.WallClock`,
``FAKETIME_NO_CACHE``: a running process sees a new offset at its next clock read):

* Mosquitto with TLS, CRL and the production ACL (:class:`~.mosquitto.MosquittoBroker`),
  serving the broker certificate ``edgeos-cloud init`` wrote (``pki/server.crt``, the file
  the shipped timer renews);
* ``edgeos-cloud run`` (the receiver, SQLite storage, the configuration ``init`` wrote);
* ``edgeos-cloud ota serve --registry …`` (TUF, ``/reports``, ``/certificates``);
* the gateway: ``edgeos ota boot-check`` then ``edgeos run`` (:class:`~.dut.LocalDut`) with
  ``[ota]`` (repository, renewal) and ``[uplink.tls]``, against ``edgeos sim`` (real time:
  the machines have no certificates);
* one-shot commands under the same clock: the shipped timers' commands
  (``edgeos-cloud pki refresh …``, ``edgeos ota check --report …``), ``ota publish``, and
  :func:`probe` — a device connecting with its installed files and asking for a certificate.

Credentials come from the real CLIs (``edgeos-cloud init``, ``device add``, ``edgeos
provision``), the OTA repository from ``edgeos-cloud ota init`` (root expiry chosen by the
caller: no timer can re-sign root), the gateway's first slot from ``edgeos ota provision``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from edgeos_cloud.receiver.pki import CertificateAuthority
from edgeos_testing.clockjump import WallClock
from edgeos_testing.dut import LocalDut
from edgeos_testing.mosquitto import MosquittoBroker
from edgeos_testing.procs import LoggedProcess, SimProcess, exe, run_cli
from edgeos_testing.rigspec import PeersSpec

__all__ = ["FakedFleet", "cert_not_after", "probe"]

#: ``cloud/systemd/edgeos-cloud-refresh.service``'s ExecStart, paths left to the caller.
REFRESH_ARGV = ("pki", "refresh")
#: ``systemd/edgeos-update.service``'s ExecStart.
UPDATE_ARGV = ("ota", "check", "--report")


def cert_not_after(path: Path) -> float:
    """A certificate file's notAfter (epoch seconds)."""
    from cryptography import x509

    return x509.load_pem_x509_certificate(path.read_bytes()).not_valid_after_utc.timestamp()


class _Broker(MosquittoBroker):
    """Mosquitto serving a given certificate (``pki/server.crt`` of ``edgeos-cloud init``)."""

    def __init__(self, directory: Path, *, server_cert: Path, **kwargs: Any) -> None:
        from edgeos_cloud.receiver.pki import IssuedCertificate

        super().__init__(directory, **kwargs)
        self._server = IssuedCertificate(
            "edgeos broker",
            0,
            b"",
            b"",
            cert_file=server_cert,
            key_file=server_cert.with_suffix(".key"),
            role="broker",
        )
        self._write_config()


class FakedFleet:
    """The cloud and one gateway under one shifted wall clock (see the module docs).

    ``devices``: the gateway first, then devices that only get credentials (for
    :func:`probe`). Use as ``async with``; everything started is killed at the end.
    """

    def __init__(
        self,
        workdir: Path,
        wall: WallClock,
        devices: tuple[str, ...],
        *,
        root_expiry_days: float = 5 * 365,
        renew_before_days: float = 60,
        hardware: str = "rpi4-aarch64",
    ) -> None:
        self.workdir = workdir
        self.wall = wall
        self.devices = devices
        self.gateway = devices[0]
        self.root_expiry_days = root_expiry_days
        self.renew_before_days = renew_before_days
        self.hardware = hardware
        self.cloud = workdir / "cloud"
        self.config = self.cloud / "receiver.toml"
        self.repo = workdir / "ota-repo"
        self.creds: dict[str, Path] = {}
        self.broker_port = 0
        self.gateway_dir = workdir / "gw"
        self.gateway_config = self.gateway_dir / "edgeos.toml"
        self.trusted_root = self.gateway_dir / "root.json"
        self.textfile = workdir / "edgeos_credentials.prom"
        self.broker: MosquittoBroker | None = None
        self.receiver: LoggedProcess | None = None
        self.ota: LoggedProcess | None = None
        self.ota_url = ""
        self.sim: SimProcess | None = None
        self.dut: LocalDut | None = None

    # ------------------------------------------------------------------ commands

    def env(self) -> dict[str, str]:
        return {**os.environ, "PYTHONUNBUFFERED": "1", **self.wall.env()}

    def run(self, argv: list[str], *, timeout: float = 120.0, check: bool = True) -> str:
        """A one-shot command under the shifted clock; its stdout (RuntimeError if it failed)."""
        done = subprocess.run(
            argv, env=self.env(), capture_output=True, text=True, timeout=timeout, check=False
        )
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} exited {done.returncode}:\n{done.stderr}")
        return done.stdout

    def cloud_cli(self, *args: str) -> str:
        return self.run([exe("edgeos-cloud"), *args])

    # ------------------------------------------------------------------ setup

    async def __aenter__(self) -> FakedFleet:
        try:
            await asyncio.to_thread(self._provision)
            await self._start()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _provision(self) -> None:
        self.broker_port = _free_port()
        self.cloud_cli("init", str(self.cloud), "--broker", f"mqtts://127.0.0.1:{self.broker_port}")
        with self.config.open("a", encoding="utf-8") as f:
            f.write('\n[metrics]\nlisten = ""\n')
        for device in self.devices:
            bundle = self.workdir / f"{device}.credentials.json"
            self.cloud_cli(
                "device", "add", device, "--bundle", str(bundle), "--config", str(self.config)
            )
            target = self.workdir / "creds" / device
            self.run([exe("edgeos"), "provision", str(bundle), "--target", str(target)])
            self.creds[device] = target
        self.cloud_cli(
            "ota",
            "init",
            "--repo",
            str(self.repo),
            "--root-keys",
            str(self.workdir / "offline-root-keys"),
            "--root-expiry-days",
            str(self.root_expiry_days),
        )
        self.gateway_dir.mkdir(parents=True, exist_ok=True)
        self.cloud_cli(
            "ota", "trusted-root", "--repo", str(self.repo), "--out", str(self.trusted_root)
        )

    async def _start(self) -> None:
        ca = CertificateAuthority(self.cloud / "registry" / "ca")
        self.broker = _Broker(
            self.workdir / "mq",
            server_cert=self.cloud / "pki" / "server.crt",
            ca=ca,
            port=self.broker_port,
            env=self.wall.env(),
        )
        await asyncio.to_thread(self.broker.start)
        self.pid_file.write_text(f"{self.broker.pid}\n")
        self.start_receiver()
        await asyncio.to_thread(self._start_ota)
        self.sim = SimProcess(PeersSpec(nests=1, tags_per_nest=20, opcua=False), self.workdir)
        async with asyncio.timeout(60):
            await self.sim.start()
        self._write_gateway_config()
        await asyncio.to_thread(self._provision_slot)
        self.dut = LocalDut(
            self.gateway,
            self.gateway_config,
            self.gateway_dir / "state",
            self.gateway_dir,
            env=self.wall.env(),
        )

    @property
    def pid_file(self) -> Path:
        return self.workdir / "mosquitto.pid"

    def start_receiver(self) -> None:
        """``edgeos-cloud run`` (again) at the current shifted time."""
        if self.receiver is not None:
            self.receiver.terminate(15.0)
        self.receiver = LoggedProcess(
            "receiver",
            [exe("edgeos-cloud"), "run", "--config", str(self.config)],
            self.workdir / "receiver.log",
            self.wall.env(),
        )
        self.receiver.start()

    def _start_ota(self) -> None:
        self.ota = LoggedProcess(
            "ota",
            [
                exe("edgeos-cloud"),
                "ota",
                "serve",
                "--repo",
                str(self.repo),
                "--port",
                "0",
                "--registry",
                str(self.cloud / "registry"),
            ],
            self.workdir / "ota.log",
            self.wall.env(),
        )
        proc = self.ota.start(stdout=subprocess.PIPE)
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()  # "serving <repo> on <url>", once it listens
        if "serving" not in line:
            raise RuntimeError(f"ota serve did not start: {line!r}\n{self.ota.log_tail()}")
        self.ota_url = line.rsplit(" on ", 1)[1].strip().rstrip("/")

    def _write_gateway_config(self) -> None:
        from edgeos_sim.line import write_line_config

        assert self.broker is not None and self.sim is not None
        creds = self.creds[self.gateway]
        write_line_config(
            self.gateway_config,
            modbus_port=self.sim.modbus_port,
            opcua_url=None,
            state_dir=self.gateway_dir / "state",
            nests=1,
            tags_per_nest=20,
            overrides={
                "device": {"id": self.gateway, "hardware": self.hardware},
                "uplink": {
                    "broker": self.broker.url,
                    "key_file": str(creds / "device.key"),
                    "interval_s": 2,
                    "tls": {
                        "ca_file": str(creds / "ca.crt"),
                        "cert_file": str(creds / "client.crt"),
                        "key_file": str(creds / "client.key"),
                    },
                },
                "ota": {
                    "enabled": True,
                    "repository_url": self.ota_url,
                    "trusted_root": str(self.trusted_root),
                    # The channel `device add` gave it: its own id.
                    "group": self.gateway,
                    "health_window_s": 3,
                    "renewal": {
                        "renew_before_days": self.renew_before_days,
                        "check_interval_s": 5,
                        "retry_s": 2,
                    },
                },
            },
        )

    def _provision_slot(self) -> None:
        """The factory's first slot: a full bundle of the stub runtime, committed."""
        bundle = self.build_bundle("full", "1.0.0")
        self.run(
            [exe("edgeos"), "ota", "provision", str(bundle), "--config", str(self.gateway_config)]
        )

    def build_bundle(self, kind: str, version: str) -> Path:
        from edgeos_testing.ota import STUB_PACKAGE, write_stub_runtime

        src = self.workdir / "src" / f"{kind}-{version}"
        (src / "config").mkdir(parents=True, exist_ok=True)
        (src / "config" / "release.txt").write_text(f"config {version}\n")
        argv = [
            exe("edgeos"),
            "bundle",
            "build",
            "--kind",
            kind,
            "--version",
            version,
            "--target",
            self.hardware,
            "--config-dir",
            str(src / "config"),
            "--out",
            str(self.workdir / "dist"),
            "--quiet",
        ]
        if kind == "full":
            write_stub_runtime(src / "pkgs", version=version)
            argv += ["--package", str(src / "pkgs" / STUB_PACKAGE), "--entry", STUB_PACKAGE]
        return Path(run_cli(argv).strip().splitlines()[-1])

    # ------------------------------------------------------------------ what a step does

    def timer(self) -> dict[str, Any]:
        """``edgeos-cloud-refresh.service``: ``pki refresh --ota-repo … --textfile …``, then
        ``ExecStartPost=systemctl reload mosquitto`` (SIGHUP; returns once it reloaded)."""
        assert self.broker is not None
        out = self.cloud_cli(
            *REFRESH_ARGV,
            "--config",
            str(self.config),
            "--ota-repo",
            str(self.repo),
            "--textfile",
            str(self.textfile),
        )
        self.broker.reload()
        doc: dict[str, Any] = json.loads(out)
        return doc

    def publish(self, kind: str, version: str) -> Path:
        """Build a bundle and publish it on the gateway's channel (the operator, at this date)."""
        bundle = self.build_bundle(kind, version)
        self.cloud_cli(
            "ota", "publish", str(bundle), "--repo", str(self.repo), "--group", self.gateway
        )
        return bundle

    def update_check(self) -> list[dict[str, Any]]:
        """``edgeos-update.service``: ``edgeos ota check --report --config …`` (JSON)."""
        out = self.run(
            [exe("edgeos"), *UPDATE_ARGV, "--config", str(self.gateway_config), "--json"]
        )
        doc: list[dict[str, Any]] = json.loads(out)
        return doc

    def ota_state(self) -> dict[str, Any]:
        out = self.run(
            [exe("edgeos"), "ota", "status", "--json", "--config", str(self.gateway_config)]
        )
        doc: dict[str, Any] = json.loads(out)
        return doc

    async def start_gateway(self) -> None:
        """``edgeos.service``: ``ExecStartPre=edgeos ota boot-check``, then ``edgeos run``."""
        assert self.dut is not None
        await asyncio.to_thread(
            self.run, [exe("edgeos"), "ota", "boot-check", "--config", str(self.gateway_config)]
        )
        await self.dut.start()

    async def commit_watch(self, timeout_s: float = 60.0) -> str:
        """``edgeos-commit.service``: ``edgeos ota commit --wait`` against the health file the
        running gateway writes; its stdout."""
        return await asyncio.to_thread(
            self.run,
            [
                exe("edgeos"),
                "ota",
                "commit",
                "--wait",
                "--timeout",
                str(timeout_s),
                "--config",
                str(self.gateway_config),
            ],
            timeout=timeout_s + 30,
        )

    def stored_rows(self, device: str, *, at_most: int | None = None) -> int:
        """Rows the receiver stored for ``device`` (``edgeos-cloud query``: JSON lines), counted
        up to ``at_most``."""
        argv = [exe("edgeos-cloud"), "query", "--config", str(self.config), "--device", device]
        if at_most is not None:
            argv += ["--limit", str(at_most)]
        out = run_cli(argv)
        return sum(1 for line in out.splitlines() if line.strip())

    def probe(self, device: str, *, renew: bool = True) -> dict[str, Any]:
        """:func:`probe` for ``device`` under the shifted clock (``renew``: also ask for a
        certificate)."""
        assert self.broker is not None
        args = {
            "renew": renew,
            "device": device,
            "creds": str(self.creds[device]),
            "broker": self.broker.url,
            "url": self.ota_url,
        }
        out = self.run([sys.executable, "-m", "edgeos_testing.timetravel", json.dumps(args)])
        doc: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
        return doc

    def logs(self) -> dict[str, str]:
        out: dict[str, str] = {}
        if self.dut is not None:
            out["gateway"] = self.dut.log_tail(40)
        if self.receiver is not None:
            out["receiver"] = self.receiver.log_tail(20)
        if self.ota is not None:
            out["ota"] = self.ota.log_tail(10)
        if self.broker is not None:
            out["broker"] = self.broker.log_tail(15)
        return out

    async def close(self) -> None:
        if self.dut is not None:
            with contextlib.suppress(Exception):
                await self.dut.close()
        for proc in (self.receiver, self.ota):
            if proc is not None:
                await asyncio.to_thread(proc.kill)
        if self.sim is not None:
            await asyncio.to_thread(self.sim.kill)
        if self.broker is not None:
            await asyncio.to_thread(self.broker.kill)


def _free_port() -> int:
    from edgeos_testing.net import free_port

    return free_port()


# --------------------------------------------------------------------------- the probe


def _mqtt_connect(host: str, port: int, creds: Path, client_id: str) -> None:
    """TLS with the device's files, then MQTT CONNECT → CONNACK (accepted) or an error.

    A raw client on purpose: a broker refusing the certificate answers with a TLS alert
    ("certificate revoked", "certificate expired") that surfaces here as ``ssl.SSLError``
    at once, where an MQTT library reports only a timeout after its full wait.
    """
    import socket
    import ssl

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cafile=str(creds / "ca.crt"))
    context.load_cert_chain(str(creds / "client.crt"), str(creds / "client.key"))
    ident = client_id.encode()
    # MQTT 3.1.1 CONNECT: protocol "MQTT" level 4, clean session, keepalive 30 s.
    body = b"\x00\x04MQTT\x04\x02\x00\x1e" + len(ident).to_bytes(2, "big") + ident
    with (
        socket.create_connection((host, port), timeout=8) as raw,
        context.wrap_socket(raw, server_hostname=host) as tls,
    ):
        tls.sendall(bytes([0x10, len(body)]) + body)
        answer = tls.recv(4)
        if answer[:1] != b"\x20" or len(answer) < 4 or answer[3] != 0:
            raise ConnectionRefusedError(f"CONNACK {answer!r}")


async def _probe(args: dict[str, Any]) -> dict[str, Any]:
    """Connect with the device's installed files, then ask ``/certificates`` for a new one."""
    import ssl

    from edgeos.renewal import CertificateRenewer, RenewalFailed, RenewalSettings
    from edgeos_protocol.crypto import Keyring

    creds = Path(args["creds"])
    device = args["device"]
    out: dict[str, Any] = {}
    host, _, port = args["broker"].removeprefix("mqtts://").rpartition(":")
    try:
        await asyncio.to_thread(_mqtt_connect, host, int(port), creds, f"{device}-probe")
        out["connected"] = True
    except (ssl.SSLError, OSError) as exc:
        out["connected"] = False
        out["connect_error"] = f"{type(exc).__name__}: {exc}"
    if args.get("renew", True):
        renewer = CertificateRenewer(
            RenewalSettings(
                device=device,
                url=args["url"],
                cert_file=creds / "client.crt",
                key_file=creds / "client.key",
                ca_file=creds / "ca.crt",
                broker=args["broker"],
            ),
            Keyring.load(creds / "device.key"),
        )
        try:
            await renewer.renew_once()
            out["renewed"] = True
        except RenewalFailed as exc:
            out["renewed"] = False
            out["renewal_error"] = str(exc)
    return out


def probe(args: dict[str, Any]) -> dict[str, Any]:
    """Run in a process of its own (``python -m edgeos_testing.timetravel ARGS``)."""
    return asyncio.run(_probe(args))


if __name__ == "__main__":
    print(json.dumps(probe(json.loads(sys.argv[1]))))
