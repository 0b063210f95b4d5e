"""The gateway renews its own MQTT client certificate before it expires (docs/credentials.md).

A task of the runtime's TaskGroup looks at ``client.crt`` every ``check_interval_s``. Within
``renew_before_days`` of its end it

1. makes a **new** EC P-256 key and a CSR for ``CN=<device>`` signed by it;
2. posts the CSR, sealed under the device key as a ``CERT_REQUEST`` (counter = µs time), to
   the cloud's ``POST /certificates`` (the OTA repository server);
3. opens the answer: a ``CERT_RESPONSE`` sealed under the same device key, naming this device
   and echoing this request's counter (a forged answer does not authenticate, a replayed one
   answers another request), whose certificate is for this device, carries the new public key
   and is signed by a CA of the trust bundle it brings;
4. writes ``client.key.new``, ``client.crt.new`` and ``ca.crt.new`` (fresh temp files,
   ``O_EXCL|O_NOFOLLOW``, fsync, rename) and, when the broker is ``mqtts://``, **connects with
   them** once (a probe client id ``<device>-renewal``) — the old credentials stay in place
   until the new ones have connected;
5. installs: the current files are hard-linked to ``*.prev``, then the three renames happen in
   one step of the event loop (the publisher, on the same loop, never sees a key without its
   certificate) and the directory is fsynced. The publisher rebuilds its TLS context when a
   credential file changes, so its next connection uses the new pair; ``*.prev`` is removed
   once it has connected.

Every outcome is an event (``cert_renewal``: ``renewed`` or ``failed`` with the reason) that
the uplink carries to the receiver, and a line in ``edgeos status``. Any failure — cloud down,
refusal, forged or replayed answer, disk full, probe refused — leaves the working credentials
untouched and retries after ``retry_s``. A crash between the renames is finished at the next
start (:meth:`CertificateRenewer.recover`).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import os
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from edgeos.httppost import PostFailed, post_sealed
from edgeos_protocol.control import (
    ControlKind,
    counter_from_time,
    open_control,
    seal_control,
)
from edgeos_protocol.crypto import Keyring
from edgeos_protocol.errors import EdgeosError
from edgeos_protocol.fsutil import fsync_dir, write_private

__all__ = ["CertificateRenewer", "RenewalFailed", "RenewalSettings", "tuf_expiries"]

log = logging.getLogger("edgeos.renewal")

Probe = Callable[[ssl.SSLContext], Awaitable[None]]


class RenewalFailed(EdgeosError):
    """One renewal attempt failed; ``reason`` is a short code for the event and status."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        super().__init__(f"{reason}: {detail}")


@dataclass(frozen=True, slots=True)
class RenewalSettings:
    """Where the credentials are and when to renew them."""

    device: str
    #: The cloud's repository server; the request goes to ``<url>/certificates``.
    url: str
    cert_file: Path
    key_file: Path
    ca_file: Path
    #: ``mqtts://host:port`` to probe the new credentials against ("" or mqtt://: no probe).
    broker: str = ""
    renew_before_days: float = 60.0
    check_interval_s: float = 3600.0
    retry_s: float = 300.0
    timeout_s: float = 15.0


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _side(path: Path, suffix: str) -> Path:
    return path.with_name(path.name + suffix)


class CertificateRenewer:
    """Keeps the gateway's client certificate valid (see the module docs)."""

    def __init__(
        self,
        settings: RenewalSettings,
        keyring: Keyring,
        *,
        probe: Probe | None = None,
        connects: Callable[[], int] | None = None,
    ) -> None:
        self.settings = settings
        self.keyring = keyring
        self._probe = probe if probe is not None else self._mqtt_probe
        #: How many times the publisher has connected (``*.prev`` goes after the next one).
        self._connects = connects
        self._prev_until: int | None = None
        self._counter = 0
        self._events: list[dict[str, Any]] = []
        self.renewals = 0
        self.failures = 0
        self.last_error: str | None = None
        self.last_attempt: float | None = None
        self.state = "ok"

    # ------------------------------------------------------------------ status

    def drain_events(self) -> list[dict[str, Any]]:
        events, self._events = self._events, []
        return events

    def status(self) -> dict[str, Any]:
        """Expiry of the client certificate and the CA bundle, and the renewal state."""
        doc: dict[str, Any] = {
            "state": self.state,
            "renewals": self.renewals,
            "failures": self.failures,
            "last_error": self.last_error,
            "last_attempt": self.last_attempt,
        }
        with contextlib.suppress(OSError, ValueError):
            doc["client_certificate_expires"] = _cert(
                self.settings.cert_file
            ).not_valid_after_utc.timestamp()
        with contextlib.suppress(OSError, ValueError):
            bundle = x509.load_pem_x509_certificates(self.settings.ca_file.read_bytes())
            doc["ca_expires"] = min(c.not_valid_after_utc for c in bundle).timestamp()
        return doc

    def due(self, now: dt.datetime | None = None) -> bool:
        """True when the certificate ends within ``renew_before_days`` (or is unreadable)."""
        now = now or dt.datetime.now(dt.UTC)
        try:
            not_after = _cert(self.settings.cert_file).not_valid_after_utc
        except (OSError, ValueError):
            return True
        return not_after - now <= dt.timedelta(days=self.settings.renew_before_days)

    # ------------------------------------------------------------------ running

    async def run(self) -> None:
        """Check, renew when due, retry after a failure; forever (a TaskGroup child)."""
        await asyncio.to_thread(self.recover)
        while True:
            self._forget_prev_once_connected()
            delay = self.settings.check_interval_s
            if self.due():
                self.state = "due"
                try:
                    await self.renew_once()
                except RenewalFailed as exc:
                    delay = min(delay, self.settings.retry_s)
                    if self.state != "failed":
                        log.warning("certificate renewal failed (will retry): %s", exc)
                    self.state = "failed"
            if self._prev_until is not None:
                delay = min(delay, 5.0)
            await asyncio.sleep(delay)

    async def renew_once(self) -> x509.Certificate:
        """One attempt; :class:`RenewalFailed` leaves the working credentials untouched."""
        s = self.settings
        self.last_attempt = time.time()
        try:
            cert = await self._attempt()
        except RenewalFailed as exc:
            self._fail(exc)
            raise
        except OSError as exc:  # disk full, permissions: nothing was installed
            failed = RenewalFailed("io_error", str(exc))
            self._fail(failed)
            raise failed from exc
        self.renewals += 1
        self.state = "ok"
        self.last_error = None
        not_after = cert.not_valid_after_utc
        log.info("client certificate renewed; valid until %s", not_after.isoformat())
        self._events.append(
            {
                "type": "cert_renewal",
                "ts": time.time(),
                "outcome": "renewed",
                "serial": f"{cert.serial_number:x}",
                "not_after": not_after.isoformat(),
                "device": s.device,
            }
        )
        return cert

    def _fail(self, exc: RenewalFailed) -> None:
        self.failures += 1
        self.last_error = str(exc)
        self._events.append(
            {
                "type": "cert_renewal",
                "ts": time.time(),
                "outcome": "failed",
                "reason": exc.reason,
                "detail": str(exc)[:512],
                "device": self.settings.device,
            }
        )
        self._remove_new()

    async def _attempt(self) -> x509.Certificate:
        s = self.settings
        key = ec.generate_private_key(ec.SECP256R1())
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(
                x509.Name(
                    [
                        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "edgeos"),
                        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "device"),
                        x509.NameAttribute(NameOID.COMMON_NAME, s.device),
                    ]
                )
            )
            .sign(key, hashes.SHA256())
        )
        self._counter = counter_from_time(self._counter, time.time())
        counter = self._counter
        request = seal_control(
            ControlKind.CERT_REQUEST,
            {"device": s.device, "csr": csr.public_bytes(serialization.Encoding.PEM).decode()},
            self.keyring.current,
            s.device,
            counter,
            key_id=self.keyring.current_id,
            created_us=int(time.time() * 1e6),
        )
        answer = await asyncio.to_thread(self._post, request)
        cert, bundle = self._check_answer(answer, counter, key)
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        await asyncio.to_thread(self._write_new, key_pem, cert, bundle)
        await self._probe_new()
        self._install()
        return cert

    def _post(self, body: bytes) -> bytes:
        try:
            return post_sealed(
                f"{self.settings.url.rstrip('/')}/certificates",
                body,
                timeout_s=self.settings.timeout_s,
            )
        except PostFailed as exc:
            if exc.status is None:
                raise RenewalFailed("network", f"cannot reach {self.settings.url}: {exc}") from exc
            text = exc.body[:200].decode(errors="replace")
            raise RenewalFailed("refused", f"HTTP {exc.status}: {text}") from None

    def _check_answer(
        self, answer: bytes, counter: int, key: ec.EllipticCurvePrivateKey
    ) -> tuple[x509.Certificate, bytes]:
        s = self.settings
        try:
            control = open_control(
                answer,
                self.keyring.keys,
                device=s.device,
                kinds=frozenset({ControlKind.CERT_RESPONSE}),
            )
        except EdgeosError as exc:
            raise RenewalFailed("forged", f"the answer does not authenticate: {exc}") from None
        doc = control.payload
        if doc.get("device") != s.device or doc.get("request") != counter:
            raise RenewalFailed(
                "replayed", f"the answer is for request {doc.get('request')!r}, not {counter}"
            )
        cert_pem, ca_pem = doc.get("cert"), doc.get("ca")
        if not isinstance(cert_pem, str) or not isinstance(ca_pem, str):
            raise RenewalFailed("malformed", "the answer lacks 'cert' or 'ca'")
        try:
            cert = x509.load_pem_x509_certificate(cert_pem.encode())
            bundle = x509.load_pem_x509_certificates(ca_pem.encode())
        except ValueError as exc:
            raise RenewalFailed("malformed", f"unreadable certificate: {exc}") from None

        def spki(k: Any) -> bytes:
            return bytes(
                k.public_bytes(
                    serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
                )
            )

        if spki(cert.public_key()) != spki(key.public_key()):
            raise RenewalFailed("malformed", "the certificate is not for the key we sent")
        names = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
        if names != [s.device]:
            raise RenewalFailed("malformed", f"the certificate names {names!r}")
        issuers = [ca for ca in bundle if ca.subject == cert.issuer]
        for ca in issuers:
            try:
                cert.verify_directly_issued_by(ca)
                break
            except (InvalidSignature, ValueError, TypeError):
                continue
        else:
            raise RenewalFailed("malformed", "the certificate is not signed by its trust bundle")
        now = dt.datetime.now(dt.UTC)
        if not cert.not_valid_before_utc <= now < cert.not_valid_after_utc:
            raise RenewalFailed("malformed", "the certificate is not valid now")
        return cert, ca_pem.encode()

    # ------------------------------------------------------------------ files

    def _files(self) -> tuple[Path, Path, Path]:
        s = self.settings
        return s.key_file, s.cert_file, s.ca_file

    def _write_new(self, key_pem: bytes, cert: x509.Certificate, bundle: bytes) -> None:
        key_file, cert_file, ca_file = self._files()
        write_private(_side(key_file, ".new"), key_pem)
        write_private(_side(cert_file, ".new"), cert.public_bytes(serialization.Encoding.PEM))
        write_private(_side(ca_file, ".new"), bundle)

    def _remove_new(self) -> None:
        for path in self._files():
            with contextlib.suppress(FileNotFoundError):
                _side(path, ".new").unlink()

    async def _probe_new(self) -> None:
        """Connect once with the new files; the old ones stay until this succeeded."""
        url = urlsplit(self.settings.broker)
        if url.scheme not in ("mqtts", "ssl", "tls"):
            return
        key_file, cert_file, ca_file = self._files()
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        try:
            context.load_verify_locations(cafile=str(_side(ca_file, ".new")))
            context.load_cert_chain(str(_side(cert_file, ".new")), str(_side(key_file, ".new")))
        except (OSError, ssl.SSLError) as exc:
            raise RenewalFailed("probe", f"new credentials not usable: {exc}") from exc
        try:
            await self._probe(context)
        except Exception as exc:  # aiomqtt raises MqttError; a TLS refusal OSError/SSLError
            raise RenewalFailed("probe", f"the broker refused the new certificate: {exc}") from exc

    async def _mqtt_probe(self, context: ssl.SSLContext) -> None:
        import aiomqtt

        url = urlsplit(self.settings.broker)
        async with aiomqtt.Client(
            url.hostname or "localhost",
            url.port or 8883,
            identifier=f"{self.settings.device}-renewal",
            tls_context=context,
            timeout=self.settings.timeout_s,
        ):
            pass

    def _install(self) -> None:
        """``*.prev`` links, then the three renames in one step of the loop, then fsync."""
        files = self._files()
        for path in files:
            prev = _side(path, ".prev")
            with contextlib.suppress(FileNotFoundError):
                prev.unlink()
            with contextlib.suppress(FileNotFoundError):
                os.link(path, prev)
        # Key first, certificate second, CA third: recover() finishes a crash in between.
        for path in files:
            os.replace(_side(path, ".new"), path)
        for directory in {p.parent for p in files}:
            fsync_dir(directory)
        self._prev_until = self._connects() if self._connects is not None else None

    def _forget_prev_once_connected(self) -> None:
        if self._prev_until is None or self._connects is None:
            return
        if self._connects() > self._prev_until:
            for path in self._files():
                with contextlib.suppress(FileNotFoundError):
                    _side(path, ".prev").unlink()
            self._prev_until = None

    def recover(self) -> None:
        """After a crash: finish an install cut between its renames, else drop ``*.new``."""
        _, cert_file, ca_file = self._files()
        new_key, new_cert, new_ca = (_side(p, ".new") for p in self._files())
        if not new_key.exists() and new_cert.exists():
            # The key was renamed, the certificate not yet: complete the install.
            os.replace(new_cert, cert_file)
            if new_ca.exists():
                os.replace(new_ca, ca_file)
        elif not new_key.exists() and not new_cert.exists() and new_ca.exists():
            os.replace(new_ca, ca_file)
        self._remove_new()


def tuf_expiries(metadata_dir: Path) -> dict[str, float]:
    """Expiry (Unix time) of each TUF role in the device's trusted metadata cache."""
    out: dict[str, float] = {}
    for role in ("root", "targets", "snapshot", "timestamp"):
        path = metadata_dir / f"{role}.json"
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            expires = json.loads(path.read_text(encoding="utf-8"))["signed"]["expires"]
            when = dt.datetime.fromisoformat(str(expires).replace("Z", "+00:00"))
            out[f"tuf_{role}"] = when.timestamp()
    return out
