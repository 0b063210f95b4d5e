"""A stop reaches the receiver's loops even when the MQTT client drops it inside a publish
(Python 3.11's wait_for in aiomqtt): seen under load as a receiver that polled on after being
cancelled, so that a service stop would wait for systemd's SIGKILL."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

from edgeos_cloud.receiver.registry import DeviceRegistry
from edgeos_cloud.receiver.service import Receiver
from edgeos_cloud.receiver.storage import open_storage
from edgeos_testing.lostcancel import DropsCancellation, stopped
from edgeos_testing.receiver import receiver_config_for

T0 = 1_700_000_000_000_000


async def test_a_stop_dropped_inside_a_command_publish_still_ends_the_command_loop(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'r.db'}"
    no_broker = SimpleNamespace(tls=False, url="mqtt://127.0.0.1:9", receiver_identity="r")
    config = receiver_config_for(no_broker, tmp_path, url)
    registry = DeviceRegistry(config.registry.dir)
    registry.add("gw1")
    receiver = Receiver(config, registry=registry)
    storage = open_storage(url)
    storage.enqueue_command("gw1", {"sp": 1.0}, T0)
    client = DropsCancellation()
    receiver._storage = storage
    receiver._executor = ThreadPoolExecutor(1)
    receiver._client = client  # type: ignore[assignment]
    try:
        loop_task = asyncio.create_task(receiver._command_loop())
        # The bound only turns a loop that serves on into a failure (it does not time anything).
        await stopped(loop_task)
        assert [t for t, _ in client.published] == ["edgeos/v1/gw1/cmd"]
    finally:
        receiver._executor.shutdown(wait=True)
        storage.close()
