"""The health file's boot id: a writer sandboxed like edgeos.service (``ProcSubset=pid``, so no
``/proc/sys``) and an unconfined reader (the image's root-slot mark-good, run as root) must agree
on it, or the reader takes every report for one of another boot and never commits a root slot
(found by images/test-boot.sh: a healthy 2.0.0 trial rebooted as "health file missing, stale,
or its writer is dead"). The sandbox is real: a private mount namespace with a procfs mounted
``subset=pid``, as systemd does for the unit."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgeos.ota.health import HealthFile, HealthReport

ROOT = Path(__file__).resolve().parents[2]
GOOD = HealthReport(service_ready=True, watchdog_alive=True, drivers_connected=1, drivers_total=1)
WRITER = """
import sys
from pathlib import Path
from edgeos.ota.health import HealthFile, HealthReport
print(Path("/proc/sys/kernel/random/boot_id").exists(), flush=True)
HealthFile(Path(sys.argv[1])).report(
    HealthReport(service_ready=True, watchdog_alive=True, drivers_connected=1, drivers_total=1)
)
print("written", flush=True)
sys.stdin.read()  # alive (the reader checks the writer's pid) until the test closes stdin
"""


def _sandboxed(code: str, path: Path) -> list[str]:
    """``python -c code path`` in a private mount namespace whose procfs is ``subset=pid``
    (what systemd's ``ProcSubset=pid`` gives edgeos.service)."""
    mount = 'mount -t proc -o subset=pid proc /proc && exec "$@"'
    return [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        mount,
        "sh",
        sys.executable,
        "-c",
        code,
        str(path),
    ]


def _systemd_boot_id() -> str:
    """What systemd's ``%b`` gives: this boot's id without dashes."""
    return Path("/proc/sys/kernel/random/boot_id").read_text().strip().replace("-", "")


def _read_from_sandboxed_writer(
    path: Path, env: dict[str, str], *, backdate: bool = False
) -> HealthReport | None:
    """Read the report while its sandboxed writer is alive; ``backdate``: first set the file's
    time to before this boot (as a file left by an earlier boot would be)."""
    probe = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "true"], capture_output=True, check=False
    )
    if probe.returncode != 0:
        pytest.skip(f"no mount namespace here (needs root): {probe.stderr.decode().strip()}")
    writer = subprocess.Popen(
        _sandboxed(WRITER, path),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert writer.stdout is not None
        sees_boot_id = writer.stdout.readline().strip()
        assert sees_boot_id == "False", "the sandbox still shows /proc/sys: it proves nothing"
        assert writer.stdout.readline().strip() == "written"
        if backdate:
            before_boot = time.time() - time.clock_gettime(time.CLOCK_BOOTTIME) - 60
            os.utime(path, (before_boot, before_boot))
        return HealthFile(path).read(max_age_s=60)
    finally:
        assert writer.stdin is not None
        writer.stdin.close()
        writer.wait(timeout=30)


def test_a_report_from_a_writer_without_proc_sys_counts_when_the_unit_hands_it_the_boot_id(
    tmp_path: Path,
) -> None:
    env = {**os.environ, "EDGEOS_BOOT_ID": _systemd_boot_id()}
    assert _read_from_sandboxed_writer(tmp_path / "health.json", env) == GOOD
    # stamped with this boot's id, not the fallback's "": a report of another boot stays refused
    stamped = json.loads((tmp_path / "health.json").read_text())["boot_id"]
    assert stamped == _systemd_boot_id().lower()


def test_without_the_boot_id_handed_over_a_report_counts_only_while_its_file_is_of_this_boot(
    tmp_path: Path,
) -> None:
    """A writer that cannot tell the boot id (sandboxed, no ``EDGEOS_BOOT_ID``: an application
    slot from before the units handed it over) stamps none; the reader then takes the file's
    own time as the proof that it is of this boot."""
    env = {k: v for k, v in os.environ.items() if k != "EDGEOS_BOOT_ID"}
    assert _read_from_sandboxed_writer(tmp_path / "a.json", env) == GOOD
    assert _read_from_sandboxed_writer(tmp_path / "b.json", env, backdate=True) is None


@pytest.mark.parametrize("unit", ["edgeos.service", "edgeos-commit.service"])
def test_every_unit_that_hides_proc_sys_hands_over_the_boot_id(unit: str) -> None:
    lines = (ROOT / "systemd" / unit).read_text().splitlines()
    assert "ProcSubset=pid" in lines
    assert "Environment=EDGEOS_BOOT_ID=%b" in lines


def _stamp(path: Path, boot_id: str) -> None:
    doc = json.loads(path.read_text())
    doc["boot_id"] = boot_id
    path.write_text(json.dumps(doc))


def test_a_report_from_an_older_writer_is_read_whatever_it_stamped_if_written_this_boot(
    tmp_path: Path,
) -> None:
    """An application slot older than the root that reads it (a root update does not touch the
    data partition's slots): unconfined it stamped the id with dashes; sandboxed, before the
    units handed the id over, it stamped nothing -- then the file's time must be of this boot."""
    path = tmp_path / "health.json"
    HealthFile(path).report(GOOD)
    _stamp(path, Path("/proc/sys/kernel/random/boot_id").read_text().strip())  # with dashes
    assert HealthFile(path).read(max_age_s=60) == GOOD
    _stamp(path, "")
    assert HealthFile(path).read(max_age_s=60) == GOOD
    before_boot = time.time() - time.clock_gettime(time.CLOCK_BOOTTIME) - 60
    os.utime(path, (before_boot, before_boot))
    assert HealthFile(path).read(max_age_s=60) is None
    _stamp(path, "0" * 32)  # another boot, said plainly: refused whatever the file's time
    assert HealthFile(path).read(max_age_s=60) is None


def test_a_sandboxed_reader_that_cannot_tell_the_boot_id_still_reads_a_report_of_this_boot(
    tmp_path: Path,
) -> None:
    """The other side: a commit watcher under an older unit (no ``EDGEOS_BOOT_ID``) reading a
    report stamped with the real id; it counts while the file is of this boot, not after."""
    path = tmp_path / "health.json"
    HealthFile(path).report(GOOD)
    reader = """
import sys
from pathlib import Path
from edgeos.ota.health import HealthFile
print(Path("/proc/sys/kernel/random/boot_id").exists(), HealthFile(Path(sys.argv[1])).read(max_age_s=60) is not None)
"""
    env = {k: v for k, v in os.environ.items() if k != "EDGEOS_BOOT_ID"}

    def sandboxed_read() -> str:
        done = subprocess.run(
            _sandboxed(reader, path),
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
            check=False,
        )
        if done.returncode != 0 and "unshare" in done.stderr:
            pytest.skip(f"no mount namespace here (needs root): {done.stderr.strip()}")
        return done.stdout.strip()

    assert sandboxed_read() == "False True"
    before_boot = time.time() - time.clock_gettime(time.CLOCK_BOOTTIME) - 60
    os.utime(path, (before_boot, before_boot))
    assert sandboxed_read() == "False False"


def test_an_unreadable_report_says_which_of_the_reasons_it_is(tmp_path: Path) -> None:
    """The watchers' verdict (trial-failed …, the commit log) names the cause instead of
    "missing, stale, or its writer is dead": the boot test's first failure took a mount of the
    disk image to tell which."""
    path = tmp_path / "health.json"
    health = HealthFile(path)
    assert health.read(max_age_s=60) is None and "no health file yet" in health.refused
    health.report(GOOD)
    assert health.read(max_age_s=60) == GOOD and health.refused == ""
    _stamp(path, "0" * 32)
    assert health.read(max_age_s=60) is None and "another boot" in health.refused
    health.report(GOOD)
    doc = json.loads(path.read_text())
    doc["monotonic"] -= 100
    path.write_text(json.dumps(doc))
    assert health.read(max_age_s=60) is None
    old = re.search(r"last health report (\d+) s old \(limit 60 s\)", health.refused)
    assert old is not None and int(old.group(1)) >= 100
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    doc["monotonic"] += 100
    doc["pid"] = int(dead.stdout)
    path.write_text(json.dumps(doc))
    assert health.read(max_age_s=60) is None
    assert f"writer (pid {int(dead.stdout)}) is gone" in health.refused
    path.write_text("{not json")
    assert health.read(max_age_s=60) is None and "unreadable" in health.refused
