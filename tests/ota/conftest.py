"""Fixtures for the OTA suite: stub releases, a real TUF repository, a provisioned device."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from edgeos.ota.slots import SlotManager
from edgeos_cloud.ota.repository import OtaRepository, RepoServer, serving
from edgeos_protocol.bundle import BundleKind, BundleSources, build_bundle
from edgeos_testing.ota import (
    HARDWARE,
    STUB_PACKAGE,
    Behaviour,
    Device,
    MakeRelease,
    write_stub_runtime,
)


@pytest.fixture
def make_release(tmp_path: Path) -> MakeRelease:
    """Build a bundle of the stub runtime: ``make_release("1.1.0", behaviour="crash")``."""

    def make(
        version: str,
        *,
        behaviour: Behaviour = "healthy",
        hardware: str = HARDWARE,
        kind: BundleKind = "full",
        compress: bool = True,
    ) -> Path:
        src = tmp_path / "src" / f"{kind}-{version}-{behaviour}-{hardware}"
        if not src.exists():
            write_stub_runtime(src / "pkgs", version=version, behaviour=behaviour)
            (src / "config").mkdir(parents=True)
            (src / "config" / "edgeos.toml").write_text(f"# config for {version}\n")
            (src / "models").mkdir()
            (src / "models" / "scrap.tflite").write_bytes(version.encode() * 100)
        sources = BundleSources(
            packages=[src / "pkgs" / STUB_PACKAGE],
            config=src / "config",
            models=src / "models",
        )
        return build_bundle(
            kind,
            version,
            hardware,
            sources,
            tmp_path / "dist" / f"{behaviour}",
            compress=compress,
            entry=STUB_PACKAGE if kind == "full" else None,
        )

    return make


@pytest.fixture
def repo(tmp_path: Path) -> OtaRepository:
    return OtaRepository.init(tmp_path / "repo", tmp_path / "offline-root-keys")


@pytest.fixture
def server(repo: OtaRepository) -> Iterator[RepoServer]:
    with serving(repo.dir) as srv:
        yield srv


@pytest.fixture
def device(tmp_path: Path, repo: OtaRepository, make_release: MakeRelease) -> Device:
    """A gateway provisioned with 1.0.0 in slot a and the repository's root installed."""
    root = tmp_path / "device" / "slots"
    slots = SlotManager(root, hardware=HARDWARE)
    slots.provision(make_release("1.0.0"))
    trusted = tmp_path / "device" / "root.json"
    trusted.write_bytes(repo.trusted_root())
    return Device(slots, trusted, root)
