"""Champion/challenger on the simulated line: shadow runs, promotion, demotion, updates."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from edgeos.config import GuardConfig, PromotionConfig
from edgeos.inference.engine import InferenceEngine
from edgeos.inference.selfcheck import MODELS_DIR
from edgeos_sim.simline import SimClock, SimLine, drive

OLD = MODELS_DIR / "archive" / "quality-1.0.0.toml"
NEW = MODELS_DIR / "quality.toml"
BASE = [MODELS_DIR / "anomaly.toml", MODELS_DIR / "correction.toml"]
RULE = PromotionConfig(min_samples=60, min_improvement=0.05)


def _engine(line: SimLine, champion: Path, challenger: Path | None) -> InferenceEngine:
    return InferenceEngine.from_manifests(
        [*BASE, champion],
        line.stations,
        line.tag_configs(),
        challengers=[challenger] if challenger else [],
        guard=GuardConfig(enabled=True),
        promotion=RULE,
        clock=SimClock(line),
    )


def test_better_challenger_is_promoted_and_champion_demoted() -> None:
    line = SimLine(40, seed=2)
    engine = _engine(line, OLD, NEW)
    log = drive(engine, line, 400, keep_events=True)
    types = [e["type"] for e in log.events]
    promoted = [e for e in log.events if e["type"] == "model_promoted"]
    assert len(promoted) == 1, types
    p = promoted[0]
    assert (p["task"], p["model"], p["version"], p["previous"]) == (
        "quality",
        "quality",
        "1.1.0",
        "quality@1.0.0",
    )
    assert p["challenger_error"] <= p["champion_error"] * (1 - RULE.min_improvement)
    demoted = [e for e in log.events if e["type"] == "model_demoted"]
    assert demoted[0]["version"] == "1.0.0" and demoted[0]["role"] == "challenger"
    metrics = [e for e in log.events if e["type"] == "model_metrics" and e["task"] == "quality"]
    assert {m["role"] for m in metrics} == {"champion", "challenger"}
    assert all(m["samples"] >= RULE.min_samples and m["latency"]["count"] > 0 for m in metrics)
    challenger_metrics = next(m for m in metrics if m["role"] == "challenger")
    assert 0.0 <= challenger_metrics["agreement"] <= 1.0
    print(
        f"promotion: errors {p['champion_error']:.3f} -> {p['challenger_error']:.3f} MPa "
        f"after {p['samples']} tyres"
    )
    # The gate now judges with the promoted model, and verdicts name it.
    assert engine.registry.champion("quality").version == "1.1.0"  # type: ignore[union-attr]
    assert engine.registry.challenger("quality").version == "1.0.0"  # type: ignore[union-attr]
    later = drive(engine, line, 200)
    assert later.verdicts and all(v.version == "1.1.0" for v in later.verdicts)


def test_worse_challenger_is_kept_in_shadow() -> None:
    line = SimLine(40, seed=3)
    engine = _engine(line, NEW, OLD)
    log = drive(engine, line, 400, keep_events=True)
    checks = [e for e in log.events if e["type"] == "promotion_check"]
    assert checks and all(c["outcome"] == "kept" for c in checks)
    assert not [e for e in log.events if e["type"] == "model_promoted"]
    assert engine.registry.champion("quality").version == "1.1.0"  # type: ignore[union-attr]
    # Only the champion's outputs reach the gate.
    assert all(v.version == "1.1.0" for v in log.verdicts)


def test_update_enters_as_challenger_and_bad_update_is_refused(tmp_path: Path) -> None:
    line = SimLine(10, seed=4)
    engine = _engine(line, NEW, None)
    update = tmp_path / "update"
    update.mkdir()
    shutil.copy(OLD, update / "quality.toml")
    shutil.copy(OLD.with_suffix(".tflite"), update / "quality-1.0.0.tflite")
    assert engine.on_models_updated(update) == [
        {"manifest": str(update / "quality.toml"), "ok": True, "model": "quality@1.0.0"}
    ]
    assert engine.registry.champion("quality").version == "1.1.0"  # type: ignore[union-attr]
    assert engine.registry.challenger("quality").version == "1.0.0"  # type: ignore[union-attr]

    tampered = tmp_path / "tampered"
    tampered.mkdir()
    shutil.copy(MODELS_DIR / "correction.toml", tampered / "correction.toml")
    blob = bytearray((MODELS_DIR / "correction.tflite").read_bytes())
    blob[-10] ^= 0x01
    (tampered / "correction.tflite").write_bytes(bytes(blob))
    result = engine.on_models_updated(tampered)
    assert not result[0]["ok"] and "sha256 mismatch" in result[0]["error"]
    assert engine.registry.challenger("correction") is None
    events = drive(engine, line, 1, keep_events=True).events
    kinds = [e["type"] for e in events]
    assert "model_loaded" in kinds and "model_rejected" in kinds


def test_verdicts_reach_twin_and_uplink_shapes() -> None:
    line = SimLine(10, seed=5)
    engine = _engine(line, NEW, None)
    out_twin: dict[str, float] = {}
    events: list[dict[str, Any]] = []
    for _ in range(120):
        line.step()
        out = engine.step(line.sample())
        out_twin.update(out.twin)
        events.extend(e for e in out.events if e["type"] == "verdict")
    assert events
    e = events[0]
    assert set(e) >= {
        "type",
        "station",
        "verdict",
        "reason",
        "confidence",
        "model",
        "version",
        "ts",
    }
    assert e["verdict"] in ("continue", "correct", "scrap") and 0 <= e["confidence"] <= 1
    assert out_twin[f"{e['station']}.gate.verdict"] in (0.0, 1.0, 2.0)
    assert f"{e['station']}.gate.confidence" in out_twin
    assert f"{e['station']}.gate.anomaly" in out_twin
    stats = engine.stats()
    assert sum(stats["gate"]["verdicts"].values()) == len(events)
