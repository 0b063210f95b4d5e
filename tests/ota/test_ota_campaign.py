"""Campaigns: staged groups, sealed device reports over HTTP, halting on the failure rate."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from edgeos_cloud.ota.campaign import Campaign, Stage
from edgeos_cloud.ota.reports import ReportIntake
from edgeos_cloud.ota.repository import OtaRepository, serving
from edgeos_cloud.receiver.registry import DeviceRegistry
from edgeos_protocol.control import ControlKind, seal_control
from edgeos_protocol.crypto import Keyring
from edgeos_testing.ota import Device, MakeRelease

_counter = itertools.count(1_000)


@pytest.fixture
def registry(tmp_path: Path) -> DeviceRegistry:
    """The receiver's device registry: the keys reports are authenticated with."""
    return DeviceRegistry(tmp_path / "registry")


@pytest.fixture
def intake(repo: OtaRepository, registry: DeviceRegistry) -> ReportIntake:
    return ReportIntake(repo.dir, registry.key_for)


def keyring_of(registry: DeviceRegistry, device: str) -> Keyring:
    record = registry.get(device) or registry.add(device)
    return Keyring.of(record.current_key)


def sealed_report(
    registry: DeviceRegistry,
    device: str,
    group: str,
    outcome: str,
    version: str = "1.1.0",
    reason: str | None = None,
    *,
    sealed_by: str | None = None,
) -> bytes:
    """A report as a gateway sends it, sealed under ``sealed_by``'s (default: its own) key."""
    signer = sealed_by or device
    ring = keyring_of(registry, signer)
    doc = {"device": device, "group": group, "outcome": outcome, "version": version}
    doc["reason"] = reason  # type: ignore[assignment]
    return seal_control(
        ControlKind.OTA_REPORT, doc, ring.current, signer, next(_counter), key_id=ring.current_id
    )


def _report(
    registry: DeviceRegistry,
    intake: ReportIntake,
    device: str,
    group: str,
    outcome: str,
    version: str = "1.1.0",
    reason: str | None = None,
) -> list[str]:
    return intake.accept(sealed_report(registry, device, group, outcome, version, reason))


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
    repo: OtaRepository,
    campaign: Campaign,
    device: Device,
    registry: DeviceRegistry,
    intake: ReportIntake,
) -> None:
    ring = keyring_of(registry, "gw-1")
    with serving(repo.dir, on_report=intake.accept) as srv:
        wave_client = device.client(srv.url, group="wave1")
        assert wave_client.find("full") is None
        campaign.start()
        assert wave_client.find("full") is None  # only the canary group so far
        results = device.client(srv.url, group="canary").check_and_install(device.slots)
        assert results[0].status == "installed"
        device.slots.boot_check()
        device.slots.commit()
        assert device.client(srv.url, group="canary").report_outcome(device.slots, "gw-1", ring)
        assert not device.client(srv.url, group="canary").report_outcome(device.slots, "gw-1", ring)

        summary = campaign.summary()
        assert summary["devices"]["gw-1"]["outcome"] == "committed"
        assert campaign.advance() == "running"
        offer = wave_client.find("full")
        assert offer is not None and offer.version == "1.1.0"

    with pytest.raises(RuntimeError, match="needs 2"):
        campaign.advance()
    for name in ("gw-2", "gw-3", "gw-4", "gw-5"):
        _report(registry, intake, name, "wave1", "committed")
    _report(registry, intake, "gw-6", "wave1", "rolled_back", reason="crash_loop")
    assert campaign.summary()["status"] == "running"  # 1 of 5 = 20 % ≤ 25 %
    assert campaign.advance() == "running"
    _report(registry, intake, "gw-7", "default", "committed")
    assert campaign.advance() == "done"


def test_failure_rate_halts_the_campaign(
    repo: OtaRepository, campaign: Campaign, registry: DeviceRegistry, intake: ReportIntake
) -> None:
    campaign.start()
    _report(registry, intake, "gw-1", "canary", "rolled_back", reason="health")
    summary = campaign.summary()
    assert summary["status"] == "halted"
    assert "canary" in summary["halted_reason"]
    assert summary["devices"]["gw-1"]["reason"] == "health"
    with pytest.raises(RuntimeError, match="halted"):
        campaign.advance()
    # wave1 never got a channel pointer.
    assert not any(p.startswith("channels/wave1/") for p in repo.targets().targets)


def test_reports_for_other_versions_are_not_counted(
    campaign: Campaign, registry: DeviceRegistry, intake: ReportIntake
) -> None:
    campaign.start()
    assert not _report(registry, intake, "gw-1", "canary", "rolled_back", version="0.9")
    assert _report(
        registry, intake, "gw-1", "canary", "rejected", version="full:1.1.0", reason="hash_mismatch"
    )
    assert campaign.summary()["status"] == "halted"


def test_stage_parsing_and_bad_input(repo: OtaRepository, tmp_path: Path) -> None:
    assert Stage.parse("canary:canary:0:1") == Stage("canary", ("canary",), 0.0, 1)
    assert Stage.parse("all:a,b") == Stage("all", ("a", "b"), 0.1, 1)
    with pytest.raises(ValueError):
        Stage.parse("nogroups")
    with pytest.raises(KeyError):
        Campaign.create(repo, "x", "bundles/none", [Stage("s", ("g",))])
