"""Release bundles: a tar (zstd-compressed or plain) holding ``manifest.json`` and a payload.

Layout of a bundle::

    manifest.json            first member; kind, version, hardware target, every file's
                             path + sha256 + size (+ executable bit)
    payload/<path>           one regular file per manifest entry, nothing else

Kinds and what their payload may contain (enforced at install, so a ``config`` bundle can never
overwrite runtime code):

* ``full``   – runtime packages (``edgeos/``, ``drivers/``), ``wheelhouse/`` or
  ``requirements.lock`` for the target architecture, ``models/``, ``config/``
* ``models`` – ``models/`` only
* ``config`` – ``config/`` only

Extraction never trusts the archive: members are streamed into a fresh directory with
``O_EXCL | O_NOFOLLOW``; anything that is not a regular file or directory (symlinks, hard
links, devices, FIFOs) is refused, as are absolute paths, ``..``, names outside the manifest,
duplicates, and more bytes than the manifest declares. Every file is hashed while it is
written and compared with the manifest; a missing file fails the install.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import stat
import tarfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import IO, Any, Literal, cast

import zstandard

from edgeos_protocol.fsutil import QuotaExceededError, fsync_dir, sha256_file
from edgeos_protocol.outcome import InstallError, Reason, Rejected, Version

__all__ = [
    "BUNDLE_KINDS",
    "MANIFEST_NAME",
    "BundleKind",
    "BundleSources",
    "FileEntry",
    "Manifest",
    "ProgressCallback",
    "build_bundle",
    "bundle_file_name",
    "channel_path",
    "extract_bundle",
    "read_manifest",
]

BundleKind = Literal["full", "models", "config"]
BUNDLE_KINDS: tuple[BundleKind, ...] = ("full", "models", "config")
MANIFEST_NAME = "manifest.json"
PAYLOAD_PREFIX = "payload/"
MANIFEST_FORMAT = 1
#: Larger manifests are refused before parsing (a 100k-file manifest is ~15 MB).
MAX_MANIFEST_BYTES = 16 << 20
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_SEGMENT_RE = re.compile(r"^[A-Za-z0-9_@+=,.\-]{1,255}$")
_TARGET_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")
_ALLOWED_TOP: dict[str, tuple[str, ...] | None] = {
    "full": None,  # anything that passes the path rules
    "models": ("models",),
    "config": ("config",),
}
_SKIP_NAMES = frozenset({"__pycache__", ".mypy_cache", ".pytest_cache", ".DS_Store"})

#: ``progress(step, done, total)``: called while building or extracting (bytes).
ProgressCallback = Callable[[str, int, int], None]


@dataclass(frozen=True, slots=True)
class FileEntry:
    """One payload file: its path in the slot, digest, size and whether it is executable."""

    path: str
    sha256: str
    size: int
    executable: bool = False

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"path": self.path, "sha256": self.sha256, "size": self.size}
        if self.executable:
            out["executable"] = True
        return out


@dataclass(frozen=True, slots=True)
class Manifest:
    """What a bundle (or an installed slot) contains, and what it is for."""

    kind: BundleKind
    version: str
    target: str
    created: str
    files: tuple[FileEntry, ...]
    #: Module run with ``python -m`` from the slot (full bundles).
    entry: str | None = None
    #: Versions of each part a slot is composed of, e.g. ``{"full": "1.2", "config": "7"}``.
    components: Mapping[str, str] = field(default_factory=dict)

    @property
    def parsed_version(self) -> Version:
        return Version.parse(self.version)

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": MANIFEST_FORMAT,
            "kind": self.kind,
            "version": self.version,
            "target": self.target,
            "created": self.created,
            "entry": self.entry,
            "components": dict(self.components) or {self.kind: self.version},
            "files": [f.to_json() for f in self.files],
        }

    def to_bytes(self) -> bytes:
        return json.dumps(self.to_json(), indent=1, sort_keys=True).encode() + b"\n"

    def digest(self) -> str:
        """SHA-256 of the canonical manifest bytes (published in the signed target metadata)."""
        return hashlib.sha256(self.to_bytes()).hexdigest()

    @classmethod
    def from_bytes(cls, data: bytes) -> Manifest:
        """Parse and validate a manifest; raise :class:`Rejected` (``malformed``) if invalid."""
        try:
            raw = json.loads(data)
            return cls._from_obj(raw)
        except Rejected:
            raise
        except (ValueError, TypeError, KeyError) as exc:
            raise Rejected(Reason.MALFORMED, f"manifest is invalid: {exc}") from exc

    @classmethod
    def _from_obj(cls, raw: Any) -> Manifest:
        if not isinstance(raw, dict) or raw.get("format") != MANIFEST_FORMAT:
            raise ValueError(f"unsupported manifest format {raw.get('format')!r}")
        kind = raw["kind"]
        if kind not in BUNDLE_KINDS:
            raise ValueError(f"unknown kind {kind!r}")
        version = str(raw["version"])
        Version.parse(version)
        target = str(raw["target"])
        if not _TARGET_RE.match(target):
            raise ValueError(f"bad hardware target {target!r}")
        files = []
        seen: set[str] = set()
        for item in raw["files"]:
            path = check_path(str(item["path"]))
            if path in seen:
                raise ValueError(f"duplicate path {path!r}")
            seen.add(path)
            sha, size = str(item["sha256"]), item["size"]
            if not re.fullmatch(r"[0-9a-f]{64}", sha) or not isinstance(size, int) or size < 0:
                raise ValueError(f"bad digest or size for {path!r}")
            files.append(FileEntry(path, sha, size, bool(item.get("executable", False))))
        _check_no_file_dir_clash(seen)
        entry = raw.get("entry")
        if entry is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.]*", str(entry)):
            raise ValueError(f"bad entry module {entry!r}")
        components = {str(k): str(v) for k, v in dict(raw.get("components") or {}).items()}
        return cls(
            kind=cast(BundleKind, kind),
            version=version,
            target=target,
            created=str(raw.get("created", "")),
            files=tuple(files),
            entry=None if entry is None else str(entry),
            components=components or {kind: version},
        )


def check_path(path: str) -> str:
    """Return ``path`` if it is a safe, normalized relative POSIX path; else raise ``Rejected``."""
    parts = path.split("/")
    if (
        not path
        or path.startswith("/")
        or "\\" in path
        or len(path) > 1024
        or any(p in ("", ".", "..") or not _SEGMENT_RE.match(p) for p in parts)
        or path == MANIFEST_NAME
    ):
        raise Rejected(Reason.UNSAFE_ENTRY, f"unsafe path {path!r}")
    return path


def _check_no_file_dir_clash(paths: set[str]) -> None:
    for path in paths:
        parent = PurePosixPath(path).parent
        while str(parent) != ".":
            if str(parent) in paths:
                raise ValueError(f"{str(parent)!r} is both a file and a directory")
            parent = parent.parent


# --------------------------------------------------------------------------- building


@dataclass(frozen=True, slots=True)
class BundleSources:
    """Where the pieces of a bundle come from on the build machine.

    ``packages`` are directories copied under their own name (``edgeos/``, ``drivers/``);
    ``wheelhouse`` holds wheels for the target architecture and ``requirements_lock`` pins them;
    ``models`` and ``config`` land in ``models/`` and ``config/``.
    """

    packages: Sequence[Path] = ()
    wheelhouse: Path | None = None
    requirements_lock: Path | None = None
    models: Path | None = None
    config: Path | None = None


def bundle_file_name(kind: str, target: str, version: str, *, compress: bool = True) -> str:
    """File name of a bundle: ``edgeos-<kind>-<target>-<version>.tar[.zst]``."""
    return f"edgeos-{kind}-{target}-{version}.tar{'.zst' if compress else ''}"


def build_bundle(
    kind: BundleKind,
    version: str | int,
    target: str,
    sources: BundleSources,
    out_dir: Path,
    *,
    compress: bool = True,
    entry: str | None = None,
    created: datetime | None = None,
    progress: ProgressCallback | None = None,
) -> Path:
    """Build a bundle into ``out_dir`` and return its path.

    The tar is reproducible (sorted members, zero mtimes and owners) so two builds of the same
    tree give the same bytes and the same signed hash. ``progress`` is called while hashing
    and while writing.
    """
    if kind not in BUNDLE_KINDS:
        raise ValueError(f"kind must be one of {BUNDLE_KINDS}, not {kind!r}")
    version_text = str(Version.parse(version))
    if not _TARGET_RE.match(target):
        raise ValueError(f"hardware target {target!r} must match {_TARGET_RE.pattern}")
    tree = _collect(kind, sources)
    if not tree:
        raise ValueError(f"a {kind} bundle needs at least one file; check the sources")
    if kind == "full" and entry is None and "edgeos/__main__.py" in tree:
        entry = "edgeos"

    total = sum(src.stat().st_size for src in tree.values())
    done = 0
    files = []
    for rel, src in sorted(tree.items()):
        digest, size = sha256_file(src)
        mode = src.stat().st_mode
        files.append(FileEntry(rel, digest, size, bool(mode & stat.S_IXUSR)))
        done += size
        if progress:
            progress("hash", done, total)
    manifest = Manifest(
        kind=kind,
        version=version_text,
        target=target,
        created=(created or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%SZ"),
        files=tuple(files),
        entry=entry,
        components={kind: version_text},
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / bundle_file_name(kind, target, version_text, compress=compress)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        with tmp.open("wb") as raw:
            if compress:
                cctx = zstandard.ZstdCompressor(level=10, threads=-1)
                with cctx.stream_writer(raw, closefd=False) as zw:
                    _write_tar(cast(IO[bytes], zw), manifest, tree, progress, total)
            else:
                _write_tar(raw, manifest, tree, progress, total)
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return out


def _collect(kind: BundleKind, sources: BundleSources) -> dict[str, Path]:
    tree: dict[str, Path] = {}

    def add_dir(src: Path, prefix: str) -> None:
        if not src.is_dir():
            raise ValueError(f"{src} is not a directory")
        for dirpath, dirnames, filenames in os.walk(src):
            dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_NAMES)
            for name in filenames:
                if name in _SKIP_NAMES or name.endswith((".pyc", ".pyo")):
                    continue
                full = Path(dirpath) / name
                if full.is_symlink() or not full.is_file():
                    raise ValueError(f"{full}: only regular files go into a bundle")
                rel = f"{prefix}/{full.relative_to(src).as_posix()}"
                tree[check_path(rel)] = full

    if kind == "full":
        for pkg in sources.packages:
            add_dir(pkg, pkg.name)
        if sources.wheelhouse is not None:
            add_dir(sources.wheelhouse, "wheelhouse")
        if sources.requirements_lock is not None:
            tree["requirements.lock"] = sources.requirements_lock
    if kind in ("full", "models") and sources.models is not None:
        add_dir(sources.models, "models")
    if kind in ("full", "config") and sources.config is not None:
        add_dir(sources.config, "config")
    return tree


def _tarinfo(name: str, size: int, mode: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = mode
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _write_tar(
    raw: IO[bytes],
    manifest: Manifest,
    tree: Mapping[str, Path],
    progress: ProgressCallback | None,
    total: int,
) -> None:
    with tarfile.open(fileobj=raw, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        data = manifest.to_bytes()
        tar.addfile(_tarinfo(MANIFEST_NAME, len(data), 0o644), io.BytesIO(data))
        done = 0
        for entry in manifest.files:
            src = tree[entry.path]
            info = _tarinfo(
                PAYLOAD_PREFIX + entry.path, entry.size, 0o755 if entry.executable else 0o644
            )
            with src.open("rb") as f:
                tar.addfile(info, f)
            done += entry.size
            if progress:
                progress("write", done, total)


# --------------------------------------------------------------------------- reading


@contextlib.contextmanager
def _open_tar(path: Path) -> Iterator[tarfile.TarFile]:
    """Open a bundle as a streaming tar, decompressing zstd when the magic says so."""
    try:
        raw = path.open("rb")
    except OSError as exc:
        raise InstallError(Reason.IO_ERROR, f"cannot open bundle {path}: {exc}") from exc
    with raw:
        head = raw.read(4)
        raw.seek(0)
        stream: IO[bytes]
        if head == _ZSTD_MAGIC:
            # The window bound stops a crafted frame from asking for gigabytes of memory.
            dctx = zstandard.ZstdDecompressor(max_window_size=1 << 27)
            stream = cast(IO[bytes], dctx.stream_reader(raw, closefd=False))
        else:
            stream = raw
        try:
            with tarfile.open(fileobj=stream, mode="r|") as tar:
                yield tar
        except (tarfile.TarError, zstandard.ZstdError, EOFError) as exc:
            raise Rejected(
                Reason.MALFORMED, f"bundle is not a valid tar/zstd stream: {exc}"
            ) from exc


def _read_member_manifest(tar: tarfile.TarFile) -> Manifest:
    first = tar.next()
    if first is None or first.name != MANIFEST_NAME or not first.isreg():
        raise Rejected(Reason.MALFORMED, f"first member must be {MANIFEST_NAME}")
    if first.size > MAX_MANIFEST_BYTES:
        raise Rejected(Reason.MALFORMED, f"manifest larger than {MAX_MANIFEST_BYTES} bytes")
    f = tar.extractfile(first)
    assert f is not None
    return Manifest.from_bytes(f.read())


def read_manifest(path: Path) -> Manifest:
    """Read and validate only the manifest of a bundle (the first member)."""
    with _open_tar(path) as tar:
        return _read_member_manifest(tar)


def check_kind_paths(manifest: Manifest) -> None:
    """Refuse a bundle whose files leave the area its kind may touch."""
    allowed = _ALLOWED_TOP[manifest.kind]
    if allowed is None:
        return
    for entry in manifest.files:
        if entry.path.split("/", 1)[0] not in allowed:
            raise Rejected(
                Reason.UNSAFE_ENTRY,
                f"a {manifest.kind} bundle may only contain {'/'.join(allowed)}/, "
                f"not {entry.path!r}",
            )


class _Budget:
    """Counts bytes written by an install; past the quota it raises ``ENOSPC``."""

    def __init__(self, quota: int | None) -> None:
        self.quota = quota
        self.used = 0

    def take(self, n: int) -> None:
        self.used += n
        if self.quota is not None and self.used > self.quota:
            raise QuotaExceededError(self.quota)


def extract_bundle(
    bundle: Path,
    dest: Path,
    *,
    expected_digest: str | None = None,
    quota_bytes: int | None = None,
    progress: ProgressCallback | None = None,
    on_file: Callable[[int], None] | None = None,
    durable: bool = True,
) -> Manifest:
    """Stream a bundle into the fresh directory ``dest`` and verify every file.

    ``dest`` must not exist (it is created). ``expected_digest`` is the manifest digest from
    signed metadata: a bundle whose manifest differs (mix-and-match) is refused before any
    payload is written. ``quota_bytes`` caps what the install may write (the installer's size
    quota); going past it raises :class:`InstallError` with ``no_space`` exactly as a full
    disk does. ``manifest.json`` itself is written last, so a tree with a manifest is complete.
    On any error ``dest`` is left for the caller to delete. ``durable=False`` skips the
    fsyncs (for a throw-away verification pass, e.g. before publishing).
    """
    budget = _Budget(quota_bytes)
    dest.mkdir(mode=0o755)
    try:
        with _open_tar(bundle) as tar:
            manifest = _read_member_manifest(tar)
            if expected_digest is not None and manifest.digest() != expected_digest:
                raise Rejected(
                    Reason.MIX_AND_MATCH,
                    "bundle manifest differs from the one named in the signed metadata",
                )
            check_kind_paths(manifest)
            wanted = {f.path: f for f in manifest.files}
            written: set[str] = set()
            total = manifest.total_size
            done = 0
            # tar.next() rather than iterating: iteration would start again at the manifest.
            while (member := tar.next()) is not None:
                rel = _member_path(member)
                if member.isdir():
                    continue
                entry = wanted.get(rel)
                if entry is None:
                    raise Rejected(Reason.UNSAFE_ENTRY, f"{member.name!r} is not in the manifest")
                if rel in written:
                    raise Rejected(Reason.UNSAFE_ENTRY, f"{member.name!r} appears twice")
                if member.size != entry.size:
                    raise Rejected(
                        Reason.HASH_MISMATCH,
                        f"{rel}: {member.size} bytes in the archive, manifest says {entry.size}",
                    )
                src = tar.extractfile(member)
                assert src is not None
                _write_verified(src, dest, entry, budget, durable=durable)
                written.add(rel)
                done += entry.size
                if progress:
                    progress("install", done, total)
                if on_file:
                    on_file(len(written))
            missing = sorted(set(wanted) - written)
            if missing:
                raise Rejected(
                    Reason.MIX_AND_MATCH,
                    f"{len(missing)} file(s) named in the manifest are missing, e.g. {missing[0]}",
                )
            data = manifest.to_bytes()
            budget.take(len(data))
            _write_file(dest / MANIFEST_NAME, [data], 0o644, durable=durable)
            if durable:
                for dirpath, _dirs, _files in os.walk(dest, topdown=False):
                    fsync_dir(Path(dirpath))
    except OSError as exc:
        raise _map_os_error(exc) from exc
    return manifest


def _map_os_error(exc: OSError) -> InstallError:
    import errno

    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return InstallError(Reason.NO_SPACE, str(exc))
    return InstallError(Reason.IO_ERROR, str(exc))


def _member_path(member: tarfile.TarInfo) -> str:
    if not (member.isreg() or member.isdir()):
        what = (
            "symlink"
            if member.issym()
            else "hard link"
            if member.islnk()
            else "device file"
            if member.isdev()
            else "special file"
        )
        raise Rejected(Reason.UNSAFE_ENTRY, f"{member.name!r} is a {what}; only files allowed")
    name = member.name.rstrip("/") if member.isdir() else member.name
    if member.isdir() and (name + "/") == PAYLOAD_PREFIX:
        return ""
    if not name.startswith(PAYLOAD_PREFIX):
        raise Rejected(Reason.UNSAFE_ENTRY, f"{member.name!r} is outside payload/")
    return check_path(name[len(PAYLOAD_PREFIX) :])


def _write_verified(
    src: IO[bytes], dest: Path, entry: FileEntry, budget: _Budget, *, durable: bool
) -> None:
    target = dest / entry.path
    target.parent.mkdir(parents=True, exist_ok=True)
    h = hashlib.sha256()
    remaining = entry.size

    def chunks() -> Iterator[bytes]:
        nonlocal remaining
        while remaining > 0:
            block = src.read(min(1 << 20, remaining))
            if not block:
                break
            remaining -= len(block)
            h.update(block)
            budget.take(len(block))
            yield block

    _write_file(target, chunks(), 0o755 if entry.executable else 0o644, durable=durable)
    if remaining or h.hexdigest() != entry.sha256:
        raise Rejected(Reason.HASH_MISMATCH, f"{entry.path}: content does not match the manifest")


def _write_file(
    path: Path, blocks: Iterator[bytes] | Sequence[bytes], mode: int, *, durable: bool = True
) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        for block in blocks:
            view = memoryview(block)
            while view:
                view = view[os.write(fd, view) :]
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)


def channel_path(group: str, hardware: str, kind: str) -> str:
    """Target path of a group's release pointer for one hardware target and bundle kind."""
    return f"channels/{group}/{hardware}/{kind}.json"
