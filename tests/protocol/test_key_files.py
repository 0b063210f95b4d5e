"""Key and credential files: non-regular files are refused without blocking, and writes never
go through a planted symlink (real FIFOs, symlinks and files in a temporary directory)."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from edgeos_protocol.crypto import key_id_for, load_device_key, write_device_key
from edgeos_protocol.errors import ProvisioningError
from edgeos_protocol.fsutil import atomic_write_bytes, read_regular, write_private


def _run(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter: a call that blocks in ``open`` fails the bound
    instead of hanging the test session."""
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_fifo_at_the_device_key_path_is_refused_at_once(tmp_path: Path) -> None:
    fifo = tmp_path / "device.key"
    os.mkfifo(fifo, 0o600)
    proc = _run(
        "import sys\n"
        "from edgeos_protocol.crypto import Keyring\n"
        "from edgeos_protocol.errors import ProvisioningError\n"
        "try:\n"
        "    Keyring.load(sys.argv[1])\n"
        "except ProvisioningError as exc:\n"
        "    print(exc)\n",
        str(fifo),
    )
    assert proc.returncode == 0, proc.stderr
    assert "not a regular file" in proc.stdout
    with pytest.raises(ProvisioningError, match="not a regular file"):
        load_device_key(fifo)  # in-process too, now that it cannot block


def test_a_fifo_as_credential_bundle_is_refused_at_once(tmp_path: Path) -> None:
    fifo = tmp_path / "gw-1.credentials.json"
    os.mkfifo(fifo, 0o600)
    proc = _run(
        "import sys\n"
        "from edgeos_protocol.credentials import read_bundle\n"
        "from edgeos_protocol.errors import ProvisioningError\n"
        "try:\n"
        "    read_bundle(sys.argv[1])\n"
        "except ProvisioningError as exc:\n"
        "    print(exc)\n",
        str(fifo),
    )
    assert proc.returncode == 0, proc.stderr
    assert "not a regular file" in proc.stdout
    with pytest.raises(OSError, match="not a regular file"):
        read_regular(fifo, max_bytes=1024)


def test_a_symlinked_device_key_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "real.key"
    write_device_key(real)
    link = tmp_path / "device.key"
    link.symlink_to(real)
    with pytest.raises(ProvisioningError):
        load_device_key(link)


def _plant_links(directory: Path, name: str, victim: Path) -> None:
    """Symlinks at every temporary name a writer of ``name`` used to pick."""
    for tmp in (f".{name}.tmp", f".{name}.tmp-{os.getpid()}"):
        (directory / tmp).symlink_to(victim)


def test_private_writes_never_follow_a_planted_temp_symlink(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"untouched")
    target_dir = tmp_path / "creds"
    target_dir.mkdir()
    _plant_links(target_dir, "client.key", victim)
    _plant_links(target_dir, "state.json", victim)
    write_private(target_dir / "client.key", b"SECRET")
    atomic_write_bytes(target_dir / "state.json", b"{}", mode=0o600)
    assert victim.read_bytes() == b"untouched"
    assert (target_dir / "client.key").read_bytes() == b"SECRET"
    assert (target_dir / "client.key").stat().st_mode & 0o777 == 0o600
    assert not (target_dir / "client.key").is_symlink()


def test_a_symlink_at_the_destination_is_replaced_not_written_through(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"untouched")
    dest = tmp_path / "device.key"
    dest.symlink_to(victim)
    write_private(dest, b"k" * 32)
    assert victim.read_bytes() == b"untouched"
    assert not dest.is_symlink() and dest.read_bytes() == b"k" * 32
    planted = tmp_path / "new.key"
    planted.symlink_to(victim)
    with pytest.raises(FileExistsError):
        write_device_key(planted, b"x" * 32)  # O_CREAT | O_EXCL | O_NOFOLLOW
    assert victim.read_bytes() == b"untouched"


def test_installing_a_bundle_through_planted_links_writes_only_new_files(tmp_path: Path) -> None:
    from edgeos.provision import install_bundle
    from edgeos_cloud.receiver.pki import CertificateAuthority

    ca = CertificateAuthority.create(tmp_path / "ca")
    issued = ca.issue_device("gw-1")
    key = bytes(range(32))
    bundle = tmp_path / "gw-1.json"
    bundle.write_text(
        json.dumps(
            {
                "format": "edgeos-credentials/1",
                "device": "gw-1",
                "key_id": key_id_for(key),
                "device_key": base64.b64encode(key).decode(),
                "client_cert": issued.cert_pem.decode(),
                "client_key": issued.key_pem.decode(),
                "ca_cert": ca.cert_pem.decode(),
                "broker": "mqtts://127.0.0.1:8883",
            }
        )
    )
    victim = tmp_path / "victim"
    victim.write_bytes(b"untouched")
    target = tmp_path / "device"
    target.mkdir(mode=0o700)
    for name in ("device.key", "client.key", "client.crt", "ca.crt", "credentials.json"):
        _plant_links(target, name, victim)
    install_bundle(bundle, target)
    assert victim.read_bytes() == b"untouched"
    assert load_device_key(target / "device.key") == key
