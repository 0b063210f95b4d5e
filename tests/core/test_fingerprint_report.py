"""The gateway tells the cloud its fleet fingerprint once per start (docs/fleet.md)."""

from __future__ import annotations

from pathlib import Path

from edgeos.app import Runtime
from edgeos_protocol.fleet import FINGERPRINT_EVENT, parse_fingerprint_report
from edgeos_protocol.manifest import load_manifest
from edgeos_sim.line import write_line_config

MODELS = Path(__file__).resolve().parents[2] / "models"
TASKS = ("anomaly", "quality", "correction")


def test_runtime_reports_its_fingerprint_with_the_champion_versions_once(
    tmp_path: Path,
) -> None:
    config = write_line_config(
        tmp_path / "edgeos.toml",
        modbus_port=1,  # never connected: the runtime is only constructed
        opcua_url=None,
        state_dir=tmp_path / "state",
        nests=2,
        tags_per_nest=20,
        overrides={
            "uplink": {"enabled": False},
            "inference": {
                "enabled": True,
                "models": [
                    {"name": t, "manifest": str(MODELS / f"{t}.toml"), "role": "champion"}
                    for t in TASKS
                ],
                "guard": {"enabled": True, "alpha": 0.005},
            },
        },
    )
    runtime = Runtime(config)
    reports = [e for e in runtime._drain_events() if e["type"] == FINGERPRINT_EVENT]
    assert len(reports) == 1
    fp = parse_fingerprint_report(reports[0])  # its key matches its fields
    assert fp.hardware == runtime.config.device.hardware
    assert set(fp.templates) == set(runtime.config.templates)
    assert set(fp.tasks) == set(TASKS)
    assert reports[0]["versions"] == {t: load_manifest(MODELS / f"{t}.toml").key for t in TASKS}
    again = [e for e in runtime._drain_events() if e["type"] == FINGERPRINT_EVENT]
    assert again == []
