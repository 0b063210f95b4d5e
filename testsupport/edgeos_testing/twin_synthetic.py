"""Synthetic tags and reads shaped like the tyre line (tests and benchmarks, no network).

``line_tags(nests, per_nest)`` builds ``nestNN.pXXX`` Modbus tags (float32 with a resolution,
every tenth tag a uint16 counter, one writable setpoint per nest); :class:`SyntheticLine`
produces :class:`~edgeos.driver.ReadResult` blocks of one nest each, like one connection's
scan, with slowly drifting values.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from edgeos.config import TagConfig
from edgeos.driver import Quality, ReadResult

__all__ = ["SyntheticLine", "line_tags"]


def line_tags(
    nests: int,
    per_nest: int,
    *,
    scan_group: str = "default",
    prefix: str = "nest",
    first_index: int = 1,
) -> list[TagConfig]:
    """``nests * per_nest`` tags named ``{prefix}{n:02d}.p{k:03d}``; ``p000`` is a writable
    setpoint (limits 0..250, max_rate 50/s), every tenth other tag a uint16 counter."""
    tags = []
    for n in range(first_index, first_index + nests):
        conn = f"{prefix}{n:02d}"
        for k in range(per_nest):
            name = f"{conn}.p{k:03d}"
            address = {"address": 2 * k, "unit": 1}
            if k == 0:
                tags.append(
                    TagConfig.model_validate(
                        {
                            "name": name,
                            "connection": conn,
                            "scan_group": scan_group,
                            "unit": "degC",
                            "resolution": 0.1,
                            "writable": True,
                            "limits": {"min": 0, "max": 250},
                            "max_rate": 50,
                            "modbus": {**address, "type": "float32"},
                        }
                    )
                )
            elif k % 10 == 0:
                tags.append(
                    TagConfig.model_validate(
                        {
                            "name": name,
                            "connection": conn,
                            "scan_group": scan_group,
                            "modbus": {**address, "type": "uint16"},
                        }
                    )
                )
            else:
                tags.append(
                    TagConfig.model_validate(
                        {
                            "name": name,
                            "connection": conn,
                            "scan_group": scan_group,
                            "unit": "bar",
                            "resolution": 0.01,
                            "deadband": 0.05,
                            "modbus": {**address, "type": "float32"},
                        }
                    )
                )
    return tags


class SyntheticLine:
    """Reads for ``blocks`` consecutive ranges of twin columns (one block per connection)."""

    def __init__(self, block_starts: Sequence[int], block_size: int, seed: int = 1) -> None:
        self._rng = np.random.default_rng(seed)
        self._blocks = [
            np.arange(start, start + block_size, dtype=np.int32) for start in block_starts
        ]
        self._base = [self._rng.uniform(10.0, 200.0, size=block_size) for _ in self._blocks]
        self._quality = np.full(block_size, Quality.GOOD, dtype=np.uint8)
        self._step = 0

    @property
    def blocks(self) -> int:
        return len(self._blocks)

    def read(self, block: int, ts: float) -> ReadResult:
        """One block's read at wall time ``ts``: values drift by a few resolution steps."""
        self._step += 1
        base = self._base[block]
        noise = self._rng.normal(0.0, 0.05, size=base.shape[0])
        values: npt.NDArray[np.float64] = base + noise + 0.01 * (self._step % 100)
        return ReadResult(
            self._blocks[block],
            values,
            self._quality.copy(),
            np.full(base.shape[0], ts, dtype=np.float64),
        )
