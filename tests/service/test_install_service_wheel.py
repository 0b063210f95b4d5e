"""`edgeos install-service` from an installed wheel finds its units (issue #18).

The wheel carries the units as data files (pyproject.toml: ``share/edgeos/systemd``); before,
``install-service`` looked only for ``systemd/`` next to the package, which exists in a checkout
but not in a venv, so an image built from wheels had no units.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import venv
from pathlib import Path

from edgeos_testing.wheels import build_wheel

ROOT = Path(__file__).resolve().parents[2]


def _built_wheel(tmp_path: Path) -> Path:
    # Build from a scratch copy: building in place would leave build/ in the checkout.
    src = tmp_path / "src"
    for name in ("edgeos", "drivers", "protocol", "systemd"):
        shutil.copytree(
            ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info")
        )
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    return build_wheel(src, tmp_path / "wheels", "edgeos-*.whl")


def test_install_service_from_an_installed_wheel_writes_the_units(tmp_path: Path) -> None:
    wheel = _built_wheel(tmp_path)
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    subprocess.run(
        [
            *(sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet"),
            *("--no-deps", "--no-index", str(wheel)),
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert (env_dir / "share/edgeos/systemd/edgeos.service").is_file()
    # Only the wheel: run from a folder without the checkout, with nothing else on the path.
    # (edgeos.service needs the standard library only; the venv has no dependencies.)
    root = tmp_path / "rootfs"
    script = (
        "import sys; from pathlib import Path; from edgeos.service import install_service;"
        "r = install_service(Path(sys.argv[1]), run_tools=False);"
        "print('\\n'.join(map(str, r.written)))"
    )
    res = subprocess.run(
        [str(python), "-I", "-c", script, str(root)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    units = root / "etc/systemd/system"
    shipped = (ROOT / "systemd/edgeos.service").read_text()
    assert (units / "edgeos.service").read_text() == shipped
    for name in ("edgeos-commit.service", "edgeos-recovery.service", "edgeos-update.timer"):
        assert (units / name).is_file(), name
    assert (root / "usr/lib/sysusers.d/edgeos.conf").is_file()
    assert (root / "usr/lib/tmpfiles.d/edgeos.conf").is_file()
    assert (units / "multi-user.target.wants/edgeos.service").is_symlink()


def test_missing_units_are_named_with_every_place_looked_in(tmp_path: Path) -> None:
    # A fresh venv (no share/edgeos) and the package copied alone, with no systemd/ beside it.
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    pkg = tmp_path / "site"
    shutil.copytree(ROOT / "edgeos", pkg / "edgeos", ignore=shutil.ignore_patterns("__pycache__"))
    script = (
        f"import sys; sys.path.insert(0, {str(pkg)!r}); from pathlib import Path;"
        "from edgeos.service import install_service;"
        "install_service(Path(sys.argv[1]), run_tools=False)"
    )
    res = subprocess.run(
        [str(env_dir / "bin/python"), "-I", "-c", script, str(tmp_path / "rootfs")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert res.returncode != 0
    assert "unit files not found" in res.stderr
    assert "share/edgeos/systemd" in res.stderr
