"""Python-side determinism: garbage-collector policy and the event loop implementation.

CPython's cyclic collector stops the world; a full (generation-2) pass over a large heap takes
tens of milliseconds, which is several periods of a 100 Hz scan group. The policy here:

* after start-up, collect once and ``gc.freeze()`` everything that exists (configuration,
  modules, the twin's bookkeeping), so later collections never traverse it again;
* raise the gen-0/gen-1 thresholds so young collections are rarer and run them early in idle
  time (between ticks) so the automatic trigger seldom fires inside a scan;
* keep automatic full collections only as a safety net (a very high gen-2 threshold) and run
  full collections in idle time, when the gap to the next deadline is larger than the last
  measured full pause — after ``full_after`` young passes *or* ``full_every_s`` seconds,
  whichever comes first. The time bound matters on a gateway that runs for months: a lost
  broker connection leaves a cycle of client, socket and TLS context behind, and with the
  counter alone a quiet loop reached a full pass only every ~45 minutes, so that garbage (and
  the OpenSSL memory it holds) piled up between passes and showed as RSS creep in the soak.
  With the start-up heap frozen a full pass costs well under a millisecond;
* count every collection and its pause through ``gc.callbacks`` so the effect is visible in
  ``edgeos status`` and the benchmark.

:class:`GcPolicy` changes process-global state; :meth:`GcPolicy.stop` puts it back.
"""

from __future__ import annotations

import asyncio
import gc
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = [
    "GcPolicy",
    "GcSettings",
    "install_event_loop_policy",
    "loop_kind",
    "new_event_loop",
    "try_realtime_priority",
]


@dataclass(frozen=True, slots=True)
class GcSettings:
    """Knobs of :class:`GcPolicy`; the defaults suit a 10 ms scan group on a Pi 4."""

    #: Net container allocations before an automatic gen-0 collection (CPython default 700).
    gen0_threshold: int = 20_000
    #: Gen-0 collections before an automatic gen-1 collection (CPython default 10).
    gen1_threshold: int = 20
    #: Gen-1 collections before an automatic full collection: the safety net only.
    gen2_ceiling: int = 1_000
    #: Gen-1 collections after which a full collection is run in idle time.
    full_after: int = 50
    #: ... or this many seconds after the last full collection, whichever comes first.
    full_every_s: float = 60.0
    #: Young collections are run in idle time once gen-0 reaches this fraction of its threshold.
    young_fraction: float = 0.5
    #: Idle gaps shorter than this are left alone (the loop needs them for I/O).
    min_idle_s: float = 0.001
    #: A collection is started only if the gap exceeds ``margin * estimated pause``.
    margin: float = 2.0


class GcPolicy:
    """Freezes the start-up heap, tunes thresholds and moves collections into idle time.

    Use ``start()`` once the runtime is built (or the object as a context manager), call
    ``idle(budget_s)`` whenever the loop has ``budget_s`` seconds before its next deadline, and
    ``stop()`` at shutdown.
    """

    def __init__(
        self,
        settings: GcSettings | None = None,
        *,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings or GcSettings()
        self._monotonic = monotonic
        self._saved_thresholds: tuple[int, int, int] | None = None
        self._gc_started = 0.0
        self._in_idle = False
        self.collections = [0, 0, 0]
        self.idle_collections = [0, 0, 0]
        self.max_pause_s = [0.0, 0.0, 0.0]
        self.total_pause_s = 0.0
        # Start with a pessimistic guess; the first measured pause replaces it.
        self._estimate_s = [0.0005, 0.002, 0.005]
        self.frozen_objects = 0
        self._last_full = monotonic()

    # ----------------------------------------------------------------------------- lifecycle

    @property
    def active(self) -> bool:
        return self._saved_thresholds is not None

    def start(self) -> None:
        """Collect, freeze the surviving heap, set thresholds, start counting collections."""
        if self.active:
            return
        self._saved_thresholds = gc.get_threshold()
        gc.collect()
        gc.freeze()
        self.frozen_objects = gc.get_freeze_count()
        s = self.settings
        gc.set_threshold(s.gen0_threshold, s.gen1_threshold, s.gen2_ceiling)
        gc.callbacks.append(self._on_gc)
        # Measure what a full pass costs now that the start-up heap is frozen.
        self._run(2)

    def stop(self) -> None:
        """Restore the thresholds, stop counting and unfreeze (for tests and clean exits)."""
        if self._saved_thresholds is None:
            return
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)
        gc.set_threshold(*self._saved_thresholds)
        gc.unfreeze()
        self._saved_thresholds = None

    def __enter__(self) -> GcPolicy:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ----------------------------------------------------------------------------- idle work

    def idle(self, budget_s: float) -> int | None:
        """Use up to ``budget_s`` seconds of idle time; return the generation collected, if any.

        At most one collection per call: the caller re-checks its deadlines in between.
        """
        if not self.active or budget_s < self.settings.min_idle_s:
            return None
        s = self.settings
        count0, count1, count2 = gc.get_count()
        margin = s.margin
        full_due = count2 >= s.full_after or (self._monotonic() - self._last_full >= s.full_every_s)
        if full_due and budget_s > margin * self._estimate_s[2]:
            return self._run(2)
        if count1 + 1 >= s.gen1_threshold and budget_s > margin * self._estimate_s[1]:
            return self._run(1)
        if (
            count0 >= s.young_fraction * s.gen0_threshold
            and budget_s > margin * self._estimate_s[0]
        ):
            return self._run(0)
        return None

    def _run(self, generation: int) -> int:
        self._in_idle = True
        try:
            gc.collect(generation)
        finally:
            self._in_idle = False
        return generation

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._gc_started = time.perf_counter()
            return
        pause = time.perf_counter() - self._gc_started
        gen = info["generation"]
        if gen == 2:
            self._last_full = self._monotonic()
        self.collections[gen] += 1
        self.total_pause_s += pause
        self.max_pause_s[gen] = max(self.max_pause_s[gen], pause)
        if self._in_idle:
            self.idle_collections[gen] += 1
        # Track the recent cost, decaying slowly so one outlier does not block idle work forever.
        self._estimate_s[gen] = max(pause, 0.8 * self._estimate_s[gen])

    # ----------------------------------------------------------------------------- reporting

    @property
    def gen2_collections(self) -> int:
        return self.collections[2]

    def stats(self) -> dict[str, Any]:
        """Counters for status and metrics (pauses in milliseconds)."""
        return {
            "active": self.active,
            "thresholds": list(gc.get_threshold()),
            "frozen_objects": self.frozen_objects,
            "collections": list(self.collections),
            "idle_collections": list(self.idle_collections),
            "hot_collections": [
                a - b for a, b in zip(self.collections, self.idle_collections, strict=True)
            ],
            "gen2_collections": self.collections[2],
            "max_pause_ms": [round(p * 1e3, 3) for p in self.max_pause_s],
            "total_pause_ms": round(self.total_pause_s * 1e3, 3),
        }


# --------------------------------------------------------------------------------- event loop


def _uvloop() -> Any:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop


def new_event_loop() -> asyncio.AbstractEventLoop:
    """A uvloop loop when uvloop is installed, else the standard one.

    Use as ``asyncio.Runner(loop_factory=new_event_loop)``; uvloop's lower per-iteration cost
    is a large part of the jitter budget at 100 Hz.
    """
    uvloop = _uvloop()
    if uvloop is not None:
        loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
        return loop
    return asyncio.new_event_loop()


def install_event_loop_policy() -> bool:
    """Make ``asyncio.run`` use uvloop when it is installed; return whether it is."""
    uvloop = _uvloop()
    if uvloop is None:
        return False
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True


def loop_kind(loop: asyncio.AbstractEventLoop | None = None) -> str:
    """``"uvloop"`` or ``"asyncio"``, for status output."""
    loop = loop or asyncio.get_running_loop()
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"


def try_realtime_priority(priority: int = 10) -> bool:
    """Ask the kernel for ``SCHED_FIFO`` at ``priority``; return whether it was granted.

    On a gateway shared with other work, OS preemption dominates scan jitter. The systemd unit
    can grant this (``CPUSchedulingPolicy=fifo``, ``LimitRTPRIO=``); the kernel's RT throttling
    (95 % by default) keeps a runaway loop from locking the core. Without the privilege this is a
    no-op returning False.
    """
    setter = getattr(os, "sched_setscheduler", None)
    if setter is None:
        return False
    try:
        setter(0, os.SCHED_FIFO, os.sched_param(priority))
    except (PermissionError, OSError):
        return False
    return True
