"""Verify an installed slot tree against its manifest, and install a full bundle's wheelhouse.

This is the gateway's half of the bundle format (:mod:`edgeos_protocol.bundle`): the cloud builds
and publishes bundles, the gateway unpacks them into a slot, installs their wheels and checks the
tree at every boot.
"""

from __future__ import annotations

import json
import stat
from pathlib import Path

from edgeos_protocol.bundle import MANIFEST_NAME, Manifest
from edgeos_protocol.fsutil import sha256_file
from edgeos_protocol.outcome import InstallError, Reason, Rejected

__all__ = ["GENERATED_NAME", "install_wheelhouse", "verify_tree"]


def verify_tree(root: Path, *, full: bool = True) -> tuple[Manifest | None, list[str]]:
    """Check an installed tree against its own ``manifest.json``.

    Returns the manifest (``None`` if unreadable) and a list of problems (empty = intact).
    ``full=False`` checks presence, type and size only (fast path for large wheelhouses).
    """
    try:
        manifest = Manifest.from_bytes((root / MANIFEST_NAME).read_bytes())
    except OSError as exc:
        return None, [f"no manifest: {exc.strerror}"]
    except Rejected as exc:
        return None, [str(exc)]
    problems: list[str] = []
    for entry in manifest.files:
        path = root / entry.path
        try:
            st = path.lstat()
            if not stat.S_ISREG(st.st_mode):
                problems.append(f"{entry.path}: not a regular file")
                continue
            if st.st_size != entry.size:
                problems.append(f"{entry.path}: size {st.st_size} != {entry.size}")
                continue
            if full and sha256_file(path)[0] != entry.sha256:
                problems.append(f"{entry.path}: sha256 mismatch")
        except OSError as exc:
            problems.append(f"{entry.path}: {exc.strerror}")
        if len(problems) >= 20:
            break
    if not problems:
        problems.extend(_verify_generated(root, full=full))
    return manifest, problems


#: Manifest of the files the installer generated (``site-packages/`` from ``wheelhouse/``);
#: written at install time and checked at every boot like the bundle's own files.
GENERATED_NAME = "site-packages.json"


def install_wheelhouse(tree: Path, *, timeout_s: float = 900.0) -> int:
    """Install a full bundle's ``wheelhouse/`` into ``tree/site-packages`` (no network).

    The wheels were verified with the bundle; pip only unpacks them (``--no-index``, pinned by
    ``requirements.lock`` when present). The result is hashed into :data:`GENERATED_NAME` so a
    later corruption of the slot's dependencies is caught by :func:`verify_tree`. Returns the
    number of generated files; raises :class:`InstallError` when pip refuses (e.g. a wheel
    for another architecture).
    """
    import subprocess
    import sys

    house = tree / "wheelhouse"
    wheels = sorted(house.glob("*.whl")) if house.is_dir() else []
    if not wheels:
        return 0
    target = tree / "site-packages"
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--no-index",
        "--no-deps",
        "--no-compile",
        "--disable-pip-version-check",
        "--no-warn-script-location",
        "--quiet",
        "--find-links",
        str(house),
        "--target",
        str(target),
    ]
    lock = tree / "requirements.lock"
    cmd += ["-r", str(lock)] if lock.is_file() else [str(w) for w in wheels]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired as exc:
        raise InstallError(
            Reason.IO_ERROR, f"installing the wheelhouse took over {timeout_s} s"
        ) from exc
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise InstallError(
            Reason.MALFORMED, "the bundle's wheels do not install: " + " | ".join(tail)
        )
    files = []
    for path in sorted(p for p in target.rglob("*") if p.is_file() and not p.is_symlink()):
        digest, size = sha256_file(path)
        files.append({"path": path.relative_to(tree).as_posix(), "sha256": digest, "size": size})
    (tree / GENERATED_NAME).write_text(json.dumps({"files": files}, separators=(",", ":")))
    return len(files)


def _verify_generated(root: Path, *, full: bool) -> list[str]:
    path = root / GENERATED_NAME
    if not path.exists():
        if (root / "site-packages").exists():
            return ["site-packages/ present without its manifest"]
        return []
    try:
        entries = json.loads(path.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return [f"{GENERATED_NAME}: unreadable ({exc})"]
    problems: list[str] = []
    for entry in entries:
        file = root / entry["path"]
        try:
            st = file.lstat()
            if not stat.S_ISREG(st.st_mode) or st.st_size != entry["size"]:
                problems.append(f"{entry['path']}: changed since install")
            elif full and sha256_file(file)[0] != entry["sha256"]:
                problems.append(f"{entry['path']}: sha256 mismatch")
        except OSError as exc:
            problems.append(f"{entry['path']}: {exc.strerror}")
        if len(problems) >= 20:
            break
    return problems
