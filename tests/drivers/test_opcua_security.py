"""OPC UA driver: Basic256Sha256 Sign / SignAndEncrypt and user/password login."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from drivers.opcua import OpcUaDriver
from edgeos.clock import SystemClock
from edgeos.config import ConnectionConfig, TagConfig
from edgeos.driver import Quality, TagBinding
from edgeos.errors import ConnectError, ProvisioningError
from edgeos_testing.opcua_server import (
    SERVER_URI,
    OpcUaServerThread,
    OpcUaTestServer,
    Variable,
    generate_certificate,
)

CLIENT_URI = "urn:edgeos:tests:gateway"
USER, PASSWORD = "operator", "correct horse battery"


@dataclass(frozen=True)
class Pki:
    server_cert: Path
    client_cert: Path
    client_key: Path
    stranger_cert: Path
    password_file: Path
    wrong_password_file: Path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    root = tmp_path_factory.mktemp("pki")
    server_cert, server_key = generate_certificate(root, "server", SERVER_URI)
    client_cert, client_key = generate_certificate(root, "client", CLIENT_URI)
    stranger_cert, _ = generate_certificate(root, "stranger", SERVER_URI)
    password_file = root / "password"
    password_file.write_text(PASSWORD + "\n")
    password_file.chmod(0o600)
    wrong = root / "wrong-password"
    wrong.write_text("guess\n")
    wrong.chmod(0o600)
    # The server's own key travels through the thread fixture below.
    (root / "server-key-path").write_text(str(server_key))
    return Pki(server_cert, client_cert, client_key, stranger_cert, password_file, wrong)


@pytest.fixture(scope="module")
def server(pki: Pki) -> Iterator[OpcUaServerThread]:
    key = Path((pki.server_cert.parent / "server-key-path").read_text())
    thread = OpcUaServerThread(
        OpcUaTestServer(
            [Variable("temp", "float64", 21.5), Variable("setpoint", "float64", 0.0)],
            certificate=pki.server_cert,
            private_key=key,
            users={USER: PASSWORD},
        )
    ).start()
    yield thread
    thread.stop()


@pytest.fixture
async def make(server: OpcUaServerThread) -> AsyncIterator[Any]:
    drivers: list[OpcUaDriver] = []

    def build(**options: Any) -> tuple[OpcUaDriver, list[TagBinding]]:
        conn = ConnectionConfig(
            name="plc", driver="opcua", endpoint=server.server.endpoint, options=options
        )
        tags = [
            TagConfig(
                name=name,
                connection="plc",
                resolution=0.1,
                writable=name == "setpoint",
                limits={"min": 0, "max": 100} if name == "setpoint" else None,
                opcua={"node_id": server.server.node_id(name)},
            )
            for name in ("temp", "setpoint")
        ]
        bindings = [TagBinding(i, t) for i, t in enumerate(tags)]
        driver = OpcUaDriver(conn.driver_context(bindings, clock=SystemClock()))
        drivers.append(driver)
        return driver, bindings

    yield build
    for driver in drivers:
        await driver.close()


def _secure(pki: Pki, mode: str, **extra: Any) -> dict[str, Any]:
    return {
        "security_policy": "Basic256Sha256",
        "security_mode": mode,
        "client_certificate": str(pki.client_cert),
        "client_private_key": str(pki.client_key),
        **extra,
    }


@pytest.mark.parametrize("mode", ["Sign", "SignAndEncrypt"])
async def test_basic256sha256_reads_and_writes(make: Any, pki: Pki, mode: str) -> None:
    # The pinned server certificate is the trust anchor; the application URI comes from the
    # client certificate's subjectAltName.
    driver, bindings = make(**_secure(pki, mode, server_certificate=str(pki.server_cert)))
    await driver.connect()
    session = driver._sessions[0].client
    assert session.security_policy.Mode.name == mode
    assert session.application_uri == CLIENT_URI

    await driver.write(bindings[1], 42.0)
    result = await driver.read("default")

    assert result.values.tolist() == [21.5, 42.0]
    assert result.quality.tolist() == [Quality.GOOD, Quality.GOOD]


async def test_a_server_certificate_that_is_not_the_pinned_one_is_refused(
    make: Any, pki: Pki
) -> None:
    driver, _ = make(**_secure(pki, "SignAndEncrypt", server_certificate=str(pki.stranger_cert)))
    with pytest.raises(ConnectError, match="not the pinned server_certificate"):
        await driver.connect()
    assert not driver.connected


async def test_username_and_password_login(make: Any, pki: Pki) -> None:
    driver, _ = make(
        **_secure(pki, "SignAndEncrypt"), username=USER, password_file=str(pki.password_file)
    )
    await driver.connect()
    result = await driver.read("default")
    assert result.values.tolist()[0] == 21.5


async def test_a_wrong_password_is_a_clear_connect_error(make: Any, pki: Pki) -> None:
    driver, _ = make(username=USER, password_file=str(pki.wrong_password_file))
    with pytest.raises(ConnectError) as info:
        await driver.connect()
    message = str(info.value)
    assert "login refused" in message
    assert "BadUserAccessDenied" in message
    assert repr(USER) in message
    assert "guess" not in message  # the password is never echoed


async def test_a_password_file_others_can_read_is_refused(
    make: Any, pki: Pki, tmp_path: Path
) -> None:
    loose = tmp_path / "password"
    loose.write_text(PASSWORD)
    loose.chmod(0o644)
    driver, _ = make(username=USER, password_file=str(loose))
    with pytest.raises(ProvisioningError, match="chmod 600"):
        await driver.connect()
