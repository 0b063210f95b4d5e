"""A real Mosquitto broker for tests, benchmarks and HIL rigs (never a mock, never the internet).

API::

    from edgeos_testing.mosquitto import MosquittoBroker

    async with MosquittoBroker(tmp_path, tls=True, acl=True) as broker:   # or `with ...:`
        broker.host, broker.port, broker.url         # "mqtts://127.0.0.1:PORT" ("mqtt://" plain)
        broker.ca                                    # the test CertificateAuthority (TLS mode)
        creds = broker.credentials("dev-1")          # issues CN=dev-1 on first use:
        creds.ca_file, creds.cert_file, creds.key_file
        broker.receiver_credentials                  # CN = broker.receiver_identity
        async with broker.client("dev-1") as client: # aiomqtt.Client with those credentials
            await client.publish("edgeos/v1/dev-1/batch", b"...", qos=1)
        broker.stop(); broker.start()                # orderly stop / start on the same port
        broker.kill()                                # SIGKILL (crash); restart() = stop + start
        broker.revoke("dev-1")                       # revoke in the CRL and restart the broker
        broker.reload()                              # SIGHUP: re-read CA, certificate, CRL

* ``tls=True``: listener on 127.0.0.1 with a server certificate from a fresh test CA,
  ``require_certificate true`` and ``use_identity_as_username true`` (the client certificate's
  CN is the MQTT username), a CRL (``crlfile``). ``tls=False``: plain listener, anonymous
  clients allowed (``client(identity)`` still sends the identity as username, so ACLs apply).
* ``acl=True``: the production ACL of :func:`edgeos_cloud.broker.device_acl` — a device ``D``
  may publish ``edgeos/v1/D/batch``, ``…/status``, ``…/cmd/result`` and subscribe
  ``edgeos/v1/D/ack`` and ``…/cmd``; receiver identities (``receivers=``, reserved service
  names) may read every device's uplink topics (plain or through ``$share/<g>/…``) and publish
  every device's ``ack`` and ``cmd``. Anything else is denied. The TLS listener's lines are
  :func:`edgeos_cloud.broker.mosquitto_config`, the snippet ``edgeos-cloud init`` writes.
* ``limits=`` (:class:`edgeos_cloud.broker.BrokerLimits`): the production queue and packet
  limits (``edgeos-cloud init`` writes them too). ``None`` (the default): Mosquitto's own
  queue defaults (1,000 queued messages per session) and a 32 MiB packet size.
* ``ca=`` reuses an existing :class:`~edgeos_cloud.receiver.pki.CertificateAuthority` (e.g. the
  receiver's own) instead of creating one under ``directory/ca``.

The broker's log is ``directory/mosquitto.log``; start failures include its tail.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from edgeos_cloud.broker import BrokerLimits, device_acl, mosquitto_config
from edgeos_cloud.receiver.pki import CertificateAuthority
from edgeos_testing.net import free_port

__all__ = ["MOSQUITTO", "ClientCredentials", "MosquittoBroker", "device_acl", "mosquitto_path"]

MOSQUITTO = "/usr/sbin/mosquitto"


def mosquitto_path() -> str | None:
    """Path of the mosquitto binary, or None when it is not installed."""
    if os.access(MOSQUITTO, os.X_OK):
        return MOSQUITTO
    return shutil.which("mosquitto")


@dataclass(frozen=True, slots=True)
class ClientCredentials:
    """Files a TLS client needs: the CA to trust, its certificate and private key."""

    identity: str
    ca_file: Path
    cert_file: Path
    key_file: Path


class MosquittoBroker:
    """A Mosquitto subprocess with its own config, port, PKI and ACLs (see module docs)."""

    host = "127.0.0.1"

    def __init__(
        self,
        directory: str | Path,
        *,
        tls: bool = True,
        env: dict[str, str] | None = None,
        acl: bool = True,
        ca: CertificateAuthority | None = None,
        receivers: Iterable[str] = ("receiver",),
        port: int | None = None,
        extra_config: str = "",
        start_timeout: float = 10.0,
        limits: BrokerLimits | None = None,
    ) -> None:
        binary = mosquitto_path()
        if binary is None:
            raise FileNotFoundError("mosquitto is not installed (apt-get install mosquitto)")
        self._binary = binary
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.tls = tls
        self.acl = acl
        self.receivers = tuple(receivers)
        self.receiver_identity = self.receivers[0] if self.receivers else "receiver"
        self.port = port if port is not None else free_port()
        self.extra_config = extra_config
        self.limits = limits
        self.start_timeout = start_timeout
        #: Extra environment of the broker process (e.g. libfaketime's, ``clockjump``).
        self.env = env
        self.config_file = self.directory / "mosquitto.conf"
        self.log_file = self.directory / "mosquitto.log"
        self._creds: dict[str, ClientCredentials] = {}
        self._proc: subprocess.Popen[bytes] | None = None
        self._ca = ca
        if tls and self._ca is None:
            self._ca = CertificateAuthority.open_or_create(self.directory / "ca", "edgeos test CA")
        if tls:
            assert self._ca is not None
            self._server = self._ca.issue_server(out_dir=self.directory / "server")
        self._write_config()

    # ------------------------------------------------------------------ properties

    @property
    def ca(self) -> CertificateAuthority:
        """The CA behind the broker's and clients' certificates (TLS mode only)."""
        if self._ca is None:
            raise RuntimeError("a plain (tls=False) broker has no CA")
        return self._ca

    @property
    def server_cert_file(self) -> Path:
        """The broker's certificate (its key is ``server.key`` next to it); TLS mode only."""
        assert self._server.cert_file is not None
        return self._server.cert_file

    @property
    def url(self) -> str:
        scheme = "mqtts" if self.tls else "mqtt"
        return f"{scheme}://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def credentials(self, identity: str) -> ClientCredentials:
        """Client certificate (``CN = identity``) and key, issued on first use."""
        found = self._creds.get(identity)
        if found is not None:
            return found
        issued = self.ca.issue_client(identity, self.directory / "clients")
        assert issued.cert_file is not None and issued.key_file is not None
        creds = ClientCredentials(identity, self.ca.ca_file, issued.cert_file, issued.key_file)
        self._creds[identity] = creds
        return creds

    @property
    def receiver_credentials(self) -> ClientCredentials:
        return self.credentials(self.receiver_identity)

    def client(self, identity: str, **kwargs: Any) -> Any:
        """An ``aiomqtt.Client`` connected as ``identity`` (use it as ``async with``)."""
        import aiomqtt

        if self.tls:
            creds = self.credentials(identity)
            kwargs.setdefault(
                "tls_params",
                aiomqtt.TLSParameters(
                    ca_certs=str(creds.ca_file),
                    certfile=str(creds.cert_file),
                    keyfile=str(creds.key_file),
                ),
            )
        else:
            kwargs.setdefault("username", identity)
        kwargs.setdefault("identifier", f"{identity}-{os.urandom(4).hex()}")
        return aiomqtt.Client(self.host, self.port, **kwargs)

    # ------------------------------------------------------------------ config

    def _write_config(self) -> None:
        # Test-only lines first; the listener itself is the production snippet (TLS mode).
        lines = [
            "persistence false",
            f"log_dest file {self.log_file}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages true",
        ]
        if self.limits is None:
            lines.append("max_packet_size 33554432")
        if os.geteuid() == 0:
            # As root Mosquitto would switch to the `mosquitto` user, which cannot read the
            # test's 0600 key files; "root" tells it to stay who it is.
            lines.append("user root")
        acl_file: Path | None = None
        if self.acl:
            acl_file = self.directory / "acl"
            acl_file.write_text(device_acl(self.receivers), encoding="utf-8")
        if self.tls:
            ca = self.ca
            assert self._server.cert_file is not None and self._server.key_file is not None
            lines.append(
                mosquitto_config(
                    ca_file=ca.ca_file,
                    cert_file=self._server.cert_file,
                    key_file=self._server.key_file,
                    crl_file=ca.crl_file,
                    acl_file=acl_file,
                    port=self.port,
                    host=self.host,
                    limits=self.limits,
                )
            )
        else:
            lines += ["per_listener_settings false", "allow_anonymous true"]
            if self.limits is not None:
                lines += self.limits.lines()
            if acl_file is not None:
                lines.append(f"acl_file {acl_file}")
            lines.append(f"listener {self.port} {self.host}")
        if self.extra_config:
            lines.append(self.extra_config)
        self.config_file.write_text("\n".join(lines) + "\n", encoding="utf-8")

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start the broker and wait until it accepts TCP connections on its port and has
        logged that it runs: Mosquitto opens its listeners *before* it installs its signal
        handlers, and a SIGHUP (:meth:`reload`) in between kills it (seen under arm64
        emulation, where that window is wide)."""
        if self.running:
            return
        with open(self.log_file, "ab") as log:
            log.write(b"--- start ---\n")
        runs_before = self._log_count(" running")
        self._proc = subprocess.Popen(
            [self._binary, "-c", str(self.config_file)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=None if self.env is None else {**os.environ, **self.env},
        )
        deadline = time.monotonic() + self.start_timeout
        while True:
            if self._proc.poll() is not None:
                err = self._proc.stderr.read().decode(errors="replace") if self._proc.stderr else ""
                self._proc = None
                raise RuntimeError(f"mosquitto exited at start: {err}\n{self.log_tail()}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection((self.host, self.port), timeout=0.2),
            ):
                break
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"mosquitto did not listen on {self.port}\n{self.log_tail()}")
            time.sleep(0.02)
        # "mosquitto version X running" comes right after the signal handlers are set.
        deadline = time.monotonic() + max(self.start_timeout, 60.0)
        while self._log_count(" running") <= runs_before:
            if self._proc.poll() is not None:
                self._proc = None
                raise RuntimeError(f"mosquitto exited at start\n{self.log_tail()}")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"mosquitto listens but never logged running\n{self.log_tail()}")
            time.sleep(0.02)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the broker (SIGTERM, then SIGKILL after ``timeout``)."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()

    def kill(self) -> None:
        """Kill the broker at once (SIGKILL), as a crash would."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()

    def restart(self) -> None:
        """Stop and start again on the same port (re-reads the config, ACL and CRL)."""
        self.stop()
        self.start()

    def reload(self, timeout: float = 120.0) -> None:
        """SIGHUP: Mosquitto 2.0 re-reads its config, ``cafile``, ``certfile``/``keyfile`` and
        ``crlfile`` and keeps connected clients. Returns once the broker logged the reload
        (it is single-threaded: the next connection is handled with the new files). ``timeout``
        is only a backstop: under arm64 emulation on a loaded machine re-reading the CA, CRL and
        certificates took longer than 10 s."""
        if self._proc is None or self._proc.poll() is not None:
            raise RuntimeError("the broker is not running")
        before = self._log_count("Reloading config.")
        deadline = time.monotonic() + timeout
        next_signal = 0.0
        while self._log_count("Reloading config.") <= before:
            if self._proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited while reloading\n{self.log_tail()}")
            now = time.monotonic()
            if now > deadline:
                raise RuntimeError(f"mosquitto did not reload\n{self.log_tail()}")
            # Signals coalesce: a SIGHUP that lands while an earlier one (e.g. from the refresh
            # command under test) is still pending yields one reload, already counted in
            # `before`. Signal again until a reload is logged after our call; one more reload
            # is harmless.
            if now >= next_signal:
                self._proc.send_signal(signal.SIGHUP)
                next_signal = now + 1.0
            time.sleep(0.02)

    def _log_count(self, text: str) -> int:
        try:
            return self.log_file.read_text(encoding="utf-8", errors="replace").count(text)
        except FileNotFoundError:
            return 0

    def revoke(self, identity: str) -> None:
        """Revoke every certificate of ``identity`` and restart so the broker loads the CRL."""
        self.ca.revoke(identity)
        self._creds.pop(identity, None)
        if self.running:
            self.restart()

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_file.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    # ------------------------------------------------------------------ context managers

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    async def __aenter__(self) -> Self:
        await asyncio.to_thread(self.start)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await asyncio.to_thread(self.stop)
