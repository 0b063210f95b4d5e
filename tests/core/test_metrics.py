"""Gateway metrics: scraped over real HTTP from a collector over the status document."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from edgeos.metrics import MetricsServer, make_registry

STATUS: dict[str, Any] = {
    "device": "gw-1",
    "uptime_s": 12.5,
    "connections": [
        {
            "name": "plc",
            "state": "degraded",
            "reconnects": 3,
            "errors": {"timeout": 2},
            "latency": {"p99_ms": 4.0},
        },
    ],
    "scan_groups": {
        "fast": {
            "jitter": {"p50_ms": 0.1, "p99_ms": 0.5, "max_ms": 2.0},
            "ticks": 100,
            "skipped": 1,
        }
    },
    "twin": {"by_quality": {"GOOD": 10, "BAD_COMM": 2}},
    "uplink": {"backlog_batches": 4, "spool": {"bytes": 1024}, "connected": True},
    "gates": {"verdicts": {"continue": 7, "scrap": 1}},
    "process": {"rss_mb": 90.5, "open_files": 19},
    "clock": {"steps": 2, "last_step_s": -3600.0},
}


async def _get(port: int, path: str) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    data = await reader.read()
    writer.close()
    await writer.wait_closed()
    return data


async def test_metrics_endpoint_serves_runtime_status() -> None:
    server = MetricsServer("127.0.0.1:0", make_registry(lambda: STATUS))
    ready = asyncio.Event()
    task = asyncio.create_task(server.run(ready))
    await ready.wait()
    try:
        body = (await _get(server.port, "/metrics")).decode()
        assert body.startswith("HTTP/1.1 200")
        assert (
            'edgeos_connection_state{connection="plc",device="gw-1",state="degraded"} 1.0' in body
        )
        assert (
            'edgeos_connection_errors_total{connection="plc",device="gw-1",kind="timeout"} 2.0'
            in body
        )
        assert 'edgeos_scan_skipped_total{device="gw-1",group="fast"} 1.0' in body
        assert 'edgeos_twin_tags{device="gw-1",quality="BAD_COMM"} 2.0' in body
        assert 'edgeos_uplink_spool_bytes{device="gw-1"} 1024.0' in body
        assert 'edgeos_uplink_connected{device="gw-1"} 1.0' in body
        assert 'edgeos_gate_verdicts_total{device="gw-1",verdict="scrap"} 1.0' in body
        assert 'edgeos_process_resident_bytes{device="gw-1"} 9.4896128e+07' in body
        assert 'edgeos_process_open_files{device="gw-1"} 19.0' in body
        assert 'edgeos_clock_steps_total{device="gw-1"} 2.0' in body
        assert (await _get(server.port, "/nope")).startswith(b"HTTP/1.1 404")
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
