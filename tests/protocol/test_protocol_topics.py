"""MQTT topic names: one builder and one parser for the gateway, the cloud and the tests."""

from __future__ import annotations

import pytest

from edgeos_protocol.topics import (
    ParsedTopic,
    TopicError,
    TopicKind,
    device_topics,
    parse_topic,
    subscription,
    topic,
)


def test_device_topics_are_the_documented_names() -> None:
    t = device_topics("gw-1")
    assert (t.batch, t.ack, t.command, t.command_result, t.status) == (
        "edgeos/v1/gw-1/batch",
        "edgeos/v1/gw-1/ack",
        "edgeos/v1/gw-1/cmd",
        "edgeos/v1/gw-1/cmd/result",
        "edgeos/v1/gw-1/status",
    )
    assert device_topics("gw-1", "site/a").ack == "site/a/gw-1/ack"


@pytest.mark.parametrize("kind", list(TopicKind))
def test_every_built_topic_parses_back(kind: TopicKind) -> None:
    assert parse_topic(topic("gw-1", kind, "p/q"), "p/q") == ParsedTopic("gw-1", kind)


@pytest.mark.parametrize(
    "name",
    [
        "other/v1/gw-1/batch",
        "edgeos/v1/gw-1/unknown",
        "edgeos/v1/gw-1",
        "edgeos/v1//batch",
        "edgeos/v1/gw-1/cmd/other",
        "edgeos/v1/gw-1/batch/extra",
        "edgeos/v1/+/batch",
    ],
)
def test_topics_that_are_not_edgeos_topics_are_refused(name: str) -> None:
    with pytest.raises(TopicError):
        parse_topic(name)


@pytest.mark.parametrize("device", ["", "a/b", "a+", "#"])
def test_a_device_name_that_is_not_one_topic_level_is_refused(device: str) -> None:
    with pytest.raises(TopicError):
        topic(device, TopicKind.ACK)


def test_subscriptions_cover_every_device_and_can_be_shared() -> None:
    assert subscription(TopicKind.BATCH) == "edgeos/v1/+/batch"
    assert subscription(TopicKind.COMMAND_RESULT, group="r") == "$share/r/edgeos/v1/+/cmd/result"
