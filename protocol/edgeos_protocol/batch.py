"""The decoded batch: a tag table and columnar sample groups (wire format v1).

A :class:`Batch` holds a tag table (twin index, name, kind, resolution, unit of every tag in
the batch — metadata travels in *every* batch so each batch is self-describing) and
:class:`Group` s: samples of one set of tags read together, ``R`` rows (scans, one time each)
× ``C`` columns (tags). ``quality == MISSING`` marks a tag not sampled in a row; a value is
present exactly when its quality is usable (``< Quality.BAD``), otherwise it is NaN.
:mod:`.body` encodes and decodes it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

import numpy as np
import numpy.typing as npt

from edgeos_protocol.columns import delta, dict_code, pack_ints

__all__ = ["MISSING", "Batch", "Group", "Rows", "TagTable", "ValueKind"]

#: Quality code of a tag that was not sampled in a row of a group.
MISSING = 255


class ValueKind(IntEnum):
    """How a tag's values are coded."""

    NUMBER = 0
    BOOL = 1
    STRING = 2


@dataclass(slots=True)
class Group:
    """Samples of one set of tags read together: ``R`` rows (scans) × ``C`` columns (tags).

    ``tags`` are positions in the batch's tag table; ``times_us`` are the rows' scan times
    (µs since the Unix epoch); ``values`` hold engineering values (NaN where the quality is
    not usable, for string tags, and where missing); ``quality`` holds
    :class:`~edgeos.driver.Quality` codes or :data:`MISSING`; ``text`` holds string values by
    ``(row, column)``.
    """

    times_us: npt.NDArray[np.int64]
    tags: npt.NDArray[np.int32]
    values: npt.NDArray[np.float64]
    quality: npt.NDArray[np.uint8]
    text: dict[tuple[int, int], str] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.times_us.shape[0]), int(self.tags.shape[0])


@dataclass(slots=True)
class Rows:
    """A batch flattened to one entry per present sample (what the receiver stores).

    ``tag`` is a position in the batch's tag table (``batch.tag_indices[rows.tag]`` gives twin
    indices, ``batch.tag_names`` names); ``text`` maps a row number to a string value.
    """

    tag: npt.NDArray[np.int32]
    ts_us: npt.NDArray[np.int64]
    value: npt.NDArray[np.float64]
    quality: npt.NDArray[np.uint8]
    text: dict[int, str]

    def __len__(self) -> int:
        return int(self.tag.shape[0])


class TagTable:
    """The tags of a batch, columnar: twin index, name, value kind, resolution, unit.

    Treat it as immutable: its wire encoding is computed once and reused, so a batcher that
    keeps one table for consecutive batches pays for encoding the names only once.
    """

    __slots__ = (
        "_dots",
        "_encoded",
        "_leaves",
        "_pcode",
        "_prefixes",
        "indices",
        "kinds",
        "leaf_codes",
        "names",
        "resolutions",
        "units",
    )

    def __init__(
        self,
        indices: npt.ArrayLike,
        names: list[str],
        kinds: npt.ArrayLike,
        resolutions: npt.ArrayLike,
        units: list[str],
    ) -> None:
        self.indices: npt.NDArray[np.int32] = np.asarray(indices, np.int32)
        self.names = list(names)
        self.kinds: npt.NDArray[np.uint8] = np.asarray(kinds, np.uint8)
        self.resolutions: npt.NDArray[np.float64] = np.asarray(resolutions, np.float64)
        self.units = list(units)
        n = self.indices.shape[0]
        if not (
            len(self.names) == len(self.units) == n
            and self.kinds.shape == (n,)
            and self.resolutions.shape == (n,)
        ):
            raise ValueError("tag table columns differ in length")
        numeric = self.kinds == ValueKind.NUMBER
        if np.any(numeric & ~(np.isfinite(self.resolutions) & (self.resolutions > 0))):
            raise ValueError("numeric tags need a finite resolution > 0")
        self._encoded: dict[str, Any] | None = None
        # Split at the first dot: equipment instance + template tag name, so 80 nests × 200
        # template tags become 80 + 200 strings. A name without a dot is all leaf.
        split = [n.partition(".") if "." in n else ("", "", n) for n in self.names]
        self._prefixes, self._pcode = dict_code([p for p, _, _ in split])
        self._leaves, self.leaf_codes = dict_code([leaf for _, _, leaf in split])
        self._dots = np.asarray([bool(sep) for _, sep, _ in split], np.uint8)

    def __len__(self) -> int:
        return int(self.indices.shape[0])

    def position(self) -> dict[int, int]:
        """Twin index → position in this table."""
        return {int(ix): pos for pos, ix in enumerate(self.indices.tolist())}

    def _doc(self) -> dict[str, Any]:
        if self._encoded is None:
            units, ucode = dict_code(self.units)
            res_table: dict[float, int] = {}
            rcode = np.asarray(
                [res_table.setdefault(r, len(res_table)) for r in self.resolutions.tolist()],
                np.int64,
            )
            self._encoded = {
                "n": len(self),
                "idx": pack_ints(delta(self.indices.astype(np.int64))),
                "pfx": self._prefixes,
                "pi": pack_ints(self._pcode),
                "leaf": self._leaves,
                "li": pack_ints(self.leaf_codes),
                "dot": np.packbits(self._dots).tobytes(),
                "kind": self.kinds.tobytes(),
                "unit": units,
                "ui": pack_ints(ucode),
                "res": list(res_table),
                "ri": pack_ints(rcode),
            }
        return self._encoded


@dataclass(slots=True)
class Batch:
    """The decoded body of a batch: a tag table, sample groups, events and metadata.

    ``events`` are msgpack-able dicts with at least ``"type"`` (``"gate"``, ``"write"``,
    ``"alarm"``, …) and ``"ts_us"``; ``meta`` is free-form batch metadata (counters, scan group
    names, the firmware version).
    """

    tags: TagTable
    groups: list[Group] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def tag_indices(self) -> npt.NDArray[np.int32]:
        return self.tags.indices

    @property
    def tag_names(self) -> list[str]:
        return self.tags.names

    @property
    def tag_kinds(self) -> npt.NDArray[np.uint8]:
        return self.tags.kinds

    @property
    def tag_resolutions(self) -> npt.NDArray[np.float64]:
        return self.tags.resolutions

    @property
    def tag_units(self) -> list[str]:
        return self.tags.units

    @property
    def sample_count(self) -> int:
        """Samples present (not :data:`MISSING`) over all groups."""
        return sum(int(np.count_nonzero(g.quality != MISSING)) for g in self.groups)

    def rows(self) -> Rows:
        """Every present sample as flat columns, group by group, row-major within a group."""
        tags: list[npt.NDArray[np.int32]] = []
        ts: list[npt.NDArray[np.int64]] = []
        vals: list[npt.NDArray[np.float64]] = []
        qual: list[npt.NDArray[np.uint8]] = []
        text: dict[int, str] = {}
        base = 0
        for g in self.groups:
            present = g.quality != MISSING
            r, c = np.nonzero(present)
            tags.append(g.tags[c])
            ts.append(g.times_us[r])
            vals.append(g.values[r, c])
            qual.append(g.quality[r, c])
            if g.text:
                # Row number of (r, c) in this group's flattened present samples.
                order = np.cumsum(present.ravel()) - 1
                width = present.shape[1]
                for (row, col), s in g.text.items():
                    if present[row, col]:
                        text[base + int(order[row * width + col])] = s
            base += int(r.shape[0])
        if not tags:
            return Rows(
                np.empty(0, np.int32),
                np.empty(0, np.int64),
                np.empty(0),
                np.empty(0, np.uint8),
                {},
            )
        return Rows(
            np.concatenate(tags).astype(np.int32, copy=False),
            np.concatenate(ts),
            np.concatenate(vals),
            np.concatenate(qual),
            text,
        )
