"""Rollout of a winner: canary first on a real TUF repository, halt and roll back when worse."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from edgeos_cloud.fleet.evidence import Tyre as FleetTyre
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


# --------------------------------------------------------------------------- the canary judge
# A canary's tyres from the line physics (the twin plays a line tyre by tyre: batches with their
# lab Mooney, a fresh batch's hotter-start need, noise) on the new rubber of the profile e2e test.
# The rollout starts at a batch change, so the canary's first tyres under the winner are a fresh
# batch's.

NESTS = 4
CYCLE_US = 6_000_000


def _canary_tyres(
    winner: Any, *, seed: int, after_cycles: int, champion_recipe: Any = None
) -> list[FleetTyre]:
    from edgeos_cloud.fleet.twinsim import Candidate, TwinParams, TwinSimulator

    twin = TwinSimulator(
        TwinParams(material_mean=1.5, material_std=0.15, mooney_offset=20.0, cycle_s=6.0),
        nests=NESTS,
        seed=seed,
    )
    cycles = 120
    m = twin.materials(cycles)
    starts = [k for k in range(1, cycles) if m.batch[k] != m.batch[k - 1]]
    k0 = [k for k in starts if k + after_cycles <= cycles][-1]
    champion = twin.run(champion_recipe or Candidate.default(), cycles).rewards
    under_winner = twin.run(winner, cycles).rewards
    out = []
    for k in range(k0 + after_cycles):
        after = k >= k0
        for j in range(NESTS):
            r = float((under_winner if after else champion)[k, j])
            out.append(
                FleetTyre(
                    "gw-b", f"nest{j + 1:02d}", T0 + (k - k0) * CYCLE_US + j, "correction@1.0.0",
                    WINNER if after else "line-a@1", "default", 0.0, r, r,
                    batch=int(m.batch[k]), mooney=float(m.mooney[k]),
                )
            )  # fmt: skip
    return out


WINNER = "line-a@2"


def _start(rollouts: Rollouts) -> Any:
    champion, winner = _champion_and_winner(rollouts)
    return rollouts.start_profile(
        "line-a", winner, members=["gw-a", "gw-b", "gw-c"], canaries=["gw-b"], hardware=HW,
        champion=champion, now_us=T0,  # type: ignore[arg-type]
    )  # fmt: skip


def _commit(repo: OtaRepository, r: Any, *devices: str) -> None:
    version = Campaign(repo, r.campaign).load()["version"]
    for device in devices:
        Campaign(repo, r.campaign).record(report(device, device, version))


def test_a_fresh_batch_under_the_winner_does_not_halt_a_canary_that_is_as_good(
    tmp_path: Path, repo: OtaRepository
) -> None:
    """The winner is the champion's recipe: the canary's first tyres under it are a fresh
    batch's, which the old unpaired means took for a worse winner; fresh tyres are compared
    with the champion's fresh tyres, batch by batch, and the rollout goes on."""
    from edgeos_cloud.fleet.twinsim import Candidate

    rollouts, _ = _setup(tmp_path, repo)
    r = _start(rollouts)
    tyres = _canary_tyres(Candidate.default(), seed=12, after_cycles=14)
    (ev,) = rollouts.evidence(rollouts.load(r.name), lambda d: tyres, ["gw-b"])
    # What the unpaired judge compared: the winner looks a third of an MPa worse.
    assert sum(ev.after) / len(ev.after) < sum(ev.before) / len(ev.before) - 0.3
    assert {s.split("/")[1] for s in ev.after_strata or ()} == {"fresh", "settled"}
    _commit(repo, r, "gw-b")
    stepped = rollouts.step(r.name, lambda d: tyres, min_tyres=8, max_tyres=1000)
    assert stepped.status == "group", stepped.reason
    (canary,) = stepped.judgement["canaries"]  # type: ignore[index]
    assert canary["verdict"] == "healthy" and canary["unit"] == "batch"
    assert canary["dimensions"] == ["material", "freshness"] and not canary["at_bound"]
    assert canary["upper_bound"] >= 0.0 and canary["naive"] < -0.3
    # The record and `edgeos-cloud fleet rollouts` carry the judgement.
    assert rollouts.load(r.name).judgement == stepped.judgement


def test_a_genuinely_worse_winner_halts_with_stated_confidence_and_rolls_back(
    tmp_path: Path, repo: OtaRepository
) -> None:
    """A colder start (155 °C) on the same batches: worse in every shared stratum."""
    from edgeos_cloud.fleet.twinsim import Candidate

    rollouts, store = _setup(tmp_path, repo)
    r = _start(rollouts)
    tyres = _canary_tyres(Candidate("cold", {"heater.sp": 155.0}), seed=12, after_cycles=14)
    halted = rollouts.step(r.name, lambda d: tyres, min_tyres=8, max_tyres=1000)
    assert halted.status == "halted" and "upper 95% bound" in halted.reason
    (canary,) = halted.judgement["canaries"]  # type: ignore[index]
    assert canary["verdict"] == "worse" and canary["p_worse"] > 0.95
    assert canary["upper_bound"] < 0.0 and canary["unit"] == "batch"
    assert pointer(repo, "gw-b", "config") == halted.rollback_target != r.target
    assert pointer(repo, "gw-a", "config") is None
    again = store.latest("line-a")
    assert (
        again is not None
        and again.tunables_digest() == store.version("line-a", 1).tunables_digest()
    )


def test_thin_evidence_waits_then_the_wait_bound_decides(
    tmp_path: Path, repo: OtaRepository
) -> None:
    """Under the winner (a colder start) the canary has run one batch so far: one batch is no
    sample of batches, so the judge waits — and says why — however many tyres of it arrive,
    until the wait bound; there it decides on tyres: worse, halted and rolled back."""
    from edgeos_cloud.fleet.twinsim import Candidate

    rollouts, _ = _setup(tmp_path, repo)
    r = _start(rollouts)
    _commit(repo, r, "gw-b")
    cold = Candidate("cold", {"heater.sp": 155.0})
    for cycles in (3, 7):  # 12 and 28 tyres under the winner, one batch
        tyres = _canary_tyres(cold, seed=12, after_cycles=cycles)
        waiting = rollouts.step(r.name, lambda d, t=tyres: t, min_tyres=8, max_tyres=40)
        assert waiting.status == "canary" and waiting.judgement is not None
        assert waiting.judgement["verdict"] == "wait"
        assert "too little comparable evidence" in waiting.judgement["reason"]
    at_bound = _canary_tyres(cold, seed=12, after_cycles=10)  # 40 tyres: the bound
    decided = rollouts.step(r.name, lambda d: at_bound, min_tyres=8, max_tyres=40)
    assert decided.status == "halted" and "at the wait bound (40 tyres)" in decided.reason
    (canary,) = decided.judgement["canaries"]  # type: ignore[index]
    assert canary["at_bound"] and canary["unit"] == "tyre" and canary["verdict"] == "worse"
    assert pointer(repo, "gw-b", "config") == decided.rollback_target


def test_without_comparable_champion_tyres_the_bound_decides_on_the_alpha_budget() -> None:
    """A canary with almost no history: it waits, and at the bound its α budget decides."""
    thin = CanaryEvidence("a", [6.4] * 3, [6.3] * 10, [6.3] * 10, 0.005, [6.4] * 3)
    assert judge([thin], min_tyres=8, max_tyres=20).verdict == "wait"
    long = CanaryEvidence("a", [6.4] * 3, [6.3] * 20, [6.3] * 20, 0.005, [6.4] * 3)
    decided = judge([long], min_tyres=8, max_tyres=20)
    assert decided.verdict == "healthy" and "without comparable champion evidence" in decided.reason
