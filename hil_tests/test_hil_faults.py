"""HIL fault scenarios (short mode): each runs the rig, injects one class of fault, heals, and
asks the oracle. Acceptance: zero loss, zero duplicates, order kept, no wrong values of
accepted samples; the figures go to the run's report (no timed assertions)."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from pathlib import Path
from typing import Any

import pytest

from edgeos.receiver.devsim import SimDevice, simple_batch
from edgeos.testing.oracle import read_receiver
from edgeos.testing.rig import (
    LocalDut,
    Outcome,
    PeersSpec,
    Rig,
    RigSpec,
    finish,
    run_cli,
)

pytestmark = pytest.mark.timeout(300)


async def _warm(rig: Rig, batches: int = 2) -> None:
    async with asyncio.timeout(60):
        await rig.wait_batches(batches)


def _judge(report: Any, outcome: Outcome) -> None:
    report.add(outcome)
    print(json.dumps(outcome.as_dict(), indent=1, default=str))
    assert outcome.passed, (outcome.problems, outcome.figures.examples)


async def test_machine_link_faults(make_rig: Any, hil_report: Any) -> None:
    """Gateway ↔ machines: latency, lost response chunks, a partition; reads fail, nothing
    that was read is lost."""
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
    proxy.partition()
    await asyncio.sleep(3)
    proxy.heal()
    # Reads keep failing for a moment after the heal (request timeout, reconnect backoff).
    faults = [(start, time.time() + 6)]
    await asyncio.sleep(4)
    outcome = await finish(
        rig,
        "machine-link: latency 50 ms, 5 % responses dropped, 3 s partition",
        fault_windows=faults,
    )
    outcome.notes["proxy"] = dict(proxy.counts)
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
        },
    )
    if sup.fired != 1:
        outcome.problems.append(f"watchdog fired {sup.fired} times, expected 1")
    _judge(hil_report, outcome)


def quota_rig_options(policy: str) -> dict[str, Any]:
    """A line fast enough to fill a 256 KiB spool in seconds (8,000 tags at 10 Hz)."""
    return {
        "spec": RigSpec(
            peers=PeersSpec(nests=40, tags_per_nest=200, opcua=False),
        ),
        "runtime_overrides": {
            "scan_groups": [
                {"name": "default", "period_ms": 100},
                {"name": "fast", "period_ms": 100, "priority": 80},
            ],
            "uplink": {
                "backlog_rate": 200,
                "spool": {
                    "max_bytes": 256 << 10,
                    "segment_bytes": 32 << 10,
                    "full_policy": policy,
                },
            },
        },
    }


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


async def test_disk_full_refuse_new(make_rig: Any, hil_report: Any) -> None:
    """The spool's disk quota fills while the broker is unreachable (``refuse_new``):
    refused batches are counted and announced, nothing else is lost, acks do not stall.
    (``drop_oldest`` runs in tests/e2e; both run in soak mode.)"""
    rig = await make_rig(**quota_rig_options("refuse_new"))
    await _warm(rig)
    full = await fill_spool(rig)
    outcome = await finish(rig, "disk full (1 MiB spool, refuse_new)", drain_s=120)
    _quota_checks(outcome, full, rig)
    _judge(hil_report, outcome)


def _quota_checks(outcome: Outcome, full: dict[str, Any], rig: Rig) -> None:
    dropped = outcome.notes.get("dropped") or 0
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
    outcome.notes["status_dropped_vs_announced"] = [
        dropped,
        fig.announced_gap_batches + fig.announced_but_stored,
    ]


async def test_wall_clock_jumps(
    make_rig: Any, hil_report: Any, credentials: Any, tmp_path: Path
) -> None:
    """Wall-clock jumps. The runtime's wall clock cannot be moved from outside without
    faketime or CAP_SYS_TIME on the whole machine, so this proves the design where it can:
    (1) the DUT's ordering and dedup are (epoch, seq), never time: the oracle's order check is
    on serve order; (2) the receiver stores and acks, in sequence order, a device whose
    ``created`` times and sample times jump by hours and days, back and forth."""
    rig = await make_rig()
    await _warm(rig)
    device = f"clock-{int(time.time() * 1000) % 10**9}"
    bundle = tmp_path / "clock.json"
    await asyncio.to_thread(
        run_cli,
        [
            str(Path(__import__("sys").executable).parent / "edgeos-receiver"),
            "device",
            "add",
            device,
            "--bundle",
            str(bundle),
            "--config",
            str(rig.workdir / "receiver.toml"),
        ],
    )
    key = base64.b64decode(json.loads(bundle.read_text())["device_key"])
    now = int(time.time() * 1e6)
    hour, day = 3_600_000_000, 86_400_000_000
    # created (µs) of each batch: forward an hour, back a day, back to now, 1 s later, …
    jumps = [now, now + hour, now - day, now - day + 1_000_000, now + 10_000_000, now - hour]
    async with SimDevice.connect(rig.broker, device, key) as dev:
        for i, created in enumerate(jumps):
            batch = simple_batch({"temp": [float(i)]}, [created])
            await dev.publish(dev.seal(batch, created_us=created))
        async with asyncio.timeout(30):
            acked = await dev.wait_acked(dev.epoch.epoch, len(jumps))
    data = await asyncio.to_thread(read_receiver, rig.storage_url, device)
    outcome = await finish(rig, "wall-clock jumps (receiver side; DUT order by seq)")
    stored = sorted(b.seq for b in data.batches)
    values = sorted(s.value for s in data.samples if s.value is not None)
    outcome.notes["clock_device"] = {
        "acked": acked,
        "stored_seqs": stored,
        "samples": len(data.samples),
        "jumps_s": [round((c - now) / 1e6) for c in jumps],
    }
    if stored != list(range(1, len(jumps) + 1)) or acked != len(jumps):
        outcome.problems.append(f"clock-jump device: stored {stored}, acked {acked}")
    if values != [float(i) for i in range(len(jumps))]:
        outcome.problems.append(f"clock-jump device: values {values}")
    _judge(hil_report, outcome)
