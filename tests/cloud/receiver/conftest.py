"""Fixtures of the receiver tests: storage back-ends (SQLite and PostgreSQL), registry, broker."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from edgeos_cloud.receiver.registry import DeviceRegistry
from edgeos_testing.mosquitto import mosquitto_path
from edgeos_testing.receiver import PostgresUnavailable, postgres_database


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def storage_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database URL: a SQLite file, or a unique PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'receiver.db'}"
        return
    try:
        with postgres_database() as url:
            yield url
    except PostgresUnavailable as exc:
        pytest.skip(f"PostgreSQL unavailable: {exc}")


@pytest.fixture
def registry(tmp_path: Path) -> DeviceRegistry:
    return DeviceRegistry(tmp_path / "registry")


@pytest.fixture(autouse=True)
def _need_mosquitto(request: pytest.FixtureRequest) -> None:
    if "broker" in request.fixturenames and mosquitto_path() is None:
        pytest.skip("mosquitto is not installed")
