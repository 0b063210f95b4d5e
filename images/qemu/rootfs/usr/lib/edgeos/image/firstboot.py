"""First boot: provision the gateway from the boot partition (edgeos-firstboot.service).

The factory (or an installer) puts on the boot partition, in ``edgeos/``:

    credentials.json   the device's credential bundle (``edgeos-receiver device add``), required
    edgeos.toml        the plant config for this gateway, optional (else the image's template)

The credentials are installed with ``edgeos provision`` *as the service user* into
``/var/lib/edgeos/credentials`` (data partition), the config becomes ``/etc/edgeos/edgeos.toml``
(root:edgeos 0640), and the bundle is deleted from the FAT partition once installed: a secret
should not stay where anyone holding the SD card can read it. Refuses, with the reason on the
console, a config whose ``[device] id`` is neither the bundle's device nor the placeholder.
"""

from __future__ import annotations

import grp
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

BOOT = Path("/boot/efi/edgeos")
CONFIG = Path("/etc/edgeos/edgeos.toml")
CREDENTIALS = Path("/var/lib/edgeos/credentials")
PLACEHOLDER = "unprovisioned"
PY = "/usr/lib/edgeos/python/bin/python"


def fail(message: str) -> int:
    print(f"edgeos-firstboot: {message}", file=sys.stderr)
    print(f"EDGEOS-FIRSTBOOT failed: {message}")
    return 1


def main() -> int:
    bundle = BOOT / "credentials.json"
    try:
        device = json.loads(bundle.read_text())["device"]
    except (OSError, ValueError, KeyError) as exc:
        return fail(f"{bundle} is not a credential bundle: {exc}")
    source = BOOT / "edgeos.toml" if (BOOT / "edgeos.toml").is_file() else CONFIG
    text = source.read_text()
    try:
        configured = tomllib.loads(text).get("device", {}).get("id", PLACEHOLDER)
    except tomllib.TOMLDecodeError as exc:
        return fail(f"{source} is not valid TOML: {exc}")
    if configured == PLACEHOLDER:
        text = re.sub(r'(?m)^(id\s*=\s*)"unprovisioned"', rf'\1"{device}"', text, count=1)
    elif configured != device:
        return fail(f"{source} is for device {configured!r}, the credentials for {device!r}")

    # The service user reads the bundle: copy it (root-only on FAT) into its own directory.
    edgeos_gid = grp.getgrnam("edgeos").gr_gid
    staging = Path("/var/lib/edgeos/.firstboot-credentials.json")
    shutil.copyfile(bundle, staging)
    os.chmod(staging, 0o600)
    shutil.chown(staging, "edgeos", "edgeos")
    try:
        proc = subprocess.run(
            [
                "runuser",
                "-u",
                "edgeos",
                "--",
                PY,
                "-m",
                "edgeos",
                "provision",
                str(staging),
                "--target",
                str(CREDENTIALS),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
    finally:
        staging.unlink(missing_ok=True)
    if proc.returncode != 0:
        return fail(f"edgeos provision failed: {proc.stderr.strip() or proc.stdout.strip()}")

    tmp = CONFIG.with_name(CONFIG.name + ".tmp")
    tmp.write_text(text)
    os.chown(tmp, 0, edgeos_gid)
    os.chmod(tmp, 0o640)
    os.replace(tmp, CONFIG)
    check = subprocess.run(
        ["runuser", "-u", "edgeos", "--", PY, "-m", "edgeos", "check-config", str(CONFIG)],
        capture_output=True,
        text=True,
        check=False,
    )
    if check.returncode != 0:
        return fail(f"{CONFIG} does not check: {(check.stdout + check.stderr).strip()[-400:]}")
    bundle.unlink()
    (BOOT / "edgeos.toml").unlink(missing_ok=True)
    os.sync()
    print(f"EDGEOS-FIRSTBOOT provisioned device={device} config={source}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
