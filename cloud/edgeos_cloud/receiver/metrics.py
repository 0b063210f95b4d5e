"""Prometheus metrics of one receiver instance (its own registry, so instances never clash)."""

from __future__ import annotations

import threading
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

__all__ = ["MetricsServer", "ReceiverMetrics"]

_LAG_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800, 3600, 86400)


class ReceiverMetrics:
    """Counters and gauges of the ingest path; thread-safe (the writer thread updates them)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.batches = Counter("edgeos_receiver_batches", "Batches newly stored", registry=r)
        self.samples = Counter("edgeos_receiver_samples", "Samples newly stored", registry=r)
        self.bytes = Counter("edgeos_receiver_bytes", "Sealed bytes of stored batches", registry=r)
        self.rejects = Counter(
            "edgeos_receiver_rejects",
            "Messages rejected, by reason (replayed = already stored, acknowledged again)",
            ["reason"],
            registry=r,
        )
        self.quarantined = Counter(
            "edgeos_receiver_quarantined",
            "Authenticated batches kept sealed instead of stored (acked as quarantined), by"
            " reason: malformed, limit, timestamp, unstorable",
            ["reason"],
            registry=r,
        )
        self.quarantined_bytes = Counter(
            "edgeos_receiver_quarantined_bytes",
            "Sealed bytes of quarantined batches",
            registry=r,
        )
        self.acks = Counter("edgeos_receiver_acks", "Acknowledgements published", registry=r)
        self.acks_dropped = Counter(
            "edgeos_receiver_acks_dropped",
            "Acknowledgements not published (broker down); the device re-sends",
            registry=r,
        )
        self.ingest_lag = Histogram(
            "edgeos_receiver_ingest_lag_seconds",
            "Seconds from a batch being sealed on the device to being stored",
            buckets=_LAG_BUCKETS,
            registry=r,
        )
        self.store_seconds = Histogram(
            "edgeos_receiver_store_seconds", "Seconds per storage transaction", registry=r
        )
        self.last_seen = Gauge(
            "edgeos_receiver_device_last_seen_timestamp_seconds",
            "Unix time the device's last batch was stored",
            ["device"],
            registry=r,
        )
        self.online = Gauge(
            "edgeos_receiver_device_online",
            "1 when the device's last status was online, 0 offline (its MQTT last will)",
            ["device"],
            registry=r,
        )
        self.queue_depth = Gauge(
            "edgeos_receiver_queue_depth", "Messages waiting for the writer", registry=r
        )
        self.commands_sent = Counter(
            "edgeos_receiver_commands_sent", "Commands published to devices", registry=r
        )
        self.command_results = Counter(
            "edgeos_receiver_command_results", "Command results stored", ["status"], registry=r
        )
        self.storage_errors = Counter(
            "edgeos_receiver_storage_errors", "Storage transactions that failed", registry=r
        )
        self.connected = Gauge(
            "edgeos_receiver_broker_connected", "1 while connected to the broker", registry=r
        )
        self.connect_failures = Counter(
            "edgeos_receiver_broker_connect_failures",
            "Broker connections refused, unreachable or lost (each failed attempt)",
            registry=r,
        )

    def value(self, name: str, **labels: str) -> float:
        """Current value of a sample by its exposed name (``edgeos_receiver_batches_total``)."""
        got = self.registry.get_sample_value(name, labels)
        return 0.0 if got is None else got


class MetricsServer:
    """The ``/metrics`` HTTP endpoint for one registry; :meth:`close` stops it."""

    def __init__(self, registry: CollectorRegistry, listen: str) -> None:
        host, _, port = listen.rpartition(":")
        server, thread = start_http_server(int(port), host or "127.0.0.1", registry=registry)
        self._server: WSGIServer = server
        self._thread: threading.Thread = thread
        self.port = int(server.server_address[1])

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)
