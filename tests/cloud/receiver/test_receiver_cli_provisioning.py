"""CLI (query, devices, device add/list/revoke) and credential bundles installed with 0600."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from edgeos.errors import ProvisioningError
from edgeos.provision import install_bundle
from edgeos_cloud.cli import main, parse_time
from edgeos_cloud.receiver.ingest import BatchOpener
from edgeos_cloud.receiver.registry import DeviceRegistry
from edgeos_cloud.receiver.storage import open_storage
from edgeos_protocol.crypto import Epoch, Keyring, load_device_key
from edgeos_protocol.wire import encode_body, seal_batch
from edgeos_testing.devsim import simple_batch
from edgeos_testing.mosquitto import MosquittoBroker

T0 = 1_700_000_000_000_000


def _config(tmp_path: Path) -> Path:
    path = tmp_path / "receiver.toml"
    path.write_text(
        '[broker]\nurl = "mqtt://127.0.0.1:1883"\n[storage]\nurl = "sqlite:///r.db"\n'
        '[metrics]\nlisten = ""\n',
        encoding="utf-8",
    )
    return path


def _out(capsys: pytest.CaptureFixture[str]) -> list[dict[str, object]]:
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_device_add_list_revoke_and_bundle_install(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = _config(tmp_path)
    bundle = tmp_path / "gw1.json"
    assert main(["device", "add", "gw1", "--bundle", str(bundle), "--config", str(cfg)]) == 0
    assert _out(capsys)[0]["device"] == "gw1"
    assert stat.S_IMODE(bundle.stat().st_mode) == 0o600
    assert main(["device", "add", "gw1", "--bundle", str(bundle), "--config", str(cfg)]) == 1
    capsys.readouterr()
    target = tmp_path / "gateway" / "creds"
    installed = install_bundle(bundle, target)
    for name in ("device.key", "client.crt", "client.key", "ca.crt", "credentials.json"):
        assert stat.S_IMODE((target / name).stat().st_mode) == 0o600, name
    assert stat.S_IMODE(target.stat().st_mode) == 0o700
    key = load_device_key(installed.key_file)  # the uplink's own loader accepts it
    assert DeviceRegistry(tmp_path / "registry").key_for("gw1", installed.key_id) == key
    with pytest.raises(ProvisioningError, match="already holds"):
        install_bundle(bundle, target)
    doc = json.loads(bundle.read_text())
    doc["device_key"] = doc["device_key"][::-1]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(doc))
    with pytest.raises(ProvisioningError):
        install_bundle(bad, tmp_path / "other")
    assert main(["device", "list", "--config", str(cfg)]) == 0
    assert [(d["device"], d["status"]) for d in _out(capsys)] == [("gw1", "active")]
    assert main(["device", "revoke", "gw1", "--config", str(cfg)]) == 0
    capsys.readouterr()
    assert main(["device", "list", "--config", str(cfg)]) == 0
    assert _out(capsys)[0]["status"] == "revoked"


async def test_bundle_certificate_connects_to_the_broker(tmp_path: Path) -> None:
    import aiomqtt

    from edgeos_cloud.receiver.pki import CertificateAuthority
    from edgeos_cloud.receiver.provisioning import create_device

    ca = CertificateAuthority.create(tmp_path / "ca")
    create_device(DeviceRegistry(tmp_path / "reg"), ca, "gw7", "mqtts://x:1", tmp_path / "b.json")
    creds = install_bundle(tmp_path / "b.json", tmp_path / "dev")
    async with MosquittoBroker(tmp_path / "mq", ca=ca) as broker:
        params = aiomqtt.TLSParameters(
            ca_certs=str(creds.ca_file),
            certfile=str(creds.cert_file),
            keyfile=str(creds.cert_key_file),
        )
        async with aiomqtt.Client(broker.host, broker.port, tls_params=params) as client:
            await client.publish("edgeos/v1/gw7/status", b"up", qos=1)


def test_query_and_devices_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _config(tmp_path)
    registry = DeviceRegistry(tmp_path / "registry")
    record = registry.add("gw1")
    epoch = Epoch.new(Keyring.of(record.current_key), "gw1")
    storage = open_storage(f"sqlite:///{tmp_path / 'r.db'}")
    opener = BatchOpener(registry)
    for i in (0, 2):  # seq 1 and 3 reach the receiver; 2 is missing → backlog 1
        batch = simple_batch(
            {"b": [float(i)], "a": [i + 0.25]}, [T0 + i * 1_000_000], text={"r": ["x"]}
        )
        _, sealed = seal_batch(epoch, encode_body(batch), T0)
        if i == 2:
            _, sealed = seal_batch(epoch, encode_body(batch), T0)
        storage.store([opener.open(sealed, T0, "gw1")])
    storage.close()
    assert main(["query", "--device", "gw1", "--config", str(cfg)]) == 0
    rows = _out(capsys)
    assert rows[0] == {
        "device": "gw1",
        "tag": "b",
        "ts": "2023-11-14T22:13:20.000000Z",
        "value": 0.0,
        "quality": 0,
    }
    assert [(r["tag"], r["value"]) for r in rows] == [
        ("b", 0.0),
        ("a", 0.25),
        ("r", "x"),
        ("b", 2.0),
        ("a", 2.25),
        ("r", "x"),
    ]
    assert (
        main(
            [
                "query",
                "--device",
                "gw1",
                "--tag",
                "a",
                "--since",
                "2023-11-14T22:13:21Z",
                "--config",
                str(cfg),
            ]
        )
        == 0
    )
    assert [r["value"] for r in _out(capsys)] == [2.25]
    assert (
        main(
            [
                "query",
                "--device",
                "gw1",
                "--until",
                str((T0 + 1) / 1e6),
                "--tag",
                "a",
                "--config",
                str(cfg),
            ]
        )
        == 0
    )
    assert [r["value"] for r in _out(capsys)] == [0.25]
    assert main(["devices", "--config", str(cfg)]) == 0
    (dev,) = _out(capsys)
    assert (dev["device"], dev["batches"], dev["backlog"]) == ("gw1", 2, 1)


def test_config_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[broker]\nurl = "http://x"\nbogus = 1\n[storage]\nurl = "mysql://"\n')
    assert main(["devices", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "broker.url" in err and "broker.bogus" in err and "storage.url" in err
    tls = tmp_path / "tls.toml"
    tls.write_text('[broker]\nurl = "mqtts://h:8883"\n')
    assert main(["devices", "--config", str(tls)]) == 2
    assert "broker.tls" in capsys.readouterr().err
    both = tmp_path / "both.toml"
    both.write_text('[broker]\nurl = "mqtt://h"\ngroup = "a"\nshared_group = ""\n')
    assert main(["devices", "--config", str(both)]) == 2
    assert "broker.shared_group" in capsys.readouterr().err
    assert parse_time("1.5") == 1_500_000
    assert parse_time("1970-01-01T00:00:02Z") == 2_000_000
