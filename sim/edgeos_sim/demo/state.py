"""The demo's options and its state directory: what to run, where, and what the spool holds.

The state directory is only ever emptied when the demo made it (:data:`MARKER`).
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "MARKER",
    "DemoError",
    "DemoOptions",
    "DemoPaths",
    "count_spooled",
    "find_models",
    "prepare_state_dir",
]

log = logging.getLogger("edgeos_sim.demo")

#: Written into a state directory the demo created; only such a directory is ever wiped.
MARKER = ".edgeos-demo"
MODEL_TASKS = ("anomaly", "quality", "correction")


class DemoError(Exception):
    """The demo cannot start (the message says what to do); ``exit_code`` for the CLI."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True, slots=True)
class DemoOptions:
    """What to run. ``duration_s=None`` runs until Ctrl-C/SIGTERM."""

    state_dir: Path = Path("demo-state")
    keep: bool = False
    nests: int = 8
    tags_per_nest: int = 50
    duration_s: float | None = None
    as_json: bool = False
    #: Press cycle (simulated seconds = wall seconds). The committed models were trained on
    #: 40 s cycles; much shorter ones make every cure time look wrong to them.
    cycle_s: float = 40.0
    seed: int = 0
    models_dir: Path | None = None
    inference: bool = True
    refresh_hz: float = 2.0
    #: Longest wait, when stopping, for the receiver to acknowledge the last batches.
    drain_s: float = 8.0


def find_models(explicit: Path | None = None) -> Path | None:
    """The folder holding the committed ``models/*.toml`` (a source checkout), if any."""
    candidates = [explicit] if explicit is not None else []
    # sim/edgeos_sim/demo/state.py → the checkout's root is three folders up.
    candidates += [Path(__file__).resolve().parents[3] / "models", Path.cwd() / "models"]
    for folder in candidates:
        if folder is not None and all((folder / f"{t}.toml").is_file() for t in MODEL_TASKS):
            return folder.resolve()
    return None


@dataclass(slots=True)
class DemoPaths:
    """Where the demo keeps the gateway's and the receiver's state below ``root``."""

    root: Path
    gateway: Path = field(init=False)
    receiver: Path = field(init=False)

    def __post_init__(self) -> None:
        self.gateway = self.root / "gateway"
        self.receiver = self.root / "receiver"

    @property
    def config(self) -> Path:
        return self.gateway / "edgeos.toml"

    @property
    def credentials(self) -> Path:
        return self.gateway / "credentials"

    @property
    def receiver_config(self) -> Path:
        return self.receiver / "receiver.toml"

    @property
    def log(self) -> Path:
        return self.root / "demo.log"


def prepare_state_dir(root: Path, *, keep: bool) -> DemoPaths:
    """Create (or, unless ``keep``, empty) the demo's state directory.

    A directory is only emptied when the demo made it (it holds :data:`MARKER`) or it is
    already empty, so ``--state-dir ~`` by mistake costs nothing.
    """
    root = root.expanduser().resolve()
    if root.exists():
        if not root.is_dir():
            raise DemoError(f"{root} exists and is not a directory", exit_code=2)
        owned = (root / MARKER).exists()
        if any(root.iterdir()) and not owned:
            raise DemoError(
                f"{root} is not empty and was not made by `edgeos demo`; "
                "choose another --state-dir",
                exit_code=2,
            )
        if owned and not keep:
            for child in root.iterdir():
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                else:
                    child.unlink()
    root.mkdir(parents=True, exist_ok=True)
    (root / MARKER).write_text("state of `edgeos demo`; deleted on its next start\n")
    paths = DemoPaths(root)
    paths.gateway.mkdir(exist_ok=True)
    paths.receiver.mkdir(exist_ok=True)
    return paths


def count_spooled(spool_dir: Path, registry_dir: Path, device: str) -> tuple[int, int]:
    """(batches, samples) still in a closed spool, opened with the device key (blocking)."""
    if not spool_dir.exists():
        return 0, 0
    from edgeos.uplink.spool import Spool
    from edgeos_cloud.receiver.ingest import BatchOpener, Rejected
    from edgeos_cloud.receiver.registry import DeviceRegistry

    opener = BatchOpener(DeviceRegistry(registry_dir))
    batches = samples = 0
    spool = Spool(spool_dir, fsync=False)
    try:
        for record in spool.pending():
            batches += 1
            try:
                # Now as the arrival time: the opener bounds sample times around it.
                now_us = int(time.time() * 1e6)
                samples += opener.open(record.payload, now_us, device).sample_count
            except Rejected as exc:
                log.warning("spooled batch %d does not open: %s", record.seq, exc)
    finally:
        spool.close()
    return batches, samples
