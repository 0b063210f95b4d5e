"""The competition rule: confident winners only, ties and thin evidence keep the champion,
and a line with easy rubber does not win by luck."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgeos_cloud.fleet.competition import CompetitionStore, compare, decide
from edgeos_cloud.fleet.config import CompetitionSettings
from edgeos_cloud.fleet.evidence import Tyre
from edgeos_cloud.fleet.physics.cure import expected_elasticity, lagged_optimum, reward

CHAMPION = "correction@1.0.0|press@1"
CHALLENGER = "correction@1.0.0|press@2"
EASY, HARD = -0.6, 1.5  # hidden batch property: the default recipe suits EASY rubber


def _tyres(
    policy: str, p: float, n: int, *, fix: float, device: str, rng: np.random.Generator
) -> list[Tyre]:
    """``n`` tyres of one material; the recipe moves ``fix`` of the way to the true optimum."""
    prop = p + rng.normal(0.0, 0.05, n)
    fresh = np.zeros(n)
    h_opt, p_opt = lagged_optimum(prop, fresh, np.full(n, 160.0), 40.0)
    heater = 160.0 + fix * (h_opt - 160.0)
    press = 15.0 + fix * (p_opt - 15.0)
    e = expected_elasticity(
        heater, press, batch_property=prop, fresh=fresh, pv0=heater, cycle_s=40.0
    ) + rng.normal(0.0, 0.06, n)
    r = reward(e)
    model, _, profile = policy.partition("|")
    mooney = 50.0 + 6.0 * prop
    return [
        Tyre(
            device,
            "nest01",
            i,
            model,
            profile,
            "learned",
            float(e[i]),
            float(r[i]),
            0.0,
            1,
            float(mooney[i]),
        )
        for i in range(n)
    ]


def test_a_better_policy_wins_with_its_bound_and_the_record_is_persisted(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    tyres = [
        *_tyres(CHAMPION, HARD, 150, fix=0.0, device="gw-a", rng=rng),
        *_tyres(CHAMPION, EASY, 150, fix=0.0, device="gw-a", rng=rng),
        *_tyres(CHALLENGER, HARD, 150, fix=0.8, device="gw-b", rng=rng),
        *_tyres(CHALLENGER, EASY, 150, fix=0.8, device="gw-b", rng=rng),
    ]
    with CompetitionStore(tmp_path / "competitions.db") as store:
        winner = decide("line-a", CHAMPION, tyres, CompetitionSettings(), store=store, now=5.0)
        assert winner is not None
        assert winner.winner == CHALLENGER and winner.task == "profile"
        assert winner.profile == "press@2" and winner.model is None
        assert winner.bound > 0.0 and winner.estimate > winner.bound
        assert winner.confidence > 0.95 and winner.strata == 2
        assert winner.evidence == {CHALLENGER: 300, CHAMPION: 300}
        (record,) = store.list("line-a")
        assert record.id == winner.competition_id and record.decision == "winner"
        assert record.bound == winner.bound and record.settings["confidence"] == 0.95


def test_too_little_evidence_keeps_the_champion_however_good_the_challenger_looks(
    tmp_path: Path,
) -> None:
    rng = np.random.default_rng(2)
    tyres = [
        *_tyres(CHAMPION, HARD, 40, fix=0.0, device="gw-a", rng=rng),
        *_tyres(CHALLENGER, HARD, 40, fix=1.0, device="gw-b", rng=rng),
    ]
    with CompetitionStore(tmp_path / "c.db") as store:
        assert decide("line-a", CHAMPION, tyres, store=store) is None
        (record,) = store.list()
    assert record.decision == "insufficient" and "too little evidence" in record.reason
    assert record.estimate is not None and record.estimate > 0.5  # it did look good


def test_a_tie_keeps_the_champion() -> None:
    rng = np.random.default_rng(3)
    tyres = [
        *_tyres(CHAMPION, HARD, 300, fix=0.5, device="gw-a", rng=rng),
        *_tyres(CHAMPION, EASY, 300, fix=0.5, device="gw-a", rng=rng),
        *_tyres(CHALLENGER, HARD, 300, fix=0.5, device="gw-b", rng=rng),
        *_tyres(CHALLENGER, EASY, 300, fix=0.5, device="gw-b", rng=rng),
    ]
    settings = CompetitionSettings(margin=0.02)
    assert decide("line-a", CHAMPION, tyres, settings) is None
    assert decide("line-a", CHALLENGER, tyres, settings) is None


def test_stratified_rule_is_not_fooled_by_a_line_with_easy_rubber() -> None:
    """The challenger is better on every rubber, but ran mostly on hard rubber while the
    champion's line happened to get easy rubber: the raw means say the opposite."""
    rng = np.random.default_rng(4)
    tyres = [
        *_tyres(CHALLENGER, HARD, 400, fix=0.6, device="gw-hard", rng=rng),
        *_tyres(CHALLENGER, EASY, 60, fix=0.6, device="gw-hard", rng=rng),
        *_tyres(CHAMPION, EASY, 400, fix=0.0, device="gw-easy", rng=rng),
        *_tyres(CHAMPION, HARD, 60, fix=0.0, device="gw-easy", rng=rng),
    ]
    by = {
        k: [(f"{t.mooney // 3}", t.reward) for t in tyres if t.policy == k]
        for k in (CHAMPION, CHALLENGER)
    }
    unstratified = compare(
        [("all", r) for _, r in by[CHALLENGER]], [("all", r) for _, r in by[CHAMPION]]
    )
    assert unstratified.bound < unstratified.estimate < -0.2  # would crown the champion
    winner = decide("line-a", CHAMPION, tyres)
    assert winner is not None and winner.winner == CHALLENGER
    # Nor is the champion declared better than the challenger the other way round.
    assert decide("line-a", CHALLENGER, tyres) is None


def test_several_challengers_share_the_error_budget_and_the_best_bound_wins() -> None:
    rng = np.random.default_rng(5)
    third = "correction@1.1.0|press@1"
    tyres = [
        *_tyres(CHAMPION, HARD, 200, fix=0.0, device="gw-a", rng=rng),
        *_tyres(CHAMPION, EASY, 200, fix=0.0, device="gw-a", rng=rng),
        *_tyres(CHALLENGER, HARD, 200, fix=0.4, device="gw-b", rng=rng),
        *_tyres(CHALLENGER, EASY, 200, fix=0.4, device="gw-b", rng=rng),
        *_tyres(third, HARD, 200, fix=0.9, device="gw-c", rng=rng),
        *_tyres(third, EASY, 200, fix=0.9, device="gw-c", rng=rng),
    ]
    winner = decide("line-a", CHAMPION, tyres)
    assert winner is not None and winner.winner == third
    assert winner.task == "correction" and winner.model == "correction@1.1.0"
    assert winner.profile is None
