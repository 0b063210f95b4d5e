"""The trainer: fleet rows in, a registrable model folder out, TensorFlow in a subprocess.

TensorFlow is not a dependency of the cloud: it is big, and in one environment it has fought
LiteRT over protobuf (``make models`` keeps it in ``.venv-train`` for that reason). The trainer
therefore writes the rows to an ``.npz`` file and runs :mod:`.train.quality_tf` with the
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import edgeos_protocol
from edgeos_cloud.models.errors import DataUnavailable, TrainingFailed
from edgeos_cloud.models.replay import QualityRows

__all__ = ["TrainedModel", "find_train_python", "train_quality"]

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
    py = find_train_python(python)
    out_dir.mkdir(parents=True, exist_ok=True)
    model_dir = out_dir / "model"
    data = out_dir / "rows.npz"
    extra: dict[str, Any] = {}
    if val is not None and len(val):
        extra = {"val_x": val.x, "val_y": val.y}
    np.savez(data, x=train.x, y=train.y, **extra)
    protocol_root = str(Path(edgeos_protocol.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": protocol_root, "PYTHONHASHSEED": "0"}
    cmd = [
        py,
        str(_TRAIN_DIR / "quality_tf.py"),
        "--data",
        str(data),
        "--out",
        str(model_dir),
        "--version",
        version,
        "--parent",
        parent,
        "--epochs",
        str(epochs),
        "--seed",
        str(seed),
        "--trained-with",
        trained_with or f"edgeos_cloud.models.train.quality_tf epochs={epochs} seed={seed}",
    ]
    import time

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


def python_version_of(py: str) -> str:
    out = subprocess.run(
        [py, "-c", "import sys; print(sys.version.split()[0])"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    return out.stdout.strip() or sys.version.split()[0]
