"""Anomaly and correction retrained from fleet data: TensorFlow in the trainer's environment.

Short on purpose (one small line, few epochs): it proves the path — rows from the receiver
database through the gateway's feature code, the trainer subprocess, registration as a
candidate with lineage, and the gate judging each task by its own replay metric against the
champion on the same held-out rows. Skips, printing why, without a training environment.
"""

from __future__ import annotations

from typing import Any

import pytest

from edgeos.inference.selfcheck import MODELS_DIR
from edgeos_cloud.models.lifecycle import Lifecycle


@pytest.mark.timeout(900)  # a safety net on a loaded machine, not a timed assertion
def test_anomaly_and_correction_retrained_from_fleet_data_are_gated_on_their_own_metric(
    make_guarded_lifecycle: Any, train_python: str
) -> None:
    life: Lifecycle = make_guarded_lifecycle(
        trainer={"python": train_python, "epochs": 40, "anomaly_epochs": 2},
        gate={"min_rows": 20},
    )
    group = "line-g"
    anomaly = life.seed_champion(MODELS_DIR / "anomaly.toml", group)
    correction = life.seed_champion(MODELS_DIR / "correction.toml", group)

    a = life.retrain("anomaly", group, reason="test")
    a_version = life.registry.find(a["version"]["key"])
    assert a_version.key == "anomaly@1.1.0" and a_version.parent == anomaly.key
    checks = {c["name"]: c for c in a["gate"]["checks"]}
    assert all(checks[n]["ok"] for n in ("integrity", "golden", "finite", "budget")), checks
    acc = checks["accuracy"]["values"]
    assert acc["metric"] == "rate" and acc["rows"] == a["rows"]["held_out"]
    assert "champion_rate" in acc and a["gate"]["champion"] == anomaly.key
    assert a_version.status == ("qualified" if checks["accuracy"]["ok"] else "refused")

    c = life.retrain("correction", group, reason="test")
    c_version = life.registry.find(c["version"]["key"])
    assert c_version.key == "correction@1.1.0" and c_version.parent == correction.key
    checks = {k["name"]: k for k in c["gate"]["checks"]}
    assert all(checks[n]["ok"] for n in ("integrity", "golden", "finite", "budget")), checks
    acc = checks["accuracy"]["values"]
    assert acc["metric"] == "rms" and acc["loads"] == c["rows"]["held_out"]
    # On the new rubber the champion's baseline head is off; the fleet's is not.
    assert acc["candidate_rms"] < acc["champion_rms"], acc
    assert c_version.status == "qualified"
    run = life.registry.client.get_run(c_version.run_id)
    assert int(run.data.params["loads_learned_recipe"]) >= 20
    assert run.data.params["task"] == "correction"
