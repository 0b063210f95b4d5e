"""The image's root-slot handlers (images/qemu/rootfs/usr/lib/edgeos/image): an install cut off
by a power loss is found at the next boot and recorded once, and the boot attempt is read from
grub's environment block."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[2]
IMAGE = REPO / "images/qemu/rootfs/usr/lib/edgeos/image"


@pytest.fixture
def judge(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    spec = importlib.util.spec_from_file_location("edgeos_image_mark_good", IMAGE / "mark-good.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "STATE", tmp_path / "rauc")
    monkeypatch.setattr(module, "GRUBENV", tmp_path / "grubenv")
    return module


def pre_install(state: Path, source: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """Run the pre-install handler with the environment RAUC gives system handlers."""
    return subprocess.run(
        ["sh", str(IMAGE / "rauc-pre-install")],
        env={
            "PATH": os.environ["PATH"],
            "EDGEOS_RAUC_STATE": str(state),
            "RAUC_UPDATE_SOURCE": str(source),
            "RAUC_TARGET_SLOTS": "1 2",
            "RAUC_SLOT_CLASS_1": "rootfs",
            "RAUC_SLOT_BOOTNAME_1": "A",
            "RAUC_SLOT_CLASS_2": "appfs",
            "RAUC_SLOT_BOOTNAME_2": "",
            **env,
        },
        capture_output=True,
        text=True,
        check=False,
    )


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    source = tmp_path / "bundle"
    source.mkdir()
    (source / "manifest.raucm").write_text(
        "[update]\ncompatible=edgeos-qemu-arm64\nversion=2.0.0\n\n[image.rootfs]\nfilename=r.ext4\n"
    )
    return source


def test_an_install_cut_off_before_post_install_is_recorded_once_with_its_slot_and_version(
    judge: ModuleType, bundle: Path
) -> None:
    assert pre_install(judge.STATE, bundle).returncode == 0
    # Power cut: the post-install handler never ran. Next boot, on the committed slot B:
    assert judge.note_interrupted("B") == "A"
    outcome = json.loads((judge.STATE / "last-outcome.json").read_text())
    assert outcome["outcome"] == "install_interrupted"
    assert (outcome["slot"], outcome["booted"], outcome["version"]) == ("A", "B", "2.0.0")
    assert outcome["started_at"]
    # The boot after that has nothing new to say, and keeps the record.
    assert judge.note_interrupted("B") is None
    assert json.loads((judge.STATE / "last-outcome.json").read_text()) == outcome


def test_no_marker_means_no_interrupted_install(judge: ModuleType) -> None:
    assert judge.note_interrupted("B") is None
    assert not (judge.STATE / "last-outcome.json").exists()


def test_a_marker_torn_by_the_power_cut_still_counts_as_an_interrupted_install(
    judge: ModuleType,
) -> None:
    judge.STATE.mkdir()
    (judge.STATE / "installing").write_text('{"slot": "A", "sta')
    assert judge.note_interrupted("B") == "other"
    assert json.loads((judge.STATE / "last-outcome.json").read_text())["slot"] == "other"


def test_the_pre_install_handler_never_fails_the_install_when_it_cannot_write(
    tmp_path: Path, bundle: Path
) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    done = pre_install(blocker / "rauc", bundle)
    assert done.returncode == 0
    assert "could not record the install" in done.stderr


def test_the_boot_attempt_is_read_from_the_grub_environment_block(judge: ModuleType) -> None:
    body = b"# GRUB Environment Block\nORDER=B A\nA_OK=0\nA_TRY=0\nB_OK=1\nB_TRY=2\n"
    judge.GRUBENV.write_bytes(body + b"#" * (1024 - len(body)))
    env = judge.grubenv()
    assert (env["ORDER"], env["B_TRY"], env["A_OK"]) == ("B A", "2", "0")
    judge.GRUBENV.unlink()
    assert judge.grubenv() == {}
