"""Rollout of a winner: canary first on a real TUF repository, halt and roll back when worse."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgeos_cloud.fleet.profiles import ProfileStore
from edgeos_cloud.fleet.rollout import CanaryEvidence, RolloutRefused, Rollouts, judge
from edgeos_cloud.ota.campaign import Campaign
from edgeos_cloud.ota.repository import OtaRepository
from edgeos_testing.fleetprofiles import HW, Tyre, pointer, profile, report, summary

T0 = 1_000_000


def test_judge_waits_for_tyres_then_calls_healthy_or_worse() -> None:
    before = [6.4] * 30
    assert judge([CanaryEvidence("a", before, [6.5] * 5, [6.3] * 5, 0.005)]).verdict == "wait"
    ok = judge([CanaryEvidence("a", before, [6.5] * 20, [6.3] * 20, 0.005)])
    assert ok.verdict == "healthy"
    worse = judge([CanaryEvidence("a", before, [6.2] * 20, [6.1] * 20, 0.005)])
    assert worse.verdict == "worse" and "champion 6.400" in worse.reason


def test_a_broken_alpha_budget_halts_before_enough_tyres() -> None:
    j = judge([CanaryEvidence("a", [6.4] * 30, [5.0, 5.0], [6.5, 6.5], 0.005)])
    assert j.verdict == "worse" and "α budget broken" in j.reason


def _setup(tmp_path: Path, repo: OtaRepository) -> tuple[Rollouts, ProfileStore]:
    store = ProfileStore(tmp_path / "fleet")
    for dev in ("gw-a", "gw-b", "gw-c"):
        store.record_summary(summary(dev))
    return Rollouts(repo.dir, tmp_path / "fleet", store), store


def _champion_and_winner(rollouts: Rollouts) -> tuple[object, object]:
    champion = profile(1, setpoints={"nest01.heater.sp": 160.0})
    rollouts.store.put(champion)
    winner = profile(2, setpoints={"nest01.heater.sp": 168.0})
    return champion, winner


@pytest.fixture
def repo(tmp_path: Path) -> OtaRepository:
    return OtaRepository.init(tmp_path / "repo", tmp_path / "offline-root-keys")


def test_profile_winner_reaches_the_canary_first_then_the_group(
    tmp_path: Path, repo: OtaRepository
) -> None:
    rollouts, _ = _setup(tmp_path, repo)
    champion, winner = _champion_and_winner(rollouts)
    r = rollouts.start_profile(
        "line-a",
        winner,
        members=["gw-a", "gw-b", "gw-c"],
        canaries=["gw-b"],
        hardware=HW,
        champion=champion,
        now_us=T0,  # type: ignore[arg-type]
    )
    assert pointer(repo, "gw-b", "config") == r.target
    assert pointer(repo, "gw-a", "config") is None and pointer(repo, "gw-c", "config") is None

    before = [Tyre(T0 - 1000 - i, 6.3, 6.3) for i in range(25)]
    after = [Tyre(T0 + i, 6.5, 6.3) for i in range(25)]
    tyres = {"gw-b": before + after, "gw-a": before + after, "gw-c": before + after}
    # Healthy tyres but no committed trial yet: a config bundle waits for the commit.
    assert rollouts.step(r.name, lambda d: tyres[d]).status == "canary"
    version = Campaign(repo, r.campaign).load()["version"]
    Campaign(repo, r.campaign).record(report("gw-b", "gw-b", version))
    assert rollouts.step(r.name, lambda d: tyres[d]).status == "group"
    assert pointer(repo, "gw-a", "config") == r.target == pointer(repo, "gw-c", "config")
    for dev in ("gw-a", "gw-c"):
        Campaign(repo, r.campaign).record(report(dev, dev, version))
    done = rollouts.step(r.name, lambda d: tyres[d])
    assert done.status == "done" and rollouts.current("line-a") == {"config": r.target}
    assert [x.name for x in rollouts.all()] == [r.name]


def test_a_winner_worse_on_the_canary_halts_and_rolls_back_as_a_new_version(
    tmp_path: Path, repo: OtaRepository
) -> None:
    rollouts, store = _setup(tmp_path, repo)
    champion, winner = _champion_and_winner(rollouts)
    r = rollouts.start_profile(
        "line-a",
        winner,
        members=["gw-a", "gw-b", "gw-c"],
        canaries=["gw-b"],
        hardware=HW,
        champion=champion,
        now_us=T0,  # type: ignore[arg-type]
    )
    before = [Tyre(T0 - 1000 - i, 6.4, 6.4) for i in range(25)]
    after = [Tyre(T0 + i, 6.1, 6.0) for i in range(25)]
    halted = rollouts.step(r.name, lambda d: before + after)
    assert halted.status == "halted" and "champion 6.400" in halted.reason
    assert Campaign(repo, r.campaign).summary()["status"] == "halted"
    # The canary's channel now points at the champion again, under a higher version.
    assert halted.rollback_target is not None and halted.rollback_target != r.target
    assert pointer(repo, "gw-b", "config") == halted.rollback_target
    assert pointer(repo, "gw-a", "config") is None  # the group never saw the winner
    again = store.latest("line-a")
    assert again is not None and again.version == 3
    assert again.tunables_digest() == store.version("line-a", 1).tunables_digest()
    published = repo.published()
    assert int(published[halted.rollback_target]["version"]) > int(published[r.target]["version"])


def test_a_canarys_tyres_count_for_the_winner_only_once_it_runs_the_profile(
    tmp_path: Path, repo: OtaRepository
) -> None:
    """Between the rollout's start and the canary's restart into the trial slot, its tyres are
    still its champion's (here: a fresh batch's poor first tyres); they do not judge the winner."""
    from edgeos_cloud.fleet.evidence import Tyre as FleetTyre

    rollouts, _ = _setup(tmp_path, repo)
    champion, winner = _champion_and_winner(rollouts)
    r = rollouts.start_profile(
        "line-a", winner, members=["gw-a", "gw-b", "gw-c"], canaries=["gw-b"], hardware=HW,
        champion=champion, now_us=T0,  # type: ignore[arg-type]
    )  # fmt: skip

    def tyre(ts: int, reward: float, profile: str) -> FleetTyre:
        return FleetTyre("gw-b", "nest01", ts, "m@1", profile, "default", reward, reward, reward)

    old, new = "line-a@1", f"{winner.name}@{winner.version}"  # type: ignore[attr-defined]
    tyres = [tyre(T0 - 1000 - i, 5.2, old) for i in range(20)]
    tyres += [tyre(T0 + i, 4.0, old) for i in range(3)]  # before the restart: not the winner's
    tyres += [tyre(T0 + 10 + i, 5.8, new) for i in range(3)]
    (ev,) = rollouts.evidence(rollouts.load(r.name), lambda d: tyres, ["gw-b"])
    assert list(ev.after) == [5.8, 5.8, 5.8] and len(ev.before) == 23
    version = Campaign(repo, r.campaign).load()["version"]
    Campaign(repo, r.campaign).record(report("gw-b", "gw-b", version))
    assert rollouts.step(r.name, lambda d: tyres, min_tyres=3).status == "group"


def test_a_rolled_back_trial_on_the_canary_halts_the_rollout(
    tmp_path: Path, repo: OtaRepository
) -> None:
    rollouts, _ = _setup(tmp_path, repo)
    champion, winner = _champion_and_winner(rollouts)
    r = rollouts.start_profile(
        "line-a",
        winner,
        members=["gw-a", "gw-b"],
        canaries=["gw-b"],
        hardware=HW,
        champion=champion,
        now_us=T0,  # type: ignore[arg-type]
    )
    version = Campaign(repo, r.campaign).load()["version"]
    Campaign(repo, r.campaign).record(report("gw-b", "gw-b", version, "rolled_back"))
    halted = rollouts.step(r.name, lambda d: [])
    assert halted.status == "halted" and "campaign halted" in halted.reason
    assert pointer(repo, "gw-a", "config") is None


def test_a_profile_beyond_a_members_hard_limits_starts_no_rollout(
    tmp_path: Path, repo: OtaRepository
) -> None:
    rollouts, store = _setup(tmp_path, repo)
    store.record_summary(summary("gw-c", heater_max=165.0))
    _, winner = _champion_and_winner(rollouts)
    with pytest.raises(RolloutRefused, match="gw-c"):
        rollouts.start_profile(
            "line-a",
            winner,
            members=["gw-a", "gw-b", "gw-c"],
            canaries=["gw-b"],  # type: ignore[arg-type]
            hardware=HW,
            champion=None,
            now_us=T0,
        )
    assert not repo.published() and not rollouts.all()


def test_a_canary_sharing_its_channel_with_the_group_is_refused(
    tmp_path: Path, repo: OtaRepository
) -> None:
    rollouts, store = _setup(tmp_path, repo)
    for dev in ("gw-a", "gw-b"):
        store.record_summary(summary(dev, channel="line-a"))
    with pytest.raises(RolloutRefused, match="give each canary an \\[ota\\] group of its own"):
        rollouts.start_model(
            "line-a",
            winner="quality@1.2.0",
            champion="quality@1.1.0",
            target="x",
            members=["gw-a", "gw-b"],
            canaries=["gw-b"],
            hardware=HW,
            now_us=T0,
        )
