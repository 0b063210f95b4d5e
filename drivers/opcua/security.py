"""OPC UA security material: credential files, pinned server certificates, login messages.

Secrets never live in the configuration: the password is read from ``password_file`` and the
private key from ``client_private_key`` at every connect, and both must not be readable by
group or others.
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from asyncua import ua
from asyncua.crypto import security_policies
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from edgeos.errors import ConnectError, ProvisioningError

from .options import OpcUaOptions

__all__ = ["Credentials", "check_pinned", "load_credentials", "with_user"]

DEFAULT_APPLICATION_URI = "urn:edgeos:opcua:client"


@dataclass(slots=True)
class Credentials:
    password: str | None = None
    certificate_der: bytes | None = None
    private_key_der: bytes | None = None
    server_certificate_der: bytes | None = None
    application_uri: str = DEFAULT_APPLICATION_URI


def load_credentials(opts: OpcUaOptions) -> Credentials:
    """Read every credential file the options name; raise ``ProvisioningError``."""
    creds = Credentials(application_uri=opts.application_uri or DEFAULT_APPLICATION_URI)
    if opts.password_file is not None:
        text = _read_secret(opts.password_file, "password_file").decode("utf-8")
        creds.password = text.splitlines()[0] if text else ""
    if opts.client_certificate is not None and opts.client_private_key is not None:
        cert = _load_certificate(opts.client_certificate, "client_certificate")
        creds.certificate_der = cert.public_bytes(serialization.Encoding.DER)
        key = _load_private_key(opts.client_private_key)
        creds.private_key_der = key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        if opts.application_uri is None:
            creds.application_uri = _certificate_uri(cert) or DEFAULT_APPLICATION_URI
    if opts.server_certificate is not None:
        server = _load_certificate(opts.server_certificate, "server_certificate")
        creds.server_certificate_der = server.public_bytes(serialization.Encoding.DER)
    return creds


def check_pinned(
    endpoint: str,
    security_mode: str,
    endpoints: list[ua.EndpointDescription],
    pinned: bytes,
) -> None:
    """Raise ``ConnectError`` unless the server offers the pinned certificate.

    A server holding another key cannot decrypt our handshake and stays silent; comparing
    certificates first says so plainly.
    """
    policy_uri = security_policies.SecurityPolicyBasic256Sha256.URI
    mode = getattr(ua.MessageSecurityMode, security_mode)
    matching = [
        e for e in endpoints if e.SecurityPolicyUri == policy_uri and e.SecurityMode == mode
    ]
    if not matching:
        offered = sorted(
            {f"{e.SecurityPolicyUri.rsplit('#', 1)[-1]}/{e.SecurityMode.name}" for e in endpoints}
        )
        raise ConnectError(
            f"{endpoint}: connect: the server offers no Basic256Sha256/"
            f"{security_mode} endpoint (it offers: {', '.join(offered)})"
        )
    presented = _first_certificate(matching[0].ServerCertificate or b"")
    if presented != pinned:
        raise ConnectError(
            f"{endpoint}: connect: the server presents certificate "
            f"{_thumbprint(presented)}, not the pinned server_certificate "
            f"{_thumbprint(pinned)}; replace the pinned file if the server was re-keyed"
        )


def with_user(exc: ConnectError, username: str) -> ConnectError:
    """Name the user in a login failure so the message says what to check."""
    if "login refused" in str(exc):
        return ConnectError(f"{exc} (user {username!r}; check username and password_file)")
    return exc


def _read_secret(path: Path, key: str) -> bytes:
    """Read a credential file; refuse one that group or others can read."""
    try:
        mode = os.stat(path).st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ProvisioningError(
                f"{key} {str(path)!r} is accessible by group/others "
                f"(mode {stat.S_IMODE(mode):o}); run: chmod 600 {path}"
            )
        return path.read_bytes()
    except OSError as exc:
        raise ProvisioningError(f"{key} {str(path)!r} cannot be read: {exc.strerror}") from exc


def _load_certificate(path: Path, key: str) -> x509.Certificate:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ProvisioningError(f"{key} {str(path)!r} cannot be read: {exc.strerror}") from exc
    try:
        if b"-----BEGIN" in data:
            return x509.load_pem_x509_certificate(data)
        return x509.load_der_x509_certificate(data)
    except ValueError as exc:
        raise ProvisioningError(f"{key} {str(path)!r} is not a PEM/DER certificate") from exc


def _load_private_key(path: Path) -> PrivateKeyTypes:
    data = _read_secret(path, "client_private_key")
    try:
        if b"-----BEGIN" in data:
            return serialization.load_pem_private_key(data, password=None)
        return serialization.load_der_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise ProvisioningError(
            f"client_private_key {str(path)!r} is not an unencrypted PEM/DER private key"
        ) from exc


def _first_certificate(chain: bytes) -> bytes:
    """The leaf certificate of a DER chain (servers may send the chain concatenated)."""
    if len(chain) < 4 or chain[0] != 0x30:
        return chain
    # DER SEQUENCE: 0x30, then a short or long-form length.
    first = chain[1]
    if first < 0x80:
        end = 2 + first
    else:
        size = first & 0x7F
        end = 2 + size + int.from_bytes(chain[2 : 2 + size], "big")
    return chain[:end]


def _thumbprint(der: bytes) -> str:
    digest = hashlib.sha256(der).hexdigest()
    return f"sha256:{digest[:16]}…"


def _certificate_uri(cert: x509.Certificate) -> str | None:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return None
    uris = san.value.get_values_for_type(x509.UniformResourceIdentifier)
    return uris[0] if uris else None
