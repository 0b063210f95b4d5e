"""Per-device queues served round robin, bounded by bytes in flight.

The writer takes messages one device at a time in turn, so one device's backlog or flood
cannot starve the others: a flooding device holds at most its own lane (``device_max_bytes``
/ ``device_max_items``), and every other device with something queued is served once per
round. A message stays counted in flight from :meth:`FairQueue.offer` until the writer
:meth:`~FairQueue.release`\\ s it after its transaction, so the bound covers what the writer is
working on too.

Loop-only (no locks): the MQTT door offers, the writer task takes and releases.
"""

from __future__ import annotations

import asyncio
import enum
from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

__all__ = ["Admission", "FairQueue", "Taken"]

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")


class Admission(enum.Enum):
    """What :meth:`FairQueue.offer` did with a message."""

    ADMITTED = "admitted"
    #: The device's lane is full: the caller defers the message (the device re-sends).
    DEVICE_FULL = "device_full"
    #: The queue as a whole is full: the caller waits (withholds the broker's PUBACK).
    FULL = "full"


@dataclass(frozen=True, slots=True)
class Taken(Generic[K, T]):
    key: K
    item: T
    nbytes: int


@dataclass(slots=True)
class _Lane(Generic[K, T]):
    queued: deque[Taken[K, T]] = field(default_factory=deque)
    #: Items and bytes of this device queued or being written.
    items: int = 0
    nbytes: int = 0


class FairQueue(Generic[K, T]):
    """Round-robin over devices; admission by bytes and items in flight (see module docs)."""

    def __init__(
        self,
        *,
        max_bytes: int,
        max_items: int,
        device_max_bytes: int,
        device_max_items: int,
    ) -> None:
        self.max_bytes = max_bytes
        self.max_items = max_items
        self.device_max_bytes = device_max_bytes
        self.device_max_items = device_max_items
        self.bytes_in_flight = 0
        self.items_in_flight = 0
        #: The highest ``bytes_in_flight`` so far.
        self.peak_bytes = 0
        self._lanes: dict[K, _Lane[K, T]] = {}
        self._turns: deque[K] = deque()  # devices with something queued, in serving order
        self._ready = asyncio.Event()

    def __len__(self) -> int:
        """Messages queued (not yet taken by the writer)."""
        return sum(len(lane.queued) for lane in self._lanes.values())

    @property
    def devices_waiting(self) -> int:
        return len(self._turns)

    def offer(self, key: K, item: T, nbytes: int) -> Admission:
        """Queue ``item`` in ``key``'s lane if both the lane and the whole queue have room.

        A device with nothing in flight always gets one message (when the queue has room),
        so a lane bound smaller than the largest message never wedges a device.
        """
        if self.items_in_flight >= self.max_items or (
            self.bytes_in_flight and self.bytes_in_flight + nbytes > self.max_bytes
        ):
            return Admission.FULL
        lane = self._lanes.get(key)
        if lane is None:
            lane = self._lanes[key] = _Lane()
        elif lane.items and (
            lane.items >= self.device_max_items or lane.nbytes + nbytes > self.device_max_bytes
        ):
            return Admission.DEVICE_FULL
        if not lane.queued:
            self._turns.append(key)
        lane.queued.append(Taken(key, item, nbytes))
        lane.items += 1
        lane.nbytes += nbytes
        self.items_in_flight += 1
        self.bytes_in_flight += nbytes
        self.peak_bytes = max(self.peak_bytes, self.bytes_in_flight)
        self._ready.set()
        return Admission.ADMITTED

    async def wait(self) -> None:
        """Return once something is queued."""
        while not self._turns:
            self._ready.clear()
            await self._ready.wait()

    def take(self, limit: int) -> list[Taken[K, T]]:
        """Up to ``limit`` messages, one device at a time in turn (still in flight)."""
        out: list[Taken[K, T]] = []
        turns = self._turns
        while turns and len(out) < limit:
            key = turns.popleft()
            lane = self._lanes[key]
            out.append(lane.queued.popleft())
            if lane.queued:
                turns.append(key)
        return out

    def requeue(self, taken: list[Taken[K, T]]) -> None:
        """Put messages taken but not worked on back at the head of their lanes.

        They stay in flight and keep their place in the round: the next :meth:`take` starts
        with them, in the order they were taken (so a device whose message was not worked on
        is not sent behind the device that used up the writer's turn).
        """
        for t in reversed(taken):
            self._lanes[t.key].queued.appendleft(t)
            if t.key in self._turns:
                self._turns.remove(t.key)
            self._turns.appendleft(t.key)
        if taken:
            self._ready.set()

    def release(self, taken: list[Taken[K, T]]) -> None:
        """The writer is done with ``taken`` (stored, refused or failed): free their room."""
        for t in taken:
            lane = self._lanes[t.key]
            lane.items -= 1
            lane.nbytes -= t.nbytes
            self.items_in_flight -= 1
            self.bytes_in_flight -= t.nbytes
            if not lane.items:
                del self._lanes[t.key]
