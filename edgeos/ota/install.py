"""Verify an installed slot tree against its manifest, install a full bundle's wheelhouse, and
compose a config bundle's slot.

This is the gateway's half of the bundle format (:mod:`edgeos_protocol.bundle`): the cloud builds
and publishes bundles, the gateway unpacks them into a slot, installs their wheels and checks the
tree at every boot.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from collections.abc import Callable
from pathlib import Path

from edgeos_protocol.bundle import MANIFEST_NAME, FileEntry, Manifest, extract_bundle
from edgeos_protocol.fsutil import atomic_write_json, fsync_dir, rmtree_quiet, sha256_file
from edgeos_protocol.outcome import InstallError, Reason, Rejected

__all__ = ["GENERATED_NAME", "compose_config_slot", "install_wheelhouse", "verify_tree"]


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


def compose_config_slot(
    bundle: Path,
    staging: Path,
    *,
    active: Path,
    unpack: Path,
    expected_digest: str | None,
    quota_bytes: int | None,
    check_config: Callable[[Path], None] | None = None,
) -> Manifest:
    """Build a slot in ``staging`` = the ``active`` slot's runtime + the bundle's new config/.

    A config change is trialled exactly like a code change, so a bad config rolls back on its
    own. The bundle is unpacked into ``unpack`` first (removed afterwards). ``check_config``
    (the gateway's profile re-validation, :func:`edgeos.profile.bundle_check`) sees the
    unpacked bundle before anything is composed and refuses it by raising ``Rejected``.
    """
    base, problems = verify_tree(active)
    if base is None or problems:
        raise InstallError(Reason.CORRUPT_SLOT, f"active slot is not intact: {problems[:3]}")
    rmtree_quiet(unpack)
    try:
        cfg = extract_bundle(
            bundle, unpack, expected_digest=expected_digest, quota_bytes=quota_bytes
        )
        if check_config is not None:
            check_config(unpack)
        staging.mkdir()
        files: list[FileEntry] = []
        for entry in base.files:
            if entry.path.startswith("config/"):
                continue
            dst = staging / entry.path
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(active / entry.path, dst)
            files.append(entry)
        for entry in cfg.files:
            dst = staging / entry.path
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.rename(unpack / entry.path, dst)
            files.append(entry)
        composed = Manifest(
            kind="full",
            version=base.version,
            target=base.target,
            created=cfg.created,
            files=tuple(sorted(files, key=lambda f: f.path)),
            entry=base.entry,
            components={**base.components, "config": cfg.version},
        )
        atomic_write_json(staging / MANIFEST_NAME, composed.to_json())
        _, problems = verify_tree(staging)
        if problems:
            raise InstallError(Reason.IO_ERROR, f"composed slot does not verify: {problems}")
        for dirpath, _d, _f in os.walk(staging, topdown=False):
            fsync_dir(Path(dirpath))
        return composed
    finally:
        rmtree_quiet(unpack)
