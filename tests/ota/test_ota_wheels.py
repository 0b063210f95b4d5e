"""A full bundle's wheelhouse becomes the slot's site-packages, verified like every other file."""

from __future__ import annotations

import base64
import hashlib
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from edgeos.ota.install import verify_tree
from edgeos.ota.slots import SlotManager
from edgeos_protocol.bundle import BundleSources, build_bundle
from edgeos_protocol.outcome import InstallError, Reason
from edgeos_testing.ota import HARDWARE, STUB_PACKAGE, write_stub_runtime


def _wheel(house: Path, name: str, version: str, body: str) -> Path:
    """A real (pure-Python) wheel, written by hand: package, METADATA, WHEEL, RECORD."""
    house.mkdir(parents=True, exist_ok=True)
    dist = f"{name}-{version}.dist-info"
    files = {
        f"{name}/__init__.py": body.encode(),
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
        f"{dist}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
        b"Tag: py3-none-any\n",
    }
    record = []
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    record.append(f"{dist}/RECORD,,")
    files[f"{dist}/RECORD"] = ("\n".join(record) + "\n").encode()
    out = house / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(out, "w") as zf:
        for path, data in files.items():
            zf.writestr(path, data)
    return out


def _bundle(tmp_path: Path, version: str, house: Path) -> Path:
    src = tmp_path / f"src-{version}"
    write_stub_runtime(src / "pkgs", version=version)
    sources = BundleSources(packages=[src / "pkgs" / STUB_PACKAGE], wheelhouse=house)
    return build_bundle("full", version, HARDWARE, sources, tmp_path / "dist", entry=STUB_PACKAGE)


def test_wheels_are_installed_into_the_slot_and_verified(tmp_path: Path) -> None:
    house = tmp_path / "house-1"
    _wheel(house, "plantlib", "1.0", "VERSION = '1.0'\n")
    slots = SlotManager(tmp_path / "slots", hardware=HARDWARE)
    result = slots.provision(_bundle(tmp_path, "1.0.0", house))
    site = result.path / "site-packages"
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = subprocess.run(
        [sys.executable, "-c", "import plantlib; print(plantlib.VERSION)"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    assert out.stdout.strip() == "1.0"
    manifest, problems = verify_tree(result.path)
    assert manifest is not None and problems == []

    # A dependency changed behind the installer's back is caught at boot.
    (site / "plantlib" / "__init__.py").write_text("VERSION = 'tampered'\n")
    _, problems = verify_tree(result.path)
    assert any("plantlib/__init__.py" in p for p in problems)


def test_a_wheel_that_does_not_install_leaves_the_slot_untouched(tmp_path: Path) -> None:
    good = tmp_path / "house-good"
    _wheel(good, "plantlib", "1.0", "VERSION = '1.0'\n")
    slots = SlotManager(tmp_path / "slots", hardware=HARDWARE)
    slots.provision(_bundle(tmp_path, "1.0.0", good))
    bad = tmp_path / "house-bad"
    bad.mkdir()
    (bad / "plantlib-2.0-py3-none-any.whl").write_bytes(b"not a zip file")
    before = slots.read_state()
    with pytest.raises(InstallError) as info:
        slots.install(_bundle(tmp_path, "1.1.0", bad))
    assert info.value.reason is Reason.MALFORMED
    assert "do not install" in info.value.detail
    after = slots.read_state()
    assert after.trial is None and after.active == before.active
    assert not slots.slot_path("b").exists()
