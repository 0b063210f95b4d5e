"""End-to-end fixtures: one receiver CA + provisioned device per session (real CLIs), and
rigs (real Mosquitto, receiver, runtime and simulated line) that are always torn down."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from edgeos_testing.mosquitto import mosquitto_path
from edgeos_testing.rig import Credentials, Rig, RigSpec

DEVICE = "e2e-gw-01"
PG_DSN_DEFAULT = "postgresql://edgeos_test:edgeos_test@127.0.0.1:5432/postgres"


@pytest.fixture(scope="session")
def e2e_credentials(tmp_path_factory: pytest.TempPathFactory) -> Credentials:
    if mosquitto_path() is None:
        pytest.skip("mosquitto is not installed")
    return Credentials.provision(tmp_path_factory.mktemp("e2e-pki"), DEVICE)


@pytest.fixture
def pg_dsn() -> str:
    return os.environ.get("EDGEOS_TEST_PG_DSN", PG_DSN_DEFAULT)


@pytest.fixture
async def e2e_rig(
    e2e_credentials: Credentials, request: pytest.FixtureRequest
) -> AsyncIterator[Callable[..., Awaitable[Rig]]]:
    """``await e2e_rig(spec=…, **Rig options)``: a started rig; killed at teardown."""
    rigs: list[Rig] = []

    async def factory(spec: RigSpec | None = None, **kwargs: Any) -> Rig:
        from edgeos_testing.rig import DutSpec

        spec = spec or RigSpec(dut=DutSpec(device_id=DEVICE))
        rig = Rig(spec, credentials=e2e_credentials, **kwargs)
        rigs.append(rig)
        await rig.__aenter__()
        return rig

    yield factory
    for rig in rigs:
        await rig.close()
        rig.remove_workdir()


def spec_for(**peers: Any) -> RigSpec:
    from edgeos_testing.rig import DutSpec, PeersSpec

    return RigSpec(dut=DutSpec(device_id=DEVICE), peers=PeersSpec(**peers))
