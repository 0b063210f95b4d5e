"""A small X.509 certificate authority for the MQTT transport (ECDSA P-256).

The receiver owns one CA. It issues

* client certificates for devices and receivers (``CN`` = the identity; Mosquitto's
  ``use_identity_as_username`` turns it into the MQTT username the ACLs match), and
* server certificates for the broker (SAN ``127.0.0.1`` / ``localhost`` by default),

each with a **role** (:data:`Role`): the subject carries it as ``OU`` (``O=edgeos, OU=device,
CN=gw-1``), ``issued.json`` records it, and the two namespaces never meet — a device
certificate is issued only for a valid device id outside the services' reserved names
(:func:`edgeos_protocol.credentials.check_device_id`), a receiver or service certificate only
for a reserved name, and a common name once issued under one role is refused under another.
The broker's ACL (:mod:`edgeos_cloud.broker`) grants cross-device rights to service names
only, so no device certificate can ever read another device's topics.

and revokes client certificates by writing a CRL (``crl.pem``) that the broker loads through
its ``crlfile`` option. Mosquitto 2.0 re-reads ``cafile``, ``certfile``/``keyfile`` and
``crlfile`` on SIGHUP without dropping connected clients (measured, ``docs/credentials.md``), so
``edgeos-cloud pki refresh`` re-signs the CRL well before its ``nextUpdate`` and reloads the
broker; a CRL past its ``nextUpdate`` makes OpenSSL refuse *every* client. The receiver refuses
a revoked device's batches at once through its key registry, so the CRL is a second wall.

Renewal: :meth:`CertificateAuthority.issue_from_csr` certifies a device's new key (never a key
certified before), :meth:`~CertificateAuthority.renew_server` re-issues the broker's certificate
in place inside its renewal window, and :meth:`~CertificateAuthority.rollover` starts a CA
rollover: a new signing CA, ``ca.crt`` = new + previous CA (the trust bundle brokers and
devices load during the overlap) and ``crl.pem`` = one CRL per CA in the bundle (OpenSSL needs a
CRL of each issuer it checks, measured).

Layout of a CA directory (every private file mode 0600)::

    ca.crt  ca.key  crl.pem  issued.json  revoked.json  retired/<serial>/{ca.crt,ca.key}
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import json
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edgeos_protocol.credentials import check_device_id, is_service_identity
from edgeos_protocol.fsutil import write_private

__all__ = [
    "ROLES",
    "CertificateAuthority",
    "CsrRefused",
    "IssuedCertificate",
    "Role",
    "cert_not_after",
    "role_of",
]

#: What a certificate is for; written into its subject as ``OU``.
Role = Literal["device", "receiver", "service", "broker"]
ROLES: tuple[Role, ...] = get_args(Role)
_ORGANIZATION = "edgeos"

_CLOCK_SKEW = dt.timedelta(minutes=5)
#: How long a CRL is valid; it is rewritten on every revocation and on :meth:`refresh_crl`.
CRL_VALIDITY = dt.timedelta(days=30)


class CsrRefused(ValueError):
    """A certificate signing request this CA will not certify (the message says why)."""


def cert_not_after(pem: bytes) -> dt.datetime:
    """``notAfter`` (UTC) of the first certificate in ``pem``."""
    return x509.load_pem_x509_certificates(pem)[0].not_valid_after_utc


def _spki_sha256(public_key: Any) -> str:
    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()


@dataclass(frozen=True, slots=True)
class IssuedCertificate:
    """A certificate and its private key (PEM), and where they were written if anywhere."""

    common_name: str
    serial: int
    cert_pem: bytes
    key_pem: bytes
    cert_file: Path | None = None
    key_file: Path | None = None
    role: Role = "device"


def role_of(cert_pem: bytes) -> Role | None:
    """The role (``OU``) of a certificate issued by this CA; None when it carries none."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    units = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    value = units[0].value if units else None
    for role in ROLES:
        if value == role:
            return role
    return None


def _client_role(common_name: str, role: Role | None) -> Role:
    """The role to issue ``common_name`` under; ``ValueError`` when the two do not fit."""
    if role is None:
        role = (
            ("receiver" if common_name.lower().startswith("receiver") else "service")
            if (is_service_identity(common_name))
            else "device"
        )
    if role == "device":
        check_device_id(common_name)
    elif role in ("receiver", "service"):
        if not is_service_identity(common_name):
            raise ValueError(
                f"a {role} identity must be a reserved service name (e.g. 'receiver', "
                f"'receiver-2', 'svc-…'), so that no device can ever take it: {common_name!r}"
            )
    else:
        raise ValueError(f"role {role!r} is not a client certificate role")
    return role


class CertificateAuthority:
    """A CA kept in one directory; create it with :meth:`create` or :meth:`open_or_create`."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        try:
            # ca.crt is the trust bundle: the signing CA first, then CAs still in overlap.
            self._cert = x509.load_pem_x509_certificates(self.ca_file.read_bytes())[0]
            key = serialization.load_pem_private_key(self._key_file.read_bytes(), None)
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"no CA in {self.directory} (missing {exc.filename})") from exc
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{self._key_file} is not an EC private key")
        self._key = key

    # ------------------------------------------------------------------ creation

    @classmethod
    def create(
        cls, directory: str | Path, common_name: str = "edgeos CA", *, days: int = 3650
    ) -> CertificateAuthority:
        """Create a new CA in ``directory`` (refuses to overwrite an existing one)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        if (directory / "ca.key").exists():
            raise FileExistsError(f"a CA already exists in {directory}")
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _ca_certificate(key, common_name, days)
        write_private(directory / "ca.key", _key_pem(key))
        write_private(directory / "ca.crt", cert.public_bytes(serialization.Encoding.PEM), 0o644)
        write_private(directory / "issued.json", b"{}")
        write_private(directory / "revoked.json", b"{}")
        ca = cls(directory)
        ca.refresh_crl()
        return ca

    @classmethod
    def open_or_create(
        cls, directory: str | Path, common_name: str = "edgeos CA"
    ) -> CertificateAuthority:
        """Open the CA in ``directory``, creating it first when there is none."""
        if (Path(directory) / "ca.key").exists():
            return cls(directory)
        return cls.create(directory, common_name)

    # ------------------------------------------------------------------ files

    @property
    def ca_file(self) -> Path:
        """The CA certificate (PEM): the trust anchor of brokers, devices and receivers."""
        return self.directory / "ca.crt"

    @property
    def crl_file(self) -> Path:
        """The current certificate revocation list (PEM), for Mosquitto's ``crlfile``."""
        return self.directory / "crl.pem"

    @property
    def _key_file(self) -> Path:
        return self.directory / "ca.key"

    @property
    def cert_pem(self) -> bytes:
        """The trust bundle (PEM): the signing CA and, during a rollover, the previous one."""
        return self.ca_file.read_bytes()

    @property
    def signing_cert_pem(self) -> bytes:
        """The CA certificate that signs new certificates and the first CRL."""
        return self._cert.public_bytes(serialization.Encoding.PEM)

    @property
    def not_after(self) -> dt.datetime:
        """When the signing CA certificate expires."""
        return self._cert.not_valid_after_utc

    # ------------------------------------------------------------------ issuing

    def issue_client(
        self,
        common_name: str,
        out_dir: str | Path | None = None,
        *,
        days: int = 825,
        role: Role | None = None,
    ) -> IssuedCertificate:
        """Issue a TLS client certificate with ``CN = common_name`` and ``OU = role``.

        ``role`` defaults to ``receiver``/``service`` for a reserved service name and to
        ``device`` otherwise; a name that does not fit its role (a device named ``receiver``, a
        receiver named like a device) or that was issued under another role is refused with
        ``ValueError``. When ``out_dir`` is given, ``<cn>.crt`` and ``<cn>.key`` (0600) are
        written there.
        """
        role = _client_role(common_name, role)
        eku = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH])
        return self._issue(common_name, sans=[], eku=eku, out_dir=out_dir, days=days, role=role)

    def issue_device(self, device: str, out_dir: str | Path | None = None) -> IssuedCertificate:
        """A device's client certificate (``OU=device``); refuses reserved or invalid ids."""
        return self.issue_client(device, out_dir, role="device")

    def role_of_name(self, common_name: str) -> Role | None:
        """The role ``common_name`` was issued under (None: never issued)."""
        for info in self._read_json("issued.json").values():
            # Certificates issued before roles were recorded have none: they do not count.
            role = info.get("role")
            if info.get("cn") == common_name and role in ROLES:
                return role  # type: ignore[no-any-return]
        return None

    def service_identities(self, role: Role = "receiver") -> list[str]:
        """Common names issued under ``role`` (e.g. every receiver, for the broker's ACL)."""
        names = {
            info["cn"]
            for info in self._read_json("issued.json").values()
            if info.get("role") == role
        }
        return sorted(names)

    def issue_server(
        self,
        hosts: Iterable[str] = ("127.0.0.1", "localhost"),
        out_dir: str | Path | None = None,
        *,
        common_name: str = "edgeos broker",
        days: int = 825,
    ) -> IssuedCertificate:
        """Issue a TLS server certificate whose SAN lists ``hosts`` (IP addresses or names)."""
        sans: list[x509.GeneralName] = []
        for host in hosts:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                sans.append(x509.DNSName(host))
        eku = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH])
        return self._issue(
            common_name,
            sans=sans,
            eku=eku,
            out_dir=out_dir,
            days=days,
            file_stem="server",
            role="broker",
        )

    def _issue(
        self,
        common_name: str,
        *,
        sans: list[x509.GeneralName],
        eku: x509.ExtendedKeyUsage,
        out_dir: str | Path | None,
        days: int,
        role: Role,
        file_stem: str | None = None,
        public_key: ec.EllipticCurvePublicKey | None = None,
    ) -> IssuedCertificate:
        earlier = self.role_of_name(common_name)
        if earlier is not None and earlier != role:
            raise ValueError(f"{common_name!r} was issued as a {earlier}; refusing a {role}")
        key: ec.EllipticCurvePrivateKey | None = None
        if public_key is None:
            key = ec.generate_private_key(ec.SECP256R1())
            public_key = key.public_key()
        now = dt.datetime.now(dt.UTC)
        serial = x509.random_serial_number()
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, _ORGANIZATION),
                x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
                x509.NameAttribute(NameOID.COMMON_NAME, common_name),
            ]
        )
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self._cert.subject)
            .public_key(public_key)
            .serial_number(serial)
            .not_valid_before(now - _CLOCK_SKEW)
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(eku, critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()), False
            )
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(self._key, hashes.SHA256())
        cert_pem = cert.public_bytes(serialization.Encoding.PEM)
        key_pem = _key_pem(key) if key is not None else b""
        issued = self._read_json("issued.json")
        issued[str(serial)] = {
            "cn": common_name,
            "role": role,
            "not_after": cert.not_valid_after_utc.isoformat(),
            "spki": _spki_sha256(public_key),
        }
        write_private(self.directory / "issued.json", json.dumps(issued, indent=1).encode())
        cert_file = key_file = None
        if out_dir is not None:
            out = Path(out_dir)
            out.mkdir(parents=True, exist_ok=True, mode=0o700)
            stem = file_stem or common_name
            cert_file, key_file = out / f"{stem}.crt", out / f"{stem}.key"
            write_private(cert_file, cert_pem, 0o644)
            if key_pem:
                write_private(key_file, key_pem)
        return IssuedCertificate(common_name, serial, cert_pem, key_pem, cert_file, key_file, role)

    # ------------------------------------------------------------------ renewal

    def issue_from_csr(self, device: str, csr_pem: bytes, *, days: int = 825) -> IssuedCertificate:
        """Certify the key of a device's CSR (``CN = device``); :class:`CsrRefused` otherwise.

        Refused: a CSR that does not parse or whose self-signature fails (no proof the
        requester holds the key), a subject other than ``CN=device`` (role device), a key that
        is not EC P-256, and a key this CA certified before (a revoked certificate's key
        included): every renewal brings a fresh key. The returned certificate has no
        ``key_pem``: the private key never left the device.
        """
        try:
            csr = x509.load_pem_x509_csr(csr_pem)
        except ValueError as exc:
            raise CsrRefused(f"not a PEM certificate request: {exc}") from None
        if not csr.is_signature_valid:
            raise CsrRefused("the request's signature does not verify")
        names = [a.value for a in csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
        if names != [device]:
            raise CsrRefused(f"a request authenticated as {device!r} names CN={names!r}")
        units = [
            a.value for a in csr.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
        ]
        if units not in ([], ["device"]):
            raise CsrRefused(f"a device may only ask for role 'device', not {units!r}")
        key = csr.public_key()
        if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
            raise CsrRefused("the key must be EC P-256")
        spki = _spki_sha256(key)
        if any(info.get("spki") == spki for info in self._read_json("issued.json").values()):
            raise CsrRefused("this key was certified before (a renewal needs a fresh key)")
        if self.role_of_name(device) not in (None, "device"):
            raise CsrRefused(f"{device!r} is not a device identity")
        try:
            check_device_id(device)
        except ValueError as exc:
            raise CsrRefused(str(exc)) from None
        eku = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH])
        return self._issue(
            device, sans=[], eku=eku, out_dir=None, days=days, role="device", public_key=key
        )

    def renew_in_place(
        self,
        cert_file: Path,
        key_file: Path,
        *,
        within: dt.timedelta,
        days: int = 825,
        force: bool = False,
    ) -> IssuedCertificate | None:
        """Re-issue a service's certificate (the broker's, a receiver's) when it expires within
        ``within`` (or ``force``); a receiver's also when another CA than the signing one
        issued it (after a :meth:`rollover`).

        Same subject, role and SANs, a new key. The key is written before the certificate (both
        atomically); the broker loads the pair on its next reload (SIGHUP), a receiver on its
        next connection. None: not due.
        """
        old = x509.load_pem_x509_certificate(cert_file.read_bytes())
        role = role_of(cert_file.read_bytes())
        due = force or old.not_valid_after_utc - dt.datetime.now(dt.UTC) <= within
        # A client moves to the new CA at once (the broker trusts the bundle); the broker's
        # own certificate only when due or forced: devices must hold the bundle first.
        if not due and (role == "broker" or old.issuer == self._cert.subject):
            return None
        names = old.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        common_name = str(names[0].value) if names else "edgeos broker"
        if role == "broker":
            try:
                ext = old.extensions.get_extension_for_class(x509.SubjectAlternativeName)
                sans = list(ext.value)
            except x509.ExtensionNotFound:
                sans = []
            eku = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH])
            issued = self._issue(
                common_name, sans=sans, eku=eku, out_dir=None, days=days, role="broker"
            )
        elif role in ("receiver", "service"):
            issued = self.issue_client(common_name, days=days, role=role)
        else:
            raise ValueError(f"{cert_file} is not a broker or service certificate (role {role})")
        write_private(key_file, issued.key_pem)
        write_private(cert_file, issued.cert_pem, 0o644)
        return IssuedCertificate(
            common_name,
            issued.serial,
            issued.cert_pem,
            issued.key_pem,
            cert_file,
            key_file,
            issued.role,
        )

    def rollover(self, common_name: str = "edgeos CA", *, days: int = 3650) -> None:
        """Start a CA rollover: a new signing CA; the old one is kept for the overlap.

        ``ca.crt`` becomes new + old (the bundle brokers and devices trust), the old key moves
        to ``retired/<serial>/`` and signs its own CRL in ``crl.pem`` until :meth:`retire`.
        Devices get the bundle with their next renewal (``CERT_RESPONSE``'s ``ca``).
        """
        old_pem, old_key = self.signing_cert_pem, self._key_file.read_bytes()
        bundle_rest = [
            c.public_bytes(serialization.Encoding.PEM)
            for c in x509.load_pem_x509_certificates(self.ca_file.read_bytes())[1:]
        ]
        slot = self.directory / "retired" / f"{self._cert.serial_number:x}"
        slot.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_private(slot / "ca.crt", old_pem, 0o644)
        write_private(slot / "ca.key", old_key)
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _ca_certificate(key, common_name, days)
        new_pem = cert.public_bytes(serialization.Encoding.PEM)
        write_private(self._key_file, _key_pem(key))
        write_private(self.ca_file, b"".join([new_pem, old_pem, *bundle_rest]), 0o644)
        self._cert, self._key = cert, key
        self.refresh_crl()

    def retire(self) -> list[str]:
        """End the overlap: drop every retired CA from the bundle, the CRL and the disk."""
        retired_dir = self.directory / "retired"
        gone = sorted(p.name for p in retired_dir.iterdir()) if retired_dir.exists() else []
        write_private(self.ca_file, self.signing_cert_pem, 0o644)
        shutil.rmtree(retired_dir, ignore_errors=True)
        self.refresh_crl()
        return gone

    def _retired(self) -> list[tuple[x509.Certificate, ec.EllipticCurvePrivateKey]]:
        out = []
        retired_dir = self.directory / "retired"
        for slot in sorted(retired_dir.iterdir()) if retired_dir.exists() else []:
            cert = x509.load_pem_x509_certificate((slot / "ca.crt").read_bytes())
            key = serialization.load_pem_private_key((slot / "ca.key").read_bytes(), None)
            if isinstance(key, ec.EllipticCurvePrivateKey):
                out.append((cert, key))
        return out

    # ------------------------------------------------------------------ expiry

    def crl_next_update(self) -> dt.datetime | None:
        """``nextUpdate`` of the signing CA's CRL in ``crl.pem`` (None: no CRL)."""
        try:
            data = self.crl_file.read_bytes()
        except FileNotFoundError:
            return None
        first = data.split(b"-----END X509 CRL-----")[0] + b"-----END X509 CRL-----\n"
        return x509.load_pem_x509_crl(first).next_update_utc

    def device_expiries(self) -> dict[str, dt.datetime]:
        """Per device, when its newest unrevoked certificate expires."""
        revoked = self.revoked_serials()
        out: dict[str, dt.datetime] = {}
        for serial, info in self._read_json("issued.json").items():
            if info.get("role") != "device" or int(serial) in revoked:
                continue
            when = dt.datetime.fromisoformat(info["not_after"])
            if info["cn"] not in out or when > out[info["cn"]]:
                out[info["cn"]] = when
        return out

    def expiries(self, server_cert: Path | None = None) -> dict[str, dt.datetime]:
        """The earliest expiry of each credential kind this CA stands behind.

        ``ca`` (earliest CA in the bundle), ``crl`` (``nextUpdate``), ``device_certificate``
        (earliest among devices' newest certificates) and, given its file, ``server_certificate``.
        """
        bundle = x509.load_pem_x509_certificates(self.ca_file.read_bytes())
        out = {"ca": min(c.not_valid_after_utc for c in bundle)}
        crl = self.crl_next_update()
        if crl is not None:
            out["crl"] = crl
        devices = self.device_expiries()
        if devices:
            out["device_certificate"] = min(devices.values())
        if server_cert is not None and server_cert.exists():
            out["server_certificate"] = cert_not_after(server_cert.read_bytes())
        return out

    # ------------------------------------------------------------------ revocation

    def serials_of(self, common_name: str) -> list[int]:
        """Serial numbers of every certificate issued to ``common_name``."""
        issued = self._read_json("issued.json")
        return [int(s) for s, info in issued.items() if info.get("cn") == common_name]

    def revoke(self, common_name: str | None = None, *, serial: int | None = None) -> list[int]:
        """Revoke every certificate of ``common_name`` (or one ``serial``); rewrite the CRL.

        Returns the serials newly revoked.
        """
        if (common_name is None) == (serial is None):
            raise ValueError("give exactly one of common_name or serial")
        serials = [serial] if serial is not None else self.serials_of(str(common_name))
        revoked = self._read_json("revoked.json")
        now = dt.datetime.now(dt.UTC).isoformat()
        new = [s for s in serials if str(s) not in revoked]
        for s in new:
            revoked[str(s)] = now
        write_private(self.directory / "revoked.json", json.dumps(revoked, indent=1).encode())
        self.refresh_crl()
        return new

    def revoked_serials(self) -> set[int]:
        return {int(s) for s in self._read_json("revoked.json")}

    def refresh_crl(self) -> Path:
        """Write freshly signed CRLs listing every revoked serial; returns the file's path.

        One CRL per CA in the trust bundle (the signing CA's first): OpenSSL checks a client
        against its issuer's CRL and refuses it when that CRL is missing or past ``nextUpdate``.
        Serials are random 159-bit numbers, so each CRL simply lists every revoked one.
        """
        now = dt.datetime.now(dt.UTC)
        revoked = self._read_json("revoked.json")
        pems = []
        for cert, key in [(self._cert, self._key), *self._retired()]:
            builder = (
                x509.CertificateRevocationListBuilder()
                .issuer_name(cert.subject)
                .last_update(now - _CLOCK_SKEW)
                .next_update(now + CRL_VALIDITY)
            )
            for serial, when in revoked.items():
                entry = (
                    x509.RevokedCertificateBuilder()
                    .serial_number(int(serial))
                    .revocation_date(dt.datetime.fromisoformat(when))
                    .build()
                )
                builder = builder.add_revoked_certificate(entry)
            pems.append(builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
        write_private(self.crl_file, b"".join(pems), 0o644)
        return self.crl_file

    def _read_json(self, name: str) -> dict[str, Any]:
        path = self.directory / name
        if not path.exists():
            return {}
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError(f"{path} is not a JSON object")
        return data


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _ca_certificate(
    key: ec.EllipticCurvePrivateKey, common_name: str, days: int
) -> x509.Certificate:
    """A self-signed CA certificate for ``key`` (path length 0: it signs leaves only)."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA256())
    )
