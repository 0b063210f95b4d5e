"""Ground truth: a log of every value the simulator served, and a reader for it.

Tests use it to prove that nothing was lost between the machine and the receiver: every
Modbus read response (wall time, unit, table, start address, raw registers) and every value
the OPC UA server handed out (source timestamp, tag, engineering value) is recorded.

File format (``.truth``), a stream of msgpack maps, append-only:

* first a header ``{"format": "edgeos-sim-truth", "version": 1, "nests": …,
  "tags_per_nest": …, "layout": "flat" | "unit-per-nest"}``;
* then columnar chunks, one per flush. Columns are little-endian binary strings so a chunk of
  thousands of records costs one msgpack ``bin`` per column:

  - ``{"k": "modbus", "t": f64[r], "unit": u8[r], "fc": u8[r], "addr": u16[r],
    "count": u16[r], "regs": u16[sum(count)]}`` — ``r`` responses; ``fc`` is 3 (holding)
    or 4 (input);
  - ``{"k": "opcua", "t": f64[m], "i": i32[m], "v": f64[m]}`` — ``m`` values by tag index.

A truncated last chunk (the process was killed) is ignored by the reader.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal, NamedTuple

import msgpack
import numpy as np
import numpy.typing as npt

from edgeos_cloud.fleet.physics.layout import Layout, LayoutMode, build_layout

__all__ = ["GroundTruth", "Series", "TruthLog"]

FORMAT = "edgeos-sim-truth"
VERSION = 1
Source = Literal["modbus", "opcua"]


class Series(NamedTuple):
    """Values one tag was served with, in the order they were served."""

    times: npt.NDArray[np.float64]
    values: npt.NDArray[np.float64]


class TruthLog:
    """Append-only recorder; in memory (``path=None``) or to a file.

    Recording is a few list appends per response; the columnar packing happens in
    :meth:`flush`, which the simulator calls about once a second and at close.
    """

    def __init__(self, layout: Layout, path: str | Path | None = None) -> None:
        self.layout = layout
        self.path = Path(path) if path is not None else None
        self._header: dict[str, Any] = {
            "format": FORMAT,
            "version": VERSION,
            "nests": layout.nests,
            "tags_per_nest": layout.tags_per_nest,
            "layout": layout.mode,
        }
        self._chunks: list[dict[str, Any]] = []
        self._file: IO[bytes] | None = None
        if self.path is not None:
            self._file = self.path.open("wb")
            self._file.write(msgpack.packb(self._header))
        self._mb_t: list[float] = []
        self._mb_unit: list[int] = []
        self._mb_fc: list[int] = []
        self._mb_addr: list[int] = []
        self._mb_regs: list[npt.NDArray[np.uint16]] = []
        self._ua_t: list[float] = []
        self._ua_i: list[int] = []
        self._ua_v: list[float] = []
        self.modbus_responses = 0
        self.opcua_values = 0
        self.closed = False

    def record_modbus(
        self, t: float, unit: int, fc: int, address: int, registers: npt.NDArray[np.uint16]
    ) -> None:
        """One served read response; ``registers`` must be a copy the caller will not change."""
        self._mb_t.append(t)
        self._mb_unit.append(unit)
        self._mb_fc.append(fc)
        self._mb_addr.append(address)
        self._mb_regs.append(registers)
        self.modbus_responses += 1

    def record_opcua(self, t: float, index: int, value: float) -> None:
        """One value handed out by the OPC UA server (read or data-change notification)."""
        self._ua_t.append(t)
        self._ua_i.append(index)
        self._ua_v.append(value)
        self.opcua_values += 1

    def flush(self) -> None:
        """Pack what was recorded since the last flush into chunks (and write them)."""
        chunks = []
        if self._mb_t:
            chunks.append(
                {
                    "k": "modbus",
                    "t": np.asarray(self._mb_t, "<f8").tobytes(),
                    "unit": np.asarray(self._mb_unit, "u1").tobytes(),
                    "fc": np.asarray(self._mb_fc, "u1").tobytes(),
                    "addr": np.asarray(self._mb_addr, "<u2").tobytes(),
                    "count": np.asarray([r.size for r in self._mb_regs], "<u2").tobytes(),
                    "regs": np.concatenate(self._mb_regs).astype("<u2").tobytes(),
                }
            )
            self._mb_t, self._mb_unit, self._mb_fc, self._mb_addr, self._mb_regs = (
                [],
                [],
                [],
                [],
                [],
            )
        if self._ua_t:
            chunks.append(
                {
                    "k": "opcua",
                    "t": np.asarray(self._ua_t, "<f8").tobytes(),
                    "i": np.asarray(self._ua_i, "<i4").tobytes(),
                    "v": np.asarray(self._ua_v, "<f8").tobytes(),
                }
            )
            self._ua_t, self._ua_i, self._ua_v = [], [], []
        if not chunks:
            return
        if self._file is not None:
            for chunk in chunks:
                self._file.write(msgpack.packb(chunk))
            self._file.flush()
        else:
            self._chunks.extend(chunks)

    def close(self) -> None:
        """Flush and close the file; idempotent."""
        if self.closed:
            return
        self.flush()
        self.closed = True
        if self._file is not None:
            self._file.close()
            self._file = None

    def ground_truth(self) -> GroundTruth:
        """What has been recorded so far (flushes first)."""
        self.flush()
        if self.path is not None:
            return GroundTruth.load(self.path)
        return GroundTruth(self.layout, list(self._chunks))


@dataclass
class _Index:
    order: npt.NDArray[np.intp]
    starts: npt.NDArray[np.intp]
    times: npt.NDArray[np.float64]
    values: npt.NDArray[np.float64]


class GroundTruth:
    """Reader over a truth log: per tag, the sequence of ``(time, engineering value)`` served."""

    def __init__(self, layout: Layout, chunks: list[dict[str, Any]]) -> None:
        self.layout = layout
        self._chunks = chunks
        self._index: dict[str, _Index] = {}

    @classmethod
    def load(cls, path: str | Path) -> GroundTruth:
        """Read a ``.truth`` file written by :class:`TruthLog`."""
        with Path(path).open("rb") as fh:
            unpacker = msgpack.Unpacker(fh, raw=False)
            try:
                header = next(unpacker)
            except StopIteration:
                raise ValueError(f"{path}: empty truth file") from None
            if not isinstance(header, dict) or header.get("format") != FORMAT:
                raise ValueError(f"{path}: not an edgeos simulator truth file")
            if header.get("version") != VERSION:
                raise ValueError(f"{path}: unsupported truth version {header.get('version')!r}")
            chunks = []
            try:
                for chunk in unpacker:
                    chunks.append(chunk)
            except (msgpack.exceptions.ExtraData, ValueError):
                # A torn final write: keep the complete chunks before it.
                pass
        mode: LayoutMode = header["layout"]
        layout = build_layout(int(header["nests"]), int(header["tags_per_nest"]), mode)
        return cls(layout, chunks)

    # ---------------------------------------------------------------- raw access

    def modbus_responses(self) -> list[tuple[float, int, int, int, npt.NDArray[np.uint16]]]:
        """Every served Modbus read: ``(time, unit, function code, address, registers)``."""
        out = []
        for chunk in self._chunks:
            if chunk["k"] != "modbus":
                continue
            t = np.frombuffer(chunk["t"], "<f8")
            unit = np.frombuffer(chunk["unit"], "u1")
            fc = np.frombuffer(chunk["fc"], "u1")
            addr = np.frombuffer(chunk["addr"], "<u2")
            count = np.frombuffer(chunk["count"], "<u2").astype(np.intp)
            regs = np.frombuffer(chunk["regs"], "<u2").astype(np.uint16)
            ends = np.cumsum(count)
            for k in range(t.size):
                out.append(
                    (
                        float(t[k]),
                        int(unit[k]),
                        int(fc[k]),
                        int(addr[k]),
                        regs[ends[k] - count[k] : ends[k]],
                    )
                )
        return out

    @property
    def modbus_response_count(self) -> int:
        return sum(len(c["t"]) // 8 for c in self._chunks if c["k"] == "modbus")

    @property
    def opcua_value_count(self) -> int:
        return sum(len(c["t"]) // 8 for c in self._chunks if c["k"] == "opcua")

    # ---------------------------------------------------------------- per tag

    def series(self, tag: str | int, source: Source = "modbus") -> Series:
        """Time-ordered values one tag was served with by one server."""
        index = self.layout.index(tag) if isinstance(tag, str) else int(tag)
        ix = self._build(source)
        lo, hi = int(ix.starts[index]), int(ix.starts[index + 1])
        rows = ix.order[lo:hi]
        return Series(ix.times[rows], ix.values[rows])

    def served(self, source: Source = "modbus") -> npt.NDArray[np.bool_]:
        """Mask over the layout: tags served at least once."""
        ix = self._build(source)
        served: npt.NDArray[np.bool_] = np.diff(ix.starts) > 0
        return served

    def _build(self, source: Source) -> _Index:
        cached = self._index.get(source)
        if cached is not None:
            return cached
        times, tags, values = (
            self._flatten_modbus() if source == "modbus" else self._flatten_opcua()
        )
        # Stable sort keeps each tag's values in the order they were served.
        order = np.argsort(tags, kind="stable")
        starts = np.searchsorted(tags[order], np.arange(self.layout.size + 1)).astype(np.intp)
        ix = _Index(order, starts, times, values)
        self._index[source] = ix
        return ix

    def _flatten_modbus(
        self,
    ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.intp], npt.NDArray[np.float64]]:
        t_parts, i_parts, r_parts = [], [], []
        for chunk in self._chunks:
            if chunk["k"] != "modbus":
                continue
            t = np.frombuffer(chunk["t"], "<f8")
            unit = np.frombuffer(chunk["unit"], "u1").astype(np.intp)
            addr = np.frombuffer(chunk["addr"], "<u2").astype(np.intp)
            count = np.frombuffer(chunk["count"], "<u2").astype(np.intp)
            regs = np.frombuffer(chunk["regs"], "<u2").astype(np.uint16)
            if self.layout.mode == "flat":
                base = addr
            else:
                base = (unit - 1) * self.layout.tags_per_nest + addr
            # Position of each register inside its response: 0, 1, …, count-1.
            within = np.arange(regs.size) - np.repeat(np.cumsum(count) - count, count)
            t_parts.append(np.repeat(t, count))
            i_parts.append(np.repeat(base, count) + within)
            r_parts.append(regs)
        if not t_parts:
            return np.empty(0), np.empty(0, np.intp), np.empty(0)
        idx = np.concatenate(i_parts)
        regs_all = np.concatenate(r_parts)
        return np.concatenate(t_parts), idx, self.layout.decode(regs_all, idx)

    def _flatten_opcua(
        self,
    ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.intp], npt.NDArray[np.float64]]:
        t_parts, i_parts, v_parts = [], [], []
        for chunk in self._chunks:
            if chunk["k"] != "opcua":
                continue
            t_parts.append(np.frombuffer(chunk["t"], "<f8"))
            i_parts.append(np.frombuffer(chunk["i"], "<i4").astype(np.intp))
            v_parts.append(np.frombuffer(chunk["v"], "<f8"))
        if not t_parts:
            return np.empty(0), np.empty(0, np.intp), np.empty(0)
        return np.concatenate(t_parts), np.concatenate(i_parts), np.concatenate(v_parts)
