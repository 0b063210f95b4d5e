"""``edgeos demo`` as a newcomer and CI run it: a real subprocess, real servers on loopback."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from edgeos_cloud.receiver.metrics import ReceiverMetrics
from edgeos_sim.demo.dashboard import receiver_status, render_dashboard
from edgeos_sim.demo.state import MARKER, DemoError, prepare_state_dir

DEMO = [sys.executable, "-m", "edgeos.cli", "demo"]


def _summary(stdout: str) -> dict[str, Any]:
    doc = json.loads(stdout)
    assert isinstance(doc, dict)
    return doc


def _assert_end_to_end(summary: dict[str, Any]) -> None:
    assert summary["ok"] is True, summary["problems"]
    assert summary["problems"] == []
    runtime, receiver = summary["runtime"], summary["receiver"]
    assert receiver["samples_stored"] > 0
    # Everything the runtime sealed was stored, except what is still in its spool.
    assert receiver["samples_stored"] == runtime["samples_delivered"]
    assert runtime["samples_delivered"] == (
        runtime["samples_sealed"] - runtime["left_in_spool"]["samples"]
    )
    assert receiver["database"]["samples"] == receiver["samples_stored"]
    # Nothing refused, and in particular no batch sent twice by a healthy gateway.
    assert receiver["rejects"].get("replayed", 0) == 0
    assert receiver["rejects"] == {}
    assert set(summary["verdicts"]) >= {"continue", "correct", "scrap"}
    assert "learning" in summary["guard"]
    assert runtime["bytes_per_sample"] > 0


def test_demo_runs_end_to_end_and_prints_a_summary(tmp_path: Path) -> None:
    state = tmp_path / "state"
    proc = subprocess.run(
        [*DEMO, "--duration", "25", "--json", "--state-dir", str(state)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr
    summary = _summary(proc.stdout)
    print(json.dumps(summary, indent=1))
    _assert_end_to_end(summary)
    assert summary["stopped_by"] == "duration"
    assert set(summary["connections"].values()) == {"up"}
    assert summary["inference"]["step_errors"] == 0
    # The device key exists on both sides, readable by the owner only.
    gw_key = state / "gateway" / "credentials" / "device.key"
    rx_record = state / "receiver" / "registry" / "devices" / f"{summary['device']}.json"
    for path in (gw_key, rx_record):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


def test_sigint_stops_everything_cleanly(tmp_path: Path) -> None:
    state = tmp_path / "state"
    proc = subprocess.Popen(
        [*DEMO, "--json", "--state-dir", str(state)],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        log = state / "demo.log"
        # Wait for the runtime to be up (its "ready:" line), then interrupt like Ctrl-C does.
        while proc.poll() is None and not (
            log.exists() and "edgeos.runtime: ready:" in log.read_text(errors="replace")
        ):
            time.sleep(0.1)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, stderr + stdout
    assert "Traceback" not in stderr
    assert "KeyboardInterrupt" not in stderr
    summary = _summary(stdout)
    assert summary["stopped_by"] == "signal"
    _assert_end_to_end(summary)


def test_state_dir_not_made_by_the_demo_is_never_emptied(tmp_path: Path) -> None:
    precious = tmp_path / "home"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    with pytest.raises(DemoError, match="not made by `edgeos demo`") as err:
        prepare_state_dir(precious, keep=False)
    assert err.value.exit_code == 2
    assert (precious / "thesis.tex").read_text() == "years of work"

    demo = tmp_path / "demo-state"
    prepare_state_dir(demo, keep=False)
    (demo / "receiver" / "old.db").write_text("x")
    prepare_state_dir(demo, keep=True)
    assert (demo / "receiver" / "old.db").exists()
    prepare_state_dir(demo, keep=False)
    assert not (demo / "receiver" / "old.db").exists()
    assert (demo / MARKER).exists()


def test_receiver_panel_reads_the_real_metric_names() -> None:
    metrics = ReceiverMetrics()
    metrics.batches.inc(3)
    metrics.samples.inc(1200)
    metrics.rejects.labels("forged").inc()
    metrics.last_seen.labels("gw1").set(1000.0)
    metrics.ingest_lag.observe(0.02)
    metrics.connected.set(1)
    doc = receiver_status(metrics.registry, now=1004.0)
    assert doc["batches"] == 3 and doc["samples"] == 1200
    assert doc["rejects"] == {"forged": 1}
    assert doc["last_stored_age_s"] == {"gw1": 4.0}
    assert doc["connected"] is True

    from rich.console import Console

    for width in (100, 180):
        console = Console(width=width, record=True, file=open(os.devnull, "w"))  # noqa: SIM115
        console.print(
            render_dashboard(
                ["edgeos demo"],
                {"device": "gw1", "state": "running", "gates": {"verdicts": {"scrap": 2}}},
                doc,
                {"samples": 400.0, "batches": 0.5},
                width=width,
                hints=["edgeos status --config x"],
            )
        )
        text = console.export_text()
        console.file.close()
        assert "forged 1" in text and "1,200 samples" in text and "scrap 2" in text
