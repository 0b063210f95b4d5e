"""The HIL wall-clock stepper: a preloaded process sees the steps, the monotonic clock does not,
and stamped times map back to real time (or the overlap is refused)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from edgeos_testing.clockjump import WallClock

PROBE = (
    "import json, time\n"
    "print(json.dumps([time.time(), time.monotonic()]), flush=True)\n"
    "input()\n"
    "print(json.dumps([time.time(), time.monotonic()]), flush=True)\n"
)


def test_a_preloaded_process_sees_its_wall_clock_step_and_nothing_else(tmp_path: Path) -> None:
    wall = WallClock(tmp_path)
    env = {"PATH": "/usr/bin:/bin", **wall.env()}
    proc = subprocess.Popen(
        [sys.executable, "-c", PROBE],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
        text=True,
    )
    assert proc.stdin is not None and proc.stdout is not None
    wall0, mono0 = json.loads(proc.stdout.readline())
    assert abs(wall0 - time.time()) < 5
    wall.step(-2 * 86400)
    proc.stdin.write("\n")
    proc.stdin.flush()
    wall1, mono1 = json.loads(proc.stdout.readline())
    proc.wait(10)
    assert wall1 - wall0 == pytest.approx(-2 * 86400, abs=5)
    assert 0 <= mono1 - mono0 < 5  # the monotonic clock did not move with it
    assert abs(time.time() - wall1 - 2 * 86400) < 5  # and ours is untouched


def test_stamped_times_map_back_to_real_time(tmp_path: Path) -> None:
    wall = WallClock(tmp_path)
    t0 = wall.history[0][0]
    # Three periods, stamped as the DUT would: real + the offset of the moment.
    wall.history += [(t0 + 10, 3600.0), (t0 + 20, -600.0)]
    real = np.array([t0 + 1, t0 + 12, t0 + 25], np.float64)
    stamped = real + np.array([0.0, 3600.0, -600.0])
    back = wall.to_real_us(np.round(stamped * 1e6).astype(np.int64), until=t0 + 30) / 1e6
    assert back == pytest.approx(real, abs=1e-5)


def test_periods_that_overlap_in_device_time_are_refused(tmp_path: Path) -> None:
    wall = WallClock(tmp_path)
    t0 = wall.history[0][0]
    wall.history += [(t0 + 10, -5.0)]  # back 5 s: overlaps the first period's times
    with pytest.raises(ValueError, match="fit two offset periods"):
        wall.to_real_us(np.array([int((t0 + 8) * 1e6)], np.int64), until=t0 + 30)
