"""Command results are recorded once per version: a repeat or a replay never overwrites."""

from __future__ import annotations

from pathlib import Path

from edgeos_cloud.receiver.storage import open_storage


def test_a_replayed_old_result_never_overwrites_the_stored_outcome(tmp_path: Path) -> None:
    storage = open_storage(f"sqlite:///{tmp_path / 'rx.db'}")
    try:
        first = storage.enqueue_command("gw-1", {"nest01.setpoint": 180.0}, 1_000)
        second = storage.enqueue_command("gw-1", {"nest01.setpoint": 182.5}, 2_000)
        storage.mark_sent("gw-1", first.version, 1_100)
        storage.mark_sent("gw-1", second.version, 2_100)
        busy = {"error": "device busy"}
        assert storage.record_command_result("gw-1", second.version, False, busy, 2_200)
        assert storage.record_command_result("gw-1", first.version, True, {"ok": 1}, 2_300)
        # Captured earlier, replayed after a receiver restart (its counter guard is empty):
        # an answer to an answered version is kept as it was.
        assert storage.record_command_result("gw-1", first.version, False, busy, 9_000)
        assert storage.record_command_result("gw-1", second.version, True, {"late": 1}, 9_100)
        by_version = {c.version: c for c in storage.commands("gw-1")}
        assert by_version[first.version].status == "applied"
        assert by_version[first.version].results == {"ok": 1}
        assert by_version[first.version].answered_us == 2_300
        assert by_version[second.version].status == "refused"
        assert by_version[second.version].results == busy
        # A result for a command that never existed is still reported as such.
        assert not storage.record_command_result("gw-1", 99, True, {}, 9_200)
    finally:
        storage.close()
