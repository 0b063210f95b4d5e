"""``edgeos-cloud init``: the receiver configuration it writes matches the broker URL's scheme."""

from __future__ import annotations

import tomllib
from pathlib import Path

from edgeos_cloud.cli import main
from edgeos_cloud.receiver.config import load_receiver_config


def test_init_for_a_plain_broker_writes_no_tls_section(tmp_path: Path) -> None:
    assert main(["init", str(tmp_path / "r"), "--broker", "mqtt://127.0.0.1:1883"]) == 0
    doc = tomllib.loads((tmp_path / "r" / "receiver.toml").read_text())
    assert "tls" not in doc["broker"]
    config = load_receiver_config(tmp_path / "r" / "receiver.toml")
    assert config.broker.url == "mqtt://127.0.0.1:1883" and config.broker.tls is None
    # The devices' listener stays TLS on 8883: not on the receiver's plain port.
    assert "listener 8883" in (tmp_path / "r" / "broker" / "mosquitto.conf").read_text()


def test_init_for_a_tls_broker_writes_the_receivers_certificate(tmp_path: Path) -> None:
    assert main(["init", str(tmp_path / "r"), "--broker", "mqtts://127.0.0.1:9883"]) == 0
    config = load_receiver_config(tmp_path / "r" / "receiver.toml")
    assert config.broker.tls is not None and config.broker.tls.cert_file.exists()
    assert "listener 9883" in (tmp_path / "r" / "broker" / "mosquitto.conf").read_text()
