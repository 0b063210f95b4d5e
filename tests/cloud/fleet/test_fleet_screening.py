"""The fleet loop screens a combination of two profile winners in the group's twin simulator
before any line runs it: on a real receiver database (three simulated lines on a new rubber,
each running its profile's recipe), real SQLite competition and profile stores, a real TUF
repository and the real twin — calibrated from the stored tyres, or given."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgeos_cloud.fleet.competition import CompetitionStore
from edgeos_cloud.fleet.config import CompetitionSettings, FleetConfig
from edgeos_cloud.fleet.groups import GroupDirectory
from edgeos_cloud.fleet.loop import LoopStep, run_once
from edgeos_cloud.fleet.rollout import Rollouts
from edgeos_cloud.fleet.twinsim import TwinParams, TwinSimulator
from edgeos_cloud.ota.repository import OtaRepository
from edgeos_cloud.receiver.storage import open_storage
from edgeos_protocol.fleet import PROFILE_EVENT
from edgeos_protocol.profile import (
    Bounds,
    GuardSummary,
    Profile,
    TagSummary,
    TargetSummary,
    parse_profile,
)
from edgeos_sim.simline import FleetRecorder, SimLine
from edgeos_testing.fleetprofiles import HW, pointer

from .conftest import WALL, line_fingerprint

NESTS = 8
SECONDS = 1800
FAMILY = "press-line"
#: line → (seed, profile version, heater °C, pressure bar). C runs the champion (the plant's
#: recipe, written out); A found a hotter start, B a higher pressure.
LINES = {
    "gw-a": (11, 2, 165.0, 15.0),
    "gw-b": (12, 3, 160.0, 16.2),
    "gw-c": (13, 1, 160.0, 15.0),
}
MODEL = "correction@1.0.0"  # every line runs the committed correction model
CHAMPION = f"{MODEL}|{FAMILY}@1"


def _profile(version: int, heater: float, press: float) -> Profile:
    setpoints = {}
    for n in range(1, NESTS + 1):
        setpoints[f"nest{n:02d}.heater.sp"] = heater
        setpoints[f"nest{n:02d}.press.sp"] = press
    return parse_profile({"name": FAMILY, "version": version, "tunables": {"setpoints": setpoints}})


def _summary(device: str, *, press_max: float | None = None) -> TargetSummary:
    """The ``config_summary`` of a gateway on the simulated line (hard limits: its layout's)."""
    tags = {}
    for name, cfg in SimLine(NESTS).tag_configs().items():
        hi = cfg.limits.max
        if press_max is not None and name.endswith(".press.sp"):
            hi = press_max
        tags[name] = TagSummary(writable=True, limits=Bounds(min=cfg.limits.min, max=hi))
    return TargetSummary(
        device=device,
        hardware=HW,
        ota_group=device,
        tags=tags,
        scan_groups={"default": 1000.0},
        guard=GuardSummary(enabled=True, alpha_max=0.005),
        supports=("setpoints",),
    )


def _record_profile_line(
    url: str, registry: Path, device: str, *, seed: int, version: int, heater: float, press: float
) -> int:
    """A line on the new rubber (hidden batch property ~ N(1.5, 0.5²)) running a profile's
    recipe on every nest; each finished tyre is reported as the gateway's guard reports it (a
    ``guard_decision`` with the profile's recipe as the default, then ``guard_settled`` with
    the measured modulus), with every sample, through the receiver's ingest path."""
    line = SimLine(NESTS, seed=seed)
    line.physics.material_mean, line.physics.material_std = 1.5, 0.5
    line.physics.new_batch()
    line.set_recipe(np.full(NESTS, heater), np.full(NESTS, press), np.arange(1, NESTS + 1))
    recorder = FleetRecorder(url, registry, device, line.stations, wall_offset=WALL)
    first = [
        line_fingerprint(HW),
        {"type": PROFILE_EVENT, "profile": f"{FAMILY}@{version}", "ts": WALL + 0.5},
    ]
    seen = len(line.physics.cycles)
    settled = 0
    try:
        line.step()
        recorder.add(line.now, line.sample(), first)
        for _ in range(SECONDS):
            line.step()
            events: list[dict[str, Any]] = []
            cycles = line.physics.cycles
            while seen < len(cycles):
                tyre = cycles[seen]
                seen += 1
                station = line.stations[tyre.nest - 1]
                ts = WALL + line.now
                events.append(
                    {
                        "type": "guard_decision",
                        "station": station,
                        "action": "default",
                        "default_upper": 0.0,
                        "ts": ts - 0.002,
                    }
                )
                events.append(
                    {
                        "type": "guard_settled",
                        "station": station,
                        "elasticity": float(tyre.elasticity),
                        "in_force": True,
                        "ts": ts - 0.001,
                    }
                )
                settled += 1
            recorder.add(line.now, line.sample(), events)
    finally:
        recorder.close()
    return settled


@dataclass(frozen=True)
class RubberFleet:
    storage_url: str
    group: str
    settled: dict[str, int]


@pytest.fixture(scope="module")
def rubber_fleet(tmp_path_factory: pytest.TempPathFactory) -> RubberFleet:
    directory = tmp_path_factory.mktemp("rubberfleet")
    url = f"sqlite:///{directory / 'receiver.db'}"
    settled = {
        device: _record_profile_line(
            url, directory / "registry", device, seed=seed, version=v, heater=h, press=p
        )
        for device, (seed, v, h, p) in LINES.items()
    }
    storage = open_storage(url)
    try:
        group = GroupDirectory(storage, None).group_of("gw-a")
    finally:
        storage.close()
    assert group is not None
    return RubberFleet(url, group, settled)


def _config(tmp_path: Path, url: str) -> FleetConfig:
    OtaRepository.init(tmp_path / "repo", tmp_path / "offline-root-keys")
    return FleetConfig(
        home=tmp_path / "fleet",
        storage_url=url,
        ota_repo=tmp_path / "repo",
        competition=CompetitionSettings(min_tyres=100),
    )


def _rollouts(config: FleetConfig, *, press_max_on_c: float | None = None) -> Rollouts:
    assert config.ota_repo is not None
    rollouts = Rollouts(config.ota_repo, config.home)
    for device in LINES:
        limit = press_max_on_c if device == "gw-c" else None
        rollouts.store.record_summary(_summary(device, press_max=limit))
    for _, version, heater, press in LINES.values():
        rollouts.store.put(_profile(version, heater, press))
    return rollouts


def _step(config: FleetConfig, group: str, twin: TwinSimulator | None = None) -> LoopStep:
    storage = open_storage(config.storage_url)
    try:
        return run_once(config, storage, group, champion=CHAMPION, twin=twin)
    finally:
        storage.close()


def test_two_winners_with_orthogonal_set_point_changes_roll_out_their_combination_when_the_calibrated_twin_says_it_is_better(
    rubber_fleet: RubberFleet, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _config(tmp_path, rubber_fleet.storage_url)
    rollouts = _rollouts(config)
    step = _step(config, rubber_fleet.group)  # the twin is calibrated from the stored tyres

    assert step.action == "started", step.reason
    assert step.screening is not None and step.winner is not None
    screening = step.screening
    assert screening["task"] == "combination" and screening["decision"] == "combined"
    details = screening["screening"]
    # Both single profiles won on the lines; each changes one set-point of the champion.
    assert {details["winner"], details["partner"]} == {f"{FAMILY}@2", f"{FAMILY}@3"}
    assert details["changes"] == {
        f"{FAMILY}@2": {"heater.sp": 165.0},
        f"{FAMILY}@3": {"press.sp": 16.2},
    } or details["changes"] == {
        f"{FAMILY}@3": {"press.sp": 16.2},
        f"{FAMILY}@2": {"heater.sp": 165.0},
    }
    # The twin was fitted on the group's tyres: the new rubber's material, not the defaults.
    assert details["twin_params"]["material_mean"] == pytest.approx(1.5, abs=0.3)
    # Screened against both winners, the champion and the plant default, with its bound.
    names = [r["candidate"] for r in details["results"]]
    assert names[0] == "default" and f"{FAMILY}@1" in names and len(names) == 5
    assert details["combined_better"] and screening["bound"] > 0.0
    assert screening["estimate"] > screening["bound"]

    # What goes out is a new version of the family with both changes, on every nest.
    assert step.winner["profile"] == f"{FAMILY}@4" == details["rolled_out"]
    combined = rollouts.store.version(FAMILY, 4)
    sp = combined.tunables.setpoints
    assert {sp[f"nest{n:02d}.heater.sp"] for n in range(1, NESTS + 1)} == {165.0}
    assert {sp[f"nest{n:02d}.press.sp"] for n in range(1, NESTS + 1)} == {16.2}
    assert step.rollout is not None and step.rollout["winner"] == f"{FAMILY}@4"
    assert step.rollout["kind"] == "profile" and step.rollout["champion"] == f"{FAMILY}@1"
    # Canary first: the first line not running the winner gets it; the others wait.
    canary = step.rollout["canaries"][0]
    assert pointer(rollouts.repo, canary, "config") == step.rollout["target"]
    assert all(pointer(rollouts.repo, d, "config") is None for d in LINES if d != canary)

    with CompetitionStore(config.home / "competitions.db") as store:
        records = store.list(rubber_fleet.group)
    rule = [r for r in records if r.task == "profile"]
    assert {r.decision for r in rule} == {"winner"} and len(rule) == 2
    (recorded,) = [r for r in records if r.task == "combination"]
    assert recorded.id == screening["id"] == step.winner["competition_id"]
    assert recorded.challenger == f"{MODEL}|{details['winner']}+{details['partner']}"
    assert recorded.screening is not None
    assert set(recorded.screening["competitions"]) == {r.id for r in rule}

    # The CLI shows it (JSON and text) and the metrics export it.
    from edgeos_cloud.cli import main

    path = tmp_path / "cloud.toml"
    path.write_text(
        f'[fleet]\nhome = "fleet"\nota_repo = "repo"\nstorage_url = "{config.storage_url}"\n'
    )
    base = ["fleet", "--config", str(path)]
    assert main([*base, "--json", "competitions", "--group", rubber_fleet.group]) == 0
    listed = json.loads(capsys.readouterr().out)
    (shown,) = [c for c in listed if c["task"] == "combination"]
    assert shown["decision"] == "combined" and shown["screening"]["rolled_out"] == f"{FAMILY}@4"
    assert main([*base, "competitions"]) == 0
    text = capsys.readouterr().out
    assert "decision=combined" in text and "screened:" in text
    assert main([*base, "metrics"]) == 0
    metrics = capsys.readouterr().out
    g = rubber_fleet.group
    assert f'edgeos_fleet_screenings{{decision="combined",group="{g}"}} 1.0' in metrics
    assert f'edgeos_fleet_competitions{{decision="winner",group="{g}"}} 2.0' in metrics
    assert "edgeos_fleet_screening_lower_bound{" in metrics
    assert f'candidate="{FAMILY}@2+{FAMILY}@3"' in metrics or (
        f'candidate="{FAMILY}@3+{FAMILY}@2"' in metrics
    )


def test_a_combination_the_twin_says_is_worse_is_not_rolled_out_and_the_winner_is(
    rubber_fleet: RubberFleet, tmp_path: Path
) -> None:
    config = _config(tmp_path, rubber_fleet.storage_url)
    rollouts = _rollouts(config)
    # A twin of the plant's usual rubber, where the plant's recipe already suits: raising both
    # overshoots the modulus, and the twin says so.
    usual = TwinSimulator(TwinParams(), nests=20, seed=7)
    step = _step(config, rubber_fleet.group, twin=usual)

    assert step.action == "started", step.reason
    assert step.screening is not None and step.winner is not None and step.rollout is not None
    assert step.screening["decision"] == "single", step.screening["reason"]
    details = step.screening["screening"]
    assert not details["combined_better"] and step.screening["bound"] <= 0.0
    assert "not better than" in step.screening["reason"]
    # The rule's own winner goes out, not the combination, which was never stored.
    assert step.winner["profile"] == details["winner"] == details["rolled_out"]
    assert step.rollout["winner"] == details["winner"]
    assert rollouts.store.latest(FAMILY) is not None
    assert rollouts.store.latest(FAMILY).version == 3  # type: ignore[union-attr]


def test_a_combination_beyond_a_targets_hard_limits_is_refused_with_the_reason(
    rubber_fleet: RubberFleet, tmp_path: Path
) -> None:
    config = _config(tmp_path, rubber_fleet.storage_url)
    # Line C's bladder may not go above 16 bar: B's pressure (16.2, fine on line B) is not
    # allowed there, so neither is any combination carrying it.
    rollouts = _rollouts(config, press_max_on_c=16.0)
    step = _step(config, rubber_fleet.group, twin=TwinSimulator(TwinParams(1.5, 0.5)))

    assert step.screening is not None and step.winner is not None
    assert step.screening["decision"] == "refused"
    reason = step.screening["reason"]
    assert "gw-c" in reason and "press.sp" in reason and "hard limits [" in reason
    assert step.screening["estimate"] is None  # refused before the twin ran it
    assert "results" not in step.screening["screening"]
    assert rollouts.store.latest(FAMILY).version == 3  # type: ignore[union-attr]
    # The winner (line A's hotter start, the best bound on these seeds) fits every line and
    # goes out alone, through the same rollout path and its own validation.
    assert step.winner["profile"] == step.screening["screening"]["winner"] == f"{FAMILY}@2"
    assert step.action == "started" and step.rollout is not None
    assert step.rollout["winner"] == f"{FAMILY}@2"


def test_a_lone_profile_winner_is_rolled_out_without_a_screening(
    rubber_fleet: RubberFleet, tmp_path: Path
) -> None:
    config = _config(tmp_path, rubber_fleet.storage_url)
    _rollouts(config)
    storage = open_storage(config.storage_url)
    try:
        step = run_once(
            config,
            storage,
            rubber_fleet.group,
            champion=CHAMPION,
            challengers=[f"{MODEL}|{FAMILY}@2"],
            twin=TwinSimulator(TwinParams(1.5, 0.5)),
        )
    finally:
        storage.close()
    assert step.action == "started" and step.screening is None
    assert step.winner is not None and step.winner["profile"] == f"{FAMILY}@2"
    with CompetitionStore(config.home / "competitions.db") as store:
        assert {r.task for r in store.list()} == {"profile"}
