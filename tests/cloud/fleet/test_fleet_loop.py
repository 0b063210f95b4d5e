"""The fleet loop's step on a real receiver database and a real TUF repository."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgeos_cloud.fleet.competition import CompetitionStore, Winner
from edgeos_cloud.fleet.config import CompetitionSettings, FleetConfig
from edgeos_cloud.fleet.groups import GroupDirectory
from edgeos_cloud.fleet.loop import run_once, start_rollout
from edgeos_cloud.fleet.rollout import Rollouts
from edgeos_cloud.ota.campaign import Campaign
from edgeos_cloud.ota.repository import OtaRepository
from edgeos_cloud.receiver.storage import open_storage
from edgeos_testing.fleetprofiles import HW, pointer, profile, summary


def _config(tmp_path: Path, url: str, **competition: object) -> FleetConfig:
    OtaRepository.init(tmp_path / "repo", tmp_path / "offline-root-keys")
    return FleetConfig(
        home=tmp_path / "fleet",
        storage_url=url,
        ota_repo=tmp_path / "repo",
        competition=CompetitionSettings.model_validate(competition),
    )


def test_run_once_keeps_the_champion_on_too_little_evidence_and_records_why(
    fleet_db: object, tmp_path: Path
) -> None:
    config = _config(tmp_path, fleet_db.storage_url, min_tyres=1_000_000)  # type: ignore[attr-defined]
    storage = open_storage(config.storage_url)
    try:
        group = GroupDirectory(storage, config).group_of("gw-a")
        assert group is not None
        step = run_once(config, storage, group, champion="-|press-a@1")
    finally:
        storage.close()
    assert step.action == "no-winner" and step.rollout is None
    with CompetitionStore(config.home / "competitions.db") as store:
        records = store.list(group)
    assert records and {r.decision for r in records} == {"insufficient"}
    assert records[-1].reason == step.reason
    assert Rollouts(tmp_path / "repo", config.home).all() == []


def test_a_profile_winner_goes_to_the_canary_first_and_the_next_step_watches_it(
    fleet_db: object, tmp_path: Path
) -> None:
    config = _config(tmp_path, fleet_db.storage_url)  # type: ignore[attr-defined]
    assert config.ota_repo is not None
    rollouts = Rollouts(config.ota_repo, config.home)
    for device in ("gw-a", "gw-b"):
        rollouts.store.record_summary(summary(device))
    champion = profile(1, setpoints={"nest01.heater.sp": 160.0})
    winning = profile(2, setpoints={"nest01.heater.sp": 164.5})
    rollouts.store.put(champion)
    rollouts.store.put(winning)
    storage = open_storage(config.storage_url)
    try:
        group = GroupDirectory(storage, config).group_of("gw-a")
        assert group is not None
        winner = Winner(
            group, "profile", "-|line-a@2", "-|line-a@1", None, "line-a@2",
            0.4, 0.1, 0.99, {"-|line-a@2": 300, "-|line-a@1": 300}, 3,
        )  # fmt: skip
        r = start_rollout(
            rollouts, winner, members=["gw-a", "gw-b"], canaries=["gw-b"], hardware=HW,
            now_us=2_000_000_000_000_000,
        )  # fmt: skip
        assert r.kind == "profile" and r.champion == "line-a@1" and r.status == "canary"
        assert pointer(rollouts.repo, "gw-b", "config") == r.target
        assert pointer(rollouts.repo, "gw-a", "config") is None  # the group waits
        stages = Campaign(rollouts.repo, r.campaign).load()["stages"]
        assert [s["name"] for s in stages] == ["canary", "group"]
        # A rollout in flight: the next step watches it (no tyres since it started: waits).
        step = run_once(config, storage, group, champion="-|line-a@1")
    finally:
        storage.close()
    assert step.action == "watched" and step.rollout is not None
    assert step.rollout["name"] == r.name and step.rollout["status"] == "canary"
    assert not (config.home / "competitions.db").exists()  # nothing decided meanwhile


def test_cli_run_once_and_rollouts_json_show_the_step_and_the_records(
    fleet_db: object, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from edgeos_cloud.cli import main

    OtaRepository.init(tmp_path / "repo", tmp_path / "offline-root-keys")
    path = tmp_path / "cloud.toml"
    path.write_text(
        f'[fleet]\nhome = "fleet"\nota_repo = "repo"\n'
        f'storage_url = "{fleet_db.storage_url}"\n'  # type: ignore[attr-defined]
        "[fleet.competition]\nmin_tyres = 1000000\n"
    )
    storage = open_storage(fleet_db.storage_url)  # type: ignore[attr-defined]
    try:
        group = GroupDirectory(storage, None).group_of("gw-a")
    finally:
        storage.close()
    assert group is not None
    base = ["fleet", "--config", str(path)]
    argv = [*base, "--json", "run-once", "--group", group, "--champion=-|press-a@1"]
    assert main(argv) == 0
    step = json.loads(capsys.readouterr().out)
    assert step["action"] == "no-winner" and step["group"] == group
    assert main([*base, "rollouts", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []


def test_a_canary_spending_slack_it_earned_before_the_rollout_is_not_halted() -> None:
    from edgeos_cloud.fleet.rollout import CanaryEvidence, judge

    # Two tyres since the rollout lose 0.04 to the default: alone that breaks (1 − α) Σd,
    # but the gateway's guard spent slack earned on its 30 earlier tyres (the e2e's halt).
    before, before_default = [6.5] * 30, [6.3] * 30
    after, after_default = [6.51, 6.52], [6.55, 6.56]
    windowed = judge([CanaryEvidence("b", before, after, after_default, 0.005)], min_tyres=2)
    assert windowed.verdict == "worse" and "since the rollout" in windowed.reason
    kept = judge(
        [CanaryEvidence("b", before, after, after_default, 0.005, before_default)], min_tyres=2
    )
    assert kept.verdict == "healthy", kept.reason
    broke = judge(
        [CanaryEvidence("b", before, [1.0, 1.0], after_default, 0.005, before_default)],
        min_tyres=2,
    )
    assert broke.verdict == "worse" and "over its history" in broke.reason
