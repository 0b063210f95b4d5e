"""On the simulated line: learning improves quality; the gate catches injected defects."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest

from edgeos.config import GuardConfig
from edgeos.inference.engine import InferenceEngine
from edgeos.inference.selfcheck import MODELS_DIR
from edgeos_cloud.fleet.physics.recipe import ELASTICITY_MAX, ELASTICITY_MIN
from edgeos_sim.simline import SimClock, SimLine, drive, reward, tyres

CHAMPIONS = [MODELS_DIR / f"{n}.toml" for n in ("anomaly", "quality", "correction")]


def _engine(line: SimLine, alpha: float = 0.005) -> InferenceEngine:
    return InferenceEngine.from_manifests(
        CHAMPIONS,
        line.stations,
        line.tag_configs(),
        guard=GuardConfig(enabled=True, alpha=alpha),
        clock=SimClock(line),
    )


def _improvement(seed: int, nests: int, seconds: int) -> dict[str, float]:
    line, twin = SimLine(nests, seed=seed), SimLine(nests, seed=seed)
    engine = _engine(line)
    drive(engine, line, seconds)
    for _ in range(seconds):
        twin.step()
    a, b = tyres(line), tyres(twin)
    keys = sorted(set(a) & set(b))
    ea = np.array([a[k] for k in keys])
    eb = np.array([b[k] for k in keys])

    def reject(e: npt.NDArray[np.float64]) -> float:
        return float(((e < ELASTICITY_MIN) | (e > ELASTICITY_MAX)).mean())

    return {
        "tyres": len(keys),
        "mean_learned": float(ea.mean()),
        "mean_default": float(eb.mean()),
        "reject_learned": reject(ea),
        "reject_default": reject(eb),
        "reward_ratio": float(reward(ea).sum() / reward(eb).sum()),
        "learned_share": engine.guard.counts["learned"] / max(engine.guard.counts["decisions"], 1)
        if engine.guard
        else 0.0,
    }


def _report(r: dict[str, float]) -> str:
    return (
        f"{r['tyres']} tyres: mean elasticity {r['mean_learned']:.3f} vs default "
        f"{r['mean_default']:.3f} MPa; rejects {100 * r['reject_learned']:.1f}% vs "
        f"{100 * r['reject_default']:.1f}%; reward ratio {r['reward_ratio']:.4f}; "
        f"learned actions {100 * r['learned_share']:.0f}%"
    )


def test_learning_improves_quality_over_default() -> None:
    r = _improvement(seed=11, nests=80, seconds=2400)
    print("quality improvement:", _report(r))
    assert r["tyres"] > 4000
    assert r["mean_learned"] > r["mean_default"] + 0.1
    assert r["reject_learned"] < 0.5 * r["reject_default"]
    assert r["reward_ratio"] > 1.01


@pytest.mark.slow
@pytest.mark.parametrize("seed", [21, 22, 23])
def test_learning_improves_quality_long_run(seed: int) -> None:
    r = _improvement(seed=seed, nests=80, seconds=12_000)
    print(f"quality improvement (seed {seed}, long):", _report(r))
    assert r["mean_learned"] > r["mean_default"] + 0.1
    assert r["reward_ratio"] > 1.01


def _gate_run(seed: int, nests: int, seconds: int) -> dict[str, float]:
    """Defects injected on a third of the nests; verdicts compared with measured tyres."""
    line = SimLine(nests, seed=seed)
    engine = _engine(line)
    rng = np.random.default_rng(seed)
    defect_nests = rng.choice(np.arange(1, nests + 1), size=nests // 3, replace=False)
    schedule: dict[int, list[tuple[int, str, float]]] = {}
    for n in defect_nests.tolist():
        start = int(rng.integers(300, seconds // 2))
        kind = "pressure_leak" if rng.random() < 0.5 else "heater_weak"
        sev = (
            float(rng.uniform(0.1, 0.45))
            if kind == "pressure_leak"
            else float(rng.uniform(0.4, 0.7))
        )
        schedule.setdefault(start, []).append((n, kind, sev))
        schedule.setdefault(start + int(rng.integers(200, 800)), []).append((n, "clear", 0.0))

    def inject(k: int) -> None:
        for n, kind, sev in schedule.get(k, []):
            if kind == "clear":
                line.physics.clear_defects(n)
            else:
                line.physics.inject_defect(n, kind, sev)  # type: ignore[arg-type]

    log = drive(engine, line, seconds, before_step=inject)
    measured = {(c.nest, c.cycle): c for c in line.physics.cycles}
    # A verdict at the end of cure k of a nest concerns the tyre measured as cycle k + 1.
    pairs = []
    counts: dict[str, int] = {}
    for v in log.verdicts:
        nest = int(v.station.removeprefix("nest"))
        counts[v.station] = counts.get(v.station, 0) + 1
        cycle = counts[v.station]
        rec = measured.get((nest, cycle))
        if rec is not None:
            pairs.append((v.verdict, not rec.ok))
    scrap = np.array([p[0] == "scrap" for p in pairs])
    flagged = np.array([p[0] != "continue" for p in pairs])
    bad = np.array([p[1] for p in pairs])
    tp = int((scrap & bad).sum())
    return {
        "tyres": len(pairs),
        "rejects": int(bad.sum()),
        "scrapped": int(scrap.sum()),
        "precision": tp / max(int(scrap.sum()), 1),
        "recall": tp / max(int(bad.sum()), 1),
        "flag_recall": int((flagged & bad).sum()) / max(int(bad.sum()), 1),
        "false_scrap_rate": int((scrap & ~bad).sum()) / max(int((~bad).sum()), 1),
    }


def test_gate_catches_injected_defects() -> None:
    r = _gate_run(seed=7, nests=60, seconds=2400)
    print(
        f"quality gate on injected defects: {r['tyres']} tyres, {r['rejects']} real rejects, "
        f"{r['scrapped']} scrapped; scrap precision {r['precision']:.3f}, recall "
        f"{r['recall']:.3f}; scrap-or-correct recall {r['flag_recall']:.3f}; "
        f"good tyres scrapped {100 * r['false_scrap_rate']:.2f}%"
    )
    assert r["rejects"] >= 30  # the defects really hurt quality
    assert r["precision"] >= 0.85
    assert r["recall"] >= 0.85
    assert r["false_scrap_rate"] <= 0.02
