"""Time travel: a fleet left alone must not go dark on a calendar date (issue #21).

The wall clock of every cloud process and of the gateway is moved by libfaketime
(``edgeos_testing.clockjump.WallClock``: one offset file they all read): Mosquitto, the
repository server that answers ``POST /certificates`` (``edgeos-cloud ota serve --registry``),
the shipped timer's command (``edgeos-cloud pki refresh --ota-repo … --broker-pid-file …``)
and a gateway process that runs the gateway's own renewal code (``edgeos.renewal``), connects
to the broker with whatever credentials it has installed, publishes, and refreshes its TUF
metadata with the gateway's OTA client. Steps: +31 days (CRL past ``nextUpdate``), +1 year
(TUF targets long expired), +3 years (broker certificate and the device's first certificate
expired). At every step the good device connects, publishes and can be updated, the receiver's
identity connects and reads it, and a device revoked at day 0 stays out.

TUF root expiry is 5 years here: root is re-signed only with the offline root keys (an
operator's ceremony, alerted ahead by ``edgeos_credential_expiry_timestamp_seconds{kind="tuf_root"}``),
which no timer can do.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgeos.provision import install_bundle
from edgeos_cloud.cli import main as cloud_main
from edgeos_cloud.ota.repository import Expiry, OtaRepository
from edgeos_cloud.receiver.pki import CertificateAuthority
from edgeos_protocol.credentials import read_bundle
from edgeos_testing.clockjump import WallClock, faketime_library
from edgeos_testing.mosquitto import MosquittoBroker, mosquitto_path
from edgeos_testing.net import free_port

pytestmark = [
    pytest.mark.skipif(mosquitto_path() is None, reason="mosquitto not installed"),
    pytest.mark.skipif(faketime_library() is None, reason="libfaketime not installed"),
]

DAY = 86400.0
STEPS = [("+31 days", 31 * DAY), ("+1 year", 365 * DAY), ("+3 years", 3 * 365 * DAY)]

# The gateway: renew when due (the runtime's task does exactly this call), then connect
# with the installed files, publish, and let the receiver's identity read it; then TUF.
GATEWAY = r"""
import asyncio, json, sys, aiomqtt
from pathlib import Path
from edgeos.renewal import CertificateRenewer, RenewalSettings, RenewalFailed
from edgeos.ota.client import ClientSettings, OtaClient
from edgeos_protocol.crypto import Keyring

args = json.loads(sys.argv[1])
creds = Path(args["creds"])
out = {"renewed": False}

def tls(d):
    return aiomqtt.TLSParameters(ca_certs=str(d / "ca.crt"), certfile=str(d / "client.crt"),
                                 keyfile=str(d / "client.key"))

async def main():
    r = CertificateRenewer(RenewalSettings(
        device=args["device"], url=args["url"], cert_file=creds / "client.crt",
        key_file=creds / "client.key", ca_file=creds / "ca.crt", broker=args["broker"],
        renew_before_days=60), Keyring.load(creds / "device.key"))
    r.recover()
    if r.due():
        try:
            await r.renew_once()
            out["renewed"] = True
        except RenewalFailed as exc:
            out["renewal_error"] = str(exc)
    out["expires"] = r.status().get("client_certificate_expires")
    try:
        rx = Path(args["receiver"])
        async with aiomqtt.Client("127.0.0.1", args["port"], identifier="rx-" + args["device"],
                                  tls_params=aiomqtt.TLSParameters(ca_certs=str(rx / "ca.crt"),
                                  certfile=str(rx / "receiver.crt"), keyfile=str(rx / "receiver.key")),
                                  timeout=8) as receiver:
            await receiver.subscribe(f"edgeos/v1/{args['device']}/status", qos=1)
            async with aiomqtt.Client("127.0.0.1", args["port"], identifier=args["device"],
                                      tls_params=tls(creds), timeout=8) as gw:
                await gw.publish(f"edgeos/v1/{args['device']}/status", args["step"].encode(), qos=1)
            async with asyncio.timeout(8):
                async for m in receiver.messages:
                    out["delivered"] = m.payload.decode()
                    break
    except (aiomqtt.MqttError, TimeoutError) as exc:
        out["connect_error"] = repr(exc)
    try:
        OtaClient(ClientSettings(repository_url=args["repo_url"], trusted_root=Path(args["root"]),
                                 cache_dir=creds / "tuf", hardware="rpi4-aarch64")).find("full")
        out["tuf"] = "ok"
    except Exception as exc:
        out["tuf"] = repr(exc)
    print(json.dumps(out))

asyncio.run(main())
"""


@pytest.fixture
def wall(tmp_path: Path) -> WallClock:
    return WallClock(tmp_path)


@contextlib.contextmanager
def _ota_server(tmp_path: Path, wall: WallClock) -> Iterator[tuple[Path, str]]:
    """``edgeos-cloud ota serve --registry`` under the shifted clock: TUF + /certificates."""
    repo = tmp_path / "ota"
    OtaRepository.init(repo, tmp_path / "root-keys", expiry=Expiry(root=5 * 365 * DAY))
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "edgeos_cloud.cli",
            "ota",
            "serve",
            "--repo",
            str(repo),
            "--port",
            str(port),
            "--registry",
            str(tmp_path / "rx" / "registry"),
        ],
        env={**os.environ, **wall.env()},
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert "serving" in proc.stdout.readline()  # it prints once it listens
        yield repo, f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


def _run(wall: WallClock, argv: list[str]) -> str:
    done = subprocess.run(
        argv,
        env={**os.environ, **wall.env()},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_fleet_keeps_connecting_and_updating_through_31_days_1_year_and_3_years(
    tmp_path: Path, wall: WallClock
) -> None:
    started = time.monotonic()
    rx = tmp_path / "rx"
    assert cloud_main(["init", str(rx)]) == 0
    ca = CertificateAuthority(rx / "registry" / "ca")
    creds: dict[str, Path] = {}
    broker = MosquittoBroker(tmp_path / "mq", ca=ca, env=wall.env())
    config = str(rx / "receiver.toml")
    for device in ("tt-gw-1", "tt-gw-bad"):
        bundle = tmp_path / f"{device}.json"
        assert (
            cloud_main(["device", "add", device, "--bundle", str(bundle), "--config", config]) == 0
        )
        installed = install_bundle(bundle, tmp_path / device)
        creds[device] = installed.cert_file.parent
        assert read_bundle(bundle)["device"] == device
    assert cloud_main(["device", "revoke", "tt-gw-bad", "--config", config]) == 0
    (rx / "pki" / "ca.crt").write_bytes(ca.cert_pem)
    with broker, _ota_server(tmp_path, wall) as (repo, repo_url):
        root = tmp_path / "root.json"
        root.write_bytes(OtaRepository(repo).trusted_root())
        pid_file = tmp_path / "mosquitto.pid"
        pid_file.write_text(str(broker.pid))
        results = {}
        for label, offset in [("day 0", 0.0), *STEPS]:
            wall.set_offset(offset)
            # The shipped timer's command, at the new date.
            refresh = json.loads(
                _run(
                    wall,
                    [
                        sys.executable,
                        "-m",
                        "edgeos_cloud.cli",
                        "pki",
                        "refresh",
                        "--config",
                        config,
                        "--server-cert",
                        str(broker.server_cert_file),
                        "--ota-repo",
                        str(repo),
                    ],
                )
            )
            (rx / "pki" / "ca.crt").write_bytes(ca.cert_pem)
            broker.reload()  # what the unit's ExecStartPost does
            step = {}
            for device, path in creds.items():
                args = {
                    "device": device,
                    "creds": str(path),
                    "url": repo_url,
                    "broker": broker.url,
                    "port": broker.port,
                    "receiver": str(rx / "pki"),
                    "repo_url": f"{repo_url}/",
                    "root": str(root),
                    "step": label,
                }
                out = _run(wall, [sys.executable, "-c", GATEWAY, json.dumps(args)])
                step[device] = json.loads(out.strip().splitlines()[-1])
            results[label] = (refresh["changed"], step)
            good, bad = step["tt-gw-1"], step["tt-gw-bad"]
            assert good.get("delivered") == label, (label, good, broker.log_tail())
            assert good["tuf"] == "ok", (label, good)
            assert "delivered" not in bad and "connect_error" in bad, (label, bad)
            assert not bad["renewed"], (label, bad)
        # The +3 years step needed a renewed device certificate and broker certificate.
        changed_3y, step_3y = results["+3 years"]
        assert step_3y["tt-gw-1"]["renewed"]
        assert "server_certificate" in changed_3y and "crl" in changed_3y
    print(f"time travel took {time.monotonic() - started:.1f} s")
