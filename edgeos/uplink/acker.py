"""A minimal receiver-side acker over MQTT, built only on the wire API (tests, benchmarks).

It opens every batch a device publishes (authenticating it), keeps what it stored in memory,
and acks the highest contiguous sequence number of each epoch (counting the ranges the device
announced as skipped in ``meta["skip"]``). A batch that authenticates but does not decode is
*quarantined* as the receiver does it: counted as present and acked with
``AckStatus.QUARANTINED`` naming it, so the device drops it and counts it apart. It is not the
receiver (``edgeos_cloud.receiver``); it is the smallest peer that lets the uplink be tested end
to end against a real broker.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiomqtt

from edgeos.errors import WireError
from edgeos_protocol.aio import reraise_lost_cancellation
from edgeos_protocol.crypto import EpochKeyCache, Keyring
from edgeos_protocol.topics import DEFAULT_PREFIX, TopicKind, subscription, topic
from edgeos_protocol.wire import (
    Ack,
    Batch,
    ControlKind,
    Header,
    counter_from_time,
    decode_body,
    open_body,
    parse_header,
    seal_control,
)

__all__ = ["Acker", "EpochState"]


@dataclass(slots=True)
class EpochState:
    stored: set[int] = field(default_factory=set)
    skipped: set[int] = field(default_factory=set)
    #: Authenticated but undecodable: present for the contiguous mark, not stored.
    quarantined: set[int] = field(default_factory=set)
    contiguous: int = 0


class Acker:
    """Consumes ``<prefix>/+/batch`` on ``client`` and publishes acks (see module docs).

    ``ack_enabled`` can be switched off to simulate a receiver that stores but does not ack.
    ``on_batch(header, batch, arrival_time)`` is called for every newly stored batch.
    """

    def __init__(
        self,
        client: aiomqtt.Client,
        keyrings: dict[str, Keyring],
        *,
        prefix: str = DEFAULT_PREFIX,
        on_batch: Callable[[Header, Batch, float], None] | None = None,
    ) -> None:
        self.client = client
        self.keyrings = keyrings
        self.prefix = prefix
        self.on_batch = on_batch
        self.ack_enabled = True
        self.epochs: dict[tuple[str, int], EpochState] = {}
        #: (device, epoch, seq) in arrival order, duplicates included.
        self.arrivals: list[tuple[str, int, int]] = []
        self.duplicates = 0
        self.rejected = 0
        #: Batches that authenticated but did not decode (acked as quarantined).
        self.quarantined = 0
        self._keys = EpochKeyCache()
        self._counter = 0
        self._subscribed = asyncio.Event()

    async def subscribed(self) -> None:
        """Wait until :meth:`run` holds its subscription (the broker has confirmed it)."""
        await self._subscribed.wait()

    async def run(self) -> None:
        """Subscribe and serve until the connection ends or the task is cancelled."""
        self._subscribed.clear()
        await self.client.subscribe(subscription(TopicKind.BATCH, self.prefix), qos=1)
        self._subscribed.set()
        async for message in self.client.messages:
            if isinstance(message.payload, bytes | bytearray):
                await self.handle(bytes(message.payload))
                # A cancellation dropped inside the ack's publish still ends the acker.
                reraise_lost_cancellation()

    def stored(self, device: str) -> set[tuple[int, int]]:
        return {
            (epoch, seq)
            for (dev, epoch), st in self.epochs.items()
            if dev == device
            for seq in st.stored
        }

    async def handle(self, payload: bytes) -> None:
        try:
            header = parse_header(payload)
            ring = self.keyrings[header.device]
            device_key = ring.keys[header.key_id]
            key = self._keys.get(
                device_key,
                suite=header.suite,
                device=header.device,
                key_id=header.key_id,
                epoch=header.epoch,
                salt=header.salt,
            )
            header, body = open_body(payload, key)
        except (WireError, KeyError):
            self.rejected += 1
            return
        try:
            batch = decode_body(body)
        except WireError:
            await self._quarantine(header, ring)
            return
        now = time.time()
        self.arrivals.append((header.device, header.epoch, header.seq))
        state = self.epochs.setdefault((header.device, header.epoch), EpochState())
        if header.seq in state.stored:
            self.duplicates += 1
        else:
            state.stored.add(header.seq)
            if self.on_batch is not None:
                self.on_batch(header, batch, now)
        for epoch, first, last in batch.meta.get("skip", []):
            other = self.epochs.setdefault((header.device, epoch), EpochState())
            other.skipped.update(range(first, last + 1))
            self._advance(other)
        self._advance(state)
        if self.ack_enabled:
            await self._ack(header.device, header.epoch, state.contiguous, ring)

    async def _quarantine(self, header: Header, ring: Keyring) -> None:
        state = self.epochs.setdefault((header.device, header.epoch), EpochState())
        if header.seq not in state.quarantined:
            self.quarantined += 1
            state.quarantined.add(header.seq)
        self._advance(state)
        if self.ack_enabled:
            await self._ack(header.device, header.epoch, state.contiguous, ring, (header.seq,))

    @staticmethod
    def _advance(state: EpochState) -> None:
        while (
            (n := state.contiguous + 1) in state.stored
            or n in state.skipped
            or (n in state.quarantined)
        ):
            state.contiguous += 1

    async def _ack(
        self, device: str, epoch: int, seq: int, ring: Keyring, quarantined: tuple[int, ...] = ()
    ) -> None:
        if seq == 0 and not quarantined:
            return
        self._counter = counter_from_time(self._counter, time.time())
        message = seal_control(
            ControlKind.ACK,
            Ack(epoch, seq, quarantined).payload(),
            ring.current,
            device,
            self._counter,
            key_id=ring.current_id,
        )
        await self.client.publish(topic(device, TopicKind.ACK, self.prefix), message, qos=1)

    def summary(self) -> dict[str, Any]:
        return {
            "stored": sum(len(s.stored) for s in self.epochs.values()),
            "duplicates": self.duplicates,
            "rejected": self.rejected,
            "quarantined": self.quarantined,
        }
