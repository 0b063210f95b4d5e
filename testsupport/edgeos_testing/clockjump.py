"""Step the DUT's own wall clock (and nothing else) for the HIL wall-clock-jump scenario.

The runtime runs with libfaketime preloaded (``LD_PRELOAD``), reading its offset from a file on
every ``clock_gettime(CLOCK_REALTIME)`` (``FAKETIME_NO_CACHE=1``); the monotonic clock is left
alone (``FAKETIME_DONT_FAKE_MONOTONIC=1``), as on a gateway whose clock NTP steps. The machine's
clock, the broker, the receiver and the simulator are untouched. :meth:`WallClock.step` writes
a new offset (atomically) and records when, so :meth:`WallClock.to_real_us` can map the times the
DUT stamped back to real time for the oracle.

Known limit of libfaketime 0.9.10 with ``DONT_FAKE_MONOTONIC``: ``clock_nanosleep`` on the
monotonic clock fails with EINVAL, so ``time.sleep`` raises in a preloaded process. The runtime
never calls it (the loop waits in epoll; threads wait on locks and conditions, which work).
"""

from __future__ import annotations

import glob
import os
import time
from pathlib import Path

import numpy as np
import numpy.typing as npt

__all__ = ["WallClock", "faketime_library"]

#: A device time is attributed to an offset period only within this margin (s) of the period:
#: the step's file write and the runtime's next clock read are not one instant.
_MARGIN_S = 2.0


def faketime_library() -> Path | None:
    """The multi-threaded libfaketime, where Debian's ``libfaketime`` package puts it."""
    found = sorted(glob.glob("/usr/lib/*/faketime/libfaketimeMT.so.1"))
    return Path(found[0]) if found else None


class WallClock:
    """The offset of the DUT's wall clock from real time, and the history of its steps."""

    def __init__(self, workdir: Path) -> None:
        lib = faketime_library()
        if lib is None:
            raise FileNotFoundError(
                "libfaketime is not installed (Debian package libfaketime; `make test` installs "
                "it through .ci/ensure-services)"
            )
        self.library = lib
        self.path = workdir / "faketime.rc"
        #: (real time the offset took effect, offset in seconds), from the start of the DUT on
        #: (create this before starting it).
        self._write(0.0)
        self.history: list[tuple[float, float]] = [(time.time(), 0.0)]

    def env(self) -> dict[str, str]:
        """Environment for the DUT process."""
        return {
            "LD_PRELOAD": str(self.library),
            "FAKETIME_TIMESTAMP_FILE": str(self.path),
            "FAKETIME_NO_CACHE": "1",
            "FAKETIME_DONT_FAKE_MONOTONIC": "1",
        }

    @property
    def offset_s(self) -> float:
        return self.history[-1][1]

    def step(self, seconds: float) -> None:
        """Move the DUT's wall clock by ``seconds`` (+ forward) from where it is now."""
        self.set_offset(self.offset_s + seconds)

    def set_offset(self, offset_s: float) -> None:
        """Set the DUT's wall clock to real time + ``offset_s``."""
        self._write(offset_s)
        self.history.append((time.time(), offset_s))

    def _write(self, offset_s: float) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(f"{offset_s:+.0f}\n")
        os.replace(tmp, self.path)

    def to_real_us(
        self, device_us: npt.NDArray[np.int64], *, until: float | None = None
    ) -> npt.NDArray[np.int64]:
        """Real times (µs) of DUT-stamped times: each is attributed to the offset period that
        contains ``device − offset`` (within a margin). Periods must not overlap in device time
        (steps of minutes to days, periods of seconds): a time two periods claim raises.
        Call it once the DUT has stopped: the last period ends at the call (or ``until``)."""
        d = device_us.astype(np.float64) / 1e6
        out = np.full(d.shape, np.nan)
        claims = np.zeros(d.shape, np.int32)
        # The last period ends now: call this after the DUT stopped stamping.
        bounds = [t for t, _ in self.history[1:]] + [time.time() if until is None else until]
        for (start, offset), end in zip(self.history, bounds, strict=True):
            real = d - offset
            inside = (real >= start - _MARGIN_S) & (real < end + _MARGIN_S)
            claims += inside
            out[inside] = real[inside]
        if (claims > 1).any():
            raise ValueError(
                f"{int((claims > 1).sum())} device times fit two offset periods: the scenario's "
                "steps must keep the periods apart in device time"
            )
        # Times no period explains (should not happen) stay as stamped, so the oracle sees them.
        missing = claims == 0
        out[missing] = d[missing]
        return np.round(out * 1e6).astype(np.int64)
