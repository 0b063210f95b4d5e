"""A/B slots: install, boot check, trial, commit, rollback, floors, models hook, health."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from edgeos.clock import VirtualClock
from edgeos.ota.health import HealthFile, HealthReport
from edgeos.ota.install import verify_tree
from edgeos.ota.slots import SlotManager
from edgeos.ota.trial import TrialMonitor, TrialOutcome
from edgeos_protocol.outcome import InstallError, Reason, Rejected
from edgeos_testing.ota import HARDWARE, Device, MakeRelease

GOOD = HealthReport(service_ready=True, watchdog_alive=True, drivers_connected=2, drivers_total=2)


def _tree_digest(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_install_trial_commit_raises_floor(device: Device, make_release: MakeRelease) -> None:
    slots = device.slots
    result = slots.install(make_release("1.1.0"))
    assert (result.slot, result.restart_required) == ("b", True)
    state = slots.read_state()
    assert (state.active, state.trial, state.attempts) == ("a", "b", 0)

    decision = slots.boot_check()
    assert (decision.slot, decision.trial, decision.attempt, decision.version) == (
        "b",
        True,
        1,
        "1.1.0",
    )
    assert os.readlink(slots.current_link) == "b"

    state = slots.commit()
    assert (state.active, state.trial, state.floors["full"]) == ("b", None, "1.1.0")
    assert state.last_outcome is not None and state.last_outcome["outcome"] == "committed"
    decision = slots.boot_check()
    assert (decision.slot, decision.trial) == ("b", False)

    # The old version is still on disk in slot a, but can never come back.
    with pytest.raises(Rejected) as info:
        slots.install(make_release("1.0.0"))
    assert info.value.reason is Reason.ROLLBACK


def test_crash_loop_rolls_back_after_max_attempts(
    device: Device, make_release: MakeRelease
) -> None:
    slots = device.slots
    slots.install(make_release("1.1.0", behaviour="crash"))
    for attempt in (1, 2, 3):
        decision = slots.boot_check()
        assert (decision.slot, decision.attempt) == ("b", attempt)
    decision = slots.boot_check()
    assert (decision.slot, decision.trial, decision.version) == ("a", False, "1.0.0")
    assert any("rolled back" in e for e in decision.events)
    state = slots.read_state()
    assert state.last_failure is not None and state.last_failure.startswith("crash_loop")
    assert state.last_outcome is not None
    assert (state.last_outcome["outcome"], state.last_outcome["version"]) == (
        "rolled_back",
        "1.1.0",
    )
    # The failed version is not retried automatically …
    with pytest.raises(Rejected) as info:
        slots.install(make_release("1.1.0", behaviour="crash"))
    assert info.value.reason is Reason.PREVIOUSLY_FAILED
    # … but a fixed release installs.
    assert slots.install(make_release("1.1.1")).slot == "b"


def test_corrupted_trial_slot_falls_back(device: Device, make_release: MakeRelease) -> None:
    slots = device.slots
    slots.install(make_release("1.1.0"))
    victim = slots.slot_path("b") / "otastub" / "__main__.py"
    victim.write_text("import sys; sys.exit(3)\n")
    decision = slots.boot_check()
    assert (decision.slot, decision.trial) == ("a", False)
    assert slots.read_state().last_failure.startswith("corrupt_slot")  # type: ignore[union-attr]


def test_damaged_active_slot_never_boots(device: Device, make_release: MakeRelease) -> None:
    slots = device.slots
    slots.install(make_release("1.1.0"))
    slots.boot_check()
    slots.commit()
    (slots.slot_path("b") / "otastub" / "__init__.py").write_text("broken")
    decision = slots.boot_check()
    # Slot a verifies but is below the floor: refusing to start beats running old code.
    assert not decision.ok and decision.slot is None
    assert any("version floor" in e for e in decision.events)


def test_refusals_leave_slots_untouched(
    device: Device, make_release: MakeRelease, tmp_path: Path
) -> None:
    slots = device.slots
    before_a = _tree_digest(slots.slot_path("a"))
    before_state = slots.state_path.read_bytes()
    with pytest.raises(Rejected) as info:
        slots.install(make_release("2.0.0", hardware="jetson-orin"))
    assert info.value.reason is Reason.WRONG_HARDWARE
    with pytest.raises(Rejected) as info:
        slots.install(make_release("0.9.0"))
    assert info.value.reason is Reason.ROLLBACK
    with pytest.raises(Rejected) as info:
        slots.install(make_release("1.1.0"), expected_digest="0" * 64)
    assert info.value.reason is Reason.MIX_AND_MATCH
    assert slots.state_path.read_bytes() == before_state
    assert _tree_digest(slots.slot_path("a")) == before_a
    assert not slots.slot_path("b").exists()
    assert not [p for p in slots.root.iterdir() if p.name.startswith(".staging")]


def test_install_quota_exhausted_leaves_slots_untouched(
    device: Device, make_release: MakeRelease
) -> None:
    """Installer size quota standing in for a full disk: ENOSPC mid-write, nothing changes."""
    slots = device.slots
    slots.install(make_release("1.1.0"))
    slots.boot_check()
    slots.commit()  # slot a now holds 1.0.0 as the inactive slot
    before = slots.state_path.read_bytes()
    with pytest.raises(InstallError) as info:
        slots.install(make_release("1.2.0"), quota_bytes=200_000)
    assert info.value.reason is Reason.NO_SPACE
    assert slots.state_path.read_bytes() == before
    assert verify_tree(slots.slot_path("b"))[1] == []
    assert not [p for p in slots.root.iterdir() if p.name.startswith(".staging")]


def test_install_refused_when_reserve_exceeds_free_space(
    device: Device, make_release: MakeRelease
) -> None:
    """Real free-space check (statvfs) with a reserve no filesystem here can satisfy."""
    with pytest.raises(InstallError) as info:
        device.slots.install(make_release("1.1.0"), reserve_bytes=1 << 60)
    assert info.value.reason is Reason.NO_SPACE
    assert device.slots.read_state().trial is None


def test_no_second_install_during_trial(device: Device, make_release: MakeRelease) -> None:
    device.slots.install(make_release("1.1.0"))
    with pytest.raises(InstallError):
        device.slots.install(make_release("1.2.0"))


def test_config_bundle_is_trialled_with_active_runtime(
    device: Device, make_release: MakeRelease
) -> None:
    slots = device.slots
    result = slots.install(make_release("7", kind="config"))
    assert result.slot == "b" and result.restart_required
    manifest, problems = verify_tree(slots.slot_path("b"))
    assert problems == [] and manifest is not None
    assert manifest.version == "1.0.0" and dict(manifest.components) == {
        "full": "1.0.0",
        "config": "7",
    }
    assert (slots.slot_path("b") / "otastub" / "__main__.py").exists()
    slots.boot_check()
    state = slots.commit()
    assert state.floors == {"full": "1.0.0", "config": "7"}
    with pytest.raises(Rejected):
        slots.install(make_release("6", kind="config"))


def test_models_update_calls_hook_without_restart(
    device: Device, make_release: MakeRelease
) -> None:
    seen: list[Path] = []
    slots = SlotManager(device.root, hardware=HARDWARE, models_hook=seen.append)
    result = slots.install(make_release("3", kind="models"))
    assert not result.restart_required and result.slot is None
    assert seen == [slots.models_dir / "3"]
    assert (seen[0] / "models" / "scrap.tflite").read_bytes() == b"3" * 100
    assert os.readlink(slots.models_dir / "current") == "3"
    assert slots.read_state().trial is None  # the runtime keeps running

    slots.install(make_release("4", kind="models"))
    assert seen[-1].name == "4" and (slots.models_dir / "3").exists()  # side by side
    with pytest.raises(Rejected):
        slots.install(make_release("2", kind="models"))


def test_models_hook_failure_keeps_previous_models(
    device: Device, make_release: MakeRelease
) -> None:
    def refuse(path: Path) -> None:
        raise ValueError("interpreter cannot load")

    ok = SlotManager(device.root, hardware=HARDWARE)
    ok.install(make_release("3", kind="models"))
    slots = SlotManager(device.root, hardware=HARDWARE, models_hook=refuse)
    with pytest.raises(InstallError):
        slots.install(make_release("4", kind="models"))
    assert os.readlink(slots.models_dir / "current") == "3"


def test_state_file_is_replaced_atomically(device: Device, make_release: MakeRelease) -> None:
    device.slots.install(make_release("1.1.0"))
    names = [p.name for p in device.root.iterdir()]
    assert not [n for n in names if ".tmp-" in n]
    raw = json.loads(device.slots.state_path.read_text())
    assert raw["format"] == 1 and raw["trial"] == "b"


def test_unreadable_state_is_rebuilt_from_slots(device: Device) -> None:
    device.slots.state_path.write_text("{garbage")
    decision = device.slots.boot_check()
    assert decision.ok and decision.slot == "a"
    assert "rebuilt" in decision.events[0]


# --------------------------------------------------------------------------- trial monitor


async def test_monitor_commits_after_a_full_healthy_window(
    device: Device, make_release: MakeRelease
) -> None:
    device.slots.install(make_release("1.1.0"))
    device.slots.boot_check()
    clock = VirtualClock()
    monitor = TrialMonitor(device.slots, health_window_s=60, trial_timeout_s=600, clock=clock)
    import asyncio

    task = asyncio.create_task(monitor.run())
    monitor.report(GOOD)
    await clock.advance(30, step=1)
    monitor.report(GOOD)
    # A blip resets the window: healthy must be continuous.
    monitor.report(
        HealthReport(service_ready=True, watchdog_alive=True, drivers_connected=1, drivers_total=2)
    )
    await clock.advance(1, step=1)
    for _ in range(59):
        monitor.report(GOOD)
        await clock.advance(1, step=1)
    assert not task.done()
    assert device.slots.read_state().trial == "b"
    for _ in range(3):
        monitor.report(GOOD)
        await clock.advance(1, step=1)
    assert await task is TrialOutcome.COMMITTED
    assert device.slots.read_state().active == "b"


async def test_monitor_fails_trial_when_never_healthy(
    device: Device, make_release: MakeRelease
) -> None:
    device.slots.install(make_release("1.1.0", behaviour="unhealthy"))
    device.slots.boot_check()
    clock = VirtualClock()
    monitor = TrialMonitor(device.slots, health_window_s=60, trial_timeout_s=180, clock=clock)
    import asyncio

    task = asyncio.create_task(monitor.run())
    bad = HealthReport(service_ready=True, watchdog_alive=True, acks_flowing=False)
    while not task.done():
        monitor.report(bad)
        await clock.advance(5, step=1)
    assert task.result() is TrialOutcome.FAILED
    state = device.slots.read_state()
    assert state.trial is None and state.active == "a"
    assert state.last_failure is not None
    assert state.last_failure.startswith("health") and "acknowledging" in state.last_failure


async def test_monitor_treats_silence_as_unhealthy(
    device: Device, make_release: MakeRelease
) -> None:
    device.slots.install(make_release("1.1.0"))
    device.slots.boot_check()
    clock = VirtualClock()
    monitor = TrialMonitor(
        device.slots, health_window_s=60, trial_timeout_s=100, stale_after_s=10, clock=clock
    )
    import asyncio

    task = asyncio.create_task(monitor.run())
    monitor.report(GOOD)  # one good report, then the runtime hangs
    await clock.advance(120, step=1)
    assert await task is TrialOutcome.FAILED
    assert "no health report" in (device.slots.read_state().last_failure or "")


async def test_a_trial_failed_on_the_health_file_records_which_reason_it_was(
    device: Device, make_release: MakeRelease, tmp_path: Path
) -> None:
    device.slots.install(make_release("1.1.0"))
    device.slots.boot_check()
    clock = VirtualClock()
    health = HealthFile(tmp_path / "never-written.json")
    monitor = TrialMonitor(
        device.slots,
        health_window_s=60,
        trial_timeout_s=100,
        clock=clock,
        poll=lambda: health.read(max_age_s=15),
        why_not=lambda: health.refused,
    )
    import asyncio

    task = asyncio.create_task(monitor.run())
    await clock.advance(120, step=1)
    assert await task is TrialOutcome.FAILED
    assert "no health file yet" in (device.slots.read_state().last_failure or "")


async def test_monitor_returns_when_not_on_trial(device: Device) -> None:
    monitor = TrialMonitor(device.slots, health_window_s=1, clock=VirtualClock())
    assert await monitor.run() is TrialOutcome.NOT_ON_TRIAL


def test_health_file_from_dead_writer_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / "health.json"
    HealthFile(path).report(GOOD)
    assert HealthFile(path).read(max_age_s=60) == GOOD
    # A writer process that reported healthy and then died must not count.
    code = (
        "import sys; from pathlib import Path; from edgeos.ota.health import HealthFile, HealthReport;"
        "HealthFile(Path(sys.argv[1])).report(HealthReport(True, True))"
    )
    subprocess.run([sys.executable, "-c", code, str(path)], check=True)
    assert json.loads(path.read_text())["health"]["service_ready"] is True
    assert HealthFile(path).read(max_age_s=60) is None
    assert HealthFile(tmp_path / "missing.json").read(max_age_s=60) is None
