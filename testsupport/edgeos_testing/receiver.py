"""Helpers for receiver tests and benchmarks: a throw-away PostgreSQL database, a running
receiver.

``postgres_database()`` finds the local server (``$EDGEOS_TEST_PG_DSN``, ``$EDGEOS_TEST_PG``
or ``postgresql://edgeos_test:edgeos_test@127.0.0.1:5432/postgres``), starts the Debian
cluster when it is installed but stopped and we may (``pg_ctlcluster``), creates a uniquely
named database and drops it at the end. When no server can be reached it raises
:class:`PostgresUnavailable` with the reason, so tests can skip saying why.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import subprocess
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from edgeos_cloud.receiver.config import ReceiverConfig
    from edgeos_cloud.receiver.service import Receiver

__all__ = [
    "PostgresUnavailable",
    "postgres_database",
    "postgres_unreachable",
    "receiver_config_for",
    "running_receiver",
    "wait_for",
]

#: How long :func:`running_receiver` waits for the receiver to subscribe.
START_TIMEOUT_S = 30.0
DEFAULT_ADMIN_URL = "postgresql://edgeos_test:edgeos_test@127.0.0.1:5432/postgres"


class PostgresUnavailable(Exception):
    """No PostgreSQL server (or no psycopg) to test against; the message says why."""


def postgres_unreachable(url: str) -> str | None:
    """Why the PostgreSQL server at ``url`` cannot be used, or ``None`` when it answers."""
    try:
        import psycopg
    except ImportError:
        return "psycopg is not installed (pip install './cloud[postgres]')"
    try:
        with psycopg.connect(url, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        return f"cannot connect to {url}: {exc}".strip()
    return None


def _start_cluster() -> str:
    if shutil.which("pg_ctlcluster") is None:
        return "pg_ctlcluster not found"
    versions = (
        sorted(p.name for p in Path("/etc/postgresql").glob("*"))
        if Path("/etc/postgresql").exists()
        else []
    )
    if not versions:
        return "no cluster under /etc/postgresql"
    cmd = ["pg_ctlcluster", "--skip-systemctl-redirect", versions[-1], "main", "start"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{' '.join(cmd)} failed: {exc}"
    if proc.returncode not in (0, 2):  # 2: already running
        return f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr.strip()}"
    return ""


def admin_url() -> str:
    """``$EDGEOS_TEST_PG_DSN`` (the team's name), ``$EDGEOS_TEST_PG``, or the default role."""
    return (
        os.environ.get("EDGEOS_TEST_PG_DSN")
        or os.environ.get("EDGEOS_TEST_PG")
        or DEFAULT_ADMIN_URL
    )


@contextlib.contextmanager
def postgres_database(prefix: str = "edgeos_test") -> Iterator[str]:
    """Create a unique database and yield its URL; drop it afterwards."""
    url = admin_url()
    problem = postgres_unreachable(url)
    if problem is not None and "psycopg is not installed" not in problem:
        started = _start_cluster()
        problem = postgres_unreachable(url)
        if problem is not None and started:
            problem += f"; starting the cluster: {started}"
    if problem is not None:
        raise PostgresUnavailable(problem)
    import psycopg

    name = f"{prefix}_{secrets.token_hex(6)}"
    with psycopg.connect(url, autocommit=True) as conn:
        # template0: whatever other test suites leave in template1 must not leak in (and a
        # session connected to template1 would make CREATE DATABASE fail).
        conn.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
    base, _, _ = url.rpartition("/")
    try:
        yield f"{base}/{name}"
    finally:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# --------------------------------------------------------------------------- receiver helpers


def receiver_config_for(
    broker: Any, directory: Path, storage_url: str, **overrides: Any
) -> ReceiverConfig:
    """A receiver config for a :class:`~edgeos_testing.mosquitto.MosquittoBroker`.

    Metrics listen on a free port, commands are polled every 0.1 s; ``overrides`` replace
    top-level sections (``limits=LimitsConfig(...)``).
    """
    from edgeos_cloud.receiver.config import (
        BrokerConfig,
        CommandsConfig,
        MetricsConfig,
        ReceiverConfig,
        RegistryConfig,
        StorageConfig,
        TlsConfig,
    )

    if broker.tls:
        creds = broker.receiver_credentials
        broker_cfg = BrokerConfig(
            url=broker.url,
            tls=TlsConfig(
                ca_file=creds.ca_file, cert_file=creds.cert_file, key_file=creds.key_file
            ),
            reconnect_s=0.2,
        )
    else:
        broker_cfg = BrokerConfig(
            url=broker.url, username=broker.receiver_identity, reconnect_s=0.2
        )
    fields: dict[str, Any] = {
        "broker": broker_cfg,
        "storage": StorageConfig(url=storage_url),
        "registry": RegistryConfig(dir=directory / "registry"),
        "metrics": MetricsConfig(listen="127.0.0.1:0"),
        "commands": CommandsConfig(poll_s=0.1, resend_s=5.0),
    }
    fields.update(overrides)
    return ReceiverConfig(**fields)


@contextlib.asynccontextmanager
async def running_receiver(receiver: Receiver) -> AsyncIterator[Receiver]:
    """Run ``receiver`` in a task until the block ends; waits until it is subscribed."""
    task = asyncio.create_task(receiver.run(), name="receiver-under-test")
    ready = asyncio.create_task(receiver.ready.wait())
    try:
        done, _ = await asyncio.wait(
            {task, ready}, timeout=START_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED
        )
        if task in done:
            task.result()  # raises what made run() stop
            raise RuntimeError("receiver stopped before it was ready")
        if ready not in done:
            raise TimeoutError("receiver did not subscribe in time")
        yield receiver
    finally:
        ready.cancel()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        with contextlib.suppress(asyncio.CancelledError):
            await ready


async def wait_for(predicate: Callable[[], bool]) -> None:
    """Poll ``predicate`` (cheap, non-blocking) until true; bound it with ``asyncio.timeout``.

    Polling is deliberate: the predicates look at state owned by other processes (a
    database, a broker) that cannot signal an event here.
    """
    while not predicate():  # noqa: ASYNC110
        await asyncio.sleep(0.02)
