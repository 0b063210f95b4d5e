"""Fleet evidence from a real receiver database: tyres, policies, strata, the leaderboard."""

from __future__ import annotations

from typing import Any

from edgeos_cloud.fleet.evidence import leaderboard, load_tyres, tyres_of_device
from edgeos_cloud.receiver.storage import open_storage


def test_every_settled_tyre_is_attributed_to_its_policy_batch_and_verdict(
    fleet_db: Any,
) -> None:
    storage = open_storage(fleet_db.storage_url)
    try:
        for device, profile in fleet_db.profiles.items():
            tyres = tyres_of_device(storage, device)
            assert len(tyres) == fleet_db.settled[device] > 50
            assert {t.policy for t in tyres} == {f"correction@1.0.0|{profile}"}
            assert all(t.batch is not None and t.mooney is not None for t in tyres)
            assert sum(t.verdict is not None for t in tyres) > 0.9 * len(tyres)
            assert {t.quality_model for t in tyres} == {"quality@1.1.0"}
            for t in tyres:
                assert t.reward == 6.6 - abs(t.elasticity - 6.6)
                if t.action == "default":
                    assert t.default_reward == t.reward
            assert {t.action for t in tyres} == {"default", "learned"}
        gw_c = tyres_of_device(storage, "gw-c")
        assert {t.profile for t in gw_c} <= {"-"}
    finally:
        storage.close()


def test_leaderboard_has_one_row_per_policy_with_strata_and_gate_error(
    fleet_db: Any,
) -> None:
    storage = open_storage(fleet_db.storage_url)
    try:
        tyres = load_tyres(storage, ["gw-a", "gw-b"])
    finally:
        storage.close()
    rows = leaderboard("line-a", tyres)
    assert [r.profile for r in sorted(rows, key=lambda r: r.profile)] == ["press-a@1", "press-b@2"]
    for row in rows:
        assert row.tyres == fleet_db.settled[row.devices[0]]
        assert sum(row.strata.values()) == row.tyres
        assert row.gate_error is not None and 0.0 < row.gate_error < 0.5
        assert 0.0 <= (row.scrap_rate or 0.0) <= 1.0
        assert 0.5 < row.learned_share < 1.0
        assert row.batches >= 2
        doc = row.as_dict()
        assert doc["policy"] == row.policy and doc["model"] == "correction@1.0.0"
    assert rows[0].adjusted_reward >= rows[1].adjusted_reward
