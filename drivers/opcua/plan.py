"""What an OPC UA connection sends, fixed at construction (no network).

Node ids are parsed and encoded once; polled tags are cut into Read requests of at most
``max_items_per_read`` node ids per scan group; subscribed tags are sorted by sampling interval
and cut into subscriptions of at most ``max_items_per_subscription`` items, spread over the
sessions. A tag whose node id does not parse is never sent and always ``BAD_CONFIG``.
"""

from __future__ import annotations

import struct
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from asyncua import ua
from asyncua.ua.attribute_ids import AttributeIds
from asyncua.ua.ua_binary import nodeid_to_binary
from asyncua.ua.uaerrors import UaError

from edgeos.driver import TagBinding

from .address import OpcUaAddress
from .options import OpcUaOptions

__all__ = ["DEFAULT_SAMPLING_INTERVAL_MS", "ConnectionPlan", "ReadChunk", "SubscriptionPlan"]

#: Sampling interval of a subscribed tag when neither the tag nor its group gives one.
DEFAULT_SAMPLING_INTERVAL_MS = 1000.0


@dataclass(slots=True)
class ReadChunk:
    """One Read request, prepared once: its handles (twin indices) and encoded parameters."""

    handles: list[int]
    params: ua.ReadParameters


@dataclass(slots=True)
class SubscriptionPlan:
    session: int
    publishing_interval_ms: float
    items: list[ua.MonitoredItemCreateRequest]
    handles: list[int]
    #: Server-assigned id of the live subscription (None until created on this session).
    subscription_id: int | None = None


def opcua_address(binding: TagBinding) -> OpcUaAddress:
    """The tag's OPC UA address; ``ValueError`` for a tag of another driver."""
    address = binding.tag.address
    if not isinstance(address, OpcUaAddress):
        raise ValueError(f"tag {binding.tag.name!r} has no 'opcua' address")
    return address


@dataclass(slots=True)
class ConnectionPlan:
    """Every request of one connection, planned from its tag bindings and options."""

    connection: str
    options: OpcUaOptions
    bindings: dict[int, TagBinding] = field(default_factory=dict)
    node_ids: dict[int, ua.NodeId] = field(default_factory=dict)
    #: Tags whose node id does not parse: never sent, always BAD_CONFIG.
    invalid: dict[int, str] = field(default_factory=dict)
    string_handles: frozenset[int] = frozenset()
    read_plans: dict[str, list[ReadChunk]] = field(default_factory=dict)
    invalid_by_group: dict[str, list[int]] = field(default_factory=dict)
    subscriptions: list[SubscriptionPlan] = field(default_factory=list)
    subscribed_handles: frozenset[int] = frozenset()
    invalid_subscribed: list[int] = field(default_factory=list)

    @classmethod
    def build(
        cls,
        connection: str,
        options: OpcUaOptions,
        tags: Sequence[TagBinding],
        scan_periods_ms: Mapping[str, float],
    ) -> ConnectionPlan:
        """Plan ``tags``; ``ValueError`` for a tag of another driver or too many subscriptions."""
        self = cls(connection, options)
        self.string_handles = frozenset(b.index for b in tags if b.tag.data_type == "string")
        polled: dict[str, list[int]] = {}
        subscribed: list[tuple[float, TagBinding]] = []
        for binding in tags:
            address = opcua_address(binding)
            if binding.index in self.bindings:
                raise ValueError(f"twin index {binding.index} is bound twice")
            self.bindings[binding.index] = binding
            try:
                node_id = ua.NodeId.from_string(address.node_id)
                # Encoding once here catches what parsing lets through (ns > 65535, i > 2^32).
                nodeid_to_binary(node_id)
                self.node_ids[binding.index] = node_id
            except (ValueError, TypeError, OverflowError, struct.error, UaError) as exc:
                self.invalid[binding.index] = f"node id {address.node_id!r}: {exc}"
            if address.mode == "poll":
                polled.setdefault(binding.tag.scan_group, []).append(binding.index)
            else:
                interval = address.sampling_interval_ms or scan_periods_ms.get(
                    binding.tag.scan_group, DEFAULT_SAMPLING_INTERVAL_MS
                )
                subscribed.append((float(interval), binding))
        for group, handles in polled.items():
            self.read_plans[group], self.invalid_by_group[group] = self._plan_reads(handles)
        self.subscriptions = self._plan_subscriptions(subscribed)
        self.subscribed_handles = frozenset(h for plan in self.subscriptions for h in plan.handles)
        self.invalid_subscribed = [b.index for _, b in subscribed if b.index in self.invalid]
        return self

    def _plan_reads(self, handles: list[int]) -> tuple[list[ReadChunk], list[int]]:
        valid = [h for h in handles if h not in self.invalid]
        invalid = [h for h in handles if h in self.invalid]
        size = self.options.max_items_per_read
        chunks = []
        for start in range(0, len(valid), size):
            part = valid[start : start + size]
            params = ua.ReadParameters(
                MaxAge=self.options.read_max_age_ms,
                TimestampsToReturn=ua.TimestampsToReturn.Both,
                NodesToRead=[
                    ua.ReadValueId(NodeId=self.node_ids[h], AttributeId=AttributeIds.Value)
                    for h in part
                ],
            )
            chunks.append(ReadChunk(part, params))
        return chunks, invalid

    def _plan_subscriptions(
        self, subscribed: list[tuple[float, TagBinding]]
    ) -> list[SubscriptionPlan]:
        opts = self.options
        # Items with similar sampling intervals share a subscription, so its publishing
        # interval (the fastest of its items) does not make slow items publish too often.
        ordered = sorted(
            (item for item in subscribed if item[1].index not in self.invalid),
            key=lambda item: (item[0], item[1].index),
        )
        plans: list[SubscriptionPlan] = []
        size = opts.max_items_per_subscription
        for start in range(0, len(ordered), size):
            part = ordered[start : start + size]
            fastest = part[0][0]
            plans.append(
                SubscriptionPlan(
                    session=len(plans) % opts.sessions,
                    publishing_interval_ms=opts.publishing_interval_ms or fastest,
                    items=[self._monitored_item(interval, b) for interval, b in part],
                    handles=[b.index for _, b in part],
                )
            )
        per_session = Counter(plan.session for plan in plans)
        worst = max(per_session.values(), default=0)
        if worst > opts.max_subscriptions:
            raise ValueError(
                f"connection {self.connection!r}: {len(ordered)} subscribed tags need "
                f"{worst} subscriptions per session, above max_subscriptions="
                f"{opts.max_subscriptions}; raise max_items_per_subscription, "
                "max_subscriptions or sessions"
            )
        return plans

    def _monitored_item(
        self, interval_ms: float, binding: TagBinding
    ) -> ua.MonitoredItemCreateRequest:
        address = opcua_address(binding)
        mfilter: Any = None
        deadband = binding.tag.deadband
        if self.options.server_deadband and deadband > 0 and binding.tag.data_type != "string":
            mfilter = ua.DataChangeFilter(
                Trigger=ua.DataChangeTrigger.StatusValue,
                DeadbandType=ua.DeadbandType.Absolute,
                DeadbandValue=deadband,
            )
        return ua.MonitoredItemCreateRequest(
            ItemToMonitor=ua.ReadValueId(
                NodeId=self.node_ids[binding.index], AttributeId=AttributeIds.Value
            ),
            MonitoringMode=ua.MonitoringMode.Reporting,
            RequestedParameters=ua.MonitoringParameters(
                # The twin index is the client handle: notifications need no lookup table.
                ClientHandle=binding.index,
                SamplingInterval=interval_ms,
                Filter=mfilter,
                QueueSize=address.queue_size,
                DiscardOldest=True,
            ),
        )
