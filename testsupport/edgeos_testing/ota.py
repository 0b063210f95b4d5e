"""Helpers for OTA tests and rigs: stub runtimes, hostile servers, forged metadata.

Everything here is real: stub runtimes are Python packages run as subprocesses from a slot,
hostile servers are real HTTP servers on loopback, forged metadata is signed with real keys.
"""

from __future__ import annotations

import random
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from http import HTTPStatus
from pathlib import Path
from typing import Any, ClassVar, Literal

from cryptography.hazmat.primitives.serialization import load_pem_private_key
from securesystemslib.signer import CryptoSigner  # type: ignore[attr-defined]
from tuf.api.metadata import Metadata
from tuf.api.serialization.json import JSONSerializer

from edgeos.ota.client import ClientSettings, OtaClient
from edgeos.ota.slots import SlotManager
from edgeos_cloud.ota.repository import OtaRepository, RepoRequestHandler
from edgeos_protocol.bundle import BundleSources, build_bundle

__all__ = [
    "HARDWARE",
    "STUB_PACKAGE",
    "Device",
    "EndlessHandler",
    "MakeRelease",
    "TrickleHandler",
    "build_stub_release",
    "forge_metadata",
    "install_and_commit",
    "wait_for",
    "write_stub_runtime",
]

STUB_PACKAGE = "otastub"
#: Hardware target the test devices claim to be.
HARDWARE = "rpi4-aarch64"
#: ``make_release(version, *, behaviour=…, hardware=…, kind=…, compress=…) -> bundle path``
MakeRelease = Callable[..., Path]
Behaviour = Literal["healthy", "crash", "unhealthy", "degraded"]

_STUB_MAIN = '''\
"""Stub runtime {version} ({behaviour}); written by edgeos_testing.ota."""
import os, sys, time
from pathlib import Path

BEHAVIOUR = {behaviour!r}
VERSION = {version!r}

log = os.environ.get("OTASTUB_LOG")
if log:
    with open(log, "a") as f:
        f.write(f"{{VERSION}} {{BEHAVIOUR}} {{os.getpid()}}\\n")
if BEHAVIOUR == "crash":
    sys.exit(1)

from edgeos.ota.health import HealthFile, HealthReport

health = HealthFile(Path(os.environ["EDGEOS_OTA_HEALTH"]))
ok = BEHAVIOUR == "healthy"
ready = BEHAVIOUR in ("healthy", "degraded")
while True:
    health.report(HealthReport(service_ready=ready, watchdog_alive=True, drivers_connected=1,
                               drivers_total=1, acks_flowing=ok,
                               detail="stub " + VERSION))
    time.sleep(0.05)
'''


@dataclass
class Device:
    """A provisioned test gateway: its slots, its trusted root file, its OTA root."""

    slots: SlotManager
    trusted_root: Path
    root: Path

    def client(self, url: str, *, group: str = "canary", **settings: float) -> OtaClient:
        """A client for this device; ``settings`` override :class:`ClientSettings` timeouts."""
        return OtaClient(
            ClientSettings(
                repository_url=url,
                trusted_root=self.trusted_root,
                cache_dir=self.root / "tuf",
                hardware=self.slots.hardware,
                group=group,
                **settings,
            )
        )


def write_stub_runtime(dest: Path, *, version: str, behaviour: Behaviour = "healthy") -> Path:
    """Write the ``otastub`` package into ``dest`` (a bundle source) and return its path.

    ``healthy`` reports full health every 50 ms, ``unhealthy`` runs but never reports ready,
    ``degraded`` reports ready but the receiver never acknowledges, ``crash`` exits 1 at once.
    Each start appends ``"<version> <behaviour> <pid>"`` to the file named by ``OTASTUB_LOG``
    so tests can see what ran.
    """
    pkg = dest / STUB_PACKAGE
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text(f"VERSION = {version!r}\n")
    (pkg / "__main__.py").write_text(
        textwrap.dedent(_STUB_MAIN.format(version=version, behaviour=behaviour))
    )
    # Some bulk so an install takes long enough to be interrupted at many points.
    rng = random.Random(version)
    data = pkg / "data"
    data.mkdir(exist_ok=True)
    for i in range(40):
        (data / f"blob{i:02d}.bin").write_bytes(rng.randbytes(16 << 10))
    return pkg


class TrickleHandler(RepoRequestHandler):
    """Sends matching files one byte at a time with a pause in between (slow retrieval)."""

    match: ClassVar[str] = "/targets/bundles/"
    interval_s: ClassVar[float] = 0.05

    def send_body(self, path: Path, data: bytes) -> None:
        if self.match not in self.path:
            super().send_body(path, data)
            return
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        for i in range(len(data)):
            if self.server.stopping.wait(self.interval_s):
                return
            self.wfile.write(data[i : i + 1])
            self.wfile.flush()


class EndlessHandler(RepoRequestHandler):
    """Sends the real file for matching paths, then garbage until the client hangs up."""

    match: ClassVar[str] = "/targets/bundles/"

    def send_body(self, path: Path, data: bytes) -> None:
        if self.match not in self.path:
            super().send_body(path, data)
            return
        self.send_response(HTTPStatus.OK)
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        self.wfile.write(data)
        junk = b"\0" * 65536
        sent = 0
        while not self.server.stopping.is_set() and sent < (1 << 30):
            self.wfile.write(junk)  # BrokenPipeError ends the handler when the client quits
            sent += len(junk)


def build_stub_release(work: Path, *, version: str = "1.0.0") -> Path:
    """A ``full`` bundle of the healthy stub runtime, built under ``work``; its path.

    The sources go to ``work/release``, the bundle to ``work/dist``: what a gateway is
    provisioned with before a test publishes anything newer.
    """
    src = work / "release"
    write_stub_runtime(src / "pkgs", version=version)
    return build_bundle(
        "full",
        version,
        HARDWARE,
        BundleSources(packages=[src / "pkgs" / STUB_PACKAGE]),
        work / "dist",
        entry=STUB_PACKAGE,
    )


def forge_metadata(
    repo: OtaRepository,
    role: str,
    *,
    key_files: list[Path] | None = None,
    version: int | None = None,
    expires_in: timedelta | None = None,
    mutate: Callable[[Any], None] | None = None,
    write_versioned: bool = True,
) -> bytes:
    """Re-sign the current ``role`` metadata with chosen keys and fields, and serve it.

    ``key_files`` default to the role's current online keys. Used to play an attacker who has
    (or lacks) a key: wrong signer, a huge version, an expired date, an extra target.
    """
    md = Metadata.from_file(str(repo.metadata_dir / f"{role}.json"))
    if version is not None:
        md.signed.version = version
    if expires_in is not None:
        md.signed.expires = datetime.now(UTC).replace(microsecond=0) + expires_in
    if mutate is not None:
        mutate(md.signed)
    if key_files is None:
        root = repo.root()
        key_files = [repo.keys_dir / f"{k}.pem" for k in root.roles[role].keyids]
    md.signatures.clear()
    for key_file in key_files:
        md.sign(CryptoSigner(load_pem_private_key(key_file.read_bytes(), None)), append=True)
    data: bytes = md.to_bytes(JSONSerializer(compact=False))
    (repo.metadata_dir / f"{role}.json").write_bytes(data)
    if write_versioned and role != "timestamp":
        (repo.metadata_dir / f"{md.signed.version}.{role}.json").write_bytes(data)
    return data


def install_and_commit(root: Path, bundle: Path, hardware: str) -> None:
    """Install, boot-check and commit in one process (a target for random SIGKILLs).

    Prints ``ready`` once imports are done, so the killer's clock starts at real work.
    """
    from edgeos.ota.slots import SlotManager

    slots = SlotManager(root, hardware=hardware)
    print("ready", flush=True)
    slots.install(bundle)
    slots.boot_check()
    slots.commit()
    print("done", flush=True)


def wait_for(predicate: Callable[[], bool], *, timeout_s: float = 30.0) -> bool:
    """Poll ``predicate`` until true or the timeout (for subprocess coordination only)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


if __name__ == "__main__":
    import sys

    install_and_commit(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3])
