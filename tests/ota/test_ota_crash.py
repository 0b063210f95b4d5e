"""Crash safety with real processes: SIGKILL at every transition and at random instants, and a
supervisor loop standing in for systemd (ExecStartPre boot check, Restart=on-failure,
TimeoutStartSec) that must bring a crashing or never-healthy release back to the old one."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from edgeos.ota.health import HealthFile
from edgeos.ota.install import verify_tree
from edgeos.ota.slots import SlotManager
from edgeos_protocol.fsutil import CRASH_ENV
from edgeos_testing.ota import HARDWARE, MakeRelease, wait_for

PY = sys.executable
OLD, NEW = "1.1.0", "1.2.0"


def _cli(
    *args: str, env: dict[str, str] | None = None, check: bool = False
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PY, "-m", "edgeos.ota.cli", *args],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
        check=check,
    )


@dataclass
class Rig:
    template: Path
    new_bundle: Path
    tmp: Path

    def fresh(self, name: str) -> SlotManager:
        """A device with OLD committed in slot b and 1.0.0 left in slot a (both slots exist)."""
        root = self.tmp / "runs" / name
        shutil.copytree(self.template, root, symlinks=True)
        return SlotManager(root, hardware=HARDWARE)


@pytest.fixture
def rig(tmp_path: Path, make_release: MakeRelease) -> Rig:
    template = tmp_path / "template"
    slots = SlotManager(template, hardware=HARDWARE)
    slots.provision(make_release("1.0.0"))
    slots.install(make_release(OLD))
    slots.boot_check()
    slots.commit()
    return Rig(template, make_release(NEW), tmp_path)


def _assert_bootable(slots: SlotManager) -> str:
    """The boot check yields a verified, runnable slot holding OLD or NEW and says what it did."""
    decision = slots.boot_check()
    assert decision.ok, decision.events
    assert decision.events
    assert decision.version in (OLD, NEW)
    assert decision.path is not None and decision.entry == "otastub"
    manifest, problems = verify_tree(decision.path)
    assert problems == [] and manifest is not None and manifest.version == decision.version
    assert os.readlink(slots.current_link) == decision.slot
    state = slots.read_state()
    if decision.version == NEW:
        assert decision.trial or state.floors["full"] == NEW
    else:
        assert state.floors["full"] == OLD
    return str(decision.version)


def _finish(slots: SlotManager) -> None:
    """After recovery the device can still complete the update."""
    state = slots.read_state()
    if state.trial is None and state.committed_version != NEW:
        slots.install(slots.root.parent.parent / "bundle.tar.zst")
    if slots.read_state().trial is not None:
        slots.commit()
    assert slots.boot_check().version == NEW


INSTALL_POINTS = [
    "install.begin",
    "install.file",
    "install.extracted",
    "install.old_moved",
    "install.in_place",
    "install.switched",
]


@pytest.mark.parametrize("point", INSTALL_POINTS)
def test_kill_at_install_transition(rig: Rig, point: str) -> None:
    slots = rig.fresh(point)
    shutil.copy(rig.new_bundle, slots.root.parent.parent / "bundle.tar.zst")
    run = _cli(
        "ota",
        "install",
        str(rig.new_bundle),
        "--root",
        str(slots.root),
        "--hardware",
        HARDWARE,
        env={CRASH_ENV: point},
    )
    assert run.returncode == -signal.SIGKILL, run.stderr
    version = _assert_bootable(slots)
    assert version == (NEW if point == "install.switched" else OLD)
    _finish(slots)


@pytest.mark.parametrize(
    ("point", "command"),
    [
        ("boot.counted", ["ota", "boot-check"]),
        ("commit.begin", ["ota", "commit", "--now"]),
        ("commit.written", ["ota", "commit", "--now"]),
        ("rollback.written", ["ota", "boot-check"]),
    ],
)
def test_kill_at_boot_and_commit_transitions(rig: Rig, point: str, command: list[str]) -> None:
    slots = rig.fresh(point.replace(".", "-"))
    shutil.copy(rig.new_bundle, slots.root.parent.parent / "bundle.tar.zst")
    slots.install(rig.new_bundle)
    if point == "rollback.written":
        for _ in range(slots.max_attempts):
            slots.boot_check()
    run = _cli(*command, "--root", str(slots.root), "--hardware", HARDWARE, env={CRASH_ENV: point})
    assert run.returncode == -signal.SIGKILL, run.stderr
    version = _assert_bootable(slots)
    if point == "commit.written":
        assert slots.read_state().committed_version == NEW
    if point == "rollback.written":
        assert version == OLD and slots.read_state().last_failure.startswith("crash_loop")  # type: ignore[union-attr]
    else:
        _finish(slots)


def _count_transitions(rig: Rig) -> int:
    slots = rig.fresh("count")
    run = subprocess.run(
        [
            PY,
            "-c",
            "import edgeos_protocol.fsutil as f, edgeos_testing.ota as t, sys, pathlib;"
            "t.install_and_commit(pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), sys.argv[3]);"
            "print(len(f._reached))",
            str(slots.root),
            str(rig.new_bundle),
            HARDWARE,
        ],
        env={**os.environ, CRASH_ENV: "never"},
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return int(run.stdout.split()[-1])


@pytest.mark.slow
def test_kill_at_every_numbered_transition(rig: Rig) -> None:
    """Walk every transition reached by install → boot check → commit, by index."""
    total = _count_transitions(rig)
    assert total > 40
    for k in range(1, total + 1):
        slots = rig.fresh(f"n{k}")
        run = subprocess.run(
            [PY, "-m", "edgeos_testing.ota", str(slots.root), str(rig.new_bundle), HARDWARE],
            env={**os.environ, CRASH_ENV: str(k)},
            check=False,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert run.returncode == -signal.SIGKILL, (k, run.stderr)
        _assert_bootable(slots)


def _random_kills(rig: Rig, count: int, seed: int) -> tuple[dict[str, int], int, int]:
    """SIGKILL the install → boot check → commit process at uniformly random instants.

    The instant is drawn over the span of real work (from the process's ``ready`` line to its
    ``done`` line in an uninterrupted probe run). On a busy machine that probe can come out much
    longer than later runs, so a draw can land after the work finished: such a run is not a
    kill (it still must leave a bootable slot), the span shrinks to that instant, and another
    draw is made, until ``count`` runs were really killed (at most ``4 * count`` attempts).
    Returns outcomes of every run, how many were killed and how many attempts it took.
    """
    rng = random.Random(seed)
    probe = rig.fresh("probe")
    cmd = [PY, "-m", "edgeos_testing.ota", str(probe.root), str(rig.new_bundle), HARDWARE]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) as proc:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        start = time.monotonic()
        assert proc.stdout.readline().strip() == "done"
        span = time.monotonic() - start
    seen = {OLD: 0, NEW: 0}
    killed = attempts = 0
    while killed < count and attempts < 4 * count:
        slots = rig.fresh(f"r{seed}-{attempts}")
        attempts += 1
        cmd = [PY, "-m", "edgeos_testing.ota", str(slots.root), str(rig.new_bundle), HARDWARE]
        instant = rng.uniform(0, span)
        with subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) as proc:
            try:
                assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
                time.sleep(instant)
                proc.send_signal(signal.SIGKILL)
            finally:
                proc.kill()
                was_killed = proc.wait() == -signal.SIGKILL
        killed += was_killed
        if not was_killed:
            span = max(instant, 1e-3)
        seen[_assert_bootable(slots)] += 1
    return seen, killed, attempts


def test_kill_at_random_instants(rig: Rig) -> None:
    seen, killed, attempts = _random_kills(rig, 16, seed=1)
    assert sum(seen.values()) == attempts
    assert killed == 16, (seen, killed, attempts)


@pytest.mark.slow
def test_kill_at_many_random_instants(rig: Rig) -> None:
    seen, killed, attempts = _random_kills(rig, 120, seed=2)
    assert sum(seen.values()) == attempts
    assert killed == 120, (seen, killed, attempts)


# --------------------------------------------------------------------------- supervisor


@dataclass
class Start:
    version: str
    trial: bool
    outcome: str  # exited:<code> | start-timeout | committed | trial-failed | running


def _supervise(
    root: Path, log: Path, *, max_starts: int = 8, start_timeout_s: float = 3.0
) -> list[Start]:
    """A tiny systemd: ExecStartPre=boot-check, Type=notify readiness from the health file,
    TimeoutStartSec, Restart=on-failure, and the commit watcher after readiness."""
    common = ["--root", str(root), "--hardware", HARDWARE]
    health = HealthFile(root / "health.json")
    starts: list[Start] = []
    for _ in range(max_starts):
        pre = _cli("ota", "boot-check", "--json", *common)
        assert pre.returncode == 0, pre.stderr
        decision = json.loads(pre.stdout)
        (root / "health.json").unlink(missing_ok=True)
        proc = subprocess.Popen(
            [PY, "-m", decision["entry"]],
            cwd=decision["path"],
            env={
                **os.environ,
                "PYTHONPATH": decision["path"],
                "EDGEOS_OTA_HEALTH": str(root / "health.json"),
                "OTASTUB_LOG": str(log),
            },
        )
        try:

            def exited_or_ready(proc: subprocess.Popen[bytes] = proc) -> bool:
                if proc.poll() is not None:
                    return True
                report = health.read(max_age_s=5)
                return report is not None and report.service_ready

            if not wait_for(exited_or_ready, timeout_s=start_timeout_s):
                starts.append(Start(decision["version"], decision["trial"], "start-timeout"))
                continue  # TimeoutStartSec: killed in finally, then Restart=on-failure
            if proc.poll() is not None:
                starts.append(
                    Start(decision["version"], decision["trial"], f"exited:{proc.returncode}")
                )
                continue
            watcher = _cli(
                "ota", "commit", "--wait", "--health-window", "0.4", "--timeout", "3", *common
            )
            if watcher.returncode == 3:
                starts.append(Start(decision["version"], decision["trial"], "trial-failed"))
                continue  # the unit is restarted so the boot check picks the previous slot
            assert watcher.returncode == 0, watcher.stderr
            outcome = "committed" if "committed" in watcher.stdout else "running"
            starts.append(Start(decision["version"], decision["trial"], outcome))
            return starts
        finally:
            proc.kill()
            proc.wait()
    return starts


def _device_with(tmp_path: Path, make_release: MakeRelease, behaviour: str) -> SlotManager:
    slots = SlotManager(tmp_path / "gw", hardware=HARDWARE)
    slots.provision(make_release("1.0.0"))
    slots.install(make_release("1.1.0", behaviour=behaviour))
    return slots


def test_healthy_release_is_committed_under_supervision(
    tmp_path: Path, make_release: MakeRelease
) -> None:
    slots = _device_with(tmp_path, make_release, "healthy")
    starts = _supervise(slots.root, tmp_path / "runs.log")
    assert [(s.version, s.trial, s.outcome) for s in starts] == [("1.1.0", True, "committed")]
    assert slots.read_state().floors["full"] == "1.1.0"


def test_release_crashing_at_start_is_rolled_back(
    tmp_path: Path, make_release: MakeRelease
) -> None:
    slots = _device_with(tmp_path, make_release, "crash")
    starts = _supervise(slots.root, tmp_path / "runs.log")
    assert [(s.version, s.outcome) for s in starts] == [("1.1.0", "exited:1")] * 3 + [
        ("1.0.0", "running")
    ]
    state = slots.read_state()
    assert state.active == "a" and state.floors["full"] == "1.0.0"
    assert state.last_outcome is not None and state.last_outcome["reason"] == "crash_loop"
    assert (tmp_path / "runs.log").read_text().count("1.1.0 crash") == 3


def test_release_never_ready_is_rolled_back(tmp_path: Path, make_release: MakeRelease) -> None:
    slots = _device_with(tmp_path, make_release, "unhealthy")
    starts = _supervise(slots.root, tmp_path / "runs.log", start_timeout_s=1.5)
    assert [(s.version, s.outcome) for s in starts] == [("1.1.0", "start-timeout")] * 3 + [
        ("1.0.0", "running")
    ]
    assert slots.read_state().last_outcome["reason"] == "crash_loop"  # type: ignore[index]


def test_release_ready_but_never_healthy_is_rolled_back(
    tmp_path: Path, make_release: MakeRelease
) -> None:
    slots = _device_with(tmp_path, make_release, "degraded")
    starts = _supervise(slots.root, tmp_path / "runs.log")
    assert [(s.version, s.outcome) for s in starts] == [
        ("1.1.0", "trial-failed"),
        ("1.0.0", "running"),
    ]
    state = slots.read_state()
    assert state.last_outcome is not None and state.last_outcome["reason"] == "health"
    assert "acknowledging" in (state.last_failure or "")
