"""Fingerprints and similarity groups: the protocol's pure function, overrides, the receiver DB."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from edgeos.inference.selfcheck import MODELS_DIR
from edgeos_cloud.fleet.config import FleetConfig, load_fleet_config, parse_fleet_config
from edgeos_cloud.fleet.groups import GroupDirectory
from edgeos_protocol.errors import ConfigError
from edgeos_protocol.features import KEY_SUFFIXES
from edgeos_protocol.fleet import (
    FingerprintError,
    fingerprint_of,
    fingerprint_report,
    parse_fingerprint_report,
)
from edgeos_protocol.manifest import load_manifest

MANIFEST_LIST = [
    load_manifest(MODELS_DIR / f"{t}.toml") for t in ("anomaly", "correction", "quality")
]


def test_fingerprint_ignores_tag_order_instance_counts_and_model_versions() -> None:
    a = fingerprint_of(templates={"press": KEY_SUFFIXES}, manifests=MANIFEST_LIST, hardware="hw")
    b = fingerprint_of(
        templates={"press": list(reversed(KEY_SUFFIXES)) * 2},
        manifests=list(reversed(MANIFEST_LIST)),
        hardware="hw",
    )
    assert a.key == b.key and a.key.startswith("fp-")
    assert a.tasks == ("anomaly", "correction", "quality")
    # A new version of a model with the same input contract stays comparable.
    quality = next(m for m in MANIFEST_LIST if m.task == "quality")
    newer = fingerprint_of(
        templates={"press": KEY_SUFFIXES},
        manifests=[
            m if m.task != "quality" else replace(quality, version="9.9.9") for m in MANIFEST_LIST
        ],
        hardware="hw",
    )
    assert newer.key == a.key


def test_fingerprint_changes_with_hardware_tags_or_input_contract() -> None:
    base = fingerprint_of(templates={"press": KEY_SUFFIXES}, manifests=MANIFEST_LIST, hardware="hw")
    other_hw = fingerprint_of(
        templates={"press": KEY_SUFFIXES}, manifests=MANIFEST_LIST, hardware="jetson"
    )
    fewer_tags = fingerprint_of(
        templates={"press": KEY_SUFFIXES[:-1]}, manifests=MANIFEST_LIST, hardware="hw"
    )
    no_correction = fingerprint_of(
        templates={"press": KEY_SUFFIXES},
        manifests=[m for m in MANIFEST_LIST if m.task != "correction"],
        hardware="hw",
    )
    keys = {base.key, other_hw.key, fewer_tags.key, no_correction.key}
    assert len(keys) == 4


def test_fingerprint_report_round_trips_and_refuses_tampering_or_unknown_schema(
    fingerprint_report_of: Any,
) -> None:
    report = fingerprint_report_of()
    fp = parse_fingerprint_report(report)
    assert fp.key == report["key"]
    assert report["versions"]["correction"] == "correction@1.0.0"
    with pytest.raises(FingerprintError, match="does not match"):
        parse_fingerprint_report({**report, "hardware": "jetson"})
    with pytest.raises(FingerprintError, match="schema"):
        parse_fingerprint_report({**report, "schema": 2})
    with pytest.raises(FingerprintError, match="templates"):
        parse_fingerprint_report({**report, "templates": ["press"], "key": None})
    assert fingerprint_report(fp, ts=1.0)["key"] == fp.key


def test_gateways_with_the_same_fingerprint_share_a_group_from_their_first_report(
    fleet_db: Any, fingerprint_report_of: Any
) -> None:
    directory = GroupDirectory.from_url(fleet_db.storage_url)
    key = parse_fingerprint_report(fingerprint_report_of()).key
    assert directory.group_of("gw-a") == directory.group_of("gw-b") == key
    assert directory.members(key) == ["gw-a", "gw-b"]
    other = directory.group_of("gw-c")
    assert other is not None and other != key
    assert directory.group_of("gw-unknown") is None
    info = {g.name: g for g in directory.groups()}[key]
    assert info.source == "fingerprint" and info.hardware == ("rpi4-aarch64",)
    assert info.tasks == ("anomaly", "correction", "quality")


def test_config_names_a_fingerprint_and_pins_devices_before_they_report(
    fleet_db: Any, fingerprint_report_of: Any
) -> None:
    key = parse_fingerprint_report(fingerprint_report_of()).key
    config = FleetConfig.model_validate(
        {
            "groups": {
                "line-a": {"fingerprints": [key], "devices": ["gw-new"]},
                "lab": {"devices": ["gw-b"]},
            }
        }
    )
    directory = GroupDirectory.from_url(fleet_db.storage_url, config)
    assert directory.members("line-a") == ["gw-a", "gw-new"]
    assert directory.group_of("gw-b") == "lab"  # pinned wins over its fingerprint
    assert {g.name: g.source for g in directory.groups()}["line-a"] == "config"


def test_fleet_config_errors_name_the_key_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        parse_fleet_config({"fleet": {"groups": {"line-a": {"devices": ["gw-1"], "colour": 1}}}})
    assert "fleet.groups.line-a.colour" in str(err.value)
    with pytest.raises(ConfigError) as err:
        parse_fleet_config({"fleet": {"competition": {"confidence": 1.5}}})
    assert "fleet.competition.confidence" in str(err.value)
    with pytest.raises(ConfigError, match="both groups"):
        parse_fleet_config(
            {"fleet": {"groups": {"a": {"devices": ["gw-1"]}, "b": {"devices": ["gw-1"]}}}}
        )
    path = tmp_path / "cloud.toml"
    path.write_text('[receiver]\nx = 1\n[fleet]\nhome = "fl"\n')
    assert load_fleet_config(path).home == tmp_path / "fl"
