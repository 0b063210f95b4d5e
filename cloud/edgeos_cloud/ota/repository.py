"""The update repository: TUF metadata (python-tuf) over bundles, and a small HTTP server.

Directory layout::

    <repo>/repo.json                expiry per role, thresholds
    <repo>/metadata/N.root.json     every root version (clients walk the chain on rotation)
    <repo>/metadata/N.targets.json  consistent snapshots: every version stays addressable
    <repo>/metadata/N.snapshot.json
    <repo>/metadata/timestamp.json  the only unversioned file clients fetch
    <repo>/targets/bundles/<hw>/<kind>/<sha256>.<file>     published bundles
    <repo>/targets/channels/<group>/<hw>/<sha256>.<kind>.json  "release for this group"
    <repo>/keys/<keyid>.pem         online keys: targets, snapshot, timestamp
    <root-keys>/<keyid>.pem         OFFLINE root keys: needed only to change root

Only root changes need the offline directory (init, key rotation, revocation, root expiry
refresh); publishing and re-signing the timestamp work with the online keys alone.

Channels: a device asks for ``channels/<group>/<hardware>/<kind>.json``, a signed pointer to
the bundle its group should run. Campaigns move groups forward by rewriting pointers, so the
device never needs to list targets (ngclient only answers questions about a named path).
Every bundle target carries custom metadata ``{"edgeos": {kind, version, hardware,
manifest_sha256}}`` which the client checks against the bundle it unpacks.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

from cryptography.hazmat.primitives.serialization import load_pem_private_key
from securesystemslib.signer import (  # type: ignore[attr-defined]
    CryptoSigner,
    Signer,
)
from tuf.api.metadata import (  # type: ignore[attr-defined]
    Metadata,
    MetaFile,
    Root,
    Signed,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)
from tuf.api.serialization.json import JSONSerializer
from tuf.repository import Repository  # type: ignore[attr-defined]

from edgeos_protocol.bundle import Manifest, channel_path, extract_bundle, read_manifest
from edgeos_protocol.fsutil import atomic_write_bytes, atomic_write_json, read_json
from edgeos_protocol.outcome import Version

__all__ = [
    "Expiry",
    "OtaRepository",
    "PublishedBundle",
    "RepoServer",
    "ReportRefused",
    "RootKeysMissingError",
    "bundle_target_path",
    "channel_path",
    "serve",
]

ONLINE_ROLES = (Targets.type, Snapshot.type, Timestamp.type)
_SIGNED_TYPES: dict[str, Callable[[], Signed]] = {
    Root.type: Root,
    Targets.type: Targets,
    Snapshot.type: Snapshot,
    Timestamp.type: Timestamp,
}


class RootKeysMissingError(RuntimeError):
    """A change needs signatures from offline root keys that were not provided."""


@dataclass(frozen=True, slots=True)
class Expiry:
    """How long each role's metadata stays valid after it is signed (seconds).

    A short timestamp expiry bounds a freeze attack: a device that cannot get fresh metadata
    stops accepting updates after ``timestamp`` seconds. The repository must re-sign it
    (``edgeos-receiver ota refresh``) more often than that.
    """

    root: float = 365 * 86400
    targets: float = 90 * 86400
    snapshot: float = 7 * 86400
    timestamp: float = 86400

    def for_role(self, role: str) -> timedelta:
        return timedelta(seconds=float(getattr(self, role)))


@dataclass(frozen=True, slots=True)
class PublishedBundle:
    """A bundle as the repository published it."""

    target_path: str
    kind: str
    version: str
    hardware: str
    manifest_sha256: str
    length: int
    groups: tuple[str, ...]


def bundle_target_path(manifest: Manifest, file_name: str) -> str:
    """Target path of a bundle: ``bundles/<hardware>/<kind>/<file name>``."""
    return f"bundles/{manifest.target}/{manifest.kind}/{file_name}"


class OtaRepository(Repository):
    """A file-based TUF repository built on :class:`tuf.repository.Repository`.

    ``root_keys_dir`` is only needed for operations that change root metadata.
    """

    def __init__(self, repo_dir: Path, *, root_keys_dir: Path | None = None) -> None:
        self.dir = Path(repo_dir)
        self.metadata_dir = self.dir / "metadata"
        self.targets_dir = self.dir / "targets"
        self.keys_dir = self.dir / "keys"
        self.root_keys_dir = root_keys_dir
        settings = read_json(self.dir / "repo.json") if (self.dir / "repo.json").exists() else {}
        self.expiry = Expiry(**settings.get("expiry", {}))

    # ------------------------------------------------------------------ creation

    @classmethod
    def init(
        cls,
        repo_dir: Path,
        root_keys_dir: Path,
        *,
        root_keys: int = 1,
        root_threshold: int = 1,
        expiry: Expiry | None = None,
    ) -> OtaRepository:
        """Create a repository: keys for every role (root keys offline), first metadata."""
        if root_threshold > root_keys:
            raise ValueError("root threshold cannot exceed the number of root keys")
        repo_dir = Path(repo_dir)
        if (repo_dir / "metadata").exists():
            raise FileExistsError(f"{repo_dir} already holds a repository")
        for d in (repo_dir / "metadata", repo_dir / "targets", repo_dir / "keys", root_keys_dir):
            d.mkdir(parents=True, exist_ok=True)
        os.chmod(repo_dir / "keys", 0o700)
        os.chmod(root_keys_dir, 0o700)
        atomic_write_json(repo_dir / "repo.json", {"expiry": asdict(expiry or Expiry())})
        repo = cls(repo_dir, root_keys_dir=root_keys_dir)
        root = Root(consistent_snapshot=True)
        root.version = 0
        for _ in range(root_keys):
            root.add_key(repo._new_key(root_keys_dir).public_key, Root.type)
        root.roles[Root.type].threshold = root_threshold
        for role in ONLINE_ROLES:
            root.add_key(repo._new_key(repo.keys_dir).public_key, role)
        repo.close(Root.type, Metadata(root))
        for role in ONLINE_ROLES:
            with repo.edit(role):
                pass
        return repo

    @staticmethod
    def _new_key(directory: Path) -> CryptoSigner:
        signer = CryptoSigner.generate_ed25519()
        path = directory / f"{signer.public_key.keyid}.pem"
        atomic_write_bytes(path, signer.private_bytes, mode=0o600)
        return signer

    # ------------------------------------------------------------------ storage

    def open(self, role: str) -> Metadata[Any]:
        path = self.metadata_dir / f"{role}.json"
        if not path.exists():
            md: Metadata[Any] = Metadata(_SIGNED_TYPES[role]())
            md.signed.version = 0
            return md
        return Metadata.from_file(str(path))

    def close(self, role: str, md: Metadata[Any]) -> None:
        """Bump version and expiry, sign with every key we hold for the role, store."""
        md.signed.version += 1
        md.signed.expires = datetime.now(UTC).replace(microsecond=0) + self.expiry.for_role(role)
        md.signatures.clear()
        for signer in self._signers_for(role, md):
            md.sign(signer, append=True)
        self._check_threshold(role, md)
        data = md.to_bytes(JSONSerializer(compact=False))
        if role != Timestamp.type:
            atomic_write_bytes(self.metadata_dir / f"{md.signed.version}.{role}.json", data)
        atomic_write_bytes(self.metadata_dir / f"{role}.json", data)

    @property
    def targets_infos(self) -> dict[str, MetaFile]:
        return {"targets.json": MetaFile(self.targets().version)}

    @property
    def snapshot_info(self) -> MetaFile:
        return MetaFile(self.snapshot().version)

    def _current_root(self) -> Root | None:
        path = self.metadata_dir / "root.json"
        if not path.exists():
            return None
        signed = Metadata[Root].from_file(str(path)).signed
        assert isinstance(signed, Root)
        return signed

    def _signers_for(self, role: str, md: Metadata[Any]) -> list[Signer]:
        if role == Root.type:
            new_root = md.signed
            old_root = self._current_root()
            wanted = set(new_root.roles[Root.type].keyids)
            if old_root is not None:
                wanted |= set(old_root.roles[Root.type].keyids)
            if self.root_keys_dir is None:
                raise RootKeysMissingError(
                    "changing root metadata needs the offline root keys (--root-keys DIR)"
                )
            return _load_signers(self.root_keys_dir, wanted)
        root = self._current_root()
        assert root is not None
        return _load_signers(self.keys_dir, set(root.roles[role].keyids))

    def _check_threshold(self, role: str, md: Metadata[Any]) -> None:
        if role == Root.type:
            result = md.signed.get_root_verification_result(
                self._current_root(), md.signed_bytes, md.signatures
            )
        else:
            root = self._current_root()
            assert root is not None
            result = root.get_verification_result(role, md.signed_bytes, md.signatures)
        if not result.verified:
            raise RootKeysMissingError(
                f"not enough keys to sign {role} v{md.signed.version} "
                f"(threshold not met; are the offline root keys available?)"
            )

    # ------------------------------------------------------------------ publishing

    def publish(
        self,
        bundle: Path,
        *,
        groups: Sequence[str] = (),
        verify: bool = True,
    ) -> PublishedBundle:
        """Add a bundle as a target and point ``groups`` (if any) at it.

        ``verify`` unpacks the bundle into a temporary directory first, so a broken bundle is
        caught here rather than on every device.
        """
        manifest = read_manifest(bundle)
        if verify:
            scratch = self.dir / f".verify-{os.getpid()}"
            shutil.rmtree(scratch, ignore_errors=True)
            try:
                extract_bundle(bundle, scratch, durable=False)
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
        path = bundle_target_path(manifest, bundle.name)
        info = TargetFile.from_file(path, str(bundle), ["sha256"])
        info.unrecognized_fields["custom"] = {
            "edgeos": {
                "kind": manifest.kind,
                "version": manifest.version,
                "hardware": manifest.target,
                "manifest_sha256": manifest.digest(),
                "unpacked_size": manifest.total_size,
            }
        }
        self._store_target(info, bundle.read_bytes())
        with self.edit_targets() as targets:
            targets.targets[path] = info
            for group in groups:
                self._point(
                    targets,
                    group,
                    manifest.target,
                    manifest.kind,
                    path=path,
                    version=manifest.version,
                )
        self._snapshot_and_timestamp()
        return PublishedBundle(
            path,
            manifest.kind,
            manifest.version,
            manifest.target,
            manifest.digest(),
            info.length,
            tuple(groups),
        )

    def set_channels(self, groups: Sequence[str], target_path: str) -> None:
        """Point each group at an already published bundle (one new targets version)."""
        with self.edit_targets() as targets:
            info = targets.targets.get(target_path)
            if info is None:
                raise KeyError(f"{target_path} is not a published target")
            meta = info.custom["edgeos"]
            for group in groups:
                self._point(
                    targets,
                    group,
                    meta["hardware"],
                    meta["kind"],
                    path=target_path,
                    version=meta["version"],
                )
        self._snapshot_and_timestamp()

    def _point(
        self, targets: Targets, group: str, hardware: str, kind: str, *, path: str, version: str
    ) -> None:
        if not group or "/" in group or group in (".", ".."):
            raise ValueError(f"bad group name {group!r}")
        pointer = json.dumps(
            {"target": path, "version": version, "kind": kind, "hardware": hardware},
            sort_keys=True,
        ).encode()
        cpath = channel_path(group, hardware, kind)
        info = TargetFile.from_data(cpath, pointer, ["sha256"])
        self._store_target(info, pointer)
        targets.targets[cpath] = info

    def _store_target(self, info: TargetFile, data: bytes) -> None:
        directory, _, name = info.path.rpartition("/")
        out = self.targets_dir / directory / f"{info.hashes['sha256']}.{name}"
        out.parent.mkdir(parents=True, exist_ok=True)
        if not out.exists():
            atomic_write_bytes(out, data)

    def _snapshot_and_timestamp(self) -> None:
        self.do_snapshot()
        self.do_timestamp()

    def published(self) -> dict[str, dict[str, Any]]:
        """Every bundle target with its custom metadata, keyed by target path."""
        return {
            path: info.custom["edgeos"]
            for path, info in self.targets().targets.items()
            if path.startswith("bundles/") and isinstance(info.custom, dict)
        }

    def refresh_timestamp(self) -> None:
        """Re-sign timestamp (and snapshot) so devices keep trusting an unchanged repository.

        Targets (online key too) is re-signed first when it expires within twice the
        snapshot expiry, so a quiet repository never lets it lapse; root needs the offline
        keys and is left alone (:meth:`expiries` shows when it is due).
        """
        targets_left = self.targets().expires - datetime.now(UTC)
        if targets_left <= 2 * self.expiry.for_role(Snapshot.type):
            with self.edit_targets():
                pass
        self.do_snapshot(force=True)
        self.do_timestamp(force=True)

    def expiries(self) -> dict[str, datetime]:
        """When each role's current metadata expires (UTC)."""
        out: dict[str, datetime] = {}
        for role in (Root.type, *ONLINE_ROLES):
            path = self.metadata_dir / f"{role}.json"
            if path.exists():
                out[role] = Metadata.from_file(str(path)).signed.expires
        return out

    # ------------------------------------------------------------------ keys

    def rotate_key(self, role: str, *, revoke: str | None = None) -> str:
        """Replace a role's key with a fresh one; return the new key id.

        ``revoke`` names the key id to take out (default: every current key of the role).
        Needs the offline root keys: the new root version is signed by the old root keys and
        the new ones, so provisioned devices can walk to it. The role itself (and snapshot and
        timestamp) are re-signed at once with the new key, and the old key file is moved to
        ``revoked/`` so it is never used again.
        """
        if role not in _SIGNED_TYPES:
            raise ValueError(f"unknown role {role!r}")
        directory = self.keys_dir if role != Root.type else self.root_keys_dir
        if directory is None:
            raise RootKeysMissingError("key rotation needs the offline root keys (--root-keys)")
        current = self.root().roles[role].keyids
        to_revoke = [revoke] if revoke is not None else list(current)
        unknown = [k for k in to_revoke if k not in current]
        if unknown:
            raise ValueError(f"{unknown[0]} is not a key of {role}")
        signer = self._new_key(directory)
        with self.edit_root() as root:
            root.add_key(signer.public_key, role)
            for keyid in to_revoke:
                root.revoke_key(keyid, role)
            if len(root.roles[role].keyids) < root.roles[role].threshold:
                raise ValueError(f"{role} would have fewer keys than its threshold")
        revoked_dir = directory / "revoked"
        revoked_dir.mkdir(exist_ok=True, mode=0o700)
        for keyid in to_revoke:
            with contextlib.suppress(FileNotFoundError):
                os.replace(directory / f"{keyid}.pem", revoked_dir / f"{keyid}.pem")
        if role == Targets.type:
            with self.edit_targets():
                pass
        if role in (Targets.type, Snapshot.type):
            self.do_snapshot(force=True)
        self.do_timestamp(force=True)
        return str(signer.public_key.keyid)

    def trusted_root(self) -> bytes:
        """Root metadata to install on devices at provisioning (the newest version)."""
        return (self.metadata_dir / "root.json").read_bytes()


def _load_signers(directory: Path, keyids: set[str]) -> list[Signer]:
    signers: list[Signer] = []
    for keyid in sorted(keyids):
        path = directory / f"{keyid}.pem"
        if path.exists():
            private = load_pem_private_key(path.read_bytes(), None)
            signers.append(CryptoSigner(private))
    return signers


# --------------------------------------------------------------------------- serving


class RepoRequestHandler(BaseHTTPRequestHandler):
    """Serves ``/metadata/*`` and ``/targets/*`` read-only; ``POST /reports`` takes outcomes,
    ``POST /certificates`` renews client certificates (when the server has the handlers)."""

    server: RepoServer
    protocol_version = "HTTP/1.1"
    chunk_size: ClassVar[int] = 64 << 10

    def setup(self) -> None:
        # Socket timeout (StreamRequestHandler): a client that stalls mid-request is dropped.
        self.timeout = self.server.request_timeout_s  # type: ignore[misc]
        super().setup()

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: a request log per poll would wear out flash on a small server."""

    def _resolve(self) -> Path | None:
        rel = self.path.split("?", 1)[0].lstrip("/")
        top, _, rest = rel.partition("/")
        if top not in ("metadata", "targets") or not rest:
            return None
        base = (self.server.repo_dir / top).resolve()
        candidate = (base / rest).resolve()
        if base not in candidate.parents or not candidate.is_file():
            return None
        return candidate

    def do_GET(self) -> None:
        path = self._resolve()
        if path is None:
            self.send_error(HTTPStatus.NOT_FOUND)
            return
        data = path.read_bytes()
        self.send_body(path, data)

    def send_body(self, path: Path, data: bytes) -> None:
        """Write a 200 response (hostile test servers override this)."""
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:
        if self.path == "/certificates" and self.server.on_certificate is not None:
            self._certificate(self.server.on_certificate)
            return
        if self.path != "/reports" or self.server.on_report is None:
            self._refuse(HTTPStatus.NOT_FOUND, "no such endpoint")
            return
        body = self._read_bounded_body(self.server.max_report_bytes)
        if body is None:
            return
        try:
            self.server.on_report(body)
        except ReportRefused as exc:
            self._refuse(exc.status, str(exc))
            return
        reply = b'{"ok": true}\n'
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def _certificate(self, on_certificate: Callable[[bytes], bytes]) -> None:
        """``POST /certificates``: a sealed renewal request in, a sealed certificate out."""
        body = self._read_bounded_body(self.server.max_report_bytes)
        if body is None:
            return
        try:
            reply = on_certificate(body)
        except ReportRefused as exc:
            self._refuse(exc.status, str(exc))
            return
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def _read_bounded_body(self, limit: int) -> bytes | None:
        """The request body when it is announced and at most ``limit`` bytes, else refused.

        Only a plain decimal ``Content-Length`` is accepted: chunked or otherwise encoded
        bodies, a missing length (411), a negative or malformed one (400: ``read(-1)`` would
        read until the client closes) and an oversized one (413) are refused before anything
        is read; a body shorter than announced (the socket timeout ends the wait) is 400.
        """
        if self.headers.get("Transfer-Encoding") is not None:
            self._refuse(HTTPStatus.LENGTH_REQUIRED, "a Content-Length body is required")
            return None
        lengths = self.headers.get_all("Content-Length") or []
        if not lengths:
            self._refuse(HTTPStatus.LENGTH_REQUIRED, "Content-Length is required")
            return None
        text = lengths[0].strip()
        if len(lengths) != 1 or not text.isascii() or not text.isdigit() or len(text) > 18:
            self._refuse(HTTPStatus.BAD_REQUEST, "Content-Length is not a decimal length")
            return None
        length = int(text)
        if length > limit:
            self._refuse(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body above {limit} bytes")
            return None
        try:
            body = self.rfile.read(length)
        except OSError:  # socket timeout: a client that announced more than it sends
            body = b""
        if len(body) != length:
            self._refuse(HTTPStatus.BAD_REQUEST, "body shorter than its Content-Length")
            return None
        return body

    def _refuse(self, status: HTTPStatus, message: str) -> None:
        # The connection is not reused: an unread body must not be parsed as a request.
        self.close_connection = True
        self.send_error(status, message)


class ReportRefused(Exception):
    """Raised by an ``on_report`` callback: the report is refused with ``status``."""

    def __init__(self, status: HTTPStatus, message: str) -> None:
        self.status = status
        super().__init__(message)


class RepoServer(ThreadingHTTPServer):
    """A stdlib HTTP server for one repository, running in a daemon thread.

    Use as a context manager, or call :meth:`close`; :attr:`url` is the base URL (bind port 0
    and read the real port back).
    """

    daemon_threads = True
    block_on_close = False

    def __init__(
        self,
        repo_dir: Path,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        handler: type[RepoRequestHandler] = RepoRequestHandler,
        on_report: Callable[[bytes], object] | None = None,
        max_report_bytes: int = 16 << 10,
        request_timeout_s: float = 15.0,
        on_certificate: Callable[[bytes], bytes] | None = None,
    ) -> None:
        super().__init__((host, port), handler)
        self.repo_dir = Path(repo_dir)
        #: Gets the raw body of ``POST /certificates`` (a sealed renewal request) and returns
        #: the sealed answer (``edgeos_cloud.renewal``); raises :class:`ReportRefused`.
        self.on_certificate = on_certificate
        #: Gets the raw body of ``POST /reports`` (a sealed report); raises
        #: :class:`ReportRefused` to refuse it.
        self.on_report = on_report
        self.max_report_bytes = max_report_bytes
        self.request_timeout_s = request_timeout_s
        self.stopping = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> RepoServer:
        self._thread = threading.Thread(
            target=self.serve_forever, name="ota-repo-server", daemon=True
        )
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop serving, close the socket and join the serving thread."""
        self.stopping.set()
        if self._thread is not None:
            self.shutdown()
            self._thread.join()
            self._thread = None
        self.server_close()

    def __enter__(self) -> RepoServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def serve(
    repo_dir: Path,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    on_report: Callable[[bytes], object] | None = None,
    on_certificate: Callable[[bytes], bytes] | None = None,
) -> RepoServer:
    """Start serving ``repo_dir`` in a background thread; returns the running server."""
    return RepoServer(
        repo_dir, host, port, on_report=on_report, on_certificate=on_certificate
    ).start()


@contextlib.contextmanager
def serving(repo_dir: Path, **kwargs: Any) -> Iterator[RepoServer]:
    """``with serving(repo) as server: …`` – start, yield, always stop."""
    server = serve(repo_dir, **kwargs)
    try:
        yield server
    finally:
        server.close()


def file_sha256(path: Path) -> str:
    """SHA-256 of a file (used by campaign reports to name bundles)."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def newest(versions: Sequence[str]) -> str | None:
    """Highest of several version strings (``None`` for none)."""
    return max(versions, key=Version.parse, default=None)
