"""Driver benchmark: 16,000 Modbus tags at 1 Hz; prints ONE JSON object.

The Modbus server runs in a separate process so only the driver's CPU is counted: the
simulated line (``edgeos sim``) when it is available, else a pymodbus server with 16,000
holding registers in one unit. Goals: ≤ 15 % of one core, ≤ 130 requests per scan.

If ``bench/opcua_bench.py`` exists and defines ``async def run(quick: bool) -> dict``, its keys
(``opcua_items``, ``opcua_notifications_per_s``) are merged into the output.

    python bench/plc_drivers.py [--quick] [--connections N]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

# Run as a script, this file's folder comes first on sys.path and "drivers" would name this
# file instead of the drivers package.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

N_TAGS = 16_000
TAGS_PER_NEST = 200


def _serve() -> None:
    """Child process: a pymodbus server on 127.0.0.1:0 until stdin closes."""
    from edgeos_testing.modbus import ModbusTestServer, UnitSpec

    async def main() -> None:
        async with ModbusTestServer([UnitSpec(unit=1, holding=N_TAGS)]) as server:
            print(json.dumps({"port": server.port}), flush=True)
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, sys.stdin.read)

    asyncio.run(main())


def _start_server() -> tuple[subprocess.Popen[str], str, str]:
    """Start the peer; returns the process, its endpoint and what it is."""
    root = Path(__file__).resolve().parent.parent
    if importlib.util.find_spec("edgeos_sim") is not None and _has_simline():
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "edgeos.cli",
                "sim",
                "--nests",
                "80",
                "--tags-per-nest",
                str(TAGS_PER_NEST),
                "--json",
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            cwd=root,
        )
        endpoint = _sim_endpoint(proc)
        if endpoint is not None:
            return proc, endpoint, "edgeos_sim"
        _stop(proc)
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "--serve"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=root,
    )
    assert proc.stdout is not None
    port = json.loads(proc.stdout.readline())["port"]
    return proc, f"tcp://127.0.0.1:{port}", "pymodbus"


def _has_simline() -> bool:
    try:
        import edgeos_sim as sim
    except ImportError:
        return False
    return hasattr(sim, "SimLine")


def _sim_endpoint(proc: subprocess.Popen[str]) -> str | None:
    """The Modbus endpoint from the simulator's first JSON line, if it names one."""
    assert proc.stdout is not None
    line = proc.stdout.readline()
    try:
        info = json.loads(line)
    except ValueError:
        return None
    modbus = info.get("modbus") if isinstance(info, dict) else None
    if isinstance(modbus, str) and modbus.startswith("tcp://"):
        return modbus
    if isinstance(modbus, dict) and "port" in modbus:
        return f"tcp://{modbus.get('host', '127.0.0.1')}:{modbus['port']}"
    return None


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.stdin is not None:
        with contextlib.suppress(OSError):
            proc.stdin.close()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.terminate()
        proc.wait(5)


async def _bench_modbus(endpoint: str, scans: int, connections: int) -> dict[str, Any]:
    from drivers.modbus import ModbusTcpDriver
    from edgeos.clock import SystemClock
    from edgeos.config import ConnectionConfig, TagConfig
    from edgeos.driver import Quality, TagBinding
    from edgeos.histogram import Histogram

    tags = [
        TagBinding(
            i,
            TagConfig(
                name=f"nest{i // TAGS_PER_NEST + 1:02d}.p{i % TAGS_PER_NEST:03d}",
                connection="line",
                modbus={"address": i, "type": "int16", "scale": 0.1},
            ),
        )
        for i in range(N_TAGS)
    ]
    conn = ConnectionConfig(
        name="line", driver="modbus_tcp", endpoint=endpoint, options={"connections": connections}
    )
    clock = SystemClock()
    driver = ModbusTcpDriver(conn.driver_context(tags, clock=clock))
    await driver.connect()
    scan_times = Histogram()
    good = 0
    try:
        await driver.read("default")  # warm-up: first-use allocations, not steady state
        cpu0, wall0 = time.process_time(), time.monotonic()
        tick = wall0
        for _ in range(scans):
            started = time.perf_counter()
            result = await driver.read("default")
            scan_times.record(time.perf_counter() - started)
            good = int((result.quality == Quality.GOOD).sum())
            tick += 1.0
            await clock.sleep_until(tick)
        cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
    finally:
        await driver.close()
    return {
        "modbus_tags": N_TAGS,
        "modbus_good_tags": good,
        "modbus_connections": connections,
        "modbus_requests_per_scan": driver.requests_per_scan("default"),
        "modbus_scans": scans,
        "modbus_cpu_pct_one_core": round(100.0 * cpu / wall, 2),
        "modbus_scan_p50_ms": round(scan_times.percentile(50) * 1e3, 3),
        "modbus_scan_p99_ms": round(scan_times.percentile(99) * 1e3, 3),
        "modbus_request_p99_ms": round(driver.latency.percentile(99) * 1e3, 3),
    }


async def _opcua(quick: bool) -> dict[str, Any]:
    if not (_HERE / "opcua_bench.py").exists():
        return {}
    # Import it by a real module name (bench.opcua_bench, repo root on sys.path): its server
    # runs in a spawned process that must import the same module to find its entry point.
    root = str(_HERE.parent)
    if root not in sys.path:
        sys.path.insert(0, root)
    module = importlib.import_module("bench.opcua_bench")
    result: dict[str, Any] = await module.run(quick)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10 scans instead of 60")
    parser.add_argument("--connections", type=int, default=1)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        _serve()
        return
    proc, endpoint, peer = _start_server()
    try:
        out: dict[str, Any] = {"modbus_peer": peer}
        out |= asyncio.run(_bench_modbus(endpoint, 10 if args.quick else 60, args.connections))
    finally:
        _stop(proc)
    out |= asyncio.run(_opcua(args.quick))
    out["goals_met"] = bool(
        out["modbus_cpu_pct_one_core"] <= 15 and out["modbus_requests_per_scan"] <= 130
    )
    print(json.dumps(out))


if __name__ == "__main__":
    main()
