"""The model contract both products share lives in the protocol: features and manifests."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

import edgeos.inference.features as gateway_features
import edgeos_protocol.features as protocol_features
from edgeos.inference.errors import ModelRejected
from edgeos.inference.registry import find_manifests, load_manifest
from edgeos.inference.selfcheck import MODELS_DIR
from edgeos_protocol.manifest import ManifestError, contract_issues, parse_manifest, render_manifest

MANIFESTS = sorted(find_manifests(MODELS_DIR) + find_manifests(MODELS_DIR / "archive"))


def test_gateway_runs_the_protocols_feature_code() -> None:
    assert gateway_features.StationTracker is protocol_features.StationTracker
    assert gateway_features.QUALITY_FEATURES == protocol_features.QUALITY_FEATURES


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.stem)
def test_committed_manifests_meet_the_gateways_contract(path: Path) -> None:
    assert contract_issues(load_manifest(path)) == []


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.stem)
def test_rendered_manifest_parses_back_to_the_same_contract(path: Path) -> None:
    m = load_manifest(path)
    text = render_manifest(
        name=m.name,
        task=m.task,
        version=m.version,
        file=m.file.name,
        blob=m.file.read_bytes(),
        features=m.features,
        tags=m.tags,
        window=m.window,
        mean=m.mean,
        std=m.std,
        outputs=[(o.name, o.unit) for o in m.outputs],
        thresholds=m.thresholds,
        description=m.description,
        trained_with=m.trained_with,
        baseline=m.baseline,
    )
    again = parse_manifest(tomllib.loads(text), m.path)
    assert again == m


def test_gateway_rejection_is_also_the_protocols_manifest_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("schema = 2\n")
    with pytest.raises(ModelRejected) as info:
        load_manifest(bad)
    assert isinstance(info.value, ManifestError)
    assert "unsupported manifest schema" in info.value.reason


def test_manifest_with_other_features_breaks_the_contract() -> None:
    m = load_manifest(MODELS_DIR / "quality.toml")
    from dataclasses import replace

    wrong = replace(m, features=("cure.mean.heater.pv", "batch.mooney", "a", "b", "c"))
    issues = contract_issues(wrong)
    assert issues and "not the gateway's quality features" in issues[0]
