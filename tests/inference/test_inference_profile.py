"""The tunables a configuration profile brings to inference: the default recipe (set-points),
the gate's thresholds and the guard's soft limits (edgeos.profile applies them to the config)."""

from __future__ import annotations

import numpy as np

from edgeos.config import GateConfig, GuardConfig, SoftLimits
from edgeos.inference.engine import InferenceEngine
from edgeos.inference.gates import QualityGate
from edgeos.inference.registry import load_manifest
from edgeos.inference.selfcheck import MODELS_DIR
from edgeos_sim.simline import SimClock, SimLine, drive

CHAMPIONS = [MODELS_DIR / f"{n}.toml" for n in ("anomaly", "quality", "correction")]
ALPHA = 0.005


def _engine(line: SimLine, guard: GuardConfig, **kw: object) -> InferenceEngine:
    return InferenceEngine.from_manifests(
        CHAMPIONS,
        line.stations,
        line.tag_configs(),
        guard=guard,
        clock=SimClock(line),
        **kw,  # type: ignore[arg-type]
    )


def _new_rubber(line: SimLine, mean: float = 1.5, std: float = 0.3) -> None:
    line.physics.material_mean, line.physics.material_std = mean, std
    line.physics.new_batch()


def test_a_configured_set_point_is_the_default_recipe_and_the_budget_stays_honest() -> None:
    line = SimLine(4, seed=3)
    _new_rubber(line)
    hot = {"nest01.heater.sp": 164.5, "nest02.heater.sp": 164.5}
    engine = _engine(line, GuardConfig(enabled=True, alpha=ALPHA), setpoints=hot)
    log = drive(engine, line, 900)
    by_station: dict[str, list[object]] = {}
    for d in log.decisions:
        by_station.setdefault(d.station, []).append(d)
    assert set(by_station) == set(line.stations)
    for station in line.stations:
        moved = f"{station}.heater.sp" in hot
        defaults = [d for d in by_station[station] if d.action == "default"]  # type: ignore[attr-defined]
        assert defaults
        heaters = [d.writes[f"{station}.heater.sp"] for d in defaults]  # type: ignore[attr-defined]
        # The default recipe in force: the configured value (ramped there by max_rate) or the
        # correction manifest's [baseline]; the pressure keeps the manifest's.
        assert heaters[-1] == (164.5 if moved else 160.0)
        assert all(d.writes[f"{station}.press.sp"] == 15.0 for d in defaults)  # type: ignore[attr-defined]
        if moved:
            # The model predicted the outcome of 160 °C, not of the recipe in force: the
            # default's reward is bounded by the best there is.
            assert {d.default_upper for d in by_station[station]} == {6.6}  # type: ignore[attr-defined]
    # Learned recipes are still the model's own (its baseline + its delta), checked as ever.
    assert engine.guard is not None and engine.guard.slack >= 0.0
    assert all(math_ok(v) for d in log.decisions for v in d.writes.values())


def math_ok(value: float) -> bool:
    return bool(np.isfinite(value)) and 5.0 <= value <= 200.0


def test_soft_limits_refuse_learned_proposals_outside_them() -> None:
    line = SimLine(6, seed=5)
    _new_rubber(line, 2.0, 0.2)  # the model proposes well above 160 °C for this rubber
    soft = {f"{s}.heater.sp": SoftLimits(min=158.0, max=162.0) for s in line.stations}
    engine = _engine(line, GuardConfig(enabled=True, alpha=ALPHA, soft_limits=soft))
    log = drive(engine, line, 1200)
    assert engine.guard is not None
    assert engine.guard.counts["soft_limit"] > 0
    refused = [d for d in log.decisions if "soft limits" in d.reason]
    assert refused and all(d.action == "default" for d in refused)
    for d in log.decisions:
        if d.action == "learned":
            heater = d.writes[f"{d.station}.heater.sp"]
            assert 158.0 <= heater <= 162.0, d


def test_gate_thresholds_from_the_configuration_override_the_manifest_and_survive_a_swap() -> None:
    quality = load_manifest(MODELS_DIR / "quality.toml")
    plain = QualityGate(quality)
    strict = QualityGate(quality, p_scrap=0.05, p_correct=0.01)
    assert (strict.p_scrap, strict.p_correct) == (0.05, 0.01)
    # A prediction near a spec limit: the manifest corrects or continues, the stricter gate scraps.
    near = np.array([quality.threshold("spec_min") + 1.0 * quality.threshold("sigma")])
    assert plain.judge(["nest01"], near, [0.0], 0.0)[0].verdict != "scrap"
    assert strict.judge(["nest01"], near, [0.0], 0.0)[0].verdict == "scrap"
    strict.set_models(quality, None)  # a promotion re-reads the manifest; the override stays
    assert (strict.p_scrap, strict.p_correct) == (0.05, 0.01)
    line = SimLine(2, seed=1)
    engine = _engine(line, GuardConfig(), gate=GateConfig(p_scrap=0.3))
    assert engine.gate is not None and engine.gate.p_scrap == 0.3
    assert engine.gate.p_correct == quality.thresholds.get("p_correct", 0.2)
