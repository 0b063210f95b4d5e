"""Inference benchmark: raw invoke, our per-event overhead, batched throughput, scan jitter.

    .venv/bin/python bench/inference.py [--quick]

Prints ONE JSON object. Goals: ``event_overhead_us`` ≤ 20, ``batched_inferences_per_s``
≥ 50,000, and scan jitter with inference unchanged within noise. The jitter is measured by
:class:`edgeos.scheduler.Scheduler` running a 100 Hz scan group (its own jitter histogram)
while the engine judges 80 nests once a second, inline (the headline figure: one step is
~0.3 ms) and in a worker thread (``step_async``, ``*_thread``).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgeos.clock import SystemClock
from edgeos.config import GuardConfig, ScanGroupConfig
from edgeos.inference.engine import InferenceEngine
from edgeos.inference.gates import QualityGate
from edgeos.inference.registry import load_model
from edgeos.inference.selfcheck import MODELS_DIR
from edgeos.scheduler import Scheduler
from edgeos_sim.simline import SimClock, SimLine


def _per_call(fn: Any, n: int) -> float:
    fn()
    best = float("inf")
    for _ in range(5):  # best of five: the least disturbed by the other tenants of the box
        t = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t) / n)
    return best


def micro(n: int) -> dict[str, Any]:
    quality = load_model(MODELS_DIR / "quality.toml", max_batch=80)
    anomaly = load_model(MODELS_DIR / "anomaly.toml", max_batch=80)
    gate = QualityGate(quality.manifest, anomaly.manifest)
    x1 = np.load(MODELS_DIR / "golden" / "quality-1.1.0.npz")["x"][:1].astype(np.float64)
    runner = quality.runner
    raw = _per_call(lambda: runner.invoke_raw(1), n)
    run = _per_call(lambda: runner.run(x1), n)
    station = ["nest01"]
    zero = np.zeros(1)

    def event() -> None:
        y = runner.run(x1)
        gate.judge(station, y[:, 0], zero, 0.0)

    full = _per_call(event, n)
    w = np.load(MODELS_DIR / "golden" / "anomaly-1.0.0.npz")["x"]
    w80 = w[np.arange(80) % len(w)]
    a_raw80 = _per_call(lambda: anomaly.runner.invoke_raw(80), n // 10)
    a_run80 = _per_call(lambda: anomaly.runner.run(w80), n // 10)
    q80 = np.repeat(x1, 80, axis=0)
    q_run80 = _per_call(lambda: runner.run(q80), n // 10)
    return {
        "raw_invoke_us": round(raw * 1e6, 3),
        "event_overhead_us": round((run - raw) * 1e6, 3),
        "event_overhead_with_verdict_us": round((full - raw) * 1e6, 3),
        "batched_inferences_per_s": round(80 / a_run80),
        "batched_raw_inferences_per_s": round(80 / a_raw80),
        "batched_quality_inferences_per_s": round(80 / q_run80),
        "batched_overhead_per_row_us": round((a_run80 - a_raw80) / 80 * 1e6, 3),
    }


def engine_step_cost(samples: list[np.ndarray], engine: InferenceEngine) -> float:
    t = time.perf_counter()
    for v in samples:
        engine.step(v)
    return (time.perf_counter() - t) / len(samples)


async def jitter(
    seconds: float, mode: str, engine: InferenceEngine, samples: list[np.ndarray]
) -> float:
    sched = Scheduler(SystemClock(), [ScanGroupConfig(name="fast", period_ms=10)])

    async def tick() -> None:
        return None

    sched.add_job("fast", "tick", tick)
    k = 0

    async def infer() -> None:
        nonlocal k
        while True:
            await asyncio.sleep(1.0)
            v = samples[k % len(samples)]
            k += 1
            if mode == "thread":
                await engine.step_async(v)
            else:
                engine.step(v)

    async with asyncio.TaskGroup() as tg:
        runner = tg.create_task(sched.run())
        worker = tg.create_task(infer()) if mode != "off" else None
        await asyncio.sleep(seconds)
        runner.cancel()
        if worker is not None:
            worker.cancel()
    return sched.group_stats("fast").jitter.percentile(99) * 1e3


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    n = 2000 if args.quick else 20000
    secs = 4.0 if args.quick else 20.0
    out: dict[str, Any] = {"bench": "inference", "quick": args.quick, "machine": platform.machine()}
    out.update(micro(n))

    line = SimLine(80, seed=1)
    engine = InferenceEngine.from_manifests(
        [MODELS_DIR / f"{m}.toml" for m in ("anomaly", "quality", "correction")],
        line.stations,
        line.tag_configs(),
        guard=GuardConfig(enabled=True),
        clock=SimClock(line),
    )
    samples = []
    for _ in range(240):
        line.step()
        samples.append(line.sample())
    out["backend"] = engine.registry.champion("quality").runner.backend  # type: ignore[union-attr]
    out["engine_step_80_nests_ms"] = round(engine_step_cost(samples, engine) * 1e3, 3)
    gc.collect()
    out["scan_jitter_p99_ms_without_inference"] = round(
        asyncio.run(jitter(secs, "off", engine, samples)), 4
    )
    out["scan_jitter_p99_ms_with_inference"] = round(
        asyncio.run(jitter(secs, "inline", engine, samples)), 4
    )
    out["scan_jitter_p99_ms_with_inference_thread"] = round(
        asyncio.run(jitter(secs, "thread", engine, samples)), 4
    )
    out["jitter_loop"] = (
        "edgeos.scheduler.Scheduler, 100 Hz group; engine.step (80 nests) every 1 s inline on the "
        "loop (recommended: ~0.3 ms); *_thread: engine.step_async"
    )
    out["goals_met"] = {
        "event_overhead_le_20us": out["event_overhead_us"] <= 20,
        "batched_ge_50k_per_s": out["batched_inferences_per_s"] >= 50_000,
    }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
