"""Per-station feature extraction shared by training (``models/train_all.py``) and the runtime.

One :class:`StationTracker` follows every station (nest) of a line, vectorised with numpy. It is
fed one row of key tag values per station per sample (``observe``) and keeps:

* a sliding window of anomaly features (``window``: ``(stations, WINDOW, len(ANOMALY_FEATURES))``),
* per-cure accumulators that become the quality model's features when a cure ends,
* the cycle/batch bookkeeping (cycles since the batch changed → ``freshness``) that the
  correction model needs when a new tyre is loaded.

Training and serving use this very class on the same sample period, so the features a model
was trained on are the features it gets on the device (no train/serve skew). It imports numpy
only, so the training venv can use it without the runtime's dependencies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

__all__ = [
    "ANOMALY_FEATURES",
    "CORRECTION_FEATURES",
    "CURE",
    "KEY_SUFFIXES",
    "LOAD",
    "NEW_BATCH_BIT",
    "QUALITY_FEATURES",
    "SAMPLE_PERIOD_S",
    "WINDOW",
    "Observation",
    "StationTracker",
    "anomaly_rows",
    "freshness",
]

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]
B = npt.NDArray[np.bool_]

#: Tag suffixes (relative to the station) the tracker reads, in column order of ``observe``.
KEY_SUFFIXES: tuple[str, ...] = (
    "heater.sp",
    "heater.pv",
    "heater.out",
    "press.sp",
    "press.pv",
    "cure.elapsed",
    "cycle.state",
    "cycle.count",
    "quality.elasticity",
    "batch.id",
    "batch.mooney",
    "alarm.bits",
    "steam.flow",
    "bladder.temp",
)
(
    _HSP,
    _HPV,
    _HOUT,
    _PSP,
    _PPV,
    _CURE_EL,
    _STATE,
    _COUNT,
    _ELAST,
    _BATCH,
    _MOONEY,
    _ALARM,
    _STEAM,
    _BLADDER,
) = range(len(KEY_SUFFIXES))

#: ``cycle.state`` codes (as served by the simulator and the presses it models).
LOAD = 1
CURE = 2
#: ``alarm.bits`` bit set while a station cures the first tyre of a new raw-material batch.
NEW_BATCH_BIT = 1 << 4
#: Sample period the committed models were trained on (seconds).
SAMPLE_PERIOD_S = 1.0
#: Samples in one anomaly window.
WINDOW = 16
#: Cycles over which a fresh batch's effect fades (e-folding), as the process engineers state it.
FRESH_CYCLES = 1.5
#: Cycles-in-batch assumed for a station first seen mid-batch (a guess, so it is moderate).
UNKNOWN_CYCLES_IN_BATCH = 3

ANOMALY_FEATURES: tuple[str, ...] = (
    "heater.pv-sp",
    "heater.out",
    "press.pv-sp_in_cure",
    "steam.flow",
    "bladder-heater",
    "in_cure",
)
QUALITY_FEATURES: tuple[str, ...] = (
    "cure.mean.heater.pv",
    "cure.mean.press.pv",
    "cure.elapsed",
    "batch.mooney",
    "freshness",
)
CORRECTION_FEATURES: tuple[str, ...] = (
    "batch.mooney",
    "freshness",
    "heater.pv",
    "last.elasticity",
)


def freshness(cycles_in_batch: npt.ArrayLike) -> F64:
    """1 for the first tyre of a batch, fading towards 0 over the following cycles."""
    result: F64 = np.exp(-np.asarray(cycles_in_batch, dtype=np.float64) / FRESH_CYCLES)
    return result


def anomaly_rows(values: F64) -> F64:
    """One sample of anomaly features per station from ``(stations, len(KEY_SUFFIXES))`` values."""
    in_cure = (values[:, _STATE] == CURE).astype(np.float64)
    out = np.empty((values.shape[0], len(ANOMALY_FEATURES)), dtype=np.float64)
    out[:, 0] = values[:, _HPV] - values[:, _HSP]
    out[:, 1] = values[:, _HOUT]
    out[:, 2] = (values[:, _PPV] - values[:, _PSP]) * in_cure
    out[:, 3] = values[:, _STEAM]
    out[:, 4] = values[:, _BLADDER] - values[:, _HPV]
    out[:, 5] = in_cure
    return out


@dataclass(frozen=True, slots=True)
class Observation:
    """What one sample changed, as station indices (0-based) and feature rows.

    ``cure_ended``: stations whose cure just ended; ``quality_x`` their quality features.
    ``completed``: stations that just finished a tyre; ``realised`` its measured elasticity.
    ``loaded``: stations that just loaded a tyre; ``correction_x`` their correction features.
    """

    cure_ended: I64
    quality_x: F64
    completed: I64
    realised: F64
    loaded: I64
    correction_x: F64


class StationTracker:
    """Follows ``stations`` stations sample by sample (see the module docstring)."""

    def __init__(self, stations: int, *, window: int = WINDOW) -> None:
        n = self.stations = stations
        self.window = np.zeros((n, window, len(ANOMALY_FEATURES)), dtype=np.float32)
        #: Samples seen per station (the window is full once this reaches ``window``).
        self.samples = np.zeros(n, dtype=np.int64)
        self._seen = False
        self._state = np.zeros(n, dtype=np.int64)
        self._count = np.zeros(n, dtype=np.int64)
        self._batch = np.full(n, -1, dtype=np.int64)
        self.cycles_in_batch = np.full(n, UNKNOWN_CYCLES_IN_BATCH, dtype=np.int64)
        self.last_elasticity = np.full(n, math.nan)
        self._sum_t = np.zeros(n)
        self._sum_p = np.zeros(n)
        self._n_cure = np.zeros(n)
        self._cure_elapsed = np.zeros(n)
        #: The tyre in the press was watched from its load with no bad sample since: only such
        #: tyres are judged (a runtime restarted mid-cure must not scrap a tyre it half saw).
        self.observed = np.zeros(n, dtype=np.bool_)
        #: Cures that ended without being fully observed (not judged).
        self.unjudged = 0

    @property
    def window_full(self) -> B:
        return self.samples >= self.window.shape[1]

    def observe(self, values: F64) -> Observation:
        """Take one sample ``(stations, len(KEY_SUFFIXES))`` and report what it changed."""
        v = np.asarray(values, dtype=np.float64)
        if v.shape != (self.stations, len(KEY_SUFFIXES)):
            raise ValueError(
                f"expected values of shape {(self.stations, len(KEY_SUFFIXES))}, got {v.shape}"
            )
        # Bad inputs arrive as NaN: hold the last good state and counter for those stations and
        # stop trusting the tyre in the press (its cure now has a gap).
        valid: B = np.asarray(np.isfinite(v[:, [_STATE, _COUNT, _HPV, _PPV]]).all(axis=1))
        if not valid.all():
            v = v.copy()
            v[~valid, _STATE] = self._state[~valid]
            v[~valid, _COUNT] = self._count[~valid]
            self.observed[~valid] = False

        # Slide the window in place: no allocation of a new (stations, W, F) array per sample.
        w = self.window
        w[:, :-1] = w[:, 1:]
        w[:, -1] = np.nan_to_num(anomaly_rows(v))
        self.samples += 1

        state = v[:, _STATE].astype(np.int64)
        count = v[:, _COUNT].astype(np.int64)
        in_cure = (state == CURE) & valid
        if not self._seen:
            self._seen = True
            self._state[:] = state
            self._count[:] = count
            prev_state, prev_count = state, count
            # A press found loading is watched from its load.
            self.observed[:] = valid & (state == LOAD)
        else:
            prev_state, prev_count = self._state, self._count

        ended = (prev_state == CURE) & (state != CURE) & (self._n_cure > 0)
        self.unjudged += int((ended & ~self.observed).sum())
        cure_ended = np.flatnonzero(ended & self.observed)
        quality_x = np.empty((cure_ended.size, len(QUALITY_FEATURES)))
        if cure_ended.size:
            n = self._n_cure[cure_ended]
            quality_x[:, 0] = self._sum_t[cure_ended] / n
            quality_x[:, 1] = self._sum_p[cure_ended] / n
            quality_x[:, 2] = np.maximum(v[cure_ended, _CURE_EL], self._cure_elapsed[cure_ended])
            quality_x[:, 3] = v[cure_ended, _MOONEY]
            quality_x[:, 4] = freshness(self.cycles_in_batch[cure_ended])

        # A counter step (16-bit, may wrap) means a tyre left the press and was measured.
        completed = np.flatnonzero(count != prev_count)
        realised = v[completed, _ELAST].copy()
        self.last_elasticity[completed] = realised

        loaded = np.flatnonzero((state == LOAD) & (prev_state != LOAD))
        if loaded.size:
            batch = v[loaded, _BATCH].astype(np.int64)
            fresh_flag = (v[loaded, _ALARM].astype(np.int64) & NEW_BATCH_BIT) != 0
            known = self._batch[loaded] >= 0
            same = known & (batch == self._batch[loaded])
            cib = np.where(
                fresh_flag,
                0,
                np.where(
                    same,
                    self.cycles_in_batch[loaded] + 1,
                    np.where(known, 0, UNKNOWN_CYCLES_IN_BATCH),
                ),
            )
            self.cycles_in_batch[loaded] = cib
            self._batch[loaded] = batch
            # A new tyre: reset its cure accumulators.
            self._sum_t[loaded] = 0.0
            self._sum_p[loaded] = 0.0
            self._n_cure[loaded] = 0.0
            self._cure_elapsed[loaded] = 0.0
            self.observed[loaded] = valid[loaded]
        correction_x = np.empty((loaded.size, len(CORRECTION_FEATURES)))
        if loaded.size:
            last = self.last_elasticity[loaded]
            correction_x[:, 0] = v[loaded, _MOONEY]
            correction_x[:, 1] = freshness(self.cycles_in_batch[loaded])
            correction_x[:, 2] = v[loaded, _HPV]
            # No measured tyre yet: assume an on-target one rather than feed a NaN to a model.
            correction_x[:, 3] = np.where(np.isnan(last), 6.6, last)

        self._sum_t += np.where(in_cure, v[:, _HPV], 0.0)
        self._sum_p += np.where(in_cure, v[:, _PPV], 0.0)
        self._n_cure += in_cure
        self._cure_elapsed = np.where(in_cure, v[:, _CURE_EL], self._cure_elapsed)
        self._state[:] = state
        self._count[:] = count
        return Observation(cure_ended, quality_x, completed, realised, loaded, correction_x)
