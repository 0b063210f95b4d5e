"""Build a project's wheel the way a release does, for tests that check what a wheel carries."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

__all__ = ["build_wheel"]


def build_wheel(project: Path, out: Path, pattern: str = "*.whl") -> Path:
    """``pip wheel --no-deps`` of ``project`` into ``out``; the one wheel matching ``pattern``.

    Build from a scratch copy of the sources: building in place leaves ``build/`` behind.
    """
    subprocess.run(
        [
            *(sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps"),
            *("--no-build-isolation", "--wheel-dir", str(out), str(project)),
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    (wheel,) = out.glob(pattern)
    return wheel
