"""[northbound] configuration: validated like the rest, errors name the key path."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from edgeos.errors import ConfigError
from edgeos.northbound import Northbound, NorthboundConfig, check_northbound
from edgeos_protocol.validation import format_validation_error

from .conftest import PlantRig


def issues(raw: dict[str, object]) -> list[str]:
    with pytest.raises(ValidationError) as err:
        NorthboundConfig.model_validate(raw)
    return [str(i) for i in format_validation_error(err.value, prefix="northbound")]


def test_unknown_keys_bad_urls_and_missing_credentials_are_reported_with_key_paths() -> None:
    found = issues(
        {
            "sparkplug": {"broker": "http://x", "deadbnad": 1, "group_id": "a/b"},
            "opcua": {"users": []},
        }
    )
    text = "\n".join(found)
    assert "northbound.sparkplug.deadbnad" in text
    assert "northbound.sparkplug.broker" in text
    assert "northbound.sparkplug.group_id" in text
    assert "northbound.opcua" in text and "cert_file" in text


def test_anonymous_is_off_by_default_so_an_opcua_server_needs_users() -> None:
    text = "\n".join(issues({"opcua": {"security": ["None"]}}))
    assert "no one could log in" in text
    ok = NorthboundConfig.model_validate({"opcua": {"security": ["None"], "allow_anonymous": True}})
    assert ok.opcua is not None and ok.opcua.allow_anonymous


def test_write_patterns_must_match_writable_tags() -> None:
    rig = PlantRig()
    config = NorthboundConfig.model_validate(
        {"sparkplug": {"broker": "mqtt://127.0.0.1:1883", "writes": ["nest*.heater.pv", "nope*"]}}
    )
    found = [str(i) for i in check_northbound(config, rig.twin.tags)]
    assert found[0].startswith("northbound.sparkplug.writes[0]: ") and "read-only" in found[0]
    assert found[1].startswith("northbound.sparkplug.writes[1]: ") and "matches no tag" in found[1]
    with pytest.raises(ConfigError):
        Northbound(config, rig.twin, device_id="gw-1")


def test_relative_paths_resolve_against_the_config_folder() -> None:
    config = NorthboundConfig.model_validate(
        {
            "sparkplug": {"broker": "mqtts://plant:8883", "tls": {"ca_file": "plant-ca.pem"}},
            "opcua": {"cert_file": "gw.pem", "key_file": "/etc/gw.key", "allow_anonymous": True},
        }
    ).resolve_paths(Path("/etc/edgeos"))
    assert config.sparkplug is not None and config.sparkplug.tls is not None
    assert config.sparkplug.tls.ca_file == Path("/etc/edgeos/plant-ca.pem")
    assert config.opcua is not None and config.opcua.cert_file == Path("/etc/edgeos/gw.pem")
    assert config.opcua.key_file == Path("/etc/gw.key")
