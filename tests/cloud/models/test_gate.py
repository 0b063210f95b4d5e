"""The quality gate on the LiteRT interpreter, on fleet replay rows; every bad input is refused."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgeos.inference.selfcheck import MODELS_DIR
from edgeos_cloud.models.gate import GateConfig, run_gate
from edgeos_cloud.models.litert import LiteModel
from edgeos_cloud.models.replay import QualityRows, load_quality_rows, split_rows
from edgeos_protocol.manifest import load_manifest, read_verified

QUALITY = MODELS_DIR / "quality.toml"
LINEAR = MODELS_DIR / "archive" / "quality-1.0.0.toml"


def version_dir(dest: Path, manifest: Path) -> Path:
    """A registrable folder: the manifest, its ``.tflite`` and its golden file."""
    m = load_manifest(manifest)
    dest.mkdir(parents=True)
    shutil.copy2(m.path, dest / m.path.name)
    shutil.copy2(m.file, dest / m.file.name)
    shutil.copy2(MODELS_DIR / "golden" / f"{m.name}-{m.version}.npz", dest / "golden.npz")
    return dest


def _edit(folder: Path, old: str, new: str) -> None:
    toml = next(folder.glob("*.toml"))
    text = toml.read_text()
    assert old in text
    toml.write_text(text.replace(old, new))


@pytest.fixture(scope="module")
def pre_drift(fleet: Any) -> QualityRows:
    """Held-out rows from before the new rubber (the committed champion is right there)."""
    rows = load_quality_rows(fleet.storage_url, [fleet.device], until_us=fleet.drift_us)
    return split_rows(rows)[1]


def test_committed_champion_passes_every_check_on_fleet_rows(
    tmp_path: Path, pre_drift: QualityRows
) -> None:
    report = run_gate(version_dir(tmp_path / "v", QUALITY), replay=pre_drift)
    assert report.passed, report.reasons
    assert {c.name for c in report.checks} == {
        "integrity",
        "golden",
        "finite",
        "budget",
        "accuracy",
    }
    assert report.interpreter.startswith("ai-edge-litert")


def test_model_worse_than_champion_on_same_rows_is_refused_with_confidence(
    tmp_path: Path, pre_drift: QualityRows
) -> None:
    report = run_gate(
        version_dir(tmp_path / "lin", LINEAR),
        champion_dir=version_dir(tmp_path / "champ", QUALITY),
        replay=pre_drift,
    )
    assert not report.passed
    acc = next(c for c in report.checks if c.name == "accuracy")
    assert not acc.ok and "worse than the limit" in acc.detail
    assert acc.values["rows"] == len(pre_drift)
    assert acc.values["candidate_rms"] > acc.values["champion_rms"] * 1.05
    assert acc.values["confidence_better"] < 0.01
    assert [c.name for c in report.checks if not c.ok] == ["accuracy"]


def test_file_that_is_not_a_flatbuffer_is_refused(tmp_path: Path) -> None:
    folder = version_dir(tmp_path / "v", QUALITY)
    junk = b"this is not a flatbuffer" * 40
    (folder / "quality.tflite").write_bytes(junk)
    _edit(folder, load_manifest(QUALITY).sha256, hashlib.sha256(junk).hexdigest())
    report = run_gate(folder)
    assert not report.passed
    assert "interpreter cannot load it" in report.reasons[0]


def test_sha256_mismatch_is_refused(tmp_path: Path) -> None:
    folder = version_dir(tmp_path / "v", QUALITY)
    blob = bytearray((folder / "quality.tflite").read_bytes())
    blob[100] ^= 0xFF
    (folder / "quality.tflite").write_bytes(bytes(blob))
    report = run_gate(folder)
    assert not report.passed and "sha256 mismatch" in report.reasons[0]


def test_manifest_whose_inputs_are_not_the_gateways_features_is_refused(tmp_path: Path) -> None:
    folder = version_dir(tmp_path / "v", QUALITY)
    _edit(folder, '"batch.mooney", "freshness"]', '"batch.viscosity", "freshness"]')
    report = run_gate(folder)
    assert not report.passed
    assert "not the gateway's quality features" in report.reasons[0]


def test_model_ten_times_slower_than_budget_is_refused(tmp_path: Path) -> None:
    m = load_manifest(QUALITY)
    lite = LiteModel(
        read_verified(m), input_shape=m.input_shape, output_width=1, mean=m.mean, std=m.std
    )
    budget_us = lite.time_invoke(1) * 1e6 / 10
    report = run_gate(
        version_dir(tmp_path / "v", QUALITY), config=GateConfig(latency_budget_us=budget_us)
    )
    assert not report.passed
    budget = next(c for c in report.checks if c.name == "budget")
    assert not budget.ok and budget.values["latency_us"] > budget_us


def test_too_few_held_out_rows_defer_the_accuracy_check(
    tmp_path: Path, pre_drift: QualityRows
) -> None:
    few = pre_drift.take(np.arange(len(pre_drift)) < 5)
    report = run_gate(version_dir(tmp_path / "v", QUALITY), replay=few)
    acc = next(c for c in report.checks if c.name == "accuracy")
    assert not report.passed and acc.detail.startswith("deferred: 5 held-out rows")


def test_golden_outputs_that_do_not_reproduce_on_litert_are_refused(tmp_path: Path) -> None:
    folder = version_dir(tmp_path / "v", QUALITY)
    with np.load(folder / "golden.npz") as g:
        x, y = g["x"], g["y"]
    np.savez(folder / "golden.npz", x=x, y=y + 0.01)
    report = run_gate(folder)
    assert not report.passed and "golden outputs differ on LiteRT" in report.reasons[0]
