"""Per-device quotas: token buckets for messages/s, samples/s, events/s, new tags/day, bytes/day.

Two thread affinities, two instances' worth of state: :meth:`DeviceQuotas.admit_message` and
:meth:`DeviceQuotas.admit_bytes` run at the MQTT door (the event loop),
:meth:`DeviceQuotas.admit_batch` in the writer thread after a batch was authenticated and
decoded. Each touches only its own dictionaries, so no lock.

A bucket may go into debt by one charge: it admits while it holds any tokens at all, then
subtracts the whole cost. A batch larger than the bucket therefore passes when the bucket is
full and the device then waits out the debt; nothing is refused forever by a quota.

The state is this process's (a restarted receiver starts every device with full buckets and
no known tags; N receivers behind a shared subscription each see about 1/N of a device).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from edgeos_cloud.receiver.config import QuotasConfig

__all__ = ["DeviceQuotas", "TokenBucket"]

_DAY_S = 86_400.0
#: Devices remembered per dictionary; beyond it, devices whose buckets are full are forgotten
#: (forgetting a full bucket changes nothing).
MAX_DEVICES = 100_000


@dataclass(slots=True)
class TokenBucket:
    """``rate`` tokens per second up to ``capacity``; starts full."""

    rate: float
    capacity: float
    tokens: float
    stamp: float

    @classmethod
    def full(cls, rate: float, capacity: float, now: float) -> TokenBucket:
        return cls(rate, capacity, capacity, now)

    def refill(self, now: float) -> float:
        if now > self.stamp:
            self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
        return self.tokens

    def available(self, now: float) -> bool:
        return self.refill(now) > 0

    def charge(self, cost: float) -> None:
        self.tokens -= cost

    def is_full(self, now: float) -> bool:
        return self.refill(now) >= self.capacity


@dataclass(slots=True)
class _BatchState:
    samples: TokenBucket
    events: TokenBucket
    new_tags: TokenBucket
    #: hash(tuple(names)) of the last tag table: the common case (same table) costs one hash.
    table_sig: int = 0
    #: Sorted hashes of every tag name seen from the device.
    known: npt.NDArray[np.int64] = field(default_factory=lambda: np.empty(0, np.int64))


class DeviceQuotas:
    """The quotas of ``[quotas]`` for every device (see module docs for thread affinity)."""

    def __init__(self, config: QuotasConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self._clock = clock
        self._bytes: dict[str, TokenBucket] = {}
        self._messages: dict[str, TokenBucket] = {}
        self._batches: dict[str, _BatchState] = {}

    # ---------------------------------------------------------------- door (event loop)

    def admit_message(self, device: str) -> bool:
        """Charge one message to the device's messages/s; False when it is used up.

        The first check of the door: a device flooding small messages costs one dictionary
        lookup and a few float operations per message beyond its rate.
        """
        now = self._clock()
        bucket = self._messages.get(device)
        if bucket is None:
            if len(self._messages) >= MAX_DEVICES:
                self._messages = {d: b for d, b in self._messages.items() if not b.is_full(now)}
            c = self.config
            bucket = TokenBucket.full(c.messages_per_s, c.messages_per_s * c.burst_s, now)
            self._messages[device] = bucket
        if not bucket.available(now):
            return False
        bucket.charge(1.0)
        return True

    def admit_bytes(self, device: str, nbytes: int) -> bool:
        """Charge ``nbytes`` to the device's bytes/day unless it is exhausted."""
        now = self._clock()
        bucket = self._bytes.get(device)
        if bucket is None:
            if len(self._bytes) >= MAX_DEVICES:
                self._bytes = {d: b for d, b in self._bytes.items() if not b.is_full(now)}
            per_day = float(self.config.bytes_per_day)
            bucket = self._bytes[device] = TokenBucket.full(per_day / _DAY_S, per_day, now)
        if not bucket.available(now):
            return False
        bucket.charge(nbytes)
        return True

    def in_debt(self, device: str) -> str | None:
        """At the door: the quota a device has overdrawn (``samples_per_s``/``events_per_s``).

        Its batches are then deferred before they cost a decode. A read-only peek at state
        the writer thread owns (floats read under the GIL; nothing is written here).
        """
        state = self._batches.get(device)
        if state is None:
            return None
        now = self._clock()
        for reason, bucket in (("samples_per_s", state.samples), ("events_per_s", state.events)):
            if bucket.tokens + max(0.0, now - bucket.stamp) * bucket.rate <= 0:
                return reason
        return None

    # ---------------------------------------------------------------- writer thread

    def admit_batch(
        self, device: str, tag_names: Sequence[str], samples: int, events: int
    ) -> str | None:
        """Charge a decoded batch; ``None`` when admitted, else the reason it is deferred.

        Reasons: ``samples_per_s``, ``events_per_s``, ``new_tags_per_day``. Nothing is charged
        for a deferred batch.
        """
        now = self._clock()
        state = self._batches.get(device)
        if state is None:
            state = self._new_state(now)
            self._batches[device] = state
        if samples and not state.samples.available(now):
            return "samples_per_s"
        if events and not state.events.available(now):
            return "events_per_s"
        sig = hash(tuple(tag_names))
        fresh: npt.NDArray[np.int64] | None = None
        if sig != state.table_sig:
            hashes = np.fromiter((hash(n) for n in tag_names), np.int64, len(tag_names))
            fresh = np.setdiff1d(hashes, state.known)
            if fresh.size and not state.new_tags.available(now):
                return "new_tags_per_day"
        state.samples.charge(samples)
        state.events.charge(events)
        if fresh is not None:
            if fresh.size:
                state.new_tags.charge(int(fresh.size))
                state.known = np.union1d(state.known, fresh)
            state.table_sig = sig
        return None

    def _new_state(self, now: float) -> _BatchState:
        if len(self._batches) >= MAX_DEVICES:
            self._batches = {
                d: s
                for d, s in self._batches.items()
                if not (s.samples.is_full(now) and s.events.is_full(now))
            }
        c = self.config
        return _BatchState(
            samples=TokenBucket.full(c.samples_per_s, c.samples_per_s * c.burst_s, now),
            events=TokenBucket.full(c.events_per_s, c.events_per_s * c.burst_s, now),
            new_tags=TokenBucket.full(c.new_tags_per_day / _DAY_S, float(c.new_tags_per_day), now),
        )
