"""Registry, replay and lifecycle refusals: real MLflow store, real receiver database."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgeos.inference.selfcheck import MODELS_DIR
from edgeos_cloud.models.errors import (
    DataUnavailable,
    PublishRefused,
    RegistryUnavailable,
    VersionRefused,
)
from edgeos_cloud.models.registry import ModelRegistry
from edgeos_cloud.models.replay import load_quality_rows
from edgeos_cloud.ota.repository import OtaRepository
from edgeos_protocol.features import StationTracker
from edgeos_sim.simline import FleetRecorder, SimLine

QUALITY = MODELS_DIR / "quality.toml"
LINEAR = MODELS_DIR / "archive" / "quality-1.0.0.toml"


def _folder(dest: Path, manifest: Path, golden: str) -> Path:
    dest.mkdir(parents=True)
    shutil.copy2(manifest, dest / manifest.name)
    shutil.copy2(manifest.with_suffix(".tflite"), dest / manifest.with_suffix(".tflite").name)
    shutil.copy2(MODELS_DIR / "golden" / golden, dest / "golden.npz")
    return dest


def test_features_from_the_receiver_database_are_the_gateways(tmp_path: Path) -> None:
    """No train/serve skew: the cloud's rows equal what the gateway's tracker computed live."""
    line = SimLine(4, seed=3)
    url = f"sqlite:///{tmp_path / 'r.db'}"
    recorder = FleetRecorder(url, tmp_path / "reg", "gw-skew", line.stations)
    live = StationTracker(4)
    pending: dict[int, np.ndarray] = {}
    live_rows: list[tuple[np.ndarray, float]] = []
    for _ in range(600):
        line.step(1.0)
        values = line.sample()
        recorder.add(line.now, values)
        obs = live.observe(values)
        for k, i in enumerate(obs.cure_ended.tolist()):
            pending[i] = obs.quality_x[k]
        for k, i in enumerate(obs.completed.tolist()):
            if i in pending:
                live_rows.append((pending.pop(i), float(obs.realised[k])))
    recorder.close()
    stored = load_quality_rows(url, ["gw-skew"])
    assert len(stored) == len(live_rows) >= 40
    order = np.lexsort((stored.y, stored.ts_us))
    live_x = np.array([r[0] for r in live_rows])
    live_y = np.array([r[1] for r in live_rows])
    key = np.lexsort((live_y, np.arange(len(live_y))))
    # Same rows in the same order (both are cure-end order); only the wire's 0.001 quantisation.
    np.testing.assert_allclose(stored.x[order][:, [0, 1, 3]], live_x[key][:, [0, 1, 3]], atol=1e-3)
    np.testing.assert_allclose(stored.x[order][:, [2, 4]], live_x[key][:, [2, 4]], atol=1e-3)
    np.testing.assert_allclose(np.sort(stored.y), np.sort(live_y), atol=1e-3)


def test_registry_that_is_down_is_reported_not_half_written(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the store's folder should be")
    folder = _folder(tmp_path / "v", QUALITY, "quality-1.1.0.npz")
    with pytest.raises(RegistryUnavailable, match="cannot open the registry"):
        ModelRegistry(f"sqlite:///{blocker}/mlflow.db").register(folder)


def test_versions_are_content_addressed_and_immutable(
    tmp_path: Path, registry: ModelRegistry
) -> None:
    first = registry.register(_folder(tmp_path / "a", QUALITY, "quality-1.1.0.npz"))
    again = registry.register(_folder(tmp_path / "b", QUALITY, "quality-1.1.0.npz"))
    assert again.number == first.number and first.status == "candidate"
    # Other bytes under the same manifest version: refused, the registered version unchanged.
    other = _folder(tmp_path / "c", LINEAR, "quality-1.0.0.npz")
    text = (other / LINEAR.name).read_text().replace('version = "1.0.0"', 'version = "1.1.0"')
    (other / LINEAR.name).write_text(text)
    with pytest.raises(VersionRefused, match="immutable"):
        registry.register(other)
    assert [v.number for v in registry.versions("quality")] == [first.number]
    assert first.sha256 == registry.get("quality", first.number).sha256


def test_tampered_model_is_not_registered(tmp_path: Path, registry: ModelRegistry) -> None:
    folder = _folder(tmp_path / "v", QUALITY, "quality-1.1.0.npz")
    blob = bytearray((folder / "quality.tflite").read_bytes())
    blob[64] ^= 1
    (folder / "quality.tflite").write_bytes(bytes(blob))
    with pytest.raises(VersionRefused, match="sha256 mismatch"):
        registry.register(folder)
    assert registry.versions() == []


def test_seeded_champion_and_every_stage_change_are_audited(
    make_lifecycle: Any, fleet: Any
) -> None:
    life = make_lifecycle()
    champ = life.seed_champion(QUALITY, fleet.group)
    assert champ.stages == {fleet.group: "champion"} and champ.status == "qualified"
    assert life.registry.holder("quality", fleet.group, "champion").number == champ.number
    trail = [(a["from"], a["to"]) for a in life.registry.audit("quality")]
    assert trail[0] == ("", "candidate") and trail[-1] == ("", "champion")


def test_window_without_realised_outcomes_is_deferred_and_nothing_registered(
    make_lifecycle: Any, fleet: Any
) -> None:
    life = make_lifecycle()
    life.seed_champion(QUALITY, fleet.group)
    before = life.registry.versions()
    with pytest.raises(DataUnavailable, match="deferred: 0 held-out rows"):
        life.retrain("quality", fleet.group, since_us=fleet.end_us + 1)
    assert life.registry.versions() == before


def test_database_that_is_down_defers_retraining(make_lifecycle: Any, fleet: Any) -> None:
    life = make_lifecycle(storage_url="postgresql://edgeos:none@127.0.0.1:1/nothing")
    with pytest.raises(DataUnavailable, match="receiver database"):
        life.retrain("quality", fleet.group)
    assert life.registry.versions() == []


def test_version_worse_than_champion_is_refused_and_never_published(
    tmp_path: Path, make_lifecycle: Any, fleet: Any
) -> None:
    repo = OtaRepository.init(tmp_path / "repo", tmp_path / "root-keys")
    life = make_lifecycle(ota_repo=repo.dir)
    champ = life.seed_champion(QUALITY, fleet.group)
    folder = _folder(tmp_path / "lin", LINEAR, "quality-1.0.0.npz")
    text = (folder / LINEAR.name).read_text().replace('version = "1.0.0"', 'version = "1.0.1"')
    (folder / LINEAR.name).write_text(text)
    (folder / "golden.npz").unlink()
    shutil.copy2(MODELS_DIR / "golden" / "quality-1.0.0.npz", folder / "golden.npz")
    worse = life.registry.register(folder)
    _, held_out = life.rows(fleet.group, until_us=fleet.drift_us)  # the old compound
    worse, report = life.gate(worse, fleet.group, replay=held_out)
    assert worse.status == "refused" and not report.passed
    assert any(r.startswith("accuracy:") for r in report.reasons)
    assert life.registry.gate_report(worse)["passed"] is False
    targets_before = repo.targets().version
    with pytest.raises(PublishRefused, match="refused"):
        life.publish(worse, fleet.group)
    assert repo.targets().version == targets_before
    assert life.registry.holder("quality", fleet.group, "champion").number == champ.number
