"""Counters of the receiver's intake: deferrals, bytes in flight, PUBACKs withheld.

Registered on the receiver's own :class:`~edgeos_cloud.receiver.metrics.ReceiverMetrics`
registry, so they appear on the same ``/metrics`` endpoint.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

__all__ = ["DEFER_REASONS", "IntakeMetrics"]

#: Why a message was deferred: not stored, not acknowledged; the device re-sends it later.
DEFER_REASONS = (
    "messages_per_s",  # quotas.messages_per_s (+ burst_s) used up (checked first at the door)
    "device_busy",  # the device's lane of the writer queue is full (a backlog or a flood)
    "bytes_per_day",  # quotas.bytes_per_day used up (checked at the door)
    "samples_per_s",  # quotas.samples_per_s (+ burst_s) used up (checked after decoding)
    "events_per_s",  # quotas.events_per_s (+ burst_s) used up
    "new_tags_per_day",  # quotas.new_tags_per_day used up
    "queue_full",  # a QoS 0 message while the queue was full (nothing to withhold)
    "disconnected",  # waiting for room when the broker connection dropped (not PUBACKed)
)


class IntakeMetrics:
    """``edgeos_receiver_deferred_total{reason}`` and the intake gauges."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.received = Counter(
            "edgeos_receiver_messages_received",
            "Messages the broker delivered (each is then stored, rejected or deferred)",
            registry=r,
        )
        self.deferred = Counter(
            "edgeos_receiver_deferred",
            "Messages deferred (not stored, not acknowledged: the device re-sends), by reason",
            ["reason"],
            registry=r,
        )
        # The door counts per message: label lookups once, not per message.
        self.deferred_by = {reason: self.deferred.labels(reason) for reason in DEFER_REASONS}
        self.bytes_in_flight = Gauge(
            "edgeos_receiver_bytes_in_flight",
            "Bytes of admitted messages not yet stored (intake.max_bytes_in_flight bounds it)",
            registry=r,
        )
        self.held = Gauge(
            "edgeos_receiver_held_messages",
            "Messages whose PUBACK is withheld until the queue has room (the broker waits)",
            registry=r,
        )
        self.peak_bytes_in_flight = Gauge(
            "edgeos_receiver_peak_bytes_in_flight",
            "Highest bytes in flight since the receiver started",
            registry=r,
        )
