"""`edgeos install-service --root DIR` lays out a gateway the way an image build would."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def _install(root: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgeos.cli", "install-service", "--root", str(root), *extra],
        capture_output=True,
        text=True,
        check=False,
    )


def test_install_service_into_a_root(tmp_path: Path) -> None:
    template = tmp_path / "plant.toml"
    template.write_text('[device]\nid = "gw-1"\n')
    root = tmp_path / "rootfs"
    res = _install(root, "--config-template", str(template))
    assert res.returncode == 0, res.stderr
    units = root / "etc/systemd/system"
    assert (units / "edgeos.service").read_text().count("Type=notify") == 1
    assert (units / "multi-user.target.wants/edgeos.service").is_symlink()
    # The gateway installs nothing of the cloud: the receiver's unit ships with edgeos-cloud.
    assert sorted(p.name for p in units.glob("edgeos-receiver*")) == []
    config = root / "etc/edgeos/edgeos.toml"
    assert config.read_text() == template.read_text()
    assert (config.stat().st_mode & 0o777) == 0o640

    if shutil.which("systemd-sysusers") is None:
        pytest.skip("systemd-sysusers not installed: user creation not checked")
    passwd = (root / "etc/passwd").read_text()
    assert any(line.startswith("edgeos:") for line in passwd.splitlines())
    dialout = [g for g in (root / "etc/group").read_text().splitlines() if g.startswith("dialout:")]
    assert dialout and "edgeos" in dialout[0].split(":")[3].split(",")
    assert (root / "var/lib/edgeos/spool").is_dir()
    assert (root / "var/lib/edgeos/slots").is_dir()


def test_existing_plant_config_is_never_overwritten(tmp_path: Path) -> None:
    root = tmp_path / "rootfs"
    config = root / "etc/edgeos/edgeos.toml"
    config.parent.mkdir(parents=True)
    config.write_text("# the plant's own config\n")
    template = tmp_path / "t.toml"
    template.write_text('[device]\nid = "new"\n')
    res = _install(root, "--config-template", str(template), "--no-tools")
    assert res.returncode == 0, res.stderr
    assert config.read_text() == "# the plant's own config\n"
    assert "kept" in res.stdout
