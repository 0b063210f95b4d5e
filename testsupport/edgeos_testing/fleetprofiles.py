"""Test helpers for fleet profiles, rollouts and bootstrap: summaries, stored events, channels."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from edgeos_cloud.ota.repository import OtaRepository
from edgeos_protocol.bundle import channel_path
from edgeos_protocol.profile import (
    Bounds,
    GuardSummary,
    Profile,
    TagSummary,
    TargetSummary,
    parse_profile,
)

HW = "rpi4-aarch64"


def summary(device: str, *, channel: str | None = None, heater_max: float = 200.0) -> TargetSummary:
    return TargetSummary(
        device=device,
        hardware=HW,
        ota_group=channel or device,
        tags={
            "nest01.heater.sp": TagSummary(
                writable=True, limits=Bounds(min=120, max=heater_max), scan_group="fast"
            ),
            "nest01.heater.pv": TagSummary(scan_group="fast", deadband=0.2),
        },
        scan_groups={"default": 1000.0, "fast": 100.0},
        guard=GuardSummary(enabled=True, alpha_max=0.005),
        supports=("guard.alpha", "deadbands", "scan_periods", "setpoints"),
    )


def profile(version: int, **tunables: Any) -> Profile:
    return parse_profile({"name": "line-a", "version": version, "tunables": tunables})


class StoredEvents:
    """The receiver storage's ``events(device, since_us)`` over a list (a fake, not a mock)."""

    def __init__(self) -> None:
        self.rows: dict[str, list[dict[str, Any]]] = {}

    def add(self, device: str, ts_us: int, event: dict[str, Any]) -> None:
        self.rows.setdefault(device, []).append({"ts_us": ts_us, **event})

    def events(self, device: str, since_us: int | None = None) -> list[dict[str, Any]]:
        return [e for e in self.rows.get(device, []) if e["ts_us"] >= (since_us or 0)]


def pointer(repo: OtaRepository, channel: str, kind: str) -> str | None:
    """The bundle a channel points at (read back from the signed targets)."""
    path = channel_path(channel, HW, kind)
    info = repo.targets().targets.get(path)
    if info is None:
        return None
    directory, _, name = path.rpartition("/")
    data = (repo.targets_dir / directory / f"{info.hashes['sha256']}.{name}").read_bytes()
    target: str = json.loads(data)["target"]
    return target


@dataclass(frozen=True)
class Tyre:
    """What the rollout reads of a fleet-evidence tyre."""

    ts_us: int
    reward: float
    default_reward: float


def report(device: str, channel: str, version: str, outcome: str = "committed") -> Any:
    """An OTA outcome as :class:`ReportIntake` would hand it over after authenticating it."""
    from edgeos_cloud.ota.reports import DeviceReport

    return DeviceReport(device, channel, HW, outcome, version, None, "", None, 1, 1)
