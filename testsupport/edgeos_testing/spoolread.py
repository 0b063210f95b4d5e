"""Read a device's spool directory without changing it: which batches were *accepted*.

A batch is accepted once it is in the spool, so after a kill -9 the spool on disk says exactly
which sequence numbers of the dead epoch existed (records still on disk, plus the ack
watermark for those already acknowledged and deleted). The record format is
``edgeos.uplink.spool``'s; this reader is independent of it on purpose (an oracle that used the
runtime's own reader would share its bugs).
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["SpoolInspection", "inspect_spool", "merge_inspections"]

_REC = struct.Struct(">4sIIQQ")
_CRC_PART = struct.Struct(">IQQ")
_RECORD_MAGIC = b"ESR1"
_FILE_MAGIC = b"EOSSPL01"


@dataclass(slots=True)
class SpoolInspection:
    """What a spool directory holds: per epoch, the records on disk and the ack watermark."""

    records: dict[int, list[int]] = field(default_factory=dict)
    watermarks: dict[int, int] = field(default_factory=dict)
    torn_bytes: int = 0

    def accepted(self) -> dict[int, set[int]]:
        """Per epoch, every sequence number known to have been in the spool."""
        out: dict[int, set[int]] = {}
        for epoch in set(self.records) | set(self.watermarks):
            seqs = set(self.records.get(epoch, ()))
            seqs.update(range(1, self.watermarks.get(epoch, 0) + 1))
            out[epoch] = seqs
        return out

    def pending(self) -> dict[int, set[int]]:
        """Per epoch, records on disk above the ack watermark (not yet acknowledged)."""
        return {
            e: {s for s in seqs if s > self.watermarks.get(e, 0)}
            for e, seqs in self.records.items()
            if any(s > self.watermarks.get(e, 0) for s in seqs)
        }


def inspect_spool(directory: Path) -> SpoolInspection:
    """Read a spool directory without changing it (the format is in ``edgeos.uplink.spool``).

    Only records with a valid CRC count; a torn tail (an append interrupted by the kill, which
    never returned to the batcher) is ignored, as the spool's own recovery does.
    """
    out = SpoolInspection()
    try:
        marks = json.loads((directory / "acked.json").read_text())
        out.watermarks = {int(k): int(v) for k, v in marks.items()}
    except (OSError, ValueError, AttributeError):
        pass
    for path in sorted(directory.glob("seg-*.spool")):
        data = path.read_bytes()
        if not data.startswith(_FILE_MAGIC):
            continue
        pos = len(_FILE_MAGIC)
        while pos + _REC.size <= len(data):
            magic, length, crc, epoch, seq = _REC.unpack_from(data, pos)
            start = pos + _REC.size
            if magic != _RECORD_MAGIC or start + length > len(data):
                break
            payload = memoryview(data)[start : start + length]
            if zlib.crc32(payload, zlib.crc32(_CRC_PART.pack(length, epoch, seq))) != crc:
                break
            out.records.setdefault(epoch, []).append(seq)
            pos = start + length
        out.torn_bytes += len(data) - pos
    return out


def merge_inspections(inspections: Iterable[SpoolInspection]) -> dict[int, set[int]]:
    """Union of the accepted sequence numbers of several inspections (one per runtime exit)."""
    out: dict[int, set[int]] = {}
    for inspection in inspections:
        for epoch, seqs in inspection.accepted().items():
            out.setdefault(epoch, set()).update(seqs)
    return out
