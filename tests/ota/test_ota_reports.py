"""Update reports are sealed by the device: forged, foreign, replayed or oversized ones move
nothing (a real TUF repository and its HTTP server, real device keys in a real registry)."""

from __future__ import annotations

import http.client
import itertools
import json
from pathlib import Path

import pytest

from edgeos_cloud.ota.campaign import Campaign, Stage
from edgeos_cloud.ota.reports import DeviceReport, ReportIntake
from edgeos_cloud.ota.repository import OtaRepository, RepoServer, serving
from edgeos_cloud.receiver.registry import DeviceRegistry
from edgeos_protocol.control import ControlKind, seal_control
from edgeos_protocol.crypto import Keyring
from edgeos_testing.ota import MakeRelease

_counter = itertools.count(10_000)


@pytest.fixture
def registry(tmp_path: Path) -> DeviceRegistry:
    return DeviceRegistry(tmp_path / "registry")


@pytest.fixture
def campaign(repo: OtaRepository, make_release: MakeRelease) -> Campaign:
    published = repo.publish(make_release("1.1.0"))
    campaign = Campaign.create(
        repo,
        "r1",
        published.target_path,
        [
            Stage("canary", ("canary",), max_failure_rate=0.05, min_reports=20),
            Stage("all", ("default",), max_failure_rate=0.1, min_reports=1),
        ],
    )
    campaign.start()
    return campaign


@pytest.fixture
def server(repo: OtaRepository, registry: DeviceRegistry) -> RepoServer:
    intake = ReportIntake(repo.dir, registry.key_for)
    with serving(repo.dir, on_report=intake.accept) as srv:
        yield srv  # type: ignore[misc]


def _seal(ring: Keyring, signer: str, doc: dict[str, object], counter: int | None = None) -> bytes:
    return seal_control(
        ControlKind.OTA_REPORT,
        doc,
        ring.current,
        signer,
        counter if counter is not None else next(_counter),
        key_id=ring.current_id,
    )


def _doc(device: str, outcome: str, group: str = "canary") -> dict[str, object]:
    return {"device": device, "group": group, "outcome": outcome, "version": "1.1.0"}


def _ring(registry: DeviceRegistry, device: str) -> Keyring:
    record = registry.get(device) or registry.add(device)
    return Keyring.of(record.current_key)


def _post(server: RepoServer, body: bytes, headers: dict[str, str] | None = None) -> int:
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(str(host), int(port), timeout=20)
    try:
        conn.putrequest("POST", "/reports", skip_accept_encoding=True)
        sent = {"Content-Length": str(len(body))} if headers is None else headers
        for name, value in sent.items():
            conn.putheader(name, value)
        conn.endheaders()
        if body:
            conn.send(body)
        return conn.getresponse().status
    finally:
        conn.close()


def test_forged_committed_reports_cannot_hide_a_real_rollback(
    server: RepoServer, campaign: Campaign, registry: DeviceRegistry
) -> None:
    real = _ring(registry, "gw-real")
    strangers = Keyring.of(bytes(range(32)))
    for i in range(19):  # unregistered devices, or a registered device under a made-up key
        name = f"gw-fake{i}" if i % 2 else "gw-real"
        assert _post(server, _seal(strangers, name, _doc(name, "committed"))) == 403
    assert campaign.summary()["devices"] == {}
    assert _post(server, _seal(real, "gw-real", _doc("gw-real", "rolled_back"))) == 200
    summary = campaign.summary()
    assert summary["status"] == "halted" and list(summary["devices"]) == ["gw-real"]


def test_a_forged_rollback_cannot_halt_a_campaign(
    server: RepoServer, campaign: Campaign, registry: DeviceRegistry
) -> None:
    _ring(registry, "gw-1")
    forged = _seal(Keyring.of(bytes(32)), "gw-1", _doc("gw-1", "rolled_back"))
    assert _post(server, forged) == 403
    plain_json = json.dumps(_doc("gw-1", "rolled_back")).encode()  # the old, unsealed format
    assert _post(server, plain_json) == 400
    assert campaign.summary()["status"] == "running"


def test_a_device_reports_only_for_itself(
    server: RepoServer, campaign: Campaign, registry: DeviceRegistry
) -> None:
    mallory = _ring(registry, "gw-mallory")
    _ring(registry, "gw-victim")
    assert _post(server, _seal(mallory, "gw-mallory", _doc("gw-victim", "rolled_back"))) == 403
    assert campaign.summary()["devices"] == {}


def test_a_revoked_device_cannot_report(
    server: RepoServer, campaign: Campaign, registry: DeviceRegistry
) -> None:
    ring = _ring(registry, "gw-old")
    registry.revoke("gw-old")
    assert _post(server, _seal(ring, "gw-old", _doc("gw-old", "rolled_back"))) == 403
    assert campaign.summary()["status"] == "running"


def test_a_replayed_report_is_refused_also_after_a_server_restart(
    repo: OtaRepository, campaign: Campaign, registry: DeviceRegistry
) -> None:
    ring = _ring(registry, "gw-1")
    rolled_back = _seal(ring, "gw-1", _doc("gw-1", "rolled_back"), counter=100)
    committed = _seal(ring, "gw-1", _doc("gw-1", "committed"), counter=200)
    with serving(repo.dir, on_report=ReportIntake(repo.dir, registry.key_for).accept) as srv:
        assert _post(srv, committed) == 200
        assert _post(srv, committed) == 409
    # A new server process: the counters are on disk, so the older report stays refused.
    with serving(repo.dir, on_report=ReportIntake(repo.dir, registry.key_for).accept) as srv:
        assert _post(srv, rolled_back) == 409
    assert campaign.summary()["devices"]["gw-1"]["outcome"] == "committed"
    assert campaign.summary()["status"] == "running"


def test_campaigns_take_only_authenticated_reports(campaign: Campaign) -> None:
    with pytest.raises(TypeError):
        campaign.record(_doc("gw-1", "rolled_back"))  # type: ignore[arg-type]
    report = DeviceReport("gw-1", "canary", "hw", "committed", "1.1.0", None, "", None, 1, 1)
    assert campaign.record(report)  # what ReportIntake builds after authenticating


@pytest.mark.parametrize(
    ("headers", "body", "status"),
    [
        ({"Content-Length": "-1"}, b"x" * 100, 400),
        ({}, b"", 411),
        ({"Content-Length": str(1 << 40)}, b"x" * 100, 413),
        ({"Content-Length": str(64 << 10)}, b"", 413),
        ({"Transfer-Encoding": "chunked"}, b"5\r\nhello\r\n0\r\n\r\n", 411),
        ({"Content-Length": "+5"}, b"hello", 400),
        ({"Content-Length": "5", "X": "y"}, b"hel", 400),
    ],
    ids=["negative", "missing", "huge", "above-cap", "chunked", "signed", "short"],
)
def test_the_report_body_cap_cannot_be_bypassed(
    server: RepoServer,
    campaign: Campaign,
    headers: dict[str, str],
    body: bytes,
    status: int,
) -> None:
    if "X" in headers:
        # Announces 5, sends 3 and keeps the connection open: the server's socket timeout
        # ends the wait (shortened here so the test does not sit through the default).
        server.request_timeout_s = 0.5
    assert _post(server, body, headers) == status
    # Still serving.
    assert _post(server, b"not sealed") == 400
    assert campaign.summary()["devices"] == {}
