"""Northbound benchmark: 16,000 tags at 1 Hz as Sparkplug B by exception and served by the OPC UA
server to a client subscribed to all of them; the 100 Hz scan group's jitter with both on vs off.

    .venv/bin/python bench/northbound.py [--seconds 15] [--nests 80] [--per-nest 200]
        [--phases off,sparkplug,opcua,both] [--repeat 2] [--quick]

Phases (same process; a new twin and scheduler each): ``off``, ``sparkplug``, ``opcua``,
``both``, each run ``--repeat`` times in rounds (off, sparkplug, opcua, both, off, …) so slow
drifts of the shared machine's load spread over all phases. CPU of an interface (one core =
1.0) = the runtime process's CPU per second in its phase minus the mean of the ``off`` phases
(``cpu_<phase>_runtime_core_fraction``: the hub, the pump, Sparkplug) plus the OPC UA server's
own process (``opcua_process_core_fraction``, from /proc). The OPC UA client (subscribed to
every tag) and the Sparkplug host run in other processes or in Mosquitto, so they are not
counted (but they share the machine's cores). The load average is sampled at the start and end
of every phase. ``--quick``: 16,000 tags, 5 s per
phase, one round. Prints JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np

from edgeos.clock import SystemClock
from edgeos.config import ScanGroupConfig, TagConfig, TwinConfig
from edgeos.driver import Quality, ReadResult
from edgeos.gcpolicy import try_realtime_priority
from edgeos.northbound import Northbound, NorthboundConfig
from edgeos.scheduler import Scheduler
from edgeos.twin import Twin
from edgeos_testing.mosquitto import MosquittoBroker
from edgeos_testing.twin_synthetic import SyntheticLine

CLIENT = textwrap.dedent(
    """
    import asyncio, os, sys, time
    from asyncua import Client, ua
    # A stand-in for a SCADA host on another machine: out of the runtime's real-time class and
    # below everything else on this one.
    os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
    os.nice(10)
    async def main(url, n_expected):
        # 16,000 monitored items: the server answers the client's 1 s health probe late while
        # it sends the first values, and the client would drop the connection.
        async with Client(url, timeout=60, watchdog_intervall=30) as c:
            ns = await c.get_namespace_index("urn:edgeos:twin")
            names = open(sys.argv[3]).read().split()
            got = [0]
            class H:
                def datachange_notification(self, node, val, data): got[0] += 1
            sub = await c.create_subscription(200, H())
            nodes = [c.get_node(ua.NodeId(n, ns)) for n in names]
            for k in range(0, len(nodes), 2000):
                await sub.subscribe_data_change(nodes[k:k + 2000], queuesize=1)
            print("subscribed", flush=True)
            while True:
                await asyncio.sleep(1)
                print(got[0], flush=True)
    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
    """
)


def line_tags(nests: int, per_nest: int, *, scan_group: str = "default", prefix: str = "nest"):
    """``nests * per_nest`` float tags ``nestNN.pXXX`` (bar, resolution 0.01, deadband 0.05)."""
    return [
        TagConfig.model_validate(
            {
                "name": f"{prefix}{n:02d}.p{k:03d}",
                "connection": f"{prefix}{n:02d}",
                "scan_group": scan_group,
                "unit": "bar",
                "resolution": 0.01,
                "deadband": 0.05,
                "modbus": {"address": 2 * k, "type": "float32"},
            }
        )
        for n in range(1, nests + 1)
        for k in range(per_nest)
    ]


async def phase(
    name: str, args: argparse.Namespace, broker: MosquittoBroker | None, tmp: Path
) -> dict[str, object]:
    clock = SystemClock()
    tags = line_tags(args.nests, args.per_nest) + line_tags(
        1, 100, scan_group="fast", prefix="fast"
    )
    groups = [
        ScanGroupConfig(name="default", period_ms=1000),
        ScanGroupConfig(name="fast", period_ms=10, priority=90),
    ]
    twin = Twin(tags, TwinConfig(history_s=60), clock=clock, scan_groups=groups)
    line = SyntheticLine([k * args.per_nest for k in range(args.nests)], args.per_nest)
    fast_idx = np.arange(args.nests * args.per_nest, len(tags), dtype=np.int32)
    fast_q = np.full(len(fast_idx), Quality.GOOD, np.uint8)
    rng = np.random.default_rng(2)
    scheduler = Scheduler(clock, groups)
    for block in range(line.blocks):

        async def scan(block: int = block) -> None:
            twin.apply(line.read(block, clock.time()), clock.time())

        scheduler.add_job("default", f"nest{block}", scan)

    async def fast() -> None:
        now = clock.time()
        vals = rng.normal(50.0, 0.01, len(fast_idx))
        twin.apply(ReadResult(fast_idx, vals, fast_q, np.full(len(fast_idx), now)), now)

    scheduler.add_job("fast", "fast", fast)

    raw: dict[str, object] = {}
    if name in ("sparkplug", "both"):
        assert broker is not None
        raw["sparkplug"] = {"broker": broker.url, "group_id": "bench", "publish_interval_ms": 100}
    if name in ("opcua", "both"):
        raw["opcua"] = {
            "endpoint": "opc.tcp://127.0.0.1:0/edgeos/",
            "security": ["None"],
            "allow_anonymous": True,
        }
    nb = (
        Northbound(NorthboundConfig.model_validate(raw), twin, device_id="gw", clock=clock)
        if raw
        else None
    )
    client: asyncio.subprocess.Process | None = None
    out: dict[str, object] = {"phase": name}
    async with asyncio.TaskGroup() as tg:
        tasks = [tg.create_task(scheduler.run())]
        if nb is not None:
            tasks.append(tg.create_task(nb.run()))
        if nb is not None and nb.opcua is not None:
            await nb.opcua.ready.wait()
            names = tmp / "names.txt"
            names.write_text("\n".join(twin.names) + "\n")
            client = await asyncio.create_subprocess_exec(
                sys.executable,
                "-c",
                CLIENT,
                nb.opcua.endpoint_url,
                str(len(tags)),
                str(names),
                stdout=asyncio.subprocess.PIPE,
            )
            assert client.stdout is not None
            line_out = (await client.stdout.readline()).decode()
            assert line_out.strip() == "subscribed", line_out
        await asyncio.sleep(2)  # settle (first full push, births)
        # Measure: fresh jitter histograms, CPU and counters over the window.
        for g in ("fast", "default"):
            scheduler.group_stats(g).jitter.reset()
        sp0 = nb.sparkplug.counters.data_bytes if nb and nb.sparkplug else 0
        sm0 = nb.sparkplug.counters.data_metrics if nb and nb.sparkplug else 0
        msg0 = nb.sparkplug.counters.data_messages if nb and nb.sparkplug else 0
        ov0 = nb.opcua.stats()["values_pushed"] if nb and nb.opcua else 0
        sup0 = nb.opcua.handoff.superseded if nb and nb.opcua else 0
        supt0 = nb.opcua.stats()["values_superseded"] if nb and nb.opcua else 0
        load0 = os.getloadavg()[0]
        pid = nb.opcua.pid if nb and nb.opcua else None
        ch0 = process_cpu(pid)
        cpu0, t0 = time.process_time(), time.monotonic()
        await asyncio.sleep(args.seconds)
        cpu1, t1 = time.process_time(), time.monotonic()
        ch1 = process_cpu(pid)
        out["load_avg_1min"] = [round(load0, 2), round(os.getloadavg()[0], 2)]
        out["cpu_core_fraction"] = round((cpu1 - cpu0) / (t1 - t0), 4)
        if ch0 is not None and ch1 is not None:
            out["opcua_process_core_fraction"] = round((ch1 - ch0) / (t1 - t0), 4)
            out["opcua_process_rss_mb"] = process_rss_mb(pid)
        out["fast_jitter_ms"] = scheduler.group_stats("fast").jitter.summary_ms()
        if nb is not None and nb.sparkplug is not None:
            c = nb.sparkplug.counters
            values = c.data_metrics - sm0
            messages = c.data_messages - msg0
            topic = len(nb.sparkplug.topic("DDATA", "nest01"))
            wire = (c.data_bytes - sp0) + messages * (topic + 2 + 5)  # + topic, its length, header
            out["sparkplug_values_per_s"] = round(values / (t1 - t0))
            out["sparkplug_payload_bytes_per_value"] = round(
                (c.data_bytes - sp0) / max(values, 1), 2
            )
            out["sparkplug_broker_bytes_per_value"] = round(wire / max(values, 1), 2)
        if nb is not None and nb.opcua is not None:
            out["opcua_values_pushed_per_s"] = round(
                (nb.opcua.stats()["values_pushed"] - ov0) / (t1 - t0)
            )
            # The runtime's handoff, and with the server process's own (as of its last push).
            out["opcua_values_superseded"] = nb.opcua.handoff.superseded - sup0
            out["opcua_values_superseded_total"] = nb.opcua.stats()["values_superseded"] - supt0
        for t in tasks:
            t.cancel()
    if client is not None:
        client.kill()
        await client.wait()
    return out


def process_cpu(pid: int | None) -> float | None:
    """CPU seconds of a process (Linux /proc), None when it is not running."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_rss_mb(pid: int | None) -> float | None:
    """Resident memory of a process in MB (Linux /proc)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--nests", type=int, default=80)
    ap.add_argument("--per-nest", type=int, default=200)
    ap.add_argument("--phases", default="off,sparkplug,opcua,both")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="5 s per phase, one round")
    ap.add_argument(
        "--realtime",
        action="store_true",
        help="run the runtime under SCHED_FIFO 20, as its systemd unit does (docs/scheduler.md)",
    )
    args = ap.parse_args()
    if args.quick:
        args.seconds, args.repeat = 5.0, 1
    phases = args.phases.split(",")
    results: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory() as tmp:
        async with MosquittoBroker(Path(tmp) / "broker", tls=False, acl=False) as broker:
            realtime = args.realtime and try_realtime_priority(20)
            for _ in range(args.repeat):
                for p in phases:
                    results.append(await phase(p, args, broker, Path(tmp)))
    by: dict[str, list[dict[str, object]]] = {}
    for r in results:
        by.setdefault(str(r["phase"]), []).append(r)
    offs = [float(r["cpu_core_fraction"]) for r in by.get("off", [])]  # type: ignore[arg-type]
    off = sum(offs) / len(offs) if offs else 0.0
    summary: dict[str, object] = {
        "benchmark": "northbound",
        "tags": args.nests * args.per_nest,
        "seconds": args.seconds,
        "repeat": args.repeat,
        "realtime": realtime,
        "cpus": os.cpu_count(),
        "phases": results,
    }
    for p in ("sparkplug", "opcua", "both"):
        if p in by:
            runtime = [float(r["cpu_core_fraction"]) - off for r in by[p]]  # type: ignore[arg-type]
            child = [float(r.get("opcua_process_core_fraction", 0.0)) for r in by[p]]  # type: ignore[arg-type]
            summary[f"cpu_{p}_runtime_core_fraction"] = [round(x, 4) for x in runtime]
            summary[f"cpu_{p}_core_fraction"] = [
                round(x + y, 4) for x, y in zip(runtime, child, strict=True)
            ]
    summary["fast_p99_jitter_ms"] = {
        p: [r["fast_jitter_ms"].get("p99_ms") for r in rs]  # type: ignore[attr-defined]
        for p, rs in by.items()
    }
    summary["load_avg_1min"] = {p: [r["load_avg_1min"] for r in rs] for p, rs in by.items()}
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
