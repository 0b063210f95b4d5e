"""Bootstrap: a gateway added to a group is offered the group's profile at first contact."""

from __future__ import annotations

from pathlib import Path

from edgeos_cloud.fleet.bootstrap import Bootstrap
from edgeos_cloud.fleet.profiles import ProfileStore
from edgeos_cloud.fleet.rollout import Rollouts
from edgeos_cloud.ota.campaign import Campaign
from edgeos_cloud.ota.repository import OtaRepository
from edgeos_testing.fleetprofiles import (
    HW,
    StoredEvents,
    Tyre,
    pointer,
    profile,
    report,
    summary,
)


def _group_with_a_done_profile(tmp_path: Path) -> tuple[OtaRepository, Rollouts, str]:
    repo = OtaRepository.init(tmp_path / "repo", tmp_path / "offline-root-keys")
    store = ProfileStore(tmp_path / "fleet")
    store.record_summary(summary("gw-a"))
    rollouts = Rollouts(repo.dir, tmp_path / "fleet", store)
    r = rollouts.start_profile(
        "line-a",
        profile(1, setpoints={"nest01.heater.sp": 168.0}),
        members=["gw-a"],
        canaries=["gw-a"],
        hardware=HW,
        champion=None,
        now_us=1000,
    )
    Campaign(repo, r.campaign).record(report("gw-a", "gw-a", repo.published()[r.target]["version"]))
    # The judge wants min_tyres (20) on each side: the champion's 20 before the rollout.
    tyres = [Tyre(1 + i, 6.3, 6.3) for i in range(20)] + [
        Tyre(1000 + i, 6.5, 6.3) for i in range(20)
    ]
    assert rollouts.step(r.name, lambda d: tyres).status == "done"
    return repo, rollouts, r.target


def test_a_new_gateway_gets_the_groups_profile_at_first_contact(tmp_path: Path) -> None:
    repo, rollouts, target = _group_with_a_done_profile(tmp_path)
    boot = Bootstrap(rollouts)
    e = boot.enroll("gw-d", "line-a")
    assert e.state == "pending" and e.channel == "gw-d"
    assert pointer(repo, "gw-d", "config") is None  # not before its configuration is known
    events = StoredEvents()
    assert boot.step(events) == []
    events.add("gw-d", 5, {"type": "config_summary", "summary": summary("gw-d").model_dump()})
    [done] = boot.step(events)
    assert done.state == "done" and done.config == target
    assert pointer(repo, "gw-d", "config") == target


def test_a_new_gateway_whose_limits_do_not_fit_is_not_offered_the_profile(tmp_path: Path) -> None:
    repo, rollouts, _ = _group_with_a_done_profile(tmp_path)
    boot = Bootstrap(rollouts)
    boot.enroll("gw-e", "line-a", channel="gw-e-chan")
    events = StoredEvents()
    narrow = summary("gw-e", channel="gw-e-chan", heater_max=165.0).model_dump()
    events.add("gw-e", 5, {"type": "config_summary", "summary": narrow})
    [refused] = boot.step(events)
    assert refused.state == "refused" and "outside the hard limits" in refused.issues[0]
    assert pointer(repo, "gw-e-chan", "config") is None
