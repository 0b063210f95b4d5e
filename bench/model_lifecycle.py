"""Model lifecycle: drift detected → challenger running on a gateway, gate and retrain times.

One simulated line (``edgeos_sim.simline.record_drifting_line``) runs the committed models on
the gateway's engine, switches to a new rubber, and ships every sample and event through the
receiver's ingest path into SQLite. Then, timed:

* ``drift_to_challenger_s``: from the drift monitor reporting drift to the retrained model
  loaded as challenger on a real gateway (retrain from the database + gate + register + models
  bundle + TUF publish + campaign + the gateway's TUF check/install + its models hook), split
  into its steps;
* ``gate_s``: the gate on one version (LiteRT: integrity, golden, finite, budget, accuracy);
* ``retrain_s``: per task (quality, anomaly, correction), on one hour of one 80-nest line
  (``--quick``: 20 nests, 20 min) whose guard runs learned recipes half of the time (the
  operator switch alternates every 15 min; a correction needs loads run with more than the plant
  recipe), each with its trainer subprocess time, rows and gate verdict;
* ``drift_check_incremental_s``: a second drift check with nothing new stored (reads only
  from its cursor);
* ``elasticity_rms``: retrained vs shipped champion on the post-drift held-out rows (goal:
  retrained ≤ 0.5 × champion).

Needs TensorFlow in ``.venv-train`` (``make models``) or ``$EDGEOS_TRAIN_PYTHON``. Prints ONE
JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from edgeos.config import GuardConfig
from edgeos.inference.engine import InferenceEngine
from edgeos.inference.selfcheck import MODELS_DIR
from edgeos.ota.slots import SlotManager
from edgeos_cloud.models.lifecycle import Lifecycle, LifecycleConfig
from edgeos_cloud.ota.repository import OtaRepository, serving
from edgeos_sim.simline import (
    FleetRecorder,
    SimClock,
    SimLine,
    record_drifting_line,
    record_run,
)
from edgeos_testing.ota import (
    HARDWARE,
    Device,
    build_stub_release,
)


def _gateway(tmp: Path, repo: OtaRepository) -> Device:
    bundle = build_stub_release(tmp)
    slots = SlotManager(tmp / "device" / "slots", hardware=HARDWARE)
    slots.provision(bundle)
    (tmp / "device" / "root.json").write_bytes(repo.trusted_root())
    return Device(slots, tmp / "device" / "root.json", tmp / "device" / "slots")


def record_guarded_hour(url: str, registry_dir: Path, nests: int, seconds: int) -> None:
    """One line, new rubber, the guard on; learned recipes on/off every quarter of the run."""
    line = SimLine(nests, seed=7)
    line.new_rubber(9.0)
    engine = InferenceEngine.from_manifests(
        [MODELS_DIR / "anomaly.toml", MODELS_DIR / "correction.toml", MODELS_DIR / "quality.toml"],
        line.stations,
        line.tag_configs(),
        guard=GuardConfig(enabled=True, alpha=0.05),
        clock=SimClock(line),
    )
    recorder = FleetRecorder(url, registry_dir, "gw-hour", line.stations)
    try:
        for phase in range(4):
            engine.set_learning(phase % 2 == 0)
            record_run(line, recorder, seconds // 4, engine=engine, apply=True)
    finally:
        recorder.close()


def retrain_all(tmp: Path, nests: int, seconds: int, epochs: int) -> dict[str, Any]:
    """Retrain time of every task on ``seconds`` of one guarded line."""
    url = f"sqlite:///{tmp / 'hour.db'}"
    t = time.perf_counter()
    record_guarded_hour(url, tmp / "hour-registry", nests, seconds)
    out: dict[str, Any] = {"record_s": round(time.perf_counter() - t, 2), "seconds": seconds}
    life = Lifecycle(
        LifecycleConfig.model_validate(
            {
                "home": tmp / "hour-lifecycle",
                "storage_url": url,
                "groups": {"line-h": {"devices": ["gw-hour"]}},
                "trainer": {"epochs": epochs},
            }
        )
    )
    for task in ("quality", "anomaly", "correction"):
        life.seed_champion(MODELS_DIR / f"{task}.toml", "line-h")
        t = time.perf_counter()
        result = life.retrain(task, "line-h", reason="bench one hour")
        acc = next(c for c in result["gate"]["checks"] if c["name"] == "accuracy")["values"]
        metric = acc.get("metric", "rms")
        out[task] = round(time.perf_counter() - t, 2)
        out[f"{task}_detail"] = {
            "trainer_subprocess_s": result["train_seconds"],
            "rows": result["rows"],
            "gate_passed": result["gate"]["passed"],
            "metric": metric,
            "candidate": acc.get(f"candidate_{metric}"),
            "champion": acc.get(f"champion_{metric}"),
            "replay_rows": acc.get("rows"),
        }
    return out


def run(quick: bool) -> dict[str, Any]:
    nests, before, after, epochs = (20, 600, 1800, 80) if quick else (80, 1200, 3600, 150)
    out: dict[str, Any] = {
        "bench": "model_lifecycle",
        "quick": quick,
        "line": {"nests": nests, "seconds_before_drift": before, "seconds_after": after},
    }
    with tempfile.TemporaryDirectory(prefix="edgeos-lifecycle-") as d:
        tmp = Path(d)
        url = f"sqlite:///{tmp / 'receiver.db'}"
        t0 = time.perf_counter()
        run_ = record_drifting_line(
            url, tmp / "registry", "gw-bench", MODELS_DIR, nests=nests, before=before, after=after
        )
        out["record_line_s"] = round(time.perf_counter() - t0, 2)
        repo = OtaRepository.init(tmp / "repo", tmp / "root-keys")
        life = Lifecycle(
            LifecycleConfig.model_validate(
                {
                    "home": tmp / "lifecycle",
                    "storage_url": url,
                    "ota_repo": repo.dir,
                    "groups": {"line-a": {"devices": ["gw-bench"]}},
                    "trainer": {"epochs": epochs},
                }
            )
        )
        champion = life.seed_champion(MODELS_DIR / "quality.toml", "line-a")

        t_detect = time.perf_counter()
        status = life.drift("quality", "line-a")
        steps: dict[str, float] = {"drift_check_s": time.perf_counter() - t_detect}
        if not status["drift"]:
            out["error"] = "no drift detected"
            return out
        t_drift = time.perf_counter()
        result = life.retrain(
            "quality", "line-a", since_us=status["drift_since_us"], reason="bench drift"
        )
        steps["retrain_and_gate_s"] = time.perf_counter() - t_drift
        candidate = life.registry.find(result["version"]["key"])
        t = time.perf_counter()
        published = life.publish(candidate, "line-a")
        steps["publish_s"] = time.perf_counter() - t
        line = SimLine(nests, seed=5)
        engine = InferenceEngine.from_manifests(
            [
                MODELS_DIR / "anomaly.toml",
                MODELS_DIR / "correction.toml",
                MODELS_DIR / "quality.toml",
            ],
            line.stations,
            line.tag_configs(),
            guard=GuardConfig(enabled=False),
            clock=SimClock(line),
        )
        device = _gateway(tmp, repo)
        device.slots.models_hook = engine.on_models_updated
        t = time.perf_counter()
        with serving(repo.dir) as server:
            device.client(server.url, group="line-a").check_and_install(device.slots)
        steps["gateway_install_s"] = time.perf_counter() - t
        challenger = engine.registry.challenger("quality")
        out["drift_to_challenger_s"] = round(time.perf_counter() - t_drift, 2)
        out["drift_to_challenger_steps"] = {k: round(v, 3) for k, v in steps.items()}
        out["challenger_on_gateway"] = challenger.key if challenger else None
        out["bundle"] = published["bundle"]

        gate = result["gate"]
        acc = next(c for c in gate["checks"] if c["name"] == "accuracy")["values"]
        out["gate_s"] = gate["seconds"]
        t = time.perf_counter()
        life.gate(candidate, "line-a", since_us=status["drift_since_us"])
        out["gate_with_replay_load_s"] = round(time.perf_counter() - t, 3)
        out["elasticity_rms"] = {
            "rows": acc["rows"],
            "champion": acc["champion_rms"],
            "retrained": acc["candidate_rms"],
            "ratio": acc["ratio"],
            "goal_ratio": 0.5,
            "goal_met": acc["ratio"] <= 0.5,
            "champion_key": champion.key,
            "retrained_key": candidate.key,
        }
        t = time.perf_counter()
        again = life.drift("quality", "line-a")
        out["drift_check_incremental_s"] = round(time.perf_counter() - t, 3)
        out["drift_check_incremental_samples"] = again["read"]["samples"]
        # Retrain time of every task on one hour of one line's data.
        out["retrain_s"] = retrain_all(tmp, nests, 1200 if quick else 3600, epochs)
        out["drift"] = {
            "threshold_mpa": status["threshold"],
            "drift_since_s_after_change": round(
                (status["drift_since_us"] - run_.drift_us) / 1e6, 1
            ),
            "windows": [(w["rms"], w["rows"]) for w in status["windows"]],
        }
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    print(json.dumps(run(args.quick)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
