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
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from edgeos.config import AnyTag
from edgeos.errors import StorageError

__all__ = ["MAGIC", "atomic_write", "decode", "encode", "tag_set_digest"]

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
