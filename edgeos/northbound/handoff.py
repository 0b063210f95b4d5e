"""The twin's changes handed from a producer to a consumer that may lag: latest value wins.

:class:`ValueHandoff` is a slot per tag (value, quality, source timestamp, text) and a pending
mask. The producer writes the changed columns with :meth:`ValueHandoff.put`, the consumer takes
every pending slot with :meth:`ValueHandoff.take`; both are vectorised numpy assignments of
O(changed). Used twice by the OPC UA server (docs/northbound.md): in the runtime, between the
pump (fed by the hub after each scan) and the task that writes batches into the server's pipe;
in the server's process, between the pipe's reader and the push to the address space. A lock
makes it safe across threads too (the wake-up is then a ``loop.call_soon_threadsafe``).

- **Bounded by construction**: one slot per tag, whatever the consumer does.
- **Latest value wins**: a tag put again before it was taken overwrites its slot; each such
  overwritten value is counted in :attr:`ValueHandoff.superseded` (the values the plant did not
  see because the consumer fell behind). Nothing else is ever dropped.
- **Never blocks the producer** beyond the copy: the wake-up is one call per batch (at most one
  outstanding until the next take).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["Batch", "ValueHandoff"]


@dataclass(frozen=True, slots=True)
class Batch:
    """The slots taken at once: parallel arrays of tag index, value, quality, source time."""

    indices: npt.NDArray[np.int32]
    values: npt.NDArray[np.float64]
    quality: npt.NDArray[np.uint8]
    source_ts: npt.NDArray[np.float64]
    #: Texts of the string tags among ``indices``.
    texts: Mapping[int, str | None]
    #: The guard's latest state when it changed since the last take (else None).
    guard: Mapping[str, Any] | None


class ValueHandoff:
    """Latest-value-wins slots per tag between a producer and a consumer (see the module docs)."""

    def __init__(self, size: int) -> None:
        self._lock = threading.Lock()
        self._pending = np.zeros(size, dtype=bool)
        self._values = np.zeros(size, dtype=np.float64)
        self._quality = np.zeros(size, dtype=np.uint8)
        self._source_ts = np.zeros(size, dtype=np.float64)
        self._texts: dict[int, str | None] = {}
        self._guard: Mapping[str, Any] | None = None
        self._waker: Callable[[], None] | None = None
        self._wake_sent = False
        #: Values put (one per tag per put).
        self.offered = 0
        #: Values overwritten before the consumer took them (it fell behind).
        self.superseded = 0
        #: Values taken by the consumer.
        self.taken = 0

    def set_waker(self, waker: Callable[[], None] | None) -> None:
        """Call ``waker`` (in the producer's context) when something becomes pending.

        ``None`` detaches the consumer: puts still fill the slots, nobody is woken (used while
        the consumer's loop starts or after it closed). Attaching wakes at once if something is
        already pending.
        """
        with self._lock:
            self._waker = waker
            self._wake_sent = False
            pending = bool(self._pending.any()) or self._guard is not None
        if waker is not None and pending:
            self._wake()

    def put(
        self,
        indices: npt.NDArray[np.int32],
        values: npt.NDArray[np.float64],
        quality: npt.NDArray[np.uint8],
        source_ts: npt.NDArray[np.float64],
        *,
        texts: Mapping[int, str | None] | None = None,
        guard: Mapping[str, Any] | None = None,
    ) -> None:
        """Fill the slots of ``indices`` (overwriting ones not yet taken) and wake the consumer."""
        if indices.shape[0] == 0 and guard is None:
            return
        with self._lock:
            self.superseded += int(np.count_nonzero(self._pending[indices]))
            self.offered += int(indices.shape[0])
            self._pending[indices] = True
            self._values[indices] = values
            self._quality[indices] = quality
            self._source_ts[indices] = source_ts
            if texts:
                self._texts.update(texts)
            if guard is not None:
                self._guard = guard
            wake = self._waker is not None and not self._wake_sent
            self._wake_sent = self._wake_sent or wake
        if wake:
            self._wake()

    def _wake(self) -> None:
        waker = self._waker
        if waker is None:
            return
        try:
            waker()
        except RuntimeError:
            # The consumer's loop closed between the check and the call: it takes nothing
            # more, and whoever restarts it attaches a new waker (which re-wakes).
            with self._lock:
                if self._waker is waker:
                    self._waker = None

    def take(self) -> Batch:
        """Every pending slot (and forget them); empty arrays when nothing is pending."""
        with self._lock:
            self._wake_sent = False
            idx = np.flatnonzero(self._pending).astype(np.int32)
            self._pending[idx] = False
            texts, self._texts = self._texts, {}  # every pending slot is taken
            guard, self._guard = self._guard, None
            self.taken += int(idx.shape[0])
            return Batch(
                idx, self._values[idx], self._quality[idx], self._source_ts[idx], texts, guard
            )

    @property
    def pending(self) -> int:
        """Values waiting for the consumer."""
        with self._lock:
            return int(np.count_nonzero(self._pending))
