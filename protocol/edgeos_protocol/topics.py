"""The MQTT topic names of edgeos, built and parsed in one place (gateway, cloud and tests).

Topics (``<p>`` = the topic prefix, default ``edgeos/v1``)::

    <p>/<device>/batch       device → receiver   sealed batches, QoS 1
    <p>/<device>/ack         receiver → device   sealed ACK {epoch, seq}
    <p>/<device>/cmd         receiver → device   sealed COMMAND
    <p>/<device>/cmd/result  device → receiver   sealed COMMAND_RESULT
    <p>/<device>/status      device → all        retained JSON birth/death

:func:`device_topics` gives one device's topics, :func:`subscription` a receiver's filter over
every device (optionally through a shared-subscription group), :func:`parse_topic` the
device and kind of a topic a message arrived on. The broker's ACLs (see
``edgeos_cloud.broker.device_acl``) are written for these same names.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = [
    "DEFAULT_PREFIX",
    "DeviceTopics",
    "ParsedTopic",
    "TopicError",
    "TopicKind",
    "device_topics",
    "parse_topic",
    "subscription",
    "topic",
]

DEFAULT_PREFIX = "edgeos/v1"
_WILDCARDS = frozenset("+#")


class TopicError(ValueError):
    """A topic that is not ``<prefix>/<device>/<kind>`` of a known kind, or a bad device name."""


class TopicKind(enum.StrEnum):
    """The last part(s) of a device topic."""

    BATCH = "batch"
    ACK = "ack"
    COMMAND = "cmd"
    COMMAND_RESULT = "cmd/result"
    STATUS = "status"


@dataclass(frozen=True, slots=True)
class ParsedTopic:
    device: str
    kind: TopicKind


@dataclass(frozen=True, slots=True)
class DeviceTopics:
    """Every topic of one device (see the module docs)."""

    batch: str
    ack: str
    command: str
    command_result: str
    status: str


def _check_device(device: str) -> str:
    if not device or "/" in device or _WILDCARDS & set(device):
        raise TopicError(f"device name {device!r} cannot be one MQTT topic level")
    return device


def topic(device: str, kind: TopicKind, prefix: str = DEFAULT_PREFIX) -> str:
    """``<prefix>/<device>/<kind>``."""
    return f"{prefix}/{_check_device(device)}/{kind.value}"


def device_topics(device: str, prefix: str = DEFAULT_PREFIX) -> DeviceTopics:
    """The topics one device publishes and subscribes to."""
    return DeviceTopics(
        batch=topic(device, TopicKind.BATCH, prefix),
        ack=topic(device, TopicKind.ACK, prefix),
        command=topic(device, TopicKind.COMMAND, prefix),
        command_result=topic(device, TopicKind.COMMAND_RESULT, prefix),
        status=topic(device, TopicKind.STATUS, prefix),
    )


def subscription(kind: TopicKind, prefix: str = DEFAULT_PREFIX, *, group: str = "") -> str:
    """The filter ``<prefix>/+/<kind>`` over every device; ``$share/<group>/…`` when ``group``.

    Brokers send no retained messages to shared subscriptions: subscribe to status plainly.
    """
    plain = f"{prefix}/+/{kind.value}"
    return f"$share/{group}/{plain}" if group else plain


_BY_SUFFIX = {tuple(kind.value.split("/")): kind for kind in TopicKind}


def parse_topic(name: str, prefix: str = DEFAULT_PREFIX) -> ParsedTopic:
    """The device and kind of a topic; :class:`TopicError` when it is not an edgeos topic."""
    head = f"{prefix}/"
    if not name.startswith(head):
        raise TopicError(f"topic {name!r} is not under {prefix!r}")
    device, _, rest = name[len(head) :].partition("/")
    kind = _BY_SUFFIX.get(tuple(rest.split("/")))
    if kind is None:
        raise TopicError(f"topic {name!r} is not <prefix>/<device>/<kind> of a known kind")
    return ParsedTopic(_check_device(device), kind)
