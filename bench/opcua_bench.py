"""OPC UA subscription throughput: notifications per second the driver turns into blocks.

The server runs in a separate process (its CPU is not ours): it holds ``items`` float64
variables and rewrites every one of them each ``period`` seconds, so it offers
``items / period`` changes per second. The driver subscribes to all of them (sampling at the
update period) and a sink counts what arrives as ReadResult blocks over a measuring window
that starts once every item has delivered its first value.

    python bench/opcua_bench.py [--quick] [--items N] [--period S] [--seconds S] [--profile]

prints one JSON object. ``server_changes_per_s`` is what the server managed to offer; when it
is below ``items / period`` the server process, not the driver, is the bottleneck.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import sys
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from drivers.opcua import OpcUaDriver
from edgeos.clock import SystemClock
from edgeos.config import ConnectionConfig, TagConfig
from edgeos.driver import ReadResult, TagBinding
from edgeos.histogram import Histogram


def _serve(items: int, period: float, pipe: Connection) -> None:
    """Server process: start, report the port, rewrite every variable each period."""
    asyncio.run(_serve_async(items, period, pipe))


async def _serve_async(items: int, period: float, pipe: Connection) -> None:
    import datetime as dt

    from asyncua import ua
    from asyncua.server import monitored_item_service

    from edgeos_testing.opcua_server import OpcUaTestServer, Variable

    # asyncua's server deep-copies every DataValue once per monitored item on every change
    # (80 % of its write path by pyinstrument: ~110 of ~140 µs per change here). This load
    # generator never mutates a DataValue after writing it, so the copy protects nothing;
    # without it one server process offers ~4x more changes per second.
    def _keep(self: Any, value: ua.DataValue) -> None:
        self.old_dvalue = self.current_dvalue
        self.current_dvalue = value

    monitored_item_service.MonitoredItemValues.set_current_datavalue = _keep  # type: ignore[method-assign,assignment]

    server = OpcUaTestServer([Variable(f"v{i}", "float64", 0.0) for i in range(items)])
    await server.start()
    nodes = [server.ua_node_id(f"v{i}") for i in range(items)]
    pipe.send(server.port)
    rounds = 0
    changes = 0
    busy = 0.0
    started = time.monotonic()
    deadline = started
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_reader(pipe.fileno(), stop.set)
    try:
        while not stop.is_set():
            begin = time.monotonic()
            now = dt.datetime.now(dt.UTC)
            value = float(rounds + 1)
            write = server.server.write_attribute_value
            for n, node in enumerate(nodes):
                if n % 250 == 0:
                    # write_attribute_value never suspends: without a yield a whole round
                    # would block the server's loop, delaying Publish and the client's probes.
                    await asyncio.sleep(0)
                await write(
                    node,
                    ua.DataValue(
                        ua.Variant(value, ua.VariantType.Double),
                        SourceTimestamp=now,  # type: ignore[arg-type]
                        ServerTimestamp=now,  # type: ignore[arg-type]
                    ),
                )
            rounds += 1
            changes += items
            busy += time.monotonic() - begin
            deadline += period
            delay = deadline - time.monotonic()
            if delay < 0:
                deadline = time.monotonic()  # overrun: do not stack rounds
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), max(delay, 0.0))
    finally:
        loop.remove_reader(pipe.fileno())
        elapsed = time.monotonic() - started
        pipe.recv()
        pipe.send(
            {
                "rounds": rounds,
                "changes": changes,
                "elapsed_s": elapsed,
                "write_busy_s": busy,
            }
        )
        await server.stop()


class _Counter:
    """Subscription sink: counts samples and their delay from the server's source time."""

    def __init__(self, clock: SystemClock, expected: int) -> None:
        self.expected = expected
        self.all_seen = asyncio.Event()
        self.samples = 0
        self.blocks = 0
        self.seen: set[int] | None = set()
        self.delay = Histogram()
        self.measuring = False
        self._clock = clock

    def __call__(self, block: ReadResult) -> None:
        self.samples += len(block)
        self.blocks += 1
        if self.seen is not None:
            self.seen.update(block.indices.tolist())
            if len(self.seen) >= self.expected:
                self.all_seen.set()
        if self.measuring:
            delay = self._clock.time() - float(np.median(block.source_ts))
            self.delay.record(delay)


async def run(
    quick: bool,
    *,
    items: int | None = None,
    period: float | None = None,
    seconds: float | None = None,
    servers: int | None = None,
    profile: bool = False,
) -> dict[str, Any]:
    """Measure sustained subscription notifications per second (see module docstring).

    With ``servers`` > 1 the items are split over that many server processes (one driver
    connection each), because one asyncua server process tops out near 5,000 changes/s on a
    small shared machine and would otherwise measure itself instead of the driver.
    """
    items = items or (5000 if quick else 16_000)
    period = period or (0.5 if quick else 1.0)
    seconds = seconds or (5.0 if quick else 15.0)
    servers = servers or (2 if quick else 4)
    ctx = mp.get_context("spawn")
    shares = [items // servers + (1 if k < items % servers else 0) for k in range(servers)]
    pipes: list[Connection] = []
    procs: list[Any] = []
    for share in shares:
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_serve, args=(share, period, child), daemon=True)
        proc.start()
        pipes.append(parent)
        procs.append(proc)
    clock = SystemClock()
    drivers: list[OpcUaDriver] = []
    counter = _Counter(clock, items)
    reports: list[dict[str, Any]] = []
    try:
        ports = [await asyncio.to_thread(_recv, pipe, 600.0) for pipe in pipes]
        first = 0
        for k, (port, share) in enumerate(zip(ports, shares, strict=True)):
            conn = ConnectionConfig(
                name=f"bench{k}",
                driver="opcua",
                endpoint=f"opc.tcp://127.0.0.1:{port}/edgeos/test",
                options={"max_items_per_subscription": 4000, "max_items_per_call": 2000},
            )
            tags = [
                TagBinding(
                    first + i,
                    TagConfig(
                        name=f"t{first + i}",
                        connection=f"bench{k}",
                        resolution=0.001,
                        opcua={
                            "node_id": f"ns=2;s=v{i}",
                            "mode": "subscribe",
                            "sampling_interval_ms": period * 1000,
                        },
                    ),
                )
                for i in range(share)
            ]
            first += share
            driver = OpcUaDriver(conn.driver_context(tags, clock=clock))
            driver.set_subscription_sink(counter)
            drivers.append(driver)
        setup_started = time.perf_counter()
        for driver in drivers:
            await driver.connect()
        setup_s = time.perf_counter() - setup_started
        # Warm-up: every item has reported at least once.
        async with asyncio.timeout(300):
            await counter.all_seen.wait()
        counter.seen = None
        await asyncio.sleep(period)

        profiler: Any = None
        if profile:
            from pyinstrument import Profiler

            profiler = Profiler(async_mode="disabled")
            profiler.start()
        counter.measuring = True
        start_samples, start_blocks = counter.samples, counter.blocks
        wall0, cpu0 = time.perf_counter(), time.process_time()
        await asyncio.sleep(seconds)
        wall = time.perf_counter() - wall0
        cpu = time.process_time() - cpu0
        samples = counter.samples - start_samples
        blocks = counter.blocks - start_blocks
        if profiler is not None:
            profiler.stop()
            print(profiler.output_text(unicode=True, color=False), file=sys.stderr)
        subscriptions = sum(d.stats.subscriptions for d in drivers)
    finally:
        for driver in drivers:
            await driver.close()
        for pipe, proc in zip(pipes, procs, strict=True):
            if proc.is_alive():
                pipe.send("stop")
                with contextlib.suppress(EOFError, TimeoutError):
                    reports.append(await asyncio.to_thread(_recv, pipe, 60.0))
        for proc in procs:
            await asyncio.to_thread(proc.join, 30)
            if proc.is_alive():
                proc.kill()
    server_rate = sum(r["changes"] / max(r["elapsed_s"], 1e-9) for r in reports)
    busy = max((r["write_busy_s"] / max(r["elapsed_s"], 1e-9) for r in reports), default=0.0)
    return {
        "opcua_items": items,
        "opcua_notifications_per_s": round(samples / wall, 1),
        "opcua_offered_changes_per_s": round(items / period, 1),
        "server_processes": servers,
        "server_changes_per_s": round(server_rate, 1),
        "server_write_busy_fraction_max": round(busy, 3),
        "blocks_per_s": round(blocks / wall, 1),
        "samples_per_block": round(samples / max(blocks, 1), 1),
        "client_cpu_fraction": round(cpu / wall, 3),
        "client_cpu_us_per_notification": round(cpu / max(samples, 1) * 1e6, 2),
        "delay_p50_ms": round(counter.delay.percentile(50) * 1e3, 1),
        "delay_p99_ms": round(counter.delay.percentile(99) * 1e3, 1),
        "subscription_setup_s": round(setup_s, 2),
        "subscriptions": subscriptions,
        "window_s": round(wall, 2),
        "period_s": period,
    }


def _recv(pipe: Connection, timeout: float) -> Any:
    if not pipe.poll(timeout):
        raise TimeoutError("OPC UA bench server did not answer")
    return pipe.recv()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--items", type=int)
    parser.add_argument("--period", type=float, help="seconds between server rewrites")
    parser.add_argument("--seconds", type=float, help="measuring window")
    parser.add_argument("--servers", type=int, help="server processes sharing the items")
    parser.add_argument("--profile", action="store_true", help="pyinstrument report on stderr")
    args = parser.parse_args()
    result = asyncio.run(
        run(
            args.quick,
            items=args.items,
            period=args.period,
            seconds=args.seconds,
            servers=args.servers,
            profile=args.profile,
        )
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
