"""Client-certificate renewal over the air: ``POST /certificates`` on the repository server.

A gateway whose MQTT client certificate nears its end makes a **new** EC P-256 key, a PKCS#10
request for ``CN=<device>`` signed by that key (proof it holds it), and posts the request as a
control message of kind :attr:`~edgeos_protocol.control.ControlKind.CERT_REQUEST` sealed under
its device key — the key that authenticates every batch it sends. :class:`CertificateRenewal`
answers only when

* the device is registered and active and the key id is one of its keys,
* the message authenticates, is a ``CERT_REQUEST`` and names in its body the device of its
  authenticated header (a device renews only itself),
* its counter is above the last one accepted from that device (persisted in
  ``<state>/renewals/counters.json``: a captured request replayed later is refused, 409), and
* the CA accepts the CSR (:meth:`~edgeos_cloud.receiver.pki.CertificateAuthority.issue_from_csr`:
  subject ``CN=<device>``, role device, self-signature valid, EC P-256, a key never certified
  before — so no revoked certificate's key comes back).

The answer is a ``CERT_RESPONSE`` sealed under the same device key, echoing the request's
counter, carrying the certificate and the CA trust bundle (during a CA rollover: old + new).
The new serial joins the device's record, so ``device revoke`` revokes it too; a revocation
that lands while the certificate is being issued revokes the new serial as well.

Refusals raise :class:`RenewalRefused` with the HTTP status the server answers: 400 malformed,
403 not authentic / foreign / revoked / CSR refused, 409 replay, 413 too large.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Any

from edgeos_cloud.ota.repository import ReportRefused
from edgeos_cloud.receiver.pki import CertificateAuthority, CsrRefused, cert_not_after
from edgeos_cloud.receiver.registry import DeviceRegistry
from edgeos_cloud.sealed import open_sealed
from edgeos_protocol.control import (
    MAX_CONTROL_BYTES,
    ControlKind,
    counter_from_time,
    seal_control,
)
from edgeos_protocol.fsutil import atomic_write_json, read_json

__all__ = [
    "EXPIRY_METRIC",
    "MAX_REQUEST_BYTES",
    "CertificateRenewal",
    "RenewalRefused",
    "Renewed",
    "credential_expiries",
    "write_textfile",
]

#: Largest sealed request accepted (a P-256 CSR is ~500 bytes of PEM).
MAX_REQUEST_BYTES = min(MAX_CONTROL_BYTES, 8 << 10)
_MAX_CSR_BYTES = 4096


class RenewalRefused(ReportRefused):
    """A renewal request that is not answered; ``status`` is the HTTP status to send."""


@dataclass(frozen=True, slots=True)
class Renewed:
    """What one accepted request produced (for logs and tests)."""

    device: str
    serial: int
    not_after: str
    response: bytes


class CertificateRenewal:
    """Authenticates sealed ``CERT_REQUEST``s and answers them with sealed certificates."""

    def __init__(
        self,
        registry_dir: Path,
        state_dir: Path,
        *,
        ca_dir: Path | None = None,
        days: int = 825,
    ) -> None:
        self.registry = DeviceRegistry(registry_dir)
        self.ca_dir = Path(ca_dir) if ca_dir is not None else Path(registry_dir) / "ca"
        self.days = days
        self._dir = Path(state_dir) / "renewals"
        self._lock = threading.Lock()
        self._last_response = 0

    def answer(self, sealed: bytes) -> bytes:
        """The sealed ``CERT_RESPONSE`` to ``sealed``; :class:`RenewalRefused` otherwise."""
        return self.accept(sealed).response

    def accept(self, sealed: bytes) -> Renewed:
        control, key = open_sealed(
            sealed,
            ControlKind.CERT_REQUEST,
            self.registry.key_for,
            max_bytes=MAX_REQUEST_BYTES,
            refused=RenewalRefused,
            noun="request",
            what="a CERT_REQUEST",
        )
        device, key_id = control.device, control.key_id
        payload = control.payload
        if payload.get("device") != device:
            raise RenewalRefused(
                HTTPStatus.FORBIDDEN,
                f"a request sealed by {device!r} names {payload.get('device')!r}",
            )
        csr = payload.get("csr")
        if not isinstance(csr, str) or len(csr) > _MAX_CSR_BYTES:
            raise RenewalRefused(HTTPStatus.BAD_REQUEST, "'csr' must be a PEM string")
        # One renewal at a time (threads of the server, or several server processes): the
        # counter check, the CA's issued.json and the registry are read-modify-written.
        with self._lock, self._locked():
            counters = self._read_counters()
            last = counters.get(device, 0)
            if not isinstance(last, int) or control.counter <= last:
                raise RenewalRefused(
                    HTTPStatus.CONFLICT,
                    f"request counter {control.counter} of {device!r} is not above {last}",
                )
            ca = CertificateAuthority(self.ca_dir)
            try:
                issued = ca.issue_from_csr(device, csr.encode(), days=self.days)
            except CsrRefused as exc:
                raise RenewalRefused(HTTPStatus.FORBIDDEN, f"CSR refused: {exc}") from None
            # The counter is spent once a certificate exists: a replay gets nothing new.
            counters[device] = control.counter
            atomic_write_json(self._dir / "counters.json", counters, mode=0o600)
            record = self.registry.get(device)
            if record is not None:
                serials = record.cert_serials or tuple(
                    s for s in ca.serials_of(device) if s != issued.serial
                )
                self.registry.set_cert_serials(device, (*serials, issued.serial))
            record = self.registry.get(device)
            if record is None or record.status != "active":
                # Revoked while we issued: the new certificate goes into the CRL too.
                ca.revoke(serial=issued.serial)
                raise RenewalRefused(HTTPStatus.FORBIDDEN, f"device {device!r} was revoked")
            self._last_response = counter_from_time(self._last_response, time.time())
            response = seal_control(
                ControlKind.CERT_RESPONSE,
                {
                    "device": device,
                    "request": control.counter,
                    "cert": issued.cert_pem.decode(),
                    "ca": ca.cert_pem.decode(),
                },
                key,
                device,
                self._last_response,
                key_id=key_id,
                created_us=int(time.time() * 1e6),
            )
        return Renewed(device, issued.serial, cert_not_after(issued.cert_pem).isoformat(), response)

    def _read_counters(self) -> dict[str, Any]:
        try:
            data = read_json(self._dir / "counters.json")
        except FileNotFoundError:
            return {}
        return data if isinstance(data, dict) else {}

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self._dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self._dir / ".lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)


# --------------------------------------------------------------------------- expiry metrics

#: The gauge Prometheus alerts on, on both sides (the gateway's from its status document).
EXPIRY_METRIC = "edgeos_credential_expiry_timestamp_seconds"


def credential_expiries(
    ca: CertificateAuthority, server_cert: Path | None = None, ota_repo: Path | None = None
) -> dict[str, dt.datetime]:
    """The earliest expiry of every credential the cloud keeps: ``ca``, ``crl``,
    ``device_certificate``, ``server_certificate`` and ``tuf_<role>`` for each TUF role."""
    out = ca.expiries(server_cert)
    if ota_repo is not None:
        from edgeos_cloud.ota.repository import OtaRepository

        for role, when in OtaRepository(ota_repo).expiries().items():
            out[f"tuf_{role}"] = when
    return out


def write_textfile(path: Path, expiries: dict[str, dt.datetime]) -> None:
    """Write the expiries as a Prometheus text file (node_exporter's textfile collector)."""
    from prometheus_client import CollectorRegistry, Gauge, write_to_textfile

    registry = CollectorRegistry()
    gauge = Gauge(
        EXPIRY_METRIC,
        "Unix time the earliest credential of this kind expires",
        ["kind"],
        registry=registry,
    )
    for kind, when in expiries.items():
        gauge.labels(kind).set(when.timestamp())
    write_to_textfile(str(path), registry)
