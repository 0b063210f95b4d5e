"""A synthetic tyre line for uplink tests and benchmarks (no simulator, no network).

``nests`` × ``tags_per_nest`` tags whose values behave like a real line read over Modbus:
each parameter has a recipe set-point shared by every nest (plus a small per-nest offset),
drifts slowly (first-order towards the set-point with small random steps) and carries
measurement noise of one or two resolution steps. Every tenth tag is a boolean, a few are
counters. Values are int16-scaled: quantized to the tag's resolution, within int16 range.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from edgeos_protocol.quality import Quality
from edgeos_protocol.wire import TagTable, ValueKind

__all__ = ["Scan", "SyntheticLine"]

_UNITS = ("°C", "bar", "mm", "%", "kN", "s", "rpm", "")
_RESOLUTIONS = (0.1, 0.01, 0.1, 0.1, 0.1, 1.0, 1.0, 1.0)


@dataclass(frozen=True, slots=True)
class Scan:
    """One scan of every tag, shaped like the twin's ``ScanRecord``."""

    recv_ts: float
    indices: npt.NDArray[np.int32]
    values: npt.NDArray[np.float64]
    quality: npt.NDArray[np.uint8]
    text: dict[int, str] = field(default_factory=dict)


class SyntheticLine:
    """Generates scans of a line: :meth:`scan` returns ``(values, quality)`` for every tag."""

    def __init__(self, nests: int = 80, tags_per_nest: int = 200, *, seed: int = 7) -> None:
        rng = np.random.default_rng(seed)
        self._rng = rng
        n = nests * tags_per_nest
        leaf = np.tile(np.arange(tags_per_nest), nests)
        cat = leaf % len(_UNITS)
        self.kinds = np.where(leaf % 10 == 9, ValueKind.BOOL, ValueKind.NUMBER).astype(np.uint8)
        self.resolution = np.asarray(_RESOLUTIONS, np.float64)[cat]
        names = [f"nest{i // tags_per_nest + 1:02d}.p{i % tags_per_nest:03d}" for i in range(n)]
        units = [_UNITS[c] for c in cat.tolist()]
        self.table = TagTable(
            np.arange(n, dtype=np.int32), names, self.kinds, self.resolution, units
        )
        # Recipe set-points in steps, shared by all nests, within int16 range.
        recipe_steps = rng.integers(200, 20_000, tags_per_nest)
        nest_offset = rng.integers(-20, 21, n)
        self._setpoint = (recipe_steps[leaf] + nest_offset).astype(np.float64)
        self._state = self._setpoint.copy()
        self._noise = np.where(cat == 1, 2.0, 0.7)  # pressure sensors are noisier
        self._counter = leaf % 50 == 5
        self._bool = self.kinds == ValueKind.BOOL
        self._bool_state = rng.random(n) < 0.5
        self.tag_count = n
        self._indices = np.arange(n, dtype=np.int32)

    def scan(self) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.uint8]]:
        """One scan of every tag: engineering values and quality (a few comm errors)."""
        rng = self._rng
        n = self.tag_count
        # Slow drift towards the set-point (a process under closed-loop control).
        self._state += 0.05 * (self._setpoint - self._state) + rng.normal(0, 0.3, n)
        steps = np.rint(self._state + rng.normal(0, 1, n) * self._noise)
        steps = np.where(self._counter, self._state.round(), steps)
        self._state[self._counter] += 1
        flips = rng.random(n) < 0.01
        self._bool_state ^= flips
        values = np.where(self._bool, self._bool_state.astype(np.float64), steps * self.resolution)
        quality = np.zeros(n, np.uint8)
        bad = rng.random(n) < 0.0005
        quality[bad] = Quality.BAD_COMM
        values[bad] = np.nan
        return values, quality

    def record(self, recv_ts: float) -> Scan:
        """One scan as a record for the batcher (all tags, in twin index order)."""
        values, quality = self.scan()
        return Scan(recv_ts, self._indices, values, quality)
