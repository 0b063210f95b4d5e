"""Inference as the runtime runs it: twin windows in, verdicts and guarded set-points out.

Every ``sample_period_s`` (1 s for the committed models) on absolute deadlines, the loop reads
each station's key tags from the twin, steps the :class:`~edgeos.inference.engine.InferenceEngine`
and then:

* writes the gate outputs into the twin as derived tags (``<station>.gate.verdict`` 0/1/2 for
  continue/correct/scrap, ``.gate.confidence``, ``.gate.elasticity``, ``.gate.anomaly``), so they
  are queryable, snapshotted and shipped in batches like any tag;
* sends the guard's set-points through the twin's desired-state path (hard limits and rate
  limits are checked again there, and every outcome is recorded); the guard measures
  ``max_rate`` from the twin's record of writes (:attr:`~edgeos.twin.Twin.writes`), so both
  checks see the same last write;
* queues the engine's events (verdicts, guard decisions, model metrics, promotions) for the
  uplink.

Stations are the equipment instances that carry every tag the models read.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Sequence
from typing import Any

import numpy as np

from edgeos.clock import Clock
from edgeos.config import Config, Tag, derived_tag
from edgeos.driver import Quality, ReadResult
from edgeos.twin import Twin

__all__ = ["GATE_OUTPUTS", "InferenceLoop", "find_stations", "gate_tags"]

log = logging.getLogger("edgeos.inference.runtime")

#: Derived tags per station: suffix -> (resolution, unit).
GATE_OUTPUTS: dict[str, tuple[float, str]] = {
    "gate.verdict": (1.0, ""),
    "gate.confidence": (0.001, ""),
    "gate.elasticity": (0.001, "MPa"),
    "gate.anomaly": (0.0001, ""),
}


def find_stations(config: Config) -> list[str]:
    """Equipment instances that have every tag the engine reads, in configuration order."""
    from edgeos.inference.features import KEY_SUFFIXES

    names = {t.name for t in config.all_tags}
    stations: list[str] = []
    for eq in config.equipment:
        for n in range(eq.first, eq.first + eq.count):
            prefix = eq.name.format(n=n)
            if prefix not in stations and all(f"{prefix}.{k}" in names for k in KEY_SUFFIXES):
                stations.append(prefix)
    return stations


def gate_tags(stations: Sequence[str]) -> list[Tag]:
    return [
        derived_tag(f"{s}.{suffix}", resolution=res, unit=unit, description="check gate output")
        for s in stations
        for suffix, (res, unit) in GATE_OUTPUTS.items()
    ]


class InferenceLoop:
    """Feeds the engine from the twin on a fixed period; a child of the root TaskGroup."""

    def __init__(
        self, config: Config, twin: Twin, stations: Sequence[str], *, clock: Clock
    ) -> None:
        from edgeos.inference.engine import InferenceEngine

        self.twin = twin
        self.clock = clock
        tags = {t.name: t for t in twin.tags}
        self.engine = InferenceEngine.from_config(config.inference, stations, tags, clock=clock)
        self.period_s = min(
            (m.manifest.sample_period_s for _, m in self.engine.registry), default=1.0
        )
        self._inputs = np.asarray(
            [[twin.index(name) for name in row] for row in self.engine.input_tags], dtype=np.int64
        )
        outputs = [f"{s}.{suffix}" for s in stations for suffix in GATE_OUTPUTS]
        self._output_index = {name: twin.index(name) for name in outputs}
        self._events: deque[dict[str, Any]] = deque(maxlen=50_000)
        self.events_dropped = 0
        self.steps = 0
        self.writes_requested = 0
        self.writes_refused = 0
        self.step_errors = 0

    def drain_events(self) -> list[dict[str, Any]]:
        events = list(self._events)
        self._events.clear()
        return events

    def _gate_result(self, values: dict[str, float]) -> ReadResult | None:
        known = [(self._output_index[k], v) for k, v in values.items() if k in self._output_index]
        if not known:
            return None
        idx = np.fromiter((i for i, _ in known), dtype=np.int32, count=len(known))
        vals = np.fromiter((v for _, v in known), dtype=np.float64, count=len(known))
        now = self.clock.time()
        return ReadResult(
            idx, vals, np.full(len(known), int(Quality.GOOD), np.uint8), np.full(len(known), now)
        )

    def _share_writes(self) -> None:
        # The engine creates its guard when a correction champion appears (at start or with a
        # models update), so look each step; the check is one attribute compare.
        guard = self.engine.guard
        if guard is not None and guard.writes is not self.twin.writes:
            guard.share_write_log(self.twin.writes)

    def step_once(self) -> None:
        """One engine step on the twin's current values (bad quality reaches it as NaN)."""
        self._share_writes()
        values = self.twin.values[self._inputs].copy()
        bad = self.twin.quality[self._inputs] >= Quality.BAD
        values[bad] = np.nan
        out = self.engine.step(values)
        self.steps += 1
        gate = self._gate_result(out.twin)
        if gate is not None:
            self.twin.apply(gate, self.clock.time())
        for tag, value in out.writes.items():
            change = self.twin.set_desired(tag, value, source="guard")
            self.writes_requested += 1
            if change.status == "refused":
                # The guard accounts the tyre by the set-points read back when its cure starts,
                # so a refusal costs budget, never honesty. Rare (the guard checks the same
                # limits first), hence logged each time.
                self.writes_refused += 1
                log.warning("guard write %s = %g refused: %s", tag, value, change.reason)
        if len(self._events) + len(out.events) > (self._events.maxlen or 0):
            self.events_dropped += len(out.events)
        self._events.extend(out.events)

    async def run(self) -> None:
        deadline = self.clock.monotonic()
        while True:
            deadline += self.period_s
            await self.clock.sleep_until(deadline)
            try:
                self.step_once()
            except (ValueError, RuntimeError, FloatingPointError) as exc:
                # One bad step (e.g. an interpreter error) must not stop the scan loop; the
                # gate simply has no verdict for this sample.
                self.step_errors += 1
                if self.step_errors == 1 or self.step_errors % 100 == 0:
                    log.error("inference step failed (%d so far): %s", self.step_errors, exc)
            now = self.clock.monotonic()
            if now - deadline > self.period_s:  # fell behind (loop blocked): do not catch up
                deadline = now

    def set_learning(self, enabled: bool, who: str) -> dict[str, Any]:
        event = self.engine.set_learning(enabled, who=who)
        self._events.append(event)
        return event

    def stats(self) -> dict[str, Any]:
        doc = self.engine.stats()
        doc["steps"] = self.steps
        doc["step_errors"] = self.step_errors
        doc["writes_requested"] = self.writes_requested
        doc["writes_refused"] = self.writes_refused
        doc["events_dropped"] = self.events_dropped
        return doc
