"""HIL fault scenarios (short mode): each runs the rig, injects one class of fault, heals, and
asks the oracle. Acceptance: zero loss, zero duplicates, order kept, no wrong values of
accepted samples; the figures go to the run's report (no timed assertions)."""

from __future__ import annotations

import asyncio
import errno
import json
import time
from pathlib import Path
from typing import Any

import pytest

from edgeos_cloud.receiver.storage import open_storage
from edgeos_testing.clockjump import WallClock
from edgeos_testing.dut import LocalDut
from edgeos_testing.receiverdb import read_receiver
from edgeos_testing.report import Outcome
from edgeos_testing.rig import Rig, finish, spool_quota_options

pytestmark = pytest.mark.timeout(300)


async def _warm(rig: Rig, batches: int = 2) -> None:
    async with asyncio.timeout(60):
        await rig.wait_batches(batches)


def _judge(report: Any, outcome: Outcome) -> None:
    report.add(outcome)
    print(json.dumps(outcome.as_dict(), indent=1, default=str))
    assert outcome.passed, (outcome.problems, outcome.figures.examples)


async def test_machine_link_faults(make_rig: Any, hil_report: Any) -> None:
    """Gateway ↔ machines: latency, lost response chunks, corrupted response bytes, a
    partition; reads fail, nothing that was read is lost. Modbus TCP carries no checksum, so a
    flipped bit inside a register is a valid answer with a wrong value: the oracle counts such
    values apart (``wrong_under_corruption``, in the report) and still requires zero wrong
    values outside the corruption window, and a runtime that kept running through it."""
    rig = await make_rig()
    await _warm(rig)
    proxy = rig.machine_proxy
    start = time.time()
    proxy.set_latency(0.05)
    await asyncio.sleep(3)
    proxy.heal()
    proxy.set_drop(0.05, "down")
    await asyncio.sleep(3)
    proxy.heal()
    corrupt_from = time.time()
    proxy.set_corrupt(0.05, "down")
    await asyncio.sleep(3)
    proxy.heal()
    corrupt = [(corrupt_from, time.time())]
    proxy.partition()
    await asyncio.sleep(3)
    proxy.heal()
    # Reads keep failing for a moment after the heal (request timeout, reconnect backoff).
    faults = [(start, time.time() + 6)]
    await asyncio.sleep(4)
    assert rig.dut is not None
    state = (await rig.dut.status()).get("state")
    outcome = await finish(
        rig,
        "machine-link: latency 50 ms, 5 % responses dropped, 5 % corrupted, 3 s partition",
        fault_windows=faults,
        corrupt_windows=corrupt,
    )
    outcome.notes["proxy"] = dict(proxy.counts)
    if state != "running":
        outcome.problems.append(f"runtime {state} after the machine-link faults")
    _judge(hil_report, outcome)


async def test_broker_link_faults(make_rig: Any, hil_report: Any) -> None:
    """Gateway ↔ broker: latency, bandwidth cap, corruption (TLS refuses it), partition."""
    rig = await make_rig()
    await _warm(rig)
    proxy = rig.broker_proxy
    proxy.set_latency(0.3)
    await asyncio.sleep(3)
    proxy.heal()
    proxy.set_bandwidth(2000)
    await asyncio.sleep(4)
    proxy.heal()
    proxy.set_corrupt(0.2, "up")
    await asyncio.sleep(3)
    proxy.heal()
    proxy.partition()
    await asyncio.sleep(4)
    proxy.heal()
    outcome = await finish(
        rig, "broker-link: latency 300 ms, 2 kB/s cap, corruption, 4 s partition"
    )
    outcome.notes["proxy"] = dict(proxy.counts)
    _judge(hil_report, outcome)


async def test_broker_kill_restart(make_rig: Any, hil_report: Any) -> None:
    rig = await make_rig()
    await _warm(rig)
    await asyncio.to_thread(rig.broker.kill)
    await asyncio.sleep(4)
    await asyncio.to_thread(rig.broker.start)
    outcome = await finish(rig, "broker kill -9, restart after 4 s")
    _judge(hil_report, outcome)


async def test_receiver_kill(make_rig: Any, hil_report: Any) -> None:
    rig = await make_rig()
    await _warm(rig)
    rig.receivers[0].kill()
    await asyncio.sleep(4)
    rig.receivers[0].start()
    outcome = await finish(rig, "receiver kill -9, restart after 4 s")
    _judge(hil_report, outcome)


async def test_runtime_kill9(make_rig: Any, hil_report: Any) -> None:
    rig = await make_rig()
    assert rig.dut is not None
    await _warm(rig)
    await rig.dut.kill()
    await asyncio.sleep(1)
    await rig.dut.start()
    await _warm(rig)
    outcome = await finish(rig, "runtime kill -9, restart")
    _judge(hil_report, outcome)


async def test_runtime_sigstop_watchdog(make_rig: Any, hil_report: Any) -> None:
    """SIGSTOP the runtime under a systemd-like supervisor: pings stop, the watchdog fires,
    the runtime is killed and restarted, and nothing accepted is lost."""
    rig = await make_rig(watchdog_s=2.0)
    dut = rig.dut
    assert isinstance(dut, LocalDut) and dut.supervisor is not None
    sup = dut.supervisor
    await _warm(rig)
    sup.drain()
    pings_before = sup.pings
    assert pings_before > 0, "the runtime sends no WATCHDOG=1 while healthy"
    frozen_at = time.monotonic()
    await dut.freeze()
    async with asyncio.timeout(30):
        while dut.restarts == 0:  # noqa: ASYNC110 - the supervisor lives in this loop
            await asyncio.sleep(0.1)
    fired_after = time.monotonic() - frozen_at
    async with asyncio.timeout(60):
        await dut.wait_running()
    await _warm(rig)
    outcome = await finish(
        rig,
        "runtime SIGSTOP → watchdog (WATCHDOG_USEC 2 s) → SIGABRT/SIGKILL → restart",
        notes={
            "watchdog_fired": sup.fired,
            "pings_before_stop": pings_before,
            "stop_to_restart_s": round(fired_after, 2),
            "ready_messages": sup.ready,
            "start_timeouts": sup.start_timeouts,
        },
    )
    if sup.fired != 1 or sup.start_timeouts:
        outcome.problems.append(
            f"watchdog fired {sup.fired} times (expected 1), {sup.start_timeouts} start timeouts"
        )
    _judge(hil_report, outcome)


async def fill_spool(rig: Rig) -> dict[str, Any]:
    """Partition the broker link until the spool's full policy acted, a little longer, heal."""
    rig.broker_proxy.partition()
    async with asyncio.timeout(150):
        doc = await rig.wait_status(lambda d: d.get("uplink", {}).get("dropped", 0) > 0)
    await asyncio.sleep(3)
    rig.broker_proxy.heal()
    # Batches sealed after the heal announce the refused/dropped ranges in meta.skip.
    sealed = doc["uplink"]["batches_sealed"]
    async with asyncio.timeout(60):
        await rig.wait_batches(sealed + 2)
    return doc


async def test_disk_fills(make_rig: Any, hil_report: Any) -> None:
    """The disk really fills: the DUT's state directory (spool, twin snapshots) is a 512 KiB
    tmpfs and the broker is unreachable, so the spool's writes fail with ENOSPC long before its
    own bound. The runtime keeps scanning, refuses (``refuse_new``) and counts what it could not
    store, announces the gap, and delivers everything it did store once the link is back.
    Where no tmpfs can be mounted (no root/CAP_SYS_ADMIN) the spool's own 256 KiB bound stands
    in for the disk, and the report says so."""
    options = spool_quota_options("refuse_new")
    spool = options["runtime_overrides"]["uplink"]["spool"]
    spool["max_bytes"] = 64 << 20  # far above the disk: only ENOSPC can stop it
    del spool["segment_bytes"]
    real_disk = True
    try:
        rig = await make_rig(**options, state_fs_bytes=512 << 10)
        name = "disk fills (512 KiB tmpfs state dir, ENOSPC)"
    except PermissionError as exc:
        real_disk = False
        print(f"no real full disk here ({exc}); the spool quota stands in for it")
        rig = await make_rig(**spool_quota_options("refuse_new"))
        name = f"disk fills — spool quota stands in (no tmpfs: {exc})"
    await _warm(rig)
    full = await fill_spool(rig)
    status = await rig.dut.status() if rig.dut is not None else {}
    outcome = await finish(rig, name, drain_s=120)
    _quota_checks(outcome, full, rig)
    enospc = full["uplink"]["spool"].get("enospc", 0)
    outcome.notes["enospc"] = enospc
    outcome.notes["state_after"] = status.get("state")
    if real_disk and enospc < 1:
        outcome.problems.append("the spool never met ENOSPC (the quota stopped it first?)")
    if status.get("state") != "running":
        outcome.problems.append(f"runtime state after the full disk: {status.get('state')}")
    _judge(hil_report, outcome)


def _fill(path: Path) -> int:
    """Write ``path`` until the filesystem says ENOSPC; the bytes it took."""
    chunk = b"\0" * (64 << 10)
    n = 0
    with open(path, "wb", buffering=0) as f:
        while True:
            try:
                n += f.write(chunk)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                return n


async def test_restart_on_a_full_disk_starts_refuses_and_delivers_once_freed(
    make_rig: Any, hil_report: Any
) -> None:
    """The gateway is killed (a power cut) and its state disk fills before it comes back (a
    log, a core dump), with the broker out of reach: it must start on the full disk and run —
    read, judge, answer ``status`` — refuse and count the batches it cannot store (ENOSPC in
    the spool's counters), announce them, and deliver everything it stored once space is freed
    and the link is back. (images/test-boot.sh does this on the image's data partition.)
    Needs a real small filesystem (tmpfs, root): without one there is nothing to show."""
    options = spool_quota_options("refuse_new")
    spool = options["runtime_overrides"]["uplink"]["spool"]
    spool["max_bytes"] = 64 << 20  # far above the disk: only ENOSPC can refuse
    del spool["segment_bytes"]
    try:
        rig = await make_rig(**options, state_fs_bytes=4 << 20)
    except PermissionError as exc:
        pytest.skip(f"no tmpfs for a real full disk here: {exc}")
    assert isinstance(rig.dut, LocalDut)
    await _warm(rig)
    await rig.dut.kill()
    filler = rig.state_dir / "filler"
    took = await asyncio.to_thread(_fill, filler)
    # With the broker reachable the spool lives on the space its acknowledged segments give
    # back; cut off, nothing is given back and every batch meets the full disk.
    rig.broker_proxy.partition()
    await rig.dut.start()  # raises with the runtime's log if it will not start

    def refusing(d: dict[str, Any]) -> bool:
        return d.get("uplink", {}).get("batcher", {}).get("refused_batches", 0) > 0

    async with asyncio.timeout(120):
        full = await rig.wait_status(refusing)
    # A second power cut with the disk still full: what this run refused was announced only in
    # memory so far (no batch could be stored to carry it). The next run must still tell.
    killed = full["uplink"]["batcher"]
    await rig.dut.kill()
    await rig.dut.start()
    async with asyncio.timeout(120):
        await rig.wait_status(refusing)
    filler.unlink()
    rig.broker_proxy.heal()
    after = (await rig.dut.status())["uplink"]["batches_sealed"]
    async with asyncio.timeout(60):
        await rig.wait_batches(after + 2)  # carrying the announcement of what was refused
    outcome = await finish(rig, "restart on a full disk (4 MiB tmpfs state dir), then freed")
    outcome.notes["filler_bytes"] = took
    outcome.notes["state_on_full_disk"] = full.get("state")
    _quota_checks(outcome, full, rig, earlier_runs_dropped=full["uplink"]["dropped"])
    if full["uplink"]["spool"].get("enospc", 0) < 1:
        outcome.problems.append("the spool never met ENOSPC: the disk was not full to it")
    if full.get("state") != "running":
        outcome.problems.append(f"runtime state on the full disk: {full.get('state')}")
    # Every batch number the killed run used reached the receiver, stored or announced.
    data = await asyncio.to_thread(read_receiver, rig.storage_url, rig.device_id)
    epoch = int(killed["epoch"], 16)
    told = {
        s for b in data.batches for e, f, last in b.skip if e == epoch for s in range(f, last + 1)
    }
    held = {b.seq for b in data.batches if b.epoch == epoch}
    untold = sorted(set(range(1, int(killed["seq"]) + 1)) - held - told)
    outcome.notes["killed_run"] = {
        "seq": killed["seq"],
        "stored": len(held),
        "announced": len(told),
    }
    if untold:
        outcome.problems.append(
            f"batches of the run killed on the full disk neither stored nor announced: {untold}"
        )
    _judge(hil_report, outcome)


@pytest.mark.slow
async def test_disk_quota_refuse_new(make_rig: Any, hil_report: Any) -> None:
    """The spool's own bound (256 KiB) fills while the broker is unreachable (``refuse_new``):
    refused batches are counted and announced, nothing else is lost, acks do not stall.
    (``drop_oldest`` runs in tests/e2e; the real full disk runs in the short suite above.)"""
    rig = await make_rig(**spool_quota_options("refuse_new"))
    await _warm(rig)
    full = await fill_spool(rig)
    outcome = await finish(rig, "spool quota (256 KiB, refuse_new)", drain_s=120)
    _quota_checks(outcome, full, rig)
    _judge(hil_report, outcome)


def _quota_checks(
    outcome: Outcome, full: dict[str, Any], rig: Rig, *, earlier_runs_dropped: int | None = None
) -> None:
    """``earlier_runs_dropped``: what incarnations killed before the last one had counted by
    their last status (a lower bound: they may have refused more before the kill), so the
    status-vs-announced comparison becomes "at least" instead of "exactly"."""
    dropped = (outcome.notes.get("dropped") or 0) + (earlier_runs_dropped or 0)
    outcome.notes["spool_when_full"] = {
        k: full["uplink"]["spool"].get(k)
        for k in ("disk_bytes", "dropped_records", "refused", "pending_records")
    }
    fig = outcome.figures
    if dropped == 0:
        outcome.problems.append("the spool never reported a dropped/refused batch")
    if fig.announced_gap_batches == 0:
        outcome.problems.append(
            f"status counts {dropped} dropped batches but none was announced in meta.skip"
        )
    if fig.accepted_batches != (
        fig.stored_batches + fig.announced_gap_batches + fig.pending_on_disk_batches
    ):
        outcome.problems.append("accepted ≠ stored + announced + pending")
    outcome.notes["status_dropped_vs_announced"] = [dropped, fig.announced_seqs]
    if earlier_runs_dropped is not None and dropped > fig.announced_seqs:
        outcome.problems.append(
            f"status counts at least {dropped} dropped batches, meta.skip names only"
            f" {fig.announced_seqs}"
        )
    elif earlier_runs_dropped is None and dropped != fig.announced_seqs:
        outcome.problems.append(
            f"status counts {dropped} dropped batches, meta.skip names {fig.announced_seqs}"
        )


async def test_wall_clock_jumps(make_rig: Any, hil_report: Any, tmp_path: Path) -> None:
    """The DUT's own wall clock steps (libfaketime; its monotonic clock and every other process
    keep real time): +1 h (NTP catching up after a boot without RTC), back 70 min, past everything
    already sent, and −2 days (a dead RTC) while the broker link drops, so the reconnect meets
    a broker certificate that is "not yet valid": the uplink must wait, spool, and deliver
    everything once the clock is right again. Samples keep the time they were stamped with;
    the oracle maps them back to real time to match them to the simulator's serves."""
    wall = WallClock(tmp_path)
    rig = await make_rig(dut_env=wall.env())
    await _warm(rig)
    assert isinstance(rig.dut, LocalDut)
    wall.step(+3600)
    await asyncio.sleep(6)
    wall.set_offset(-600)  # back 4,200 s: before the first sample this runtime sent
    await asyncio.sleep(6)
    before = (await rig.dut.status())["uplink"]["publisher"]
    wall.set_offset(-2 * 86400)
    rig.broker_proxy.partition()
    await asyncio.sleep(2)
    rig.broker_proxy.heal()
    await asyncio.sleep(8)  # reconnects: the broker's certificate is not valid yet for the DUT
    during = (await rig.dut.status())["uplink"]
    wall.set_offset(0)  # NTP puts it right
    await asyncio.sleep(3)  # the runtime looks at its clock every second
    status = await rig.dut.status()
    outcome = await finish(
        rig,
        "wall-clock jumps on the DUT: +1 h, back 4,200 s, −2 days with a reconnect, back",
        device_time=wall.to_real_us,
    )
    storage = open_storage(rig.storage_url)
    try:
        events = [e for e in storage.events(rig.device_id) if e.get("type") == "clock_step"]
        events.sort(key=lambda e: (e["epoch"], e["seq"]))  # stored by device time: it jumped
    finally:
        storage.close()
    steps = [round(e["step_s"]) for e in events]
    refused = during["publisher"]["connect_failures"] - before["connect_failures"]
    outcome.notes["clock"] = {
        "status": status.get("clock"),
        "steps_in_receiver": steps,
        "uplink_while_2_days_behind": during["state"],
        "connects_refused_while_behind": refused,
        "backlog_while_behind": during["backlog_batches"],
    }
    expected = [3600, -4200, -172200, 172800]
    if status["clock"]["steps"] != len(expected) or steps != expected:
        outcome.problems.append(f"clock steps: status {status['clock']}, receiver {steps}")
    if during["state"] == "connected" or refused < 1 or during["backlog_batches"] < 1:
        outcome.problems.append(
            f"with the clock 2 days behind the uplink was {during['state']} "
            f"({refused} refused connects, backlog {during['backlog_batches']})"
        )
    _judge(hil_report, outcome)
