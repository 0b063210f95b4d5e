"""Cloud profiles: content-addressed store, summaries from stored events, validation first."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgeos_cloud.fleet.profiles import ProfilesRefused, ProfileStore, build_profile_bundle
from edgeos_protocol.bundle import extract_bundle
from edgeos_protocol.profile import PROFILE_FILE, parse_profile
from edgeos_testing.fleetprofiles import HW, StoredEvents, profile, summary


def test_profiles_are_stored_by_content_address_and_versions_are_immutable(
    tmp_path: Path,
) -> None:
    store = ProfileStore(tmp_path)
    p1 = profile(1, guard={"alpha": 0.004})
    digest = store.put(p1)
    assert store.get(digest) == p1 and store.version("line-a", 1) == p1
    assert store.put(p1) == digest
    with pytest.raises(ValueError, match="already stored with other content"):
        store.put(profile(1, guard={"alpha": 0.003}))
    p2 = profile(2, scan_periods={"fast": 200.0})
    store.put(p2)
    assert store.latest("line-a") == p2 and store.next_version("line-a") == 3
    assert [c.path for c in store.diff(digest, p2.digest())] == ["guard.alpha", "scan_periods.fast"]


def test_the_latest_reported_summary_is_kept_and_a_summary_for_another_device_ignored(
    tmp_path: Path,
) -> None:
    store = ProfileStore(tmp_path)
    events = StoredEvents()
    events.add("gw-a", 10, {"type": "config_summary", "summary": summary("gw-a").model_dump()})
    events.add("gw-a", 20, {"type": "verdict", "station": "nest01"})
    newer = summary("gw-a", heater_max=190.0).model_dump()
    events.add("gw-a", 30, {"type": "config_summary", "summary": newer})
    events.add("gw-b", 10, {"type": "config_summary", "summary": summary("gw-a").model_dump()})
    assert store.refresh_summaries(events, ["gw-a", "gw-b"]) == ["gw-a"]
    got = store.summary("gw-a")
    assert got is not None and got.tags["nest01.heater.sp"].limits is not None
    assert got.tags["nest01.heater.sp"].limits.max == 190.0
    assert store.summary("gw-b") is None
    assert store.refresh_summaries(events, ["gw-a"]) == []  # nothing newer


def test_a_profile_beyond_any_targets_hard_limits_never_leaves_the_cloud(tmp_path: Path) -> None:
    store = ProfileStore(tmp_path)
    store.record_summary(summary("gw-a"))
    store.record_summary(summary("gw-b", heater_max=170.0))
    hot = profile(3, setpoints={"nest01.heater.sp": 180.0})
    with pytest.raises(ProfilesRefused) as refused:
        build_profile_bundle(
            store, hot, ["gw-a", "gw-b", "gw-new"], hardware=HW, version="1", out_dir=tmp_path
        )
    assert set(refused.value.issues) == {"gw-b", "gw-new"}
    assert "outside the hard limits [120.0, 170.0]" in str(refused.value)
    assert "no config_summary" in str(refused.value)
    assert store.latest("line-a") is None  # nothing stored, nothing built
    assert not list(tmp_path.glob("*.tar*"))


def test_a_fitting_profile_becomes_a_config_bundle_holding_it(tmp_path: Path) -> None:
    store = ProfileStore(tmp_path)
    store.record_summary(summary("gw-a"))
    fit = profile(3, setpoints={"nest01.heater.sp": 165.0}, guard={"alpha": 0.004})
    bundle = build_profile_bundle(
        store, fit, ["gw-a"], hardware=HW, version="7", out_dir=tmp_path / "dist"
    )
    manifest = extract_bundle(bundle, tmp_path / "x")
    assert manifest.kind == "config" and manifest.version == "7"
    assert parse_profile((tmp_path / "x" / PROFILE_FILE).read_bytes()) == fit
    assert store.latest("line-a") == fit
