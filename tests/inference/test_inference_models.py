"""Committed models: manifests match files, golden outputs, rejection, batching, backends."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from edgeos.inference.errors import ModelRejected
from edgeos.inference.registry import ModelRegistry, find_manifests, load_manifest, load_model
from edgeos.inference.runner import DEFAULT_BACKEND, available_backends
from edgeos.inference.selfcheck import MODELS_DIR, check_all

MANIFESTS = sorted(find_manifests(MODELS_DIR) + find_manifests(MODELS_DIR / "archive"))


def test_every_task_has_a_committed_model() -> None:
    tasks = {load_manifest(p).task for p in MANIFESTS}
    assert tasks == {"anomaly", "quality", "correction"}


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.stem)
def test_manifest_matches_file(path: Path) -> None:
    m = load_manifest(path)
    blob = m.file.read_bytes()
    assert hashlib.sha256(blob).hexdigest() == m.sha256
    # Tiny enough for a Pi to batch 80 nests at >= 50k inferences/s.
    assert len(blob) < 64 * 1024
    assert len(m.mean) == len(m.std) == len(m.features)


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.stem)
def test_golden_outputs_with_litert(path: Path) -> None:
    m = load_manifest(path)
    golden = np.load(MODELS_DIR / "golden" / f"{m.name}-{m.version}.npz")
    model = load_model(path, backend="ai_edge_litert")
    y = model.runner.run(golden["x"])
    np.testing.assert_allclose(y, golden["y"], rtol=1e-4, atol=1e-4)


def test_sha256_mismatch_is_refused_and_previous_model_stays(tmp_path: Path) -> None:
    registry = ModelRegistry()
    good = registry.load(MODELS_DIR / "quality.toml")
    registry.place(good, "champion")
    shutil.copy(MODELS_DIR / "quality.toml", tmp_path / "quality.toml")
    blob = bytearray((MODELS_DIR / "quality.tflite").read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    (tmp_path / "quality.tflite").write_bytes(bytes(blob))
    with pytest.raises(ModelRejected, match="sha256 mismatch"):
        registry.load(tmp_path / "quality.toml")
    assert registry.champion("quality") is good


def test_manifest_errors_are_named(tmp_path: Path) -> None:
    text = (MODELS_DIR / "quality.toml").read_text()
    bad = tmp_path / "bad.toml"
    bad.write_text(text.replace('task = "quality"', 'task = "weather"'))
    with pytest.raises(ModelRejected, match="unknown task 'weather'"):
        load_manifest(bad)
    bad.write_text(text.replace("[input]", "[inputs]"))
    with pytest.raises(ModelRejected, match="'input' is missing"):
        load_manifest(bad)
    shutil.copy(MODELS_DIR / "quality.tflite", tmp_path / "quality.tflite")
    shape = tmp_path / "shape.toml"
    shape.write_text(
        text.replace('"freshness"]', '"freshness", "extra"]')
        .replace("mean = [", "mean = [0.0, ")
        .replace("std = [", "std = [1.0, ")
    )
    with pytest.raises(ModelRejected, match="input shape"):
        load_model(shape)


def test_batched_rows_equal_single_rows() -> None:
    model = load_model(MODELS_DIR / "anomaly.toml", max_batch=80)
    golden = np.load(MODELS_DIR / "golden" / "anomaly-1.0.0.npz")
    rng = np.random.default_rng(0)
    x = golden["x"][rng.integers(0, len(golden["x"]), 203)]
    singles = np.concatenate([model.runner.run(x[i : i + 1]).copy() for i in range(len(x))])
    for n in (1, 5, 8, 9, 80, 203):  # every bucket, padding, and chunking past max_batch
        np.testing.assert_allclose(model.runner.run(x[:n]), singles[:n], rtol=1e-5, atol=1e-6)


async def test_run_async_in_worker_thread_matches() -> None:
    model = load_model(MODELS_DIR / "quality.toml", max_batch=16)
    model.runner.thread_threshold = 10
    x = np.load(MODELS_DIR / "golden" / "quality-1.1.0.npz")["x"]
    expected = model.runner.run(x).copy()
    got = await model.runner.run_async(x)  # 32 rows >= threshold: runs in a worker thread
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_default_backend_is_available() -> None:
    assert DEFAULT_BACKEND in available_backends()
    report = check_all(backend="ai_edge_litert")
    assert report["ok"], report


def test_tflite_runtime_backend() -> None:
    """The same goldens through tflite-runtime, in-process or via a venv that has it."""
    if "tflite_runtime" in available_backends():
        report = check_all(backend="tflite_runtime")
    else:
        python = os.environ.get("EDGEOS_TFLITE_RUNTIME_PYTHON", "")
        if not python or not Path(python).exists():
            reason = (
                "tflite-runtime is not installed here (it has wheels for Python 3.11 on "
                "x86_64/aarch64: pip install tflite-runtime); or set "
                "EDGEOS_TFLITE_RUNTIME_PYTHON to a python that has it"
            )
            print(f"SKIP tflite-runtime: {reason}")
            pytest.skip(reason)
        root = Path(__file__).resolve().parents[2]
        proc = subprocess.run(
            [python, "-m", "edgeos.inference.selfcheck", "--backend", "tflite_runtime"],
            capture_output=True,
            text=True,
            cwd=root,
            env={**os.environ, "PYTHONPATH": str(root)},
            timeout=60,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr
        report = json.loads(proc.stdout)
    print("tflite-runtime self-check:", json.dumps(report["models"]))
    assert report["backend"] == "tflite_runtime"
    assert report["ok"], report
