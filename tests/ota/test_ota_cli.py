"""The CLI functions the console scripts delegate to, driven in-process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgeos.ota.cli import gateway_main
from edgeos_cloud.ota.cli import repo_main
from edgeos_cloud.ota.repository import serving
from edgeos_testing.ota import HARDWARE, write_stub_runtime


def test_build_publish_check_boot_commit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repo, keys, dist = tmp_path / "repo", tmp_path / "offline", tmp_path / "dist"
    assert repo_main(["ota", "init", "--repo", str(repo), "--root-keys", str(keys)]) == 0
    assert "root keys in" in capsys.readouterr().out
    bundles = []
    for version in ("1.0.0", "1.1.0"):
        pkg = write_stub_runtime(tmp_path / f"src{version}", version=version)
        args = [
            "bundle",
            "build",
            "--kind",
            "full",
            "--version",
            version,
            "--target",
            HARDWARE,
            "--package",
            str(pkg),
            "--entry",
            "otastub",
            "--out",
            str(dist),
            "--quiet",
        ]
        assert gateway_main(args) == 0
        bundles.append(Path(capsys.readouterr().out.strip()))
    assert (
        repo_main(["ota", "publish", str(bundles[1]), "--repo", str(repo), "--group", "canary"])
        == 0
    )
    assert json.loads(capsys.readouterr().out)["version"] == "1.1.0"
    root_json = tmp_path / "root.json"
    assert repo_main(["ota", "trusted-root", "--repo", str(repo), "--out", str(root_json)]) == 0

    dev = [
        "--root",
        str(tmp_path / "gw"),
        "--hardware",
        HARDWARE,
        "--trusted-root",
        str(root_json),
        "--group",
        "canary",
    ]
    assert gateway_main(["ota", "provision", str(bundles[0]), *dev]) == 0
    with serving(repo) as srv:
        capsys.readouterr()
        assert gateway_main(["ota", "check", "--json", "--repository", srv.url, *dev]) == 0
        results = json.loads(capsys.readouterr().out)
    assert results[0]["status"] == "installed" and results[0]["restart_required"]
    assert gateway_main(["ota", "boot-check", "--json", *dev]) == 0
    decision = json.loads(capsys.readouterr().out)
    assert (decision["slot"], decision["trial"]) == ("b", True)
    assert gateway_main(["ota", "commit", "--now", *dev]) == 0
    capsys.readouterr()
    assert gateway_main(["ota", "status", "--json", *dev]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["floors"] == {"full": "1.1.0"} and status["active"] == "b"


def test_refusal_exit_code_and_reason(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pkg = write_stub_runtime(tmp_path / "src", version="1")
    assert (
        gateway_main(
            [
                "bundle",
                "build",
                "--kind",
                "full",
                "--version",
                "1",
                "--target",
                "jetson-orin",
                "--package",
                str(pkg),
                "--out",
                str(tmp_path),
                "--quiet",
            ]
        )
        == 0
    )
    bundle = capsys.readouterr().out.strip()
    code = gateway_main(
        ["ota", "install", bundle, "--root", str(tmp_path / "gw"), "--hardware", HARDWARE]
    )
    assert code == 1
    assert "wrong_hardware" in capsys.readouterr().err
    gateway_main(
        ["ota", "status", "--json", "--root", str(tmp_path / "gw"), "--hardware", HARDWARE]
    )
    assert json.loads(capsys.readouterr().out)["last_failure"].startswith("wrong_hardware")


def test_rotate_key_needs_offline_keys(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    repo, keys = tmp_path / "repo", tmp_path / "offline"
    repo_main(["init", "--repo", str(repo), "--root-keys", str(keys)])
    assert repo_main(["rotate-key", "targets", "--repo", str(repo)]) == 1
    assert "offline root keys" in capsys.readouterr().err
    assert repo_main(["rotate-key", "targets", "--repo", str(repo), "--root-keys", str(keys)]) == 0
