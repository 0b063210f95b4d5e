"""Mark the booted root slot good in RAUC once edgeos is healthy (edgeos-rauc-mark-good.service).

"Healthy" has one definition in edgeos: :class:`edgeos.ota.health.HealthReport` ``.healthy``
(service ready, watchdog alive, every driver connected, the receiver acknowledging batches), read
from the health file the runtime writes for the application-level A/B commit
(:class:`edgeos.ota.health.HealthFile`: a report from a dead writer, another boot or older than
``--stale-after`` does not count). This script adds nothing to that definition; it only applies
it to the root filesystem slots:

* healthy without a break for ``--window`` seconds -> ``rauc status mark-good booted`` (resets
  the slot's boot-attempt counter in grubenv; on a trial slot this is the commit);
* a slot on trial (marker written by the RAUC post-install handler) that is not healthy within
  ``--timeout`` -> reboot: grub.cfg counts the attempt and, after three, boots the other slot;
* booted on a slot other than the one on trial -> grub gave the trial up: the trial slot is
  marked bad in RAUC and the outcome ``rolled_back`` recorded (then the booted slot is judged as
  above);
* the RAUC pre-install handler's ``installing`` marker still there (the post-install handler
  removes it once the slot is written) -> an install was cut off (power loss, kill, write
  error): the outcome ``install_interrupted`` is recorded once; RAUC had marked that slot
  unbootable before writing it, so grub keeps booting the committed slot.

Each boot says which attempt it is of the booted slot (grubenv ``<slot>_TRY``, counted by
grub.cfg), so a trial that was cut short by a power loss shows as ``attempt=2``.

Outcomes go to ``/var/lib/edgeos/rauc/last-outcome.json`` and, as ``EDGEOS-RAUC …`` lines, to
the console (images/test-boot.sh reads them).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from edgeos.config import load_config
from edgeos.errors import ConfigError
from edgeos.ota.health import HealthFile

STATE = Path("/var/lib/edgeos/rauc")
GRUBENV = Path("/boot/efi/EFI/edgeos/grubenv")


def say(text: str) -> None:
    print(f"EDGEOS-RAUC {text}", flush=True)


def booted_slot() -> str:
    for arg in Path("/proc/cmdline").read_text().split():
        if arg.startswith("rauc.slot="):
            return arg.split("=", 1)[1]
    return ""


def grubenv() -> dict[str, str]:
    """grub.cfg's environment block (``key=value`` lines, padded with ``#``)."""
    try:
        raw = GRUBENV.read_bytes()
    except OSError:
        return {}
    out = {}
    for line in raw.decode(errors="replace").splitlines():
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            out[key] = value
    return out


def last_outcome() -> dict[str, object]:
    try:
        doc = json.loads((STATE / "last-outcome.json").read_text())
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def note_interrupted(booted: str) -> str | None:
    """An install the pre-install handler started and the post-install handler never finished.

    Records ``install_interrupted`` (the marker is then removed: recorded once) and returns the
    slot it was writing; ``None`` when there was none.
    """
    marker = STATE / "installing"
    try:
        started = json.loads(marker.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        started = {}  # torn by the power cut itself: still an install that did not finish
    if not isinstance(started, dict):
        started = {}
    slot = str(started.get("slot") or "other")
    record(
        "install_interrupted",
        slot=slot,
        booted=booted,
        version=started.get("bundle_version"),
        started_at=started.get("started_at"),
    )
    marker.unlink(missing_ok=True)
    return slot


def rauc(*args: str) -> None:
    proc = subprocess.run(["rauc", *args], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"rauc {' '.join(args)}: {proc.stderr.strip() or proc.stdout.strip()}")


def record(outcome: str, **fields: object) -> None:
    STATE.mkdir(mode=0o700, exist_ok=True)
    doc = {"outcome": outcome, "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **fields}
    tmp = STATE / "last-outcome.json.tmp"
    tmp.write_text(json.dumps(doc) + "\n")
    tmp.replace(STATE / "last-outcome.json")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("/etc/edgeos/edgeos.toml"))
    parser.add_argument(
        "--window",
        type=float,
        help="seconds of continuous health (default: "
        "[ota] health_window_s, or $EDGEOS_MARK_GOOD_WINDOW_S)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        help="trial deadline (default 3 x window, or $EDGEOS_MARK_GOOD_TIMEOUT_S)",
    )
    parser.add_argument("--stale-after", type=float, default=15.0)
    args = parser.parse_args()

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        say(f"config-error {exc}")
        return 2
    window = (
        args.window
        or float(os.environ.get("EDGEOS_MARK_GOOD_WINDOW_S", "0"))
        or config.ota.health_window_s
    )
    timeout = args.timeout or float(os.environ.get("EDGEOS_MARK_GOOD_TIMEOUT_S", "0")) or 3 * window
    slots = config.ota.slots_dir
    health = HealthFile(
        (slots if slots.is_absolute() else config.device.state_dir / slots) / "health.json"
    )

    booted = booted_slot()
    marker = STATE / "trial"
    trial: dict[str, str] = {}
    if marker.is_file():
        trial = json.loads(marker.read_text())
    if trial and trial.get("slot") != booted:
        # grub.cfg used up the trial slot's attempts and booted this one: a rollback.
        rauc("status", "mark-bad", "other")
        record(
            "rolled_back",
            slot=trial.get("slot"),
            booted=booted,
            version=trial.get("bundle_version"),
        )
        marker.unlink()
        say(f"rolled-back slot={trial.get('slot')} booted={booted}")
        trial = {}
    interrupted = note_interrupted(booted)
    if interrupted is not None:
        say(f"install-interrupted slot={interrupted} booted={booted} (slot left unbootable)")
    on_trial = bool(trial)
    attempt = grubenv().get(f"{booted}_TRY", "?")
    say(
        f"watching slot={booted} trial={int(on_trial)} attempt={attempt} window_s={window:g}"
        f" timeout_s={timeout:g}"
    )

    start = time.monotonic()
    healthy_since: float | None = None
    problems = ["no health report yet"]
    warned = False
    while True:
        report = health.read(max_age_s=args.stale_after)
        now = time.monotonic()
        if report is not None and report.healthy:
            healthy_since = healthy_since or now
            if now - healthy_since >= window:
                rauc("status", "mark-good", "booted")
                if on_trial:
                    record(
                        "committed",
                        slot=booted,
                        version=trial.get("bundle_version"),
                        after_s=round(now - start, 1),
                    )
                    marker.unlink(missing_ok=True)
                say(f"mark-good slot={booted} trial={int(on_trial)} after_s={now - start:.1f}")
                return 0
        else:
            healthy_since = None
            problems = (
                report.problems()
                if report is not None
                # (an edgeos older than HealthFile.refused: the lumped reason)
                else [
                    getattr(health, "refused", "")
                    or "health file missing, stale, or its writer is dead"
                ]
            )
        if now - start >= timeout:
            if on_trial:
                say(f"trial-failed slot={booted} problems={'; '.join(problems)}; rebooting")
                subprocess.run(["systemctl", "reboot"], check=False)
                return 3
            if not warned:
                # A committed slot is not rebooted for being unhealthy (the plant network may be
                # down); it stays unmarked, so grub counts its boots until it is healthy again.
                say(
                    f"unhealthy slot={booted} problems={'; '.join(problems)}; not on trial, waiting"
                )
                warned = True
        time.sleep(1.0)


if __name__ == "__main__":
    sys.exit(main())
