"""A minimal device speaking the real wire format: for receiver tests, benchmarks and demos.

It seals batches with :mod:`edgeos_protocol.wire` exactly as the uplink does, publishes them on
its own topics, verifies the receiver's acks and answers commands. It is deliberately not the
uplink (no spool, no retries) so receiver tests stay independent of it::

    async with SimDevice.connect(broker, "dev-1", key) as dev:
        sealed = dev.seal(dev.batch(values={"temp": [20.5, 20.6]}))
        await dev.publish(sealed)
        async with asyncio.timeout(30):
            await dev.wait_acked(dev.epoch.epoch, 1)

Waits have no timeout of their own: wrap them in ``asyncio.timeout`` scopes.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any

import numpy as np

from edgeos.errors import WireError
from edgeos_protocol.aio import reraise_lost_cancellation
from edgeos_protocol.crypto import Epoch, Keyring, Suite
from edgeos_protocol.wire import (
    DOWNLINK_KINDS,
    Ack,
    Batch,
    ControlKind,
    Group,
    ReplayGuard,
    TagTable,
    ValueKind,
    counter_from_time,
    encode_body,
    open_control,
    seal_batch,
    seal_control,
)

__all__ = ["CommandHandler", "SimDevice", "simple_batch"]

#: ``handler(desired) -> (ok, results)`` decides a command's outcome.
CommandHandler = Callable[[dict[str, Any]], tuple[bool, dict[str, Any]]]


def simple_batch(
    values: Mapping[str, Sequence[float]],
    times_us: Sequence[int],
    *,
    text: Mapping[str, Sequence[str]] | None = None,
    resolution: float = 0.01,
    events: list[dict[str, Any]] | None = None,
) -> Batch:
    """A one-group batch: numeric tags ``values[name][row]`` and string tags ``text``."""
    text = text or {}
    names = list(values) + list(text)
    kinds = [ValueKind.NUMBER] * len(values) + [ValueKind.STRING] * len(text)
    table = TagTable(
        np.arange(len(names)), names, kinds, [resolution] * len(names), [""] * len(names)
    )
    rows = len(times_us)
    vals = np.full((rows, len(names)), np.nan)
    for col, name in enumerate(values):
        vals[:, col] = np.asarray(values[name], np.float64)
    group_text = {
        (r, len(values) + c): s for c, name in enumerate(text) for r, s in enumerate(text[name])
    }
    group = Group(
        np.asarray(times_us, np.int64),
        np.arange(len(names), dtype=np.int32),
        vals,
        np.zeros((rows, len(names)), np.uint8),
        group_text,
    )
    return Batch(table, [group], events or [], {"sim": True})


class SimDevice:
    """A device on an MQTT connection: seals batches, tracks acks, answers commands."""

    def __init__(
        self,
        client: Any,
        device: str,
        key: bytes,
        *,
        prefix: str = "edgeos/v1",
        handler: CommandHandler | None = None,
        suite: Suite = Suite.CHACHA20_POLY1305,
    ) -> None:
        self.client = client
        self.device = device
        self.keyring = Keyring.of(key)
        self.epoch = Epoch.new(self.keyring, device, suite)
        self.prefix = prefix
        self.handler = handler or (lambda desired: (True, dict.fromkeys(desired, "applied")))
        self.acked: dict[int, int] = {}
        self.commands: list[dict[str, Any]] = []
        self.bad_controls = 0
        #: Authenticated acks received (re-acks of replays included).
        self.ack_count = 0
        #: ``(epoch, seq)`` the receiver said it quarantined (``AckStatus.QUARANTINED``).
        self.quarantined: set[tuple[int, int]] = set()
        self._guard = ReplayGuard()
        self._applied_version = 0
        self._answers: dict[int, tuple[bool, dict[str, Any]]] = {}
        self._counter = 0
        # A fresh Event per change: a wait holds no lock, so an enclosing ``asyncio.timeout``
        # ends it at once, and a listener that stopped fails the waits instead of hanging them.
        self._changed = asyncio.Event()
        #: Why the listener stopped (a dropped link, a bug): waits fail with it, never hang.
        self._stopped: BaseException | None = None

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(
        cls, broker: Any, device: str, key: bytes, **kwargs: Any
    ) -> AsyncIterator[SimDevice]:
        """Connect to a :class:`~edgeos_testing.mosquitto.MosquittoBroker` as ``device``."""
        async with broker.client(device) as client:
            dev = cls(client, device, key, **kwargs)
            await client.subscribe(f"{dev.prefix}/{device}/ack", qos=1)
            await client.subscribe(f"{dev.prefix}/{device}/cmd", qos=1)
            task = asyncio.create_task(dev._listen_until_stopped(), name=f"simdevice-{device}")
            try:
                yield dev
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    def seal(self, batch: Batch, created_us: int | None = None) -> bytes:
        """Seal ``batch`` under the next sequence number of the current epoch."""
        body = encode_body(batch)
        created = created_us if created_us is not None else int(_now() * 1e6)
        _, sealed = seal_batch(self.epoch, body, created)
        return sealed

    def seal_body(self, body: bytes, created_us: int | None = None) -> bytes:
        """Seal an already encoded (possibly hostile) body under the next sequence number."""
        created = created_us if created_us is not None else int(_now() * 1e6)
        _, sealed = seal_batch(self.epoch, body, created)
        return sealed

    async def publish(self, sealed: bytes, topic_device: str | None = None) -> None:
        await self.client.publish(
            f"{self.prefix}/{topic_device or self.device}/batch", sealed, qos=1
        )

    async def wait_acked(self, epoch: int, seq: int) -> int:
        """Wait until an authenticated ack covers ``seq`` of ``epoch``; returns the acked seq."""
        await self._wait(lambda: self.acked.get(epoch, 0) >= seq)
        return self.acked[epoch]

    async def wait_quarantined(self, epoch: int, seq: int) -> None:
        """Wait until an ack says the receiver quarantined ``seq`` of ``epoch``."""
        await self._wait(lambda: (epoch, seq) in self.quarantined)

    async def wait_ack_count(self, count: int) -> None:
        """Wait until ``count`` authenticated acks have arrived in total."""
        await self._wait(lambda: self.ack_count >= count)

    async def wait_commands(self, count: int) -> list[dict[str, Any]]:
        """Wait until ``count`` distinct commands were received and answered."""
        await self._wait(lambda: len(self.commands) >= count)
        return list(self.commands)

    async def _wait(self, predicate: Callable[[], bool]) -> None:
        while not predicate():
            if self._stopped is not None:
                raise RuntimeError(
                    f"device {self.device!r} stopped listening: {self._stopped!r}"
                ) from self._stopped
            await self._changed.wait()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def _listen_until_stopped(self) -> None:
        try:
            await self._listen()
            self._stopped = EOFError("the broker ended the message stream")
        except BaseException as exc:
            self._stopped = exc
            raise
        finally:
            self._notify()

    async def _listen(self) -> None:
        async for message in self.client.messages:
            payload = bytes(message.payload)
            try:
                control = open_control(
                    payload, self.keyring.keys, device=self.device, kinds=DOWNLINK_KINDS
                )
            except WireError:
                self.bad_controls += 1
                continue
            if not self._guard.check(control):
                self.bad_controls += 1
                continue
            if control.kind is ControlKind.ACK:
                try:
                    ack = Ack.parse(control.payload)
                except WireError:
                    self.bad_controls += 1
                    continue
                self.acked[ack.epoch] = max(self.acked.get(ack.epoch, 0), ack.seq)
                self.quarantined.update((ack.epoch, q) for q in ack.quarantined)
                self.ack_count += 1
                self._notify()
            elif control.kind is ControlKind.COMMAND:
                await self._answer(control.payload)
                # The answer's publish can drop a cancellation (edgeos_protocol.aio): stop here.
                reraise_lost_cancellation()

    async def _answer(self, command: dict[str, Any]) -> None:
        version = int(command["version"])
        if version in self._answers:
            # A re-sent command already handled: repeat the answer, do not apply twice.
            ok, results = self._answers[version]
        elif version <= self._applied_version:
            ok, results = False, {"reason": f"version {version} is older than the applied one"}
        else:
            ok, results = self.handler(dict(command["desired"]))
            self._applied_version = version
            self._answers[version] = (ok, results)
            self.commands.append(command)
            self._notify()
        self._counter = counter_from_time(self._counter, _now())
        reply = seal_control(
            ControlKind.COMMAND_RESULT,
            {"id": command["id"], "version": version, "ok": ok, "results": results},
            self.keyring.current,
            self.device,
            self._counter,
            key_id=self.keyring.current_id,
        )
        await self.client.publish(f"{self.prefix}/{self.device}/cmd/result", reply, qos=1)


def _now() -> float:
    import time

    return time.time()
