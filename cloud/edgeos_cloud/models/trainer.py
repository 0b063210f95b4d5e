"""The trainer: fleet rows in, a registrable model folder out, TensorFlow in a subprocess.

TensorFlow is not a dependency of the cloud: it is big, and in one environment it has fought
LiteRT over protobuf (``make models`` keeps it in ``.venv-train`` for that reason). The trainer
therefore writes the rows to an ``.npz`` file and runs the task's script
(:mod:`.train.quality_tf`, :mod:`.train.anomaly_tf`, :mod:`.train.correction_tf`) with the
training interpreter, found in this order:

1. ``python=`` (``[trainer] python`` in the lifecycle configuration),
2. ``$EDGEOS_TRAIN_PYTHON``,
3. ``.venv-train/bin/python`` of the source checkout (what ``make models`` builds).

The subprocess gets ``PYTHONPATH`` pointing at this installation's ``edgeos_protocol``, so it
trains with the very feature and manifest code the gateway runs. Its output folder is what
:meth:`~edgeos_cloud.models.registry.ModelRegistry.register` takes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import edgeos_protocol
from edgeos_cloud.models.errors import DataUnavailable, TrainingFailed
from edgeos_cloud.models.replay import AnomalyRows, QualityRows

__all__ = [
    "TrainedModel",
    "find_train_python",
    "train_anomaly",
    "train_correction",
    "train_quality",
]

_TRAIN_DIR = Path(__file__).resolve().parent / "train"
#: Fewer training rows than this: no training (the result would not mean anything).
MIN_TRAIN_ROWS = 50


@dataclass(frozen=True, slots=True)
class TrainedModel:
    directory: Path
    report: dict[str, Any]
    seconds: float


def find_train_python(python: str | None = None) -> str:
    """The training interpreter (see the module docstring); raises :class:`TrainingFailed`."""
    candidates = [python, os.environ.get("EDGEOS_TRAIN_PYTHON")]
    checkout = Path(edgeos_protocol.__file__).resolve().parents[2] / ".venv-train" / "bin"
    candidates.append(str(checkout / "python"))
    for c in candidates:
        if c and Path(c).exists():
            return c
    raise TrainingFailed(
        "no training interpreter: set [trainer] python or EDGEOS_TRAIN_PYTHON to a Python with "
        "tensorflow-cpu and numpy (make models builds .venv-train)"
    )


def _run_script(
    script: str,
    out_dir: Path,
    arrays: dict[str, Any],
    args: list[str],
    *,
    python: str | None,
    timeout_s: float,
) -> TrainedModel:
    """Write ``arrays`` to ``rows.npz`` and run ``train/<script>`` in the training interpreter."""
    py = find_train_python(python)
    out_dir.mkdir(parents=True, exist_ok=True)
    model_dir = out_dir / "model"
    data = out_dir / "rows.npz"
    np.savez(data, **arrays)
    protocol_root = str(Path(edgeos_protocol.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": protocol_root, "PYTHONHASHSEED": "0"}
    cmd = [py, str(_TRAIN_DIR / script), "--data", str(data), "--out", str(model_dir), *args]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd, env=env, capture_output=True, text=True, timeout=timeout_s, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise TrainingFailed(f"the trainer ran longer than {timeout_s:g} s") from exc
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise TrainingFailed(f"the trainer exited {proc.returncode}:\n{tail}")
    try:
        report = json.loads((model_dir / "training.json").read_text())
    except (OSError, ValueError) as exc:
        raise TrainingFailed(f"the trainer wrote no report: {exc}") from exc
    return TrainedModel(model_dir, report, seconds)


def _common_args(
    script: str, *, version: str, parent: str, epochs: int, seed: int, trained_with: str
) -> list[str]:
    return [
        "--version",
        version,
        "--parent",
        parent,
        "--epochs",
        str(epochs),
        "--seed",
        str(seed),
        "--trained-with",
        trained_with or f"edgeos_cloud.models.train.{script} epochs={epochs} seed={seed}",
    ]


def train_quality(
    train: QualityRows,
    out_dir: Path,
    *,
    version: str,
    parent: str = "",
    val: QualityRows | None = None,
    epochs: int = 150,
    seed: int = 20240601,
    python: str | None = None,
    timeout_s: float = 1800.0,
    trained_with: str = "",
) -> TrainedModel:
    """Train a quality model on ``train`` into ``out_dir`` (a fresh folder)."""
    if len(train) < MIN_TRAIN_ROWS:
        raise DataUnavailable(
            f"deferred: {len(train)} training rows with realised quality in the window, "
            f"need {MIN_TRAIN_ROWS}"
        )
    arrays: dict[str, Any] = {"x": train.x, "y": train.y}
    if val is not None and len(val):
        arrays |= {"val_x": val.x, "val_y": val.y}
    return _run_script(
        "quality_tf.py",
        out_dir,
        arrays,
        _common_args(
            "quality_tf",
            version=version,
            parent=parent,
            epochs=epochs,
            seed=seed,
            trained_with=trained_with,
        ),
        python=python,
        timeout_s=timeout_s,
    )


def train_anomaly(
    train: AnomalyRows,
    out_dir: Path,
    *,
    version: str,
    parent: str = "",
    epochs: int = 12,
    seed: int = 20240601,
    python: str | None = None,
    timeout_s: float = 1800.0,
    trained_with: str = "",
) -> TrainedModel:
    """Train the anomaly autoencoder on the windows of ``train``'s in-spec tyres."""
    normal = int((train.y == 0).sum())
    if normal < MIN_TRAIN_ROWS:
        raise DataUnavailable(
            f"deferred: {normal} training tyres realised in spec in the window (their cure "
            f"windows are the normal operation the autoencoder learns), need {MIN_TRAIN_ROWS}"
        )
    arrays = {"windows": train.windows, "tyre": train.tyre, "y": train.y}
    return _run_script(
        "anomaly_tf.py",
        out_dir,
        arrays,
        _common_args(
            "anomaly_tf",
            version=version,
            parent=parent,
            epochs=epochs,
            seed=seed,
            trained_with=trained_with,
        ),
        python=python,
        timeout_s=timeout_s,
    )


def train_correction(
    train: QualityRows,
    out_dir: Path,
    *,
    version: str,
    champion_proposals: Any,
    baseline: dict[str, float],
    thresholds: dict[str, float],
    parent: str = "",
    val: QualityRows | None = None,
    epochs: int = 150,
    seed: int = 20240601,
    python: str | None = None,
    timeout_s: float = 1800.0,
    trained_with: str = "",
) -> TrainedModel:
    """Train a correction model (see :mod:`.train.correction_tf`) on ``train``.

    ``champion_proposals`` are the champion's ``(heater, pressure)`` deltas on the training
    rows (the direction the new model recalibrates); ``baseline`` the plant recipe.
    """
    if len(train) < MIN_TRAIN_ROWS or train.applied is None:
        raise DataUnavailable(
            f"deferred: {len(train)} training loads with a realised outcome and the recipe in "
            f"force in the window, need {MIN_TRAIN_ROWS}"
        )
    base = np.array([baseline["heater.sp"], baseline["press.sp"]])
    arrays: dict[str, Any] = {
        "x": train.x,
        "y": train.y,
        "d": train.applied - base,
        "dir": np.asarray(champion_proposals, np.float64),
    }
    if val is not None and len(val) and val.applied is not None:
        arrays |= {"val_x": val.x, "val_y": val.y, "val_d": val.applied - base}
    extra = [
        "--baseline-heater",
        repr(float(baseline["heater.sp"])),
        "--baseline-press",
        repr(float(baseline["press.sp"])),
        "--target",
        repr(float(thresholds.get("target", 6.6))),
        "--confidence-k",
        repr(float(thresholds.get("confidence_k", 2.0))),
    ]
    return _run_script(
        "correction_tf.py",
        out_dir,
        arrays,
        _common_args(
            "correction_tf",
            version=version,
            parent=parent,
            epochs=epochs,
            seed=seed,
            trained_with=trained_with,
        )
        + extra,
        python=python,
        timeout_s=timeout_s,
    )


def python_version_of(py: str) -> str:
    out = subprocess.run(
        [py, "-c", "import sys; print(sys.version.split()[0])"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    return out.stdout.strip() or sys.version.split()[0]
