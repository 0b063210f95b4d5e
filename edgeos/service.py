"""``edgeos install-service``: units, user, directories and the default config on a gateway.

Works on the running system (``--root /``) and on an image's root filesystem (``--root DIR``,
used by image builds and tests). Users and directories are declared as ``sysusers.d`` and
``tmpfiles.d`` entries and created with ``systemd-sysusers --root`` and
``systemd-tmpfiles --root``, the same way an OS image build does it, so the result is identical
whether it was installed live or baked into an image.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sysconfig
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

__all__ = ["InstallReport", "install_service"]

log = logging.getLogger("edgeos.service")

UNITS = (
    "edgeos.service",
    "edgeos-recovery.service",
    "edgeos-commit.service",
    "edgeos-update.service",
    "edgeos-update.timer",
)


@dataclass
class InstallReport:
    root: Path
    written: list[Path] = field(default_factory=list)
    kept: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _source_dirs() -> list[Path]:
    """Where the ``systemd/`` folder may be, in order.

    Next to the package in a checkout or an A/B slot (the bundle carries the source tree); in an
    installed wheel, ``<prefix>/share/edgeos/systemd`` (the wheel's data files, pyproject.toml).
    """
    return [
        Path(str(resources.files("edgeos"))).parent / "systemd",
        Path(sysconfig.get_path("data")) / "share" / "edgeos" / "systemd",
    ]


def _source_dir() -> Path:
    """The first ``systemd/`` folder of :func:`_source_dirs` that holds the units."""
    tried = _source_dirs()
    for here in tried:
        if (here / UNITS[0]).is_file():
            return here
    raise FileNotFoundError(
        "unit files not found (looked in " + ", ".join(str(p) for p in tried) + ")"
    )


def _copy(src: Path, dst: Path, report: InstallReport, *, mode: int, overwrite: bool) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists() and not overwrite:
        report.kept.append(dst)
        return
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.copyfile(src, tmp)
    os.chmod(tmp, mode)
    os.replace(tmp, dst)
    report.written.append(dst)


def install_service(
    root: Path,
    *,
    config_template: Path | None = None,
    enable: bool = True,
    run_tools: bool = True,
) -> InstallReport:
    """Install units, sysusers/tmpfiles entries and a default config under ``root``.

    An existing ``/etc/edgeos/edgeos.toml`` is never overwritten (it is the plant's config).
    On the live system (``root == /``) the units are enabled unless ``enable`` is false.
    """
    root = root.resolve()
    src = _source_dir()
    report = InstallReport(root)
    for unit in UNITS:
        _copy(src / unit, root / "etc/systemd/system" / unit, report, mode=0o644, overwrite=True)
    _copy(
        src / "edgeos.sysusers",
        root / "usr/lib/sysusers.d/edgeos.conf",
        report,
        mode=0o644,
        overwrite=True,
    )
    _copy(
        src / "edgeos.tmpfiles",
        root / "usr/lib/tmpfiles.d/edgeos.conf",
        report,
        mode=0o644,
        overwrite=True,
    )

    if run_tools:
        _run_tool(["systemd-sysusers", f"--root={root}"], report)
        _run_tool(["systemd-tmpfiles", "--create", f"--root={root}"], report)
    else:
        report.notes.append("skipped systemd-sysusers/systemd-tmpfiles (run them at first boot)")

    template = config_template or src.parent / "examples" / "small-line.toml"
    config_dst = root / "etc/edgeos/edgeos.toml"
    if template.is_file():
        _copy(template, config_dst, report, mode=0o640, overwrite=False)
        _chown_to_service_group(config_dst, root, report)
    else:
        report.notes.append(f"no config template at {template}; write {config_dst} yourself")

    if root == Path("/") and enable:
        _run_tool(["systemctl", "daemon-reload"], report)
        _run_tool(["systemctl", "enable", "edgeos.service"], report)
    elif enable:
        wants = root / "etc/systemd/system/multi-user.target.wants"
        wants.mkdir(parents=True, exist_ok=True)
        link = wants / "edgeos.service"
        if not link.is_symlink():
            link.symlink_to("/etc/systemd/system/edgeos.service")
            report.written.append(link)
    return report


def _run_tool(cmd: list[str], report: InstallReport) -> None:
    if shutil.which(cmd[0]) is None:
        report.notes.append(f"{cmd[0]} not found; run `{' '.join(cmd)}` on the target")
        return
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        report.notes.append(f"`{' '.join(cmd)}` failed: {proc.stderr.strip()[:300]}")


def _chown_to_service_group(path: Path, root: Path, report: InstallReport) -> None:
    """root:edgeos 0640, looked up in the target's /etc/group (not the host's)."""
    group_file = root / "etc/group"
    if not group_file.is_file():
        return
    for line in group_file.read_text().splitlines():
        parts = line.split(":")
        if len(parts) >= 3 and parts[0] == "edgeos":
            try:
                os.chown(path, 0, int(parts[2]))
            except PermissionError:
                report.notes.append(f"not root: left {path} owned by the installing user")
            return
