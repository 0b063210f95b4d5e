"""The soft-realtime scan scheduler: scan groups on absolute deadlines.

Each scan group has a period; each *job* is one connection's scan of one group. A single
dispatcher task keeps a heap of absolute deadlines (``base + k * period`` on the monotonic clock,
so there is no drift however long it runs), sleeps through :meth:`Clock.sleep_until` and starts
every due job in its own task, so a slow group never delays a fast one.

Rules the dispatcher keeps:

* **Stagger.** Job ``j`` of ``n`` in the ``g``-th group gets the phase
  ``period * (j + frac(g * 0.618…)) / n``: the connections of a group poll spread over the
  period, and groups are offset from each other by golden-ratio fractions of a slot (which
  never line up exactly whatever the job counts), so requests do not burst together.
* **Priority.** When several jobs are due at once, higher ``priority`` starts first.
* **No stacking.** A job still running at its next deadline is not started again; the tick is
  counted as ``skipped``. When the dispatcher itself wakes more than one period late (the loop
  was blocked), the ticks in between are counted as ``missed`` and only the latest is started.
* **Timeouts.** Every scan runs inside an ``asyncio.timeout`` scope. With ``timeout_ms`` set,
  the dispatcher expires the scope at ``deadline + timeout`` (without it a late scan is left
  to finish and only its overlapped ticks are skipped), so the decision follows the
  injected clock (virtual time in tests). A timeout shorter than the period is enforced at its
  own instant; a longer one is checked at the job's ticks. The cancelled scan is counted in
  ``timeouts``; the tick at which it was cancelled is skipped because the scan is still
  unwinding.
* **Start gate.** A job registered with ``ready`` starts no scan until ``ready()`` is true
  (the runtime's: the connection's first connect attempt has ended, bounded by its connect
  timeout); ticks before that pass without a scan and are not counted as skipped or missed —
  a tag is never reported ``BAD_COMM`` for a connection that was still opening.
* **Skipped scans are recorded.** With ``skip_log=True`` every tick that started no scan
  (``skipped`` or ``missed``) is kept as runs of consecutive ticks per job
  (:class:`SkippedScans`, wall-clock deadlines) until :meth:`Scheduler.drain_skips`; the
  batcher announces them in the next batch (``meta["scans_skipped"]``), so the cloud knows
  those scans were not read rather than read and lost.
* **Errors.** An exception from a job is counted in ``errors`` and logged when the job starts
  failing and when it recovers, never once per failed scan.
* **Idle time.** When no scan is running and the next deadline is far enough away, the
  :class:`~edgeos.gcpolicy.GcPolicy` (if given) collects garbage.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from edgeos.clock import Clock, wall_offset
from edgeos.config import ScanGroupConfig
from edgeos.gcpolicy import GcPolicy
from edgeos.histogram import Histogram

__all__ = ["GroupStats", "JobFn", "ReadyFn", "Scheduler", "SkippedScans"]

log = logging.getLogger(__name__)

JobFn = Callable[[], Awaitable[None]]
#: A job's start gate: asked at each tick until it first answers True.
ReadyFn = Callable[[], bool]

# Heap entry kinds; at the same instant timeouts are handled before ticks.
_TIMEOUT = 0
_TICK = 1
_GOLDEN = 0.6180339887498949
#: Runs of skipped ticks kept for the batcher at most (a runtime without a consumer, or one
#: whose batcher stalls, must not grow without bound); older runs are dropped and counted.
_MAX_SKIP_RUNS = 4096


@dataclass(slots=True)
class SkippedScans:
    """Consecutive ticks of one job that started no scan: the job was still running at its
    deadline (overrun) or the dispatcher woke late (a blocked or starved loop)."""

    group: str
    job: str
    #: Wall-clock times (s) of the first and last skipped deadline.
    first_ts: float
    last_ts: float
    count: int
    #: Tick numbers of the run (internal: consecutive ticks extend it).
    first_k: int = 0
    last_k: int = 0

    def wire(self) -> list[Any]:
        """``[group, job, first_us, last_us, count]``: one entry of ``meta["scans_skipped"]``."""
        return [
            self.group,
            self.job,
            round(self.first_ts * 1e6),
            round(self.last_ts * 1e6),
            self.count,
        ]


@dataclass(slots=True)
class GroupStats:
    """Counters and histograms of one scan group (all of its jobs together)."""

    #: Actual start minus deadline, seconds.
    jitter: Histogram = field(default_factory=Histogram)
    #: Scan durations, seconds.
    duration: Histogram = field(default_factory=Histogram)
    ticks: int = 0
    skipped: int = 0
    missed: int = 0
    timeouts: int = 0
    errors: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "ticks": self.ticks,
            "skipped": self.skipped,
            "missed": self.missed,
            "timeouts": self.timeouts,
            "errors": self.errors,
            "jitter": self.jitter.summary_ms(),
            "duration": self.duration.summary_ms(),
        }


@dataclass(slots=True, eq=False)
class _Group:
    config: ScanGroupConfig
    index: int
    period: float
    timeout: float
    jobs: list[_Job] = field(default_factory=list)
    stats: GroupStats = field(default_factory=GroupStats)


@dataclass(slots=True, eq=False)
class _Job:
    group: _Group
    name: str
    fn: JobFn
    #: Deadline ``k`` is ``base + k * period``.
    base: float = 0.0
    task: asyncio.Task[None] | None = None
    scope: asyncio.Timeout | None = None
    timeout_at: float = 0.0
    #: Identifies one scan, so a stale timeout entry cannot cancel a later scan.
    run_id: int = 0
    failing: bool = False
    removed: bool = False
    #: Start gate (None once open).
    ready: ReadyFn | None = None
    #: The job's current run in the skip log (extended by the next consecutive tick).
    skip_run: SkippedScans | None = None


class Scheduler:
    """Runs registered jobs on their scan group's absolute deadlines.

    ``run()`` is meant to be a child of the runtime's root ``TaskGroup``; scans are children of a
    task group inside it, so cancelling ``run()`` cancels them and re-raises.
    """

    def __init__(
        self,
        clock: Clock,
        groups: Sequence[ScanGroupConfig],
        *,
        gc_policy: GcPolicy | None = None,
        stagger: bool = True,
        start_delay_s: float = 0.0,
        skip_log: bool = False,
    ) -> None:
        self._clock = clock
        self._groups: dict[str, _Group] = {}
        for i, cfg in enumerate(groups):
            if cfg.name in self._groups:
                raise ValueError(f"duplicate scan group {cfg.name!r}")
            period = cfg.period_ms / 1000.0
            # No timeout by default: a late scan is left to finish (the supervisor's request
            # timeout bounds its I/O) and the ticks it overlaps are skipped. Cancelling it
            # mid-request would force the connection to be re-opened.
            timeout = cfg.timeout_ms / 1000.0 if cfg.timeout_ms is not None else math.inf
            self._groups[cfg.name] = _Group(cfg, i, period, timeout)
        self._gc = gc_policy
        self._stagger = stagger
        self._start_delay = start_delay_s
        self._heap: list[tuple[float, int, int, int, _Job, int]] = []
        self._seq = itertools.count()
        self._run_ids = itertools.count(1)
        self._tg: asyncio.TaskGroup | None = None
        self._origin = 0.0
        self._wake_at = 0.0
        self._running = 0
        self._keep_skips = skip_log
        self._skips: list[SkippedScans] = []
        #: Skipped ticks dropped from a full skip log (never announced).
        self.skips_dropped = 0

    # --------------------------------------------------------------------------- registration

    def add_job(self, group: str, name: str, fn: JobFn, *, ready: ReadyFn | None = None) -> None:
        """Register ``fn`` (one connection's scan) to run on every tick of ``group``.

        Jobs added before ``run()`` are staggered across the period; a job added while running
        starts at its phase after the dispatcher's next wake-up. With ``ready``, no scan starts
        before ``ready()`` is true (the ticks until then are neither run nor counted); the
        caller bounds how long it can stay false.
        """
        g = self._groups.get(group)
        if g is None:
            known = ", ".join(sorted(self._groups)) or "none"
            raise KeyError(f"unknown scan group {group!r} (known: {known})")
        if any(job.name == name for job in g.jobs):
            raise ValueError(f"job {name!r} already registered in scan group {group!r}")
        job = _Job(g, name, fn, ready=ready)
        g.jobs.append(job)
        if self._tg is not None:
            phase = self._phase(g, len(g.jobs) - 1, len(g.jobs))
            job.base = self._origin + phase
            k = max(0, _ceil_ticks(self._wake_at - job.base, g.period))
            self._push(job.base + k * g.period, _TICK, job, k)

    def remove_job(self, group: str, name: str) -> None:
        """Stop scheduling a job; a scan in progress is cancelled."""
        g = self._groups[group]
        for job in g.jobs:
            if job.name == name:
                job.removed = True
                g.jobs.remove(job)
                if job.task is not None:
                    job.task.cancel()
                return
        raise KeyError(f"no job {name!r} in scan group {group!r}")

    def jobs(self, group: str) -> list[str]:
        return [job.name for job in self._groups[group].jobs]

    # --------------------------------------------------------------------------- running

    async def run(self) -> None:
        """Dispatch until cancelled."""
        if self._tg is not None:
            raise RuntimeError("Scheduler.run() is already running")
        if self._gc is not None:
            self._gc.start()
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                self._origin = self._clock.monotonic() + self._start_delay
                self._wake_at = self._origin
                for g in self._groups.values():
                    n = len(g.jobs)
                    for j, job in enumerate(g.jobs):
                        job.base = self._origin + self._phase(g, j, n)
                        self._push(job.base, _TICK, job, 0)
                await self._dispatch()
        finally:
            self._tg = None
            self._heap.clear()
            if self._gc is not None:
                self._gc.stop()

    def _phase(self, g: _Group, j: int, n: int) -> float:
        if not self._stagger:
            return 0.0
        # Golden-ratio offsets keep groups with different job counts off each other's slots.
        shift = (g.index * _GOLDEN) % 1.0
        return g.period * (j + shift) / n

    def _push(self, when: float, kind: int, job: _Job, k: int) -> None:
        heapq.heappush(
            self._heap, (when, kind, -job.group.config.priority, next(self._seq), job, k)
        )

    async def _dispatch(self) -> None:
        clock = self._clock
        heap = self._heap
        # With no jobs the dispatcher still wakes now and then, so jobs added later are seen.
        idle_wake = 1.0
        while True:
            now = clock.monotonic()
            if heap and heap[0][0] <= now:
                due: list[tuple[float, int, int, int, _Job, int]] = []
                while heap and heap[0][0] <= now:
                    due.append(heapq.heappop(heap))
                self._handle_due(due, now)
            if self._running == 0:
                self._idle(clock.monotonic())
            wake = heap[0][0] if heap else clock.monotonic() + idle_wake
            self._wake_at = wake
            await clock.sleep_until(wake)

    def _handle_due(self, due: list[tuple[float, int, int, int, _Job, int]], now: float) -> None:
        for _, kind, _, _, job, k in due:
            if kind == _TIMEOUT and not job.removed:
                self._expire(job, k)
        ticks = [entry for entry in due if entry[1] == _TICK and not entry[4].removed]
        # Heap order is (deadline, priority); "due together" means priority first.
        ticks.sort(key=lambda e: (e[2], e[0], e[3]))
        for _, _, _, _, job, k in ticks:
            g = job.group
            period = g.period
            latest = max(k, int((now - job.base) / period))
            # Guard the float division: never start before the deadline we report.
            while job.base + latest * period > now and latest > k:
                latest -= 1
            deadline = job.base + latest * period
            self._push(job.base + (latest + 1) * period, _TICK, job, latest + 1)
            if job.ready is not None:
                if not job.ready():
                    continue
                job.ready = None
            if latest > k:
                g.stats.missed += latest - k
                self._record_skip(job, k, latest - 1)
            if job.task is not None:
                g.stats.skipped += 1
                self._record_skip(job, latest, latest)
                # The slack absorbs float rounding when the timeout equals the period.
                if job.scope is not None and deadline >= job.timeout_at - 1e-9:
                    self._expire(job, job.run_id)
                continue
            self._start(job, deadline)

    def _record_skip(self, job: _Job, first_k: int, last_k: int) -> None:
        """Keep ticks ``first_k..last_k`` of ``job`` (no scan started) for the batcher."""
        if not self._keep_skips:
            return
        period = job.group.period
        # Deadlines are on the monotonic clock; the cloud reads wall-clock times.
        to_wall = wall_offset(self._clock)
        first_ts = job.base + first_k * period + to_wall
        last_ts = job.base + last_k * period + to_wall
        count = last_k - first_k + 1
        run = job.skip_run
        if run is not None and run.last_k == first_k - 1:
            run.last_k = last_k
            run.last_ts = last_ts
            run.count += count
            return
        if len(self._skips) >= _MAX_SKIP_RUNS:
            oldest = self._skips.pop(0)
            self.skips_dropped += oldest.count
            for other in self._groups[oldest.group].jobs:
                if other.skip_run is oldest:
                    other.skip_run = None  # never extend a run that will not be announced
        run = SkippedScans(job.group.config.name, job.name, first_ts, last_ts, count)
        run.first_k, run.last_k = first_k, last_k
        job.skip_run = run
        self._skips.append(run)

    def drain_skips(self) -> list[SkippedScans]:
        """The runs of skipped ticks recorded since the last call (oldest first)."""
        runs, self._skips = self._skips, []
        for g in self._groups.values():
            for job in g.jobs:
                job.skip_run = None
        return runs

    def _start(self, job: _Job, deadline: float) -> None:
        assert self._tg is not None
        g = job.group
        job.run_id = run_id = next(self._run_ids)
        job.timeout_at = deadline + g.timeout
        if g.timeout < g.period:
            self._push(job.timeout_at, _TIMEOUT, job, run_id)
        g.stats.ticks += 1
        self._running += 1
        task = self._tg.create_task(
            self._scan(job, deadline), name=f"scan:{g.config.name}:{job.name}"
        )
        job.task = task
        # A done callback (not the coroutine's finally) so a scan cancelled before its first
        # step is accounted for too.
        task.add_done_callback(lambda t: self._scan_done(job, t))

    def _scan_done(self, job: _Job, task: asyncio.Task[None]) -> None:
        # Only does something for a scan cancelled before its first step.
        self._release(job, task)

    def _release(self, job: _Job, task: asyncio.Task[Any] | None) -> None:
        if job.task is not task:
            return
        job.task = None
        job.scope = None
        self._running -= 1
        if self._running == 0:
            self._idle(self._clock.monotonic())

    def _expire(self, job: _Job, run_id: int) -> None:
        if job.run_id == run_id and job.scope is not None and not job.scope.expired():
            # Expire "now": the scope cancels the scan at the loop's next iteration.
            job.scope.reschedule(asyncio.get_running_loop().time())

    async def _scan(self, job: _Job, deadline: float) -> None:
        clock = self._clock
        stats = job.group.stats
        start = clock.monotonic()
        stats.jitter.record(start - deadline)
        failed: str | None = None
        try:
            async with asyncio.timeout(None) as scope:
                job.scope = scope
                try:
                    await job.fn()
                finally:
                    # An exited scope can no longer be rescheduled.
                    job.scope = None
        except TimeoutError:
            if scope.expired():
                stats.timeouts += 1
                failed = f"timed out after {job.group.timeout * 1e3:g} ms"
            else:
                stats.errors += 1
                failed = "raised TimeoutError"
        except Exception as exc:  # the one place: a failing scan is counted, never fatal
            stats.errors += 1
            failed = f"{type(exc).__name__}: {exc}"
        finally:
            stats.duration.record(clock.monotonic() - start)
            # Free the job now rather than in the done callback one loop iteration later, so a
            # scan that finished just before its next deadline is not counted as an overrun.
            self._release(job, asyncio.current_task())
        if failed is not None and not job.failing:
            log.warning("scan %s/%s failing: %s", job.group.config.name, job.name, failed)
        elif failed is None and job.failing:
            log.info("scan %s/%s recovered", job.group.config.name, job.name)
        job.failing = failed is not None

    def _idle(self, now: float) -> None:
        if self._gc is None or not self._heap:
            return
        budget = self._heap[0][0] - now
        if budget > 0:
            self._gc.idle(budget)

    # --------------------------------------------------------------------------- reporting

    def group_stats(self, group: str) -> GroupStats:
        return self._groups[group].stats

    def stats(self) -> dict[str, Any]:
        """Per-group counters and histograms (milliseconds), plus GC counters if managed."""
        out: dict[str, Any] = {
            "groups": {
                name: {
                    "period_ms": g.config.period_ms,
                    "priority": g.config.priority,
                    "jobs": len(g.jobs),
                    **g.stats.as_dict(),
                }
                for name, g in self._groups.items()
            }
        }
        if self._gc is not None:
            out["gc"] = self._gc.stats()
        if self._keep_skips:
            out["skip_log"] = {"pending_runs": len(self._skips), "dropped": self.skips_dropped}
        return out


def _ceil_ticks(delta: float, period: float) -> int:
    k = int(delta // period)
    return k if k * period >= delta else k + 1
