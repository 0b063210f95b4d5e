"""A receiver database holding a small fleet: real gateway engines (committed models, guard on)
on simulated lines, every sample and event written through the receiver's real ingest path."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from edgeos.config import GuardConfig
from edgeos.inference.engine import InferenceEngine
from edgeos.inference.selfcheck import MODELS_DIR
from edgeos_protocol.features import KEY_SUFFIXES
from edgeos_protocol.fleet import PROFILE_EVENT, fingerprint_of, fingerprint_report
from edgeos_protocol.manifest import load_manifest
from edgeos_sim.simline import FleetRecorder, SimClock, SimLine

WALL = 1_700_000_000.0
MANIFESTS = [
    MODELS_DIR / "anomaly.toml",
    MODELS_DIR / "correction.toml",
    MODELS_DIR / "quality.toml",
]


def line_fingerprint(hardware: str = "rpi4-aarch64") -> dict[str, Any]:
    """The fingerprint report a gateway on a simulated line sends."""
    manifests = [load_manifest(m) for m in MANIFESTS]
    fp = fingerprint_of(templates={"press": KEY_SUFFIXES}, manifests=manifests, hardware=hardware)
    return fingerprint_report(fp, ts=WALL + 0.5, versions={m.task: m.key for m in manifests})


@dataclass(frozen=True)
class FleetDb:
    storage_url: str
    registry_dir: Path
    devices: tuple[str, ...]
    #: guard_settled events written per device.
    settled: dict[str, int]
    profiles: dict[str, str]


def record_gateway(
    url: str,
    registry: Path,
    device: str,
    *,
    seed: int,
    seconds: int,
    nests: int = 6,
    profile: str | None = None,
    hardware: str = "rpi4-aarch64",
) -> int:
    """A gateway engine with the guard on; returns the guard_settled events it produced."""
    line = SimLine(nests, seed=seed)
    engine = InferenceEngine.from_manifests(
        MANIFESTS,
        line.stations,
        line.tag_configs(),
        guard=GuardConfig(enabled=True, alpha=0.05),
        clock=SimClock(line, WALL),
    )
    recorder = FleetRecorder(url, registry, device, line.stations, wall_offset=WALL)
    first: list[dict[str, Any]] = [line_fingerprint(hardware)]
    if profile is not None:
        first.append({"type": PROFILE_EVENT, "profile": profile, "ts": WALL + 0.5})
    settled = 0
    try:
        line.step()
        recorder.add(line.now, line.sample(), first)
        for _ in range(seconds):
            line.step()
            values = line.sample()
            out = engine.step(values)
            line.apply(out.writes)
            settled += sum(e["type"] == "guard_settled" for e in out.events)
            recorder.add(line.now, values, list(out.events))
    finally:
        recorder.close()
    return settled


@pytest.fixture(scope="session")
def fleet_db(tmp_path_factory: pytest.TempPathFactory) -> FleetDb:
    directory = tmp_path_factory.mktemp("fleetdb")
    url = f"sqlite:///{directory / 'receiver.db'}"
    registry = directory / "registry"
    profiles = {"gw-a": "press-a@1", "gw-b": "press-b@2"}
    settled = {
        device: record_gateway(
            url, registry, device, seed=seed, seconds=900, profile=profiles[device]
        )
        for device, seed in (("gw-a", 3), ("gw-b", 4))
    }
    # A third gateway on other hardware: comparable to neither.
    settled["gw-c"] = record_gateway(
        url, registry, "gw-c", seed=5, seconds=60, hardware="jetson-orin"
    )
    return FleetDb(url, registry, ("gw-a", "gw-b", "gw-c"), settled, profiles)


@pytest.fixture
def fingerprint_report_of() -> Any:
    """``(hardware) → the fingerprint report`` a gateway on a simulated line sends."""
    return line_fingerprint


@pytest.fixture
def record() -> Any:
    """:func:`record_gateway`: one more gateway into a receiver database."""
    return record_gateway


@pytest.fixture
def manifests() -> list[Path]:
    return list(MANIFESTS)
