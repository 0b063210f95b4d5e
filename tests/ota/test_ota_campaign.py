"""Campaigns: staged groups, device reports over HTTP, halting on the failure rate."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgeos_cloud.ota.campaign import Campaign, Stage, record_report
from edgeos_cloud.ota.repository import OtaRepository, serving
from edgeos_testing.ota import Device, MakeRelease


def _report(
    device: str, group: str, outcome: str, version: str = "1.1.0", reason: str | None = None
) -> dict[str, str | None]:
    return {
        "device": device,
        "group": group,
        "outcome": outcome,
        "version": version,
        "reason": reason,
    }


@pytest.fixture
def campaign(repo: OtaRepository, make_release: MakeRelease) -> Campaign:
    published = repo.publish(make_release("1.1.0"))
    return Campaign.create(
        repo,
        "r1",
        published.target_path,
        [
            Stage("canary", ("canary",), max_failure_rate=0.0, min_reports=1),
            Stage("ten-percent", ("wave1",), max_failure_rate=0.25, min_reports=2),
            Stage("all", ("default",), max_failure_rate=0.1, min_reports=1),
        ],
    )


def test_stages_advance_and_devices_follow(
    repo: OtaRepository, campaign: Campaign, device: Device
) -> None:
    with serving(repo.dir, on_report=lambda r: record_report(repo.dir, r)) as srv:
        wave_client = device.client(srv.url, group="wave1")
        assert wave_client.find("full") is None
        campaign.start()
        assert wave_client.find("full") is None  # only the canary group so far
        results = device.client(srv.url, group="canary").check_and_install(device.slots)
        assert results[0].status == "installed"
        device.slots.boot_check()
        device.slots.commit()
        assert device.client(srv.url, group="canary").report_outcome(device.slots, "gw-1")
        assert not device.client(srv.url, group="canary").report_outcome(device.slots, "gw-1")

        summary = campaign.summary()
        assert summary["devices"]["gw-1"]["outcome"] == "committed"
        assert campaign.advance() == "running"
        offer = wave_client.find("full")
        assert offer is not None and offer.version == "1.1.0"

    with pytest.raises(RuntimeError, match="needs 2"):
        campaign.advance()
    for name in ("gw-2", "gw-3", "gw-4", "gw-5"):
        campaign.record(_report(name, "wave1", "committed"))
    campaign.record(_report("gw-6", "wave1", "rolled_back", reason="crash_loop"))
    assert campaign.summary()["status"] == "running"  # 1 of 5 = 20 % ≤ 25 %
    assert campaign.advance() == "running"
    campaign.record(_report("gw-7", "default", "committed"))
    assert campaign.advance() == "done"


def test_failure_rate_halts_the_campaign(repo: OtaRepository, campaign: Campaign) -> None:
    campaign.start()
    campaign.record(_report("gw-1", "canary", "rolled_back", reason="health"))
    summary = campaign.summary()
    assert summary["status"] == "halted"
    assert "canary" in summary["halted_reason"]
    assert summary["devices"]["gw-1"]["reason"] == "health"
    with pytest.raises(RuntimeError, match="halted"):
        campaign.advance()
    # wave1 never got a channel pointer.
    assert not any(p.startswith("channels/wave1/") for p in repo.targets().targets)


def test_reports_for_other_versions_are_not_counted(campaign: Campaign) -> None:
    campaign.start()
    assert not campaign.record(_report("gw-1", "canary", "rolled_back", version="0.9"))
    assert campaign.record(
        _report("gw-1", "canary", "rejected", version="full:1.1.0", reason="hash_mismatch")
    )
    assert campaign.summary()["status"] == "halted"


def test_stage_parsing_and_bad_input(repo: OtaRepository, tmp_path: Path) -> None:
    assert Stage.parse("canary:canary:0:1") == Stage("canary", ("canary",), 0.0, 1)
    assert Stage.parse("all:a,b") == Stage("all", ("a", "b"), 0.1, 1)
    with pytest.raises(ValueError):
        Stage.parse("nogroups")
    with pytest.raises(KeyError):
        Campaign.create(repo, "x", "bundles/none", [Stage("s", ("g",))])
