"""The in-process acker (tests, benchmarks) ends when stopped, even when the MQTT client drops
the cancellation inside the ack's publish (Python 3.11's wait_for in aiomqtt): seen under load
as a test whose teardown waited for ever on an acker that had acked once more."""

from __future__ import annotations

import asyncio

from edgeos.uplink.acker import Acker
from edgeos_protocol.crypto import Epoch, Keyring
from edgeos_protocol.wire import encode_body, seal_batch
from edgeos_testing.devsim import simple_batch
from edgeos_testing.lostcancel import DropsCancellation, stopped

T0 = 1_700_000_000_000_000


async def test_a_stop_dropped_inside_the_ack_publish_still_ends_the_acker() -> None:
    ring = Keyring.of(b"k" * 32)
    epoch = Epoch.new(ring, "gw1")
    _, sealed = seal_batch(epoch, encode_body(simple_batch({"t": [1.0]}, [T0])), T0)
    client = DropsCancellation([("edgeos/v1/gw1/batch", sealed)])
    acker = Acker(client, {"gw1": ring})  # type: ignore[arg-type]
    task = asyncio.create_task(acker.run())
    # The bound only turns a loop that serves on into a failure (it does not time anything).
    await stopped(task)
    assert acker.summary()["stored"] == 1
    assert [t for t, _ in client.published] == ["edgeos/v1/gw1/ack"]
