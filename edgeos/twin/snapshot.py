"""Twin snapshot file format and crash-safe file replacement.

Layout::

    b"EDGTWIN\x01"            magic + format version (8 bytes)
    u32 little-endian         length of the JSON header
    JSON header               {"format", "created", "tags", "tag_set", "text", "desired",
                               "arrays": [[name, dtype, count], ...]}
    arrays                    raw little-endian columns, in header order
    sha256 (32 bytes)         over everything before it

``tag_set`` is a digest of the tag names and data types in twin order; a snapshot is only
restored into a twin with the same tag set. History rings are not saved (they are rebuilt
within one history window and would multiply flash writes).

:class:`Snapshots` is the twin's snapshot component: it saves the columns and the desired state
(periodically and at shutdown) and restores them at start.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import math
import os
import struct
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from edgeos.clock import Clock
from edgeos.config import AnyTag
from edgeos.errors import StorageError
from edgeos.twin.columns import SAVED, Columns
from edgeos.twin.desired import DesiredState

__all__ = ["MAGIC", "Snapshots", "atomic_write", "decode", "encode", "tag_set_digest"]

log = logging.getLogger(__name__)

MAGIC = b"EDGTWIN\x01"
FORMAT = 1
_DIGEST = 32


def tag_set_digest(tags: Sequence[AnyTag]) -> str:
    h = hashlib.sha256()
    for tag in tags:
        h.update(f"{tag.name}\x00{tag.data_type}\n".encode())
    return h.hexdigest()


def encode(header: dict[str, Any], arrays: dict[str, npt.NDArray[Any]]) -> bytes:
    """Serialise a JSON-able header and named 1-D arrays (stored little-endian)."""
    layout = []
    chunks = []
    for name, array in arrays.items():
        little = array.astype(array.dtype.newbyteorder("<"), copy=False)
        layout.append([name, little.dtype.str, int(little.shape[0])])
        chunks.append(little.tobytes())
    head = json.dumps({"format": FORMAT, **header, "arrays": layout}).encode()
    payload = b"".join([MAGIC, struct.pack("<I", len(head)), head, *chunks])
    return payload + hashlib.sha256(payload).digest()


def decode(data: bytes, source: str = "snapshot") -> tuple[dict[str, Any], dict[str, Any]]:
    """Check magic and digest, split header and arrays; raise :class:`StorageError` saying what
    is wrong."""
    m = len(MAGIC)
    if len(data) < m + 4 + _DIGEST:
        raise StorageError(f"{source}: truncated ({len(data)} bytes)")
    if data[: m - 1] != MAGIC[:-1]:
        raise StorageError(f"{source}: not a twin snapshot (bad magic)")
    if data[m - 1] != MAGIC[-1]:
        raise StorageError(f"{source}: unsupported snapshot version {data[m - 1]}")
    payload, digest = data[:-_DIGEST], data[-_DIGEST:]
    if hashlib.sha256(payload).digest() != digest:
        raise StorageError(f"{source}: checksum mismatch (corrupt or partially written)")
    try:
        (head_len,) = struct.unpack_from("<I", payload, m)
        header = json.loads(payload[m + 4 : m + 4 + head_len])
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            raise ValueError("unsupported header")
        arrays: dict[str, Any] = {}
        offset = m + 4 + head_len
        for name, dtype_str, count in header["arrays"]:
            dtype = np.dtype(dtype_str)
            size = dtype.itemsize * int(count)
            if offset + size > len(payload):
                raise ValueError(f"array {name!r} runs past the end")
            arrays[name] = np.frombuffer(payload, dtype=dtype, count=int(count), offset=offset)
            offset += size
    except (ValueError, TypeError, KeyError, struct.error) as exc:
        raise StorageError(f"{source}: cannot be decoded: {exc}") from exc
    return header, arrays


def atomic_write(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so a crash leaves either the old or the new file.

    Temp file in the same directory, fsync, rename over the target, fsync the directory.
    """
    directory = path.parent
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class Snapshots:
    """Saves the twin's columns and desired state to one file, and restores them at start."""

    def __init__(
        self,
        columns: Columns,
        desired: DesiredState,
        *,
        clock: Clock,
        interval_s: float,
    ) -> None:
        self._cols = columns
        self._desired = desired
        self._clock = clock
        self._interval = interval_s
        self._tag_set = tag_set_digest(columns.tags)
        self._lock = threading.Lock()
        self.saved = 0
        self.errors = 0
        self._failing = False

    def save(self, path: str | Path) -> None:
        """Write the current state atomically (blocking: temp file, fsync, rename, fsync dir)."""
        self._write_locked(Path(path), self._encode())

    async def run(self, path: str | Path) -> None:
        """Save every interval (the file I/O in a thread) and once more when cancelled at
        shutdown. Failures are counted and logged on change, never fatal."""
        path = Path(path)
        clock = self._clock
        interval = self._interval
        start = clock.monotonic()
        k = 1
        try:
            while True:
                await clock.sleep_until(start + k * interval)
                k = max(k + 1, math.floor((clock.monotonic() - start) / interval) + 1)
                data = self._encode()
                try:
                    await asyncio.to_thread(self._write_locked, path, data)
                except OSError as exc:
                    self._failed(path, exc)
                else:
                    self._ok(path)
        finally:
            # Shutdown: the freshest state is what the next start restores. Synchronous on
            # purpose, the loop is winding down; the lock waits for a write still in flight.
            try:
                self.save(path)
            except OSError as exc:
                self._failed(path, exc)

    def _write_locked(self, path: Path, data: bytes) -> None:
        with self._lock:
            atomic_write(path, data)
            self.saved += 1

    def _failed(self, path: Path, exc: OSError) -> None:
        self.errors += 1
        if not self._failing:
            log.warning("twin snapshot to %s failing: %s", path, exc)
        self._failing = True

    def _ok(self, path: Path) -> None:
        if self._failing:
            log.info("twin snapshot to %s recovered", path)
        self._failing = False

    def _encode(self) -> bytes:
        header = {
            "created": self._clock.time(),
            "tag_set": self._tag_set,
            "tags": self._cols.names,
            "text": self._cols.saved_text(),
            "desired": self._desired.saved(),
        }
        return encode(header, self._cols.saved())

    def restore(self, path: str | Path) -> bool:
        """Load a snapshot at start; return False when there is none.

        Values come back with quality ``STALE`` until the first fresh read. A corrupt snapshot,
        or one of a different tag set, is moved aside (``<name>.rejected-<time>``) and
        :class:`~edgeos.errors.StorageError` is raised; the runtime logs it and starts without.
        """
        path = Path(path)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise StorageError(f"{path}: cannot read snapshot: {exc.strerror}") from exc
        try:
            header, arrays = decode(data, str(path))
            columns, text, desired = self._check(header, arrays, path)
        except StorageError as exc:
            moved = self._quarantine(path)
            raise StorageError(f"{exc}; moved aside to {moved.name}, starting without it") from exc
        self._cols.load(columns, text)
        self._desired.load(desired)
        return True

    def _check(
        self, body: dict[str, Any], columns: dict[str, Any], path: Path
    ) -> tuple[dict[str, npt.NDArray[Any]], dict[int, str], list[dict[str, Any]]]:
        n = len(self._cols)
        try:
            names = list(body["tags"])
            if body["tag_set"] != self._tag_set:
                raise StorageError(
                    f"{path}: snapshot is of a different tag set ({len(names)} tags vs "
                    f"{n} configured: {self._difference(names)})"
                )
            arrays = {name: np.asarray(columns[name], dtype=dtype) for name, dtype in SAVED}
            if any(a.shape[0] != n for a in arrays.values()):
                raise StorageError(f"{path}: snapshot arrays do not have {n} entries")
            text = {int(k): str(v) for k, v in body["text"].items()}
            desired = [dict(d) for d in body["desired"]]
            problem = self._desired.check_saved(desired)
            if problem is not None:
                raise StorageError(f"{path}: {problem}")
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise StorageError(f"{path}: snapshot body is malformed ({exc!r})") from exc
        return arrays, text, desired

    def _difference(self, names: list[str]) -> str:
        ours = set(self._cols.names)
        theirs = set(names)
        added = sorted(ours - theirs)
        removed = sorted(theirs - ours)
        detail = []
        if added:
            detail.append(f"{len(added)} tag(s) not in it (e.g. {added[0]})")
        if removed:
            detail.append(f"{len(removed)} tag(s) no longer configured (e.g. {removed[0]})")
        if not detail:
            detail.append("same names, but a different order or data types")
        return "; ".join(detail)

    def _quarantine(self, path: Path) -> Path:
        stamp = int(self._clock.time())
        for n in range(1000):
            suffix = f".rejected-{stamp}" + (f"-{n}" if n else "")
            dest = path.with_name(path.name + suffix)
            if not dest.exists():
                break
        try:
            path.rename(dest)
        except OSError as exc:
            log.warning("cannot move rejected snapshot %s aside: %s", path, exc)
            return path
        return dest
