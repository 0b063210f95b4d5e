"""Runs the HIL suite (hil_tests/, short mode, default loopback rig) in a subprocess and checks
its report: every scenario passed with zero loss and zero duplicates of accepted samples."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(900)
def test_hil_short_suite(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "hil_tests",
            "-q",
            "-p",
            "no:cacheprovider",
            "--report-dir",
            str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=870,
        check=False,
    )
    print(proc.stdout[-6000:])
    report = json.loads((tmp_path / "latest.json").read_text())
    print((tmp_path / "latest.md").read_text())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    scenarios = report["scenarios"]
    # 9 fault scenarios (machine link, broker link, broker kill, receiver kill, kill -9,
    # SIGSTOP, disk fills, restart on a full disk, wall-clock jumps) and the one-minute soak.
    assert len(scenarios) >= 10, sorted(scenarios)
    assert any(name.startswith("soak") for name in scenarios)
    assert report["soak"]["summary"]["rss_growth_mb"] is not None
    for name, doc in scenarios.items():
        f = doc["figures"]
        assert doc["passed"], name
        assert f["lost_batches"] == 0 and f["window_lost"] == 0, name
        assert f["duplicates"] == 0, name
        assert f["order_violations"] == 0, (name, f.get("examples"))
