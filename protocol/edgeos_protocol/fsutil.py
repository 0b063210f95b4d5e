"""Durable file operations and crash-injection points shared by the OTA parts.

Every state change the installer makes is one of three durable steps: write a file (temp +
fsync + rename + fsync dir), rename a directory (+ fsync the parent), or remove a directory
that nothing references any more. A power cut between two steps leaves either the old or the
new state on disk, never a half-written file.

Crash points: :func:`crash_point` makes the process SIGKILL itself at a named transition when
``EDGEOS_OTA_CRASH_AT`` names it (or names its 1-based index in the order the transitions are
reached). Tests use it to prove the boot check recovers from every transition; in production
the variable is unset and the call costs one dict lookup.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import secrets
import shutil
import signal
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

__all__ = [
    "CRASH_ENV",
    "QuotaExceededError",
    "atomic_write_bytes",
    "atomic_write_json",
    "crash_point",
    "fsync_dir",
    "open_temp",
    "read_json",
    "read_regular",
    "replace_symlink",
    "rmtree_quiet",
    "sha256_file",
    "write_private",
]

CRASH_ENV = "EDGEOS_OTA_CRASH_AT"
_reached: list[str] = []


def crash_point(name: str) -> None:
    """SIGKILL this process here when ``EDGEOS_OTA_CRASH_AT`` asks for it (tests only).

    The variable holds a transition name (``install.staged``) or a 1-based count of transitions
    reached so far in this process, so a test can walk every transition without knowing names.
    """
    want = os.environ.get(CRASH_ENV)
    if not want:
        return
    _reached.append(name)
    if want == name or (want.isdigit() and int(want) == len(_reached)):
        os.kill(os.getpid(), signal.SIGKILL)


def fsync_dir(path: Path) -> None:
    """Make a rename or creation inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


#: Flags of every temporary file: a new inode we created, never a file or link planted there.
_TEMP_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)


def open_temp(path: Path, mode: int) -> tuple[int, Path]:
    """Create a fresh temporary file next to ``path``: ``(fd, temp path)``.

    ``O_CREAT | O_EXCL | O_NOFOLLOW`` under an unpredictable name: a symlink, FIFO or file
    planted at a temporary name (even a name we used before) is never opened, so a write can
    never be redirected through it.
    """
    for _ in range(16):
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(6)}")
        try:
            return os.open(tmp, _TEMP_FLAGS, mode), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name next to {path}")


def read_regular(path: Path, *, max_bytes: int, follow: bool = True) -> bytes:
    """The bytes of a regular file of at most ``max_bytes``; ``OSError`` for anything else.

    Opened with ``O_NONBLOCK`` and checked with ``fstat`` before reading: a FIFO, socket or
    device planted at ``path`` is refused at once instead of blocking the caller in ``open``
    (``follow=False`` refuses symlinks too).
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    if not follow:
        flags |= os.O_NOFOLLOW
    fd = os.open(path, flags)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, f"{path} is not a regular file")
        if st.st_size > max_bytes:
            raise OSError(errno.EFBIG, f"{path} is larger than {max_bytes} bytes")
        os.set_blocking(fd, True)
        chunks: list[bytes] = []
        total = 0
        while chunk := os.read(fd, min(1 << 20, max_bytes + 1 - total)):
            chunks.append(chunk)
            total += len(chunk)
            if total > max_bytes:
                raise OSError(errno.EFBIG, f"{path} is larger than {max_bytes} bytes")
        return b"".join(chunks)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes, *, mode: int = 0o644, durable: bool = True) -> None:
    """Replace ``path`` with ``data``: temp file, fsync, rename, fsync of the directory.

    ``durable=False`` keeps the rename (readers never see half a file) but skips both fsyncs,
    for frequently rewritten files whose loss on power failure is harmless. The temporary file
    is created with :func:`open_temp` (never through a planted link).
    """
    fd, tmp = open_temp(path, mode)
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        if durable:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    os.close(fd)
    os.replace(tmp, path)
    if durable:
        fsync_dir(path.parent)


def atomic_write_json(path: Path, obj: Any, *, mode: int = 0o644, durable: bool = True) -> None:
    """Write ``obj`` as indented, key-sorted JSON through :func:`atomic_write_bytes`."""
    data = json.dumps(obj, indent=2, sort_keys=True).encode() + b"\n"
    atomic_write_bytes(path, data, mode=mode, durable=durable)


def read_json(path: Path) -> Any:
    """Parse a JSON file (raises ``OSError`` or ``ValueError``)."""
    with path.open("rb") as f:
        return json.load(f)


def replace_symlink(link: Path, target: str) -> None:
    """Point ``link`` at ``target`` atomically (new link under a temp name, then rename)."""
    tmp = link.with_name(f".{link.name}.tmp-{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    os.symlink(target, tmp)
    os.replace(tmp, link)
    fsync_dir(link.parent)


def rmtree_quiet(path: Path) -> None:
    """Remove a directory tree that nothing references; missing is fine."""
    if path.is_symlink():
        path.unlink()
        return
    shutil.rmtree(path, ignore_errors=True)


def sha256_file(path: Path, *, chunk: int = 1 << 20) -> tuple[str, int]:
    """SHA-256 hex digest and size of a regular file (symlinks are not followed)."""
    h = hashlib.sha256()
    size = 0
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd, "rb") as f:
        for block in _blocks(f, chunk):
            h.update(block)
            size += len(block)
    return h.hexdigest(), size


def _blocks(f: BinaryIO, chunk: int) -> Iterator[bytes]:
    while block := f.read(chunk):
        yield block


class QuotaExceededError(OSError):
    """A write went past the installer's byte quota; carries ``errno.ENOSPC``."""

    def __init__(self, quota: int) -> None:
        super().__init__(errno.ENOSPC, f"install quota of {quota} bytes exhausted")


def write_private(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write ``data`` atomically (temp file, fsync, rename) with ``mode`` from the start.

    The temporary file is new (:func:`open_temp`: ``O_EXCL | O_NOFOLLOW``), so a symlink
    planted at a temporary name cannot redirect the secret; the rename replaces a link at
    ``path`` itself instead of writing through it.
    """
    fd, tmp = open_temp(path, mode)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fchmod(fd, mode)  # the umask may have narrowed O_CREAT's mode; make it exact
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
