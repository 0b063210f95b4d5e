"""Prometheus metrics for the gateway, collected from the runtime's status at scrape time.

Nothing on the scan path touches a metric object: a custom collector reads the same status
dictionary that ``edgeos status`` shows, when Prometheus asks. The HTTP endpoint is a tiny
asyncio server on the runtime's own loop (no extra thread).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

__all__ = ["MetricsServer", "RuntimeCollector", "make_registry"]

StatusFn = Callable[[], Mapping[str, Any]]

_CONN_STATES = ("connecting", "up", "degraded", "down")


class RuntimeCollector(Collector):
    """Turns the runtime status document into metric families."""

    def __init__(self, status: StatusFn) -> None:
        self._status = status

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        doc = self._status()
        device = str(doc.get("device", ""))
        yield from _connections(device, doc.get("connections", []))
        yield from _scan_groups(device, doc.get("scan_groups", {}))
        twin = doc.get("twin", {})
        if twin:
            g = GaugeMetricFamily(
                "edgeos_twin_tags", "Tags in the twin by quality", labels=["device", "quality"]
            )
            for quality, count in twin.get("by_quality", {}).items():
                g.add_metric([device, quality], count)
            yield g
        uplink = doc.get("uplink", {})
        if uplink:
            yield from _flat(device, "edgeos_uplink", uplink)
        gates = doc.get("gates", {})
        if gates:
            c = CounterMetricFamily(
                "edgeos_gate_verdicts", "Gate verdicts", labels=["device", "verdict"]
            )
            for verdict, count in gates.get("verdicts", {}).items():
                c.add_metric([device, verdict], count)
            yield c
        proc = doc.get("process", {})
        if proc:
            rss = GaugeMetricFamily(
                "edgeos_process_resident_bytes", "Resident memory of the runtime", labels=["device"]
            )
            rss.add_metric([device], float(proc.get("rss_mb", 0.0)) * 2**20)
            fds = GaugeMetricFamily(
                "edgeos_process_open_files", "Open file descriptors", labels=["device"]
            )
            fds.add_metric([device], float(proc.get("open_files", 0)))
            yield from (rss, fds)
        clock = doc.get("clock", {})
        if clock:
            steps = CounterMetricFamily(
                "edgeos_clock_steps", "Wall-clock steps seen by the runtime", labels=["device"]
            )
            steps.add_metric([device], float(clock.get("steps", 0)))
            yield steps
        creds = doc.get("credentials", {})
        expiry = GaugeMetricFamily(
            "edgeos_credential_expiry_timestamp_seconds",
            "Unix time a credential expires (client certificate, CA bundle, trusted TUF roles)",
            labels=["device", "kind"],
        )
        for key, value in creds.items():
            named = key in ("client_certificate_expires", "ca_expires") or key.startswith("tuf_")
            if named and isinstance(value, int | float):
                expiry.add_metric([device, key.removesuffix("_expires")], float(value))
        if expiry.samples:
            yield expiry
        if creds:
            fails = CounterMetricFamily(
                "edgeos_cert_renewal_failures", "Failed renewal attempts", labels=["device"]
            )
            fails.add_metric([device], float(creds.get("failures", 0)))
            yield fails
        up = GaugeMetricFamily(
            "edgeos_uptime_seconds", "Seconds since the runtime started", labels=["device"]
        )
        up.add_metric([device], float(doc.get("uptime_s", 0.0)))
        yield up


def _connections(device: str, conns: Any) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
    state = GaugeMetricFamily(
        "edgeos_connection_state",
        "1 for the connection's current state",
        labels=["device", "connection", "state"],
    )
    reconnects = CounterMetricFamily(
        "edgeos_connection_reconnects", "Reconnects", labels=["device", "connection"]
    )
    errors = CounterMetricFamily(
        "edgeos_connection_errors", "Errors by kind", labels=["device", "connection", "kind"]
    )
    latency = GaugeMetricFamily(
        "edgeos_connection_latency_p99_seconds",
        "p99 request latency",
        labels=["device", "connection"],
    )
    for conn in conns:
        name = str(conn.get("name", ""))
        for s in _CONN_STATES:
            state.add_metric([device, name, s], 1.0 if conn.get("state") == s else 0.0)
        reconnects.add_metric([device, name], float(conn.get("reconnects", 0)))
        for kind, count in conn.get("errors", {}).items():
            errors.add_metric([device, name, str(kind)], float(count))
        latency.add_metric([device, name], float(conn.get("latency", {}).get("p99_ms", 0.0)) / 1e3)
    yield from (state, reconnects, errors, latency)


def _scan_groups(device: str, groups: Any) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
    jitter = GaugeMetricFamily(
        "edgeos_scan_jitter_seconds", "Scan start jitter", labels=["device", "group", "quantile"]
    )
    ticks = CounterMetricFamily("edgeos_scan_ticks", "Scan ticks run", labels=["device", "group"])
    skipped = CounterMetricFamily(
        "edgeos_scan_skipped", "Ticks skipped on overrun", labels=["device", "group"]
    )
    missed = CounterMetricFamily(
        "edgeos_scan_missed",
        "Ticks missed because the dispatcher woke late (overloaded or blocked loop)",
        labels=["device", "group"],
    )
    for name, g in groups.items():
        j = g.get("jitter", {})
        for q in ("p50", "p99"):
            jitter.add_metric([device, name, q], float(j.get(f"{q}_ms", 0.0)) / 1e3)
        jitter.add_metric([device, name, "max"], float(j.get("max_ms", 0.0)) / 1e3)
        ticks.add_metric([device, name], float(g.get("ticks", 0)))
        skipped.add_metric([device, name], float(g.get("skipped", 0)))
        missed.add_metric([device, name], float(g.get("missed", 0)))
    yield from (jitter, ticks, skipped, missed)


def _flat(device: str, prefix: str, doc: Mapping[str, Any]) -> Iterator[GaugeMetricFamily]:
    """Numeric leaves of a nested dict as gauges named after their path."""
    for key, value in doc.items():
        name = f"{prefix}_{key}"
        if isinstance(value, int | float):  # bool is an int: True counts as 1
            g = GaugeMetricFamily(name, f"{key} (see docs/uplink.md)", labels=["device"])
            g.add_metric([device], float(value))
            yield g
        elif isinstance(value, Mapping):
            yield from _flat(device, name, value)


def make_registry(status: StatusFn) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(RuntimeCollector(status))
    return registry


class MetricsServer:
    """Serves ``GET /metrics`` on ``host:port`` until cancelled."""

    def __init__(self, listen: str, registry: CollectorRegistry) -> None:
        host, _, port = listen.rpartition(":")
        self.host = host or "127.0.0.1"
        self.port = int(port)
        self._registry = registry

    async def run(self, ready: asyncio.Event | None = None) -> None:
        server = await asyncio.start_server(self._serve, self.host, self.port)
        self.port = server.sockets[0].getsockname()[1]
        async with server:
            if ready is not None:
                ready.set()
            await server.serve_forever()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(5):
                request = await reader.readline()
                while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                    pass
            parts = request.split()
            if len(parts) >= 2 and parts[0] == b"GET" and parts[1].split(b"?")[0] == b"/metrics":
                # On the loop, not a thread: the collector reads live runtime state.
                body = generate_latest(self._registry)
                head = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\n"
            else:
                body = b"not found: try /metrics\n"
                head = b"HTTP/1.1 404 Not Found\r\nContent-Type: text/plain\r\n"
            writer.write(
                head + b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body
            )
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
