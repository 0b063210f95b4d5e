"""One reconnect policy for every link of edgeos: PLC connections, the uplink, the receiver.

:class:`BackoffPolicy` is the frozen, configurable part (what an operator sets per connection);
:class:`Backoff` is one link's running state. Delays grow exponentially from ``initial_s`` to
``max_s`` with jitter, so a fleet that lost its broker at the same instant does not come back in
lock step. After a link that had been up for a while drops, the first retry comes after
``first_retry_s`` (fast: most drops are a restarted peer or a blip), and only repeated failures
walk up the exponential ladder.

It lives in the protocol package because both ends must behave alike towards the broker; it
imports nothing but the standard library.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

__all__ = ["Backoff", "BackoffPolicy"]


@dataclass(frozen=True, slots=True)
class BackoffPolicy:
    """How long to wait between attempts to (re)connect one link.

    Attempt ``n`` (0-based) of a failure run waits ``min(max_s, initial_s * multiplier**n)``,
    jittered down by up to ``jitter`` of itself (0 = no jitter, 1 = anywhere in ``[0, d]``).
    ``first_retry_s`` replaces the first delay after a link that had been up is lost.
    """

    initial_s: float = 0.5
    max_s: float = 30.0
    multiplier: float = 2.0
    jitter: float = 0.5
    first_retry_s: float | None = 0.1

    def __post_init__(self) -> None:
        if not 0 < self.initial_s <= self.max_s:
            raise ValueError(f"need 0 < initial_s ({self.initial_s}) <= max_s ({self.max_s})")
        if self.multiplier < 1:
            raise ValueError(f"multiplier must be >= 1, got {self.multiplier}")
        if not 0 <= self.jitter <= 1:
            raise ValueError(f"jitter must be within [0, 1], got {self.jitter}")
        if self.first_retry_s is not None and self.first_retry_s < 0:
            raise ValueError(f"first_retry_s must be >= 0, got {self.first_retry_s}")

    def ceiling(self, attempt: int) -> float:
        """The un-jittered delay of attempt ``attempt`` (0-based) of a failure run."""
        return min(self.max_s, self.initial_s * self.multiplier ** min(attempt, 64))


@dataclass(slots=True)
class Backoff:
    """One link's position on its :class:`BackoffPolicy`.

    Call :meth:`next_delay` after each failed attempt, :meth:`succeeded` when the link is up,
    and :meth:`lost` when a link that was up drops (so the next delay is the fast first retry).
    """

    policy: BackoffPolicy = field(default_factory=BackoffPolicy)
    rng: random.Random | None = None
    _attempt: int = 0
    _after_loss: bool = False

    def next_delay(self) -> float:
        if self._after_loss:
            self._after_loss = False
            if self.policy.first_retry_s is not None:
                return self.policy.first_retry_s
        ceiling = self.policy.ceiling(self._attempt)
        self._attempt = min(self._attempt + 1, 64)
        draw: float = (self.rng or random).random()
        return ceiling * (1.0 - self.policy.jitter * draw)

    def succeeded(self) -> None:
        """The link is up: the next failure run starts from the bottom of the ladder."""
        self._attempt = 0

    def lost(self) -> None:
        """A link that had been up dropped: the next delay is the policy's fast first retry."""
        self._attempt = 0
        self._after_loss = True

    def reset(self) -> None:
        self._attempt = 0
        self._after_loss = False
