"""Fixtures for the model lifecycle: a fleet database from the simulated line, a real MLflow
store, the TensorFlow training interpreter (built once when missing, as ``make models`` does)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from edgeos.inference.selfcheck import MODELS_DIR
from edgeos_cloud.models.lifecycle import Lifecycle, LifecycleConfig
from edgeos_cloud.models.registry import ModelRegistry
from edgeos_sim.simline import record_drifting_line

ROOT = Path(__file__).resolve().parents[3]


@dataclass(frozen=True)
class Fleet:
    """A receiver database holding one gateway's run: old compound, then a new rubber."""

    storage_url: str
    registry_dir: Path
    device: str
    group: str
    drift_us: int
    end_us: int


@pytest.fixture(scope="session")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Fleet:
    directory = tmp_path_factory.mktemp("fleet")
    url = f"sqlite:///{directory / 'receiver.db'}"
    t0 = time.perf_counter()
    run = record_drifting_line(url, directory / "registry", "gw-line-a", MODELS_DIR)
    print(f"fleet database: {time.perf_counter() - t0:.1f} s")
    return Fleet(url, directory / "registry", run.device, "line-a", run.drift_us, run.end_us)


MakeLifecycle = Callable[..., Lifecycle]


@pytest.fixture
def make_lifecycle(tmp_path: Path, fleet: Fleet) -> MakeLifecycle:
    """``make_lifecycle(ota_repo=…, storage_url=…, **settings)``: a lifecycle on a fresh store."""

    def make(**overrides: Any) -> Lifecycle:
        config = LifecycleConfig.model_validate(
            {
                "home": tmp_path / "lifecycle",
                "storage_url": fleet.storage_url,
                "groups": {fleet.group: {"devices": [fleet.device]}},
                "trainer": {"epochs": 120},
                **overrides,
            }
        )
        return Lifecycle(config)

    return make


@pytest.fixture
def registry(tmp_path: Path) -> ModelRegistry:
    return ModelRegistry.at(tmp_path / "mlflow")


@pytest.fixture(scope="session")
def train_python() -> Iterator[str]:
    """A Python with TensorFlow: ``$EDGEOS_TRAIN_PYTHON`` or ``.venv-train`` (built when missing;
    measured ~35 s from PyPI). Skips, printing the reason, when neither can be had."""
    env = os.environ.get("EDGEOS_TRAIN_PYTHON")
    if env and Path(env).exists():
        yield env
        return
    venv = ROOT / ".venv-train"
    py = venv / "bin" / "python"
    if not py.exists():
        try:
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
            subprocess.run(
                [str(py), "-m", "pip", "install", "--quiet", "tensorflow-cpu", "numpy"],
                check=True,
                timeout=1200,
            )
        except (subprocess.SubprocessError, OSError) as exc:
            shutil.rmtree(venv, ignore_errors=True)
            pytest.skip(f"no TensorFlow training environment (pip install failed: {exc})")
    probe = subprocess.run(
        [str(py), "-c", "import tensorflow"],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if probe.returncode != 0:
        pytest.skip(f"{py} cannot import tensorflow: {probe.stderr.strip()[-300:]}")
    yield str(py)


@dataclass(frozen=True)
class GuardedFleet:
    """A receiver database of one gateway whose guard runs learned recipes half of the time."""

    storage_url: str
    registry_dir: Path
    device: str
    group: str
    end_us: int


def record_guarded_line(
    url: str, registry_dir: Path, device: str, *, nests: int = 10, phase_s: int = 450
) -> int:
    """A new rubber from the start; the operator switch alternates learned recipes (the guard
    decides, within its budget) and the plant recipe, ``phase_s`` each, four phases. Returns the
    end time (µs). Every sample and event goes through the receiver's ingest path."""
    from edgeos.config import GuardConfig
    from edgeos.inference.engine import InferenceEngine
    from edgeos_sim.simline import FleetRecorder, SimClock, SimLine, record_run

    line = SimLine(nests, seed=7)
    line.new_rubber(9.0)
    engine = InferenceEngine.from_manifests(
        [MODELS_DIR / "anomaly.toml", MODELS_DIR / "correction.toml", MODELS_DIR / "quality.toml"],
        line.stations,
        line.tag_configs(),
        guard=GuardConfig(enabled=True, alpha=0.05),
        clock=SimClock(line),
    )
    recorder = FleetRecorder(url, registry_dir, device, line.stations)
    try:
        for phase in range(4):
            engine.set_learning(phase % 2 == 0)
            record_run(line, recorder, phase_s, engine=engine, apply=True)
    finally:
        recorder.close()
    return round((line.now + 1_700_000_000.0) * 1e6)


@pytest.fixture(scope="session")
def guarded_fleet(tmp_path_factory: pytest.TempPathFactory) -> GuardedFleet:
    directory = tmp_path_factory.mktemp("guarded")
    url = f"sqlite:///{directory / 'receiver.db'}"
    end = record_guarded_line(url, directory / "registry", "gw-guarded")
    return GuardedFleet(url, directory / "registry", "gw-guarded", "line-g", end)


@pytest.fixture
def make_guarded_lifecycle(tmp_path: Path, guarded_fleet: GuardedFleet) -> MakeLifecycle:
    def make(**overrides: Any) -> Lifecycle:
        config = LifecycleConfig.model_validate(
            {
                "home": tmp_path / "guarded-lifecycle",
                "storage_url": guarded_fleet.storage_url,
                "groups": {guarded_fleet.group: {"devices": [guarded_fleet.device]}},
                **overrides,
            }
        )
        return Lifecycle(config)

    return make
