"""The receiver's reconnect keys map onto the shared BackoffPolicy (edgeos_protocol.backoff)."""

from __future__ import annotations

import pytest

from edgeos_cloud.receiver.config import parse_receiver_config
from edgeos_protocol.backoff import BackoffPolicy
from edgeos_protocol.errors import ConfigError


def test_reconnect_s_keeps_working_as_the_first_delay_of_the_policy() -> None:
    config = parse_receiver_config('[broker]\nurl = "mqtt://b:1883"\nreconnect_s = 0.5\n')
    assert config.broker.reconnect_policy == BackoffPolicy(
        initial_s=0.5, max_s=30.0, first_retry_s=0.1
    )


def test_reconnect_max_s_caps_the_delays() -> None:
    config = parse_receiver_config(
        '[broker]\nurl = "mqtt://b:1883"\nreconnect_s = 0.05\nreconnect_max_s = 5\n'
    )
    policy = config.broker.reconnect_policy
    assert (policy.initial_s, policy.max_s, policy.first_retry_s) == (0.05, 5.0, 0.05)
    assert policy.ceiling(20) == 5.0


def test_a_cap_below_the_first_delay_is_refused_with_its_key_path() -> None:
    with pytest.raises(ConfigError, match=r"broker\.reconnect_max_s"):
        parse_receiver_config(
            '[broker]\nurl = "mqtt://b:1883"\nreconnect_s = 5\nreconnect_max_s = 1\n'
        )
