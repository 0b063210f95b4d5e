"""Receiver scale-out: >= 1,000 simulated gateways against 1, 2 and 4 receiver processes.

One Mosquitto (plain TCP with per-device ACLs, to spend the 2 cores on the receivers rather
than on TLS), one PostgreSQL database (``$EDGEOS_TEST_PG_DSN``), receivers started as
processes (``edgeos-receiver run``) sharing ``$share/receivers/edgeos/v1/+/batch``. The
gateways are ``edgeos_testing.devsim.SimDevice``\\ s spread over ``--sim-processes`` processes,
each sealing a real batch (``--tags`` x 3 scans) every ``--period-s`` seconds, staggered.

Per receiver count (a new epoch per device and phase, so phases do not mix): stored samples/s
(the receivers' own counters), ack latency (publish -> authenticated ack covering the batch;
p50/p99/max, measured in the simulator processes) and how many batches were never acked, and
per-device order: pairs of one device's batches (same epoch) committed in the opposite order
of their sequence numbers (``sample_blocks.id`` is the commit order).

A warm-up phase (one batch per gateway, not in the figures) registers devices and tags first.
Prints ONE JSON object; the default run (1,000 gateways, 30 s per phase) takes ~4.5 minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

RECEIVER = Path(sys.executable).with_name("edgeos-receiver")
T0 = 1_700_000_000_000_000


# --------------------------------------------------------------------------- simulator process


def sim_main(
    conn: Connection, host: str, port: int, devices: dict[str, bytes], tags: int, period: float
) -> None:
    asyncio.run(_sim(conn, host, port, devices, tags, period))


async def _sim(
    conn: Connection, host: str, port: int, devices: dict[str, bytes], tags: int, period: float
) -> None:
    import aiomqtt

    from edgeos_testing.devsim import SimDevice

    class _Broker:  # the part of MosquittoBroker SimDevice.connect uses (plain, no TLS)
        def client(self, identity: str) -> aiomqtt.Client:
            return aiomqtt.Client(host, port, username=identity, identifier=identity)

    values = {f"t{i}": [float(i), i + 0.5, i + 0.25] for i in range(tags)}
    async with contextlib.AsyncExitStack() as stack:
        sims: list[SimDevice] = []
        for name, key in devices.items():
            sims.append(await stack.enter_async_context(SimDevice.connect(_Broker(), name, key)))
        conn.send("connected")
        loop = asyncio.get_running_loop()
        while True:
            command = await loop.run_in_executor(None, conn.recv)
            if command[0] == "stop":
                return
            stats = _PhaseStats(float(command[1]))
            count = len(sims)
            await asyncio.gather(
                *(
                    _gateway(d, period * i / count, period, values, stats)
                    for i, d in enumerate(sims)
                )
            )
            conn.send(
                {
                    "published": stats.published,
                    "unacked": stats.unacked,
                    "latencies": stats.latencies,
                }
            )


@dataclass(slots=True)
class _PhaseStats:
    seconds: float
    published: int = 0
    unacked: int = 0
    latencies: list[float] = field(default_factory=list)


async def _gateway(
    dev: Any, offset: float, period: float, values: dict[str, list[float]], stats: _PhaseStats
) -> None:
    """One gateway for one phase: a fresh epoch, a batch every ``period`` s, acks timed."""
    from edgeos_protocol.crypto import Epoch
    from edgeos_testing.devsim import simple_batch

    dev.epoch = Epoch.new(dev.keyring, dev.device)  # a fresh epoch per phase
    epoch = dev.epoch.epoch

    async def track(seq: int, sent: float) -> None:
        try:
            async with asyncio.timeout(60):
                await dev.wait_acked(epoch, seq)
            stats.latencies.append(time.perf_counter() - sent)
        except TimeoutError:
            stats.unacked += 1

    waits: list[asyncio.Task[None]] = []
    await asyncio.sleep(offset)
    start = time.perf_counter()
    n = 0
    while time.perf_counter() - start < stats.seconds:
        times = [T0 + int((n * period + i) * 1e6) for i in range(3)]
        sealed = dev.seal(simple_batch(values, times))
        sent = time.perf_counter()
        await dev.publish(sealed)
        stats.published += 1
        n += 1
        waits.append(asyncio.create_task(track(n, sent)))
        await asyncio.sleep(max(0.0, start + n * period - time.perf_counter()))
    await asyncio.gather(*waits)


# --------------------------------------------------------------------------- orchestration


def _write_config(tmp: Path, url: str, dsn: str, index: int, metrics_port: int) -> Path:
    path = tmp / f"receiver{index}.toml"
    path.write_text(
        f'log_level = "WARNING"\n[broker]\nurl = "{url}"\nusername = "receiver"\n'
        f'[storage]\nurl = "{dsn}"\n[registry]\ndir = "{tmp / "registry"}"\n'
        f'[metrics]\nlisten = "127.0.0.1:{metrics_port}"\n',
        encoding="utf-8",
    )
    return path


def _metric(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[-1])
    return 0.0


def _wait_connected(port: int, proc: subprocess.Popen[bytes]) -> None:
    while proc.poll() is None:
        with contextlib.suppress(OSError):
            if _metric(port, "edgeos_receiver_broker_connected") == 1.0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"receiver exited with {proc.returncode}")


def _order_inversions(dsn: str) -> tuple[int, int]:
    import psycopg

    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT device_id, epoch, seq, min(id) FROM sample_blocks"
            " GROUP BY device_id, epoch, seq ORDER BY device_id, epoch, seq"
        ).fetchall()
    inversions = 0
    last: tuple[int, int, int] | None = None
    for device, epoch, _seq, block_id in rows:
        if last is not None and last[:2] == (device, epoch) and block_id < last[2]:
            inversions += 1
        last = (device, epoch, block_id)
    return inversions, len(rows)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from edgeos_cloud.receiver.registry import DeviceRegistry
    from edgeos_testing.mosquitto import MosquittoBroker
    from edgeos_testing.receiver import postgres_database

    result: dict[str, Any] = {
        "benchmark": "receiver_scaleout",
        "gateways": args.gateways,
        "samples_per_batch": args.tags * 3,
        "period_s": args.period_s,
        "phase_s": args.seconds,
        "offered_samples_per_s": round(args.gateways * args.tags * 3 / args.period_s),
        "cores": multiprocessing.cpu_count(),
        "phases": {},
    }
    with tempfile.TemporaryDirectory() as tmp_name, postgres_database("edgeos_scale") as dsn:
        tmp = Path(tmp_name)
        registry = DeviceRegistry(tmp / "registry")
        keys = {f"gw{i:05d}": registry.add(f"gw{i:05d}").current_key for i in range(args.gateways)}
        extra = f"max_queued_messages {args.broker_queue}\nmax_connections -1"
        with MosquittoBroker(tmp / "mq", tls=False, acl=True, extra_config=extra) as broker:
            ctx = multiprocessing.get_context("spawn")
            names = sorted(keys)
            pipes: list[Connection] = []
            procs = []
            for p in range(args.sim_processes):
                mine = {n: keys[n] for n in names[p :: args.sim_processes]}
                parent, child = ctx.Pipe()
                proc = ctx.Process(
                    target=sim_main,
                    args=(child, broker.host, broker.port, mine, args.tags, args.period_s),
                )
                proc.start()
                pipes.append(parent)
                procs.append(proc)
            try:
                for pipe in pipes:
                    assert pipe.recv() == "connected"
                # Warm-up, not reported: each device's first batch registers it and its tags.
                warm = argparse.Namespace(**{**vars(args), "seconds": args.period_s})
                result["warmup"] = _phase(warm, tmp, broker, dsn, max(args.receivers), pipes)
                for count in args.receivers:
                    result["phases"][str(count)] = _phase(args, tmp, broker, dsn, count, pipes)
            finally:
                for pipe in pipes:
                    with contextlib.suppress(OSError):
                        pipe.send(("stop",))
                for proc in procs:
                    proc.join(60)
                    if proc.is_alive():
                        proc.kill()
        inversions, blocks = _order_inversions(dsn)
    result["order"] = {"batches": blocks, "committed_out_of_sequence_order": inversions}
    base = result["phases"][str(args.receivers[0])]["stored_samples_per_s"]
    for phase in result["phases"].values():
        phase["speedup"] = round(phase["stored_samples_per_s"] / max(1, base), 2)
    return result


def _phase(
    args: argparse.Namespace,
    tmp: Path,
    broker: Any,
    dsn: str,
    count: int,
    pipes: list[Connection],
) -> dict[str, Any]:
    from edgeos_testing.net import free_port

    ports = [free_port() for _ in range(count)]
    receivers = []
    for i, port in enumerate(ports):
        config = _write_config(tmp, broker.url, dsn, i, port)
        log = open(tmp / f"receiver{count}-{i}.log", "wb")  # noqa: SIM115
        receivers.append(
            subprocess.Popen(
                [str(RECEIVER), "run", "--config", str(config)],
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
        )
    try:
        for port, proc in zip(ports, receivers, strict=True):
            _wait_connected(port, proc)
        cpu_before = [_cpu_s(p.pid) for p in receivers]
        start = time.perf_counter()
        for pipe in pipes:
            pipe.send(("phase", args.seconds))
        reports = [pipe.recv() for pipe in pipes]
        elapsed = time.perf_counter() - start
        samples = sum(_metric(p, "edgeos_receiver_samples_total") for p in ports)
        batches = sum(_metric(p, "edgeos_receiver_batches_total") for p in ports)
        per_receiver = [int(_metric(p, "edgeos_receiver_batches_total")) for p in ports]
        cpu = [round(_cpu_s(p.pid) - b, 1) for p, b in zip(receivers, cpu_before, strict=True)]
    finally:
        for proc in receivers:
            proc.terminate()
        for proc in receivers:
            proc.wait(30)
    lat = np.array([x for r in reports for x in r["latencies"]]) * 1000
    published = sum(r["published"] for r in reports)
    return {
        "receivers": count,
        "published_batches": published,
        "stored_batches": int(batches),
        "stored_batches_per_receiver": per_receiver,
        "never_acked": sum(r["unacked"] for r in reports),
        # Publishing runs for phase_s; the drain of the last acks is included in elapsed.
        "stored_samples_per_s": round(samples / elapsed),
        "elapsed_s": round(elapsed, 1),
        "ack_latency_ms": {
            "p50": round(float(np.percentile(lat, 50)), 1) if lat.size else None,
            "p99": round(float(np.percentile(lat, 99)), 1) if lat.size else None,
            "max": round(float(lat.max()), 1) if lat.size else None,
        },
        "receiver_cpu_s": cpu,
    }


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    import os

    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gateways", type=int, default=1000)
    parser.add_argument("--tags", type=int, default=100, help="tags per gateway (x3 scans)")
    parser.add_argument("--period-s", type=float, default=3.0, help="seconds between batches")
    parser.add_argument("--seconds", type=float, default=30.0, help="publishing per phase")
    parser.add_argument("--receivers", default="1,2,4", help="receiver counts, in order")
    parser.add_argument("--sim-processes", type=int, default=2)
    parser.add_argument("--broker-queue", type=int, default=100_000)
    args = parser.parse_args(argv)
    args.receivers = [int(x) for x in args.receivers.split(",")]
    json.dump(run(args), sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
