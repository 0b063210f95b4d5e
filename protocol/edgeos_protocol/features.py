"""Per-station feature extraction shared by the gateway, the cloud's trainer and ``models/``.

One :class:`StationTracker` follows every station (nest) of a line, vectorised with numpy. It is
fed one row of key tag values per station per sample (``observe``) and keeps:

* a sliding window of anomaly features (``window``: ``(stations, WINDOW, len(ANOMALY_FEATURES))``),
* per-cure accumulators that become the quality model's features when a cure ends,
* the cycle/batch bookkeeping (cycles since the batch changed → ``freshness``) that the
  correction model needs when a new tyre is loaded.

Training (``models/train_all.py``, the cloud's trainer in :mod:`edgeos_cloud.models.train`) and
serving (``edgeos.inference.engine``) use this very class on the same sample period, so the
features a model was trained on are the features it gets on the device (no train/serve skew).
It lives in the protocol because both products need it: the gateway runs it, the cloud retrains
with it. It imports numpy only, so the training venv can use it without either product's
dependencies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

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
#: A station first seen mid-batch counts as fully observed once this many loads of that batch
#: were watched: the fresh-batch effect left is then at most ``exp(-4 / 1.5)`` ≈ 7 % (≈ 0.4 °C).
KNOWN_AFTER_CYCLES = 4
_TYRE_STATES = (CURE, 3, 4)  # CURE, COOL, UNLOAD: a tyre is in the press

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
    ``completed``: stations that just finished a tyre; ``realised`` its measured elasticity,
    ``count`` the station's cycle counter with it (identifies the tyre).
    ``loaded``: stations that loaded a tyre; ``correction_x`` their correction features,
    ``load_ok`` whether those features are fully observed (see :meth:`StationTracker.observe`),
    ``load_count`` the cycle counter the tyre will complete with.
    ``cure_started``: stations whose cure just started (the set-points in force are latched).
    """

    cure_ended: I64
    quality_x: F64
    completed: I64
    realised: F64
    loaded: I64
    correction_x: F64
    count: I64 = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    load_ok: B = field(default_factory=lambda: np.zeros(0, dtype=np.bool_))
    load_count: I64 = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    cure_started: I64 = field(default_factory=lambda: np.zeros(0, dtype=np.int64))


class StationTracker:
    """Follows ``stations`` stations sample by sample (see the module docstring).

    **Consistent loads.** A gateway reads the key tags in several scan groups (``cycle.state``
    at 10 Hz, ``cycle.count``, ``quality.elasticity`` and the ``batch.*``/``alarm.bits`` tags at
    1 Hz in the shipped configurations), so one sample can show a press already loading while
    its counter, last modulus and batch tags are still those of the previous cycle. The press
    sets all of them when the previous tyre leaves, so a load that follows a tyre is reported
    (in ``loaded``) only once the counter step has been seen too: then the features come from
    one consistent cycle, and the previous tyre is always reported (``completed``) before the
    next one is loaded. A load that cannot be checked this way (a press starting from idle, a
    counter step that never came before the cure) is still reported, with ``load_ok`` false,
    and its batch bookkeeping is redone from the sample where the cure starts (by then every
    scan group has refreshed), so the quality features of that tyre are right.

    **Cold start.** A station first seen mid-batch has an unknown ``cycles_in_batch``; it gets
    a moderate guess (:data:`UNKNOWN_CYCLES_IN_BATCH`) for the features, and ``load_ok`` stays
    false until the batch history is known (a batch change or the ``NEW_BATCH`` bit was seen)
    or :data:`KNOWN_AFTER_CYCLES` loads of that batch were watched.
    """

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
        #: ``cycles_in_batch`` is exact (the batch's start was seen), not a guess.
        self.batch_exact = np.zeros(n, dtype=np.bool_)
        # Loads of the current batch watched while its start is unknown.
        self._loads_seen = np.zeros(n, dtype=np.int64)
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
        # Consistent loads (see the class docstring).
        self._awaiting = np.zeros(n, dtype=np.bool_)
        self._expects_count = np.zeros(n, dtype=np.bool_)
        self._finished = np.zeros(n, dtype=np.bool_)
        self._pv_load = np.zeros(n)
        # Batch bookkeeping latched from a sample that may be stale: redone at the cure start.
        self._provisional = np.zeros(n, dtype=np.bool_)
        self._undo_batch = self._batch.copy()
        self._undo_cib = self.cycles_in_batch.copy()
        self._undo_exact = self.batch_exact.copy()
        self._undo_loads = self._loads_seen.copy()
        #: Loads reported before the counter step was seen (``load_ok`` false).
        self.unchecked_loads = 0

    @property
    def window_full(self) -> B:
        return self.samples >= self.window.shape[1]

    @property
    def batch_known(self) -> B:
        """``cycles_in_batch`` is exact, or large enough that the guess no longer matters."""
        known: B = self.batch_exact | (self._loads_seen >= KNOWN_AFTER_CYCLES)
        return known

    def _latch_batch(self, idx: I64, v: F64, *, provisional: B) -> None:
        """Batch bookkeeping of the tyre just loaded at stations ``idx`` from sample ``v``."""
        self._undo_batch[idx] = self._batch[idx]
        self._undo_cib[idx] = self.cycles_in_batch[idx]
        self._undo_exact[idx] = self.batch_exact[idx]
        self._undo_loads[idx] = self._loads_seen[idx]
        self._provisional[idx] = provisional
        batch = v[idx, _BATCH].astype(np.int64)
        fresh_flag = (v[idx, _ALARM].astype(np.int64) & NEW_BATCH_BIT) != 0
        known = self._batch[idx] >= 0
        same = known & (batch == self._batch[idx])
        self.cycles_in_batch[idx] = np.where(
            fresh_flag,
            0,
            np.where(
                same,
                self.cycles_in_batch[idx] + 1,
                np.where(known, 0, UNKNOWN_CYCLES_IN_BATCH),
            ),
        )
        self.batch_exact[idx] = fresh_flag | (known & ~same) | (same & self.batch_exact[idx])
        self._loads_seen[idx] = np.where(same, self._loads_seen[idx] + 1, 1)
        self._batch[idx] = batch

    def _relatch(self, idx: I64, v: F64) -> None:
        """Undo a provisional latch and redo it from ``v`` (a sample taken in the cure)."""
        self._batch[idx] = self._undo_batch[idx]
        self.cycles_in_batch[idx] = self._undo_cib[idx]
        self.batch_exact[idx] = self._undo_exact[idx]
        self._loads_seen[idx] = self._undo_loads[idx]
        self._latch_batch(idx, v, provisional=np.zeros(idx.size, dtype=np.bool_))

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
            # A press found loading is watched from its load; its batch tags may be stale.
            self.observed[:] = valid & (state == LOAD)
            self._provisional[:] = state == LOAD
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
        # A counter step seen before the cure ended belongs to an earlier tyre.
        self._finished[prev_state == CURE] = False

        # A counter step (16-bit, may wrap) means a tyre left the press and was measured.
        completed = np.flatnonzero(count != prev_count)
        realised = v[completed, _ELAST].copy()
        self.last_elasticity[completed] = realised
        self._finished[completed] = True

        detected = np.flatnonzero((state == LOAD) & (prev_state != LOAD))
        if detected.size:
            self._awaiting[detected] = True
            self._expects_count[detected] = np.isin(prev_state[detected], _TYRE_STATES)
            self._pv_load[detected] = v[detected, _HPV]
            # A new tyre: reset its cure accumulators.
            self._sum_t[detected] = 0.0
            self._sum_p[detected] = 0.0
            self._n_cure[detected] = 0.0
            self._cure_elapsed[detected] = 0.0
            self.observed[detected] = valid[detected]
        # Report a load once its features are consistent, or when it can no longer become so.
        consistent = self._awaiting & (state == LOAD) & self._expects_count & self._finished
        unchecked = self._awaiting & ((state != LOAD) | ~self._expects_count)
        report = consistent | unchecked
        loaded = np.flatnonzero(report)
        load_ok: B = np.zeros(loaded.size, dtype=np.bool_)
        correction_x = np.empty((loaded.size, len(CORRECTION_FEATURES)))
        if loaded.size:
            self._awaiting[loaded] = False
            self._finished[loaded] = False
            self.unchecked_loads += int(unchecked.sum())
            good = consistent[loaded] & valid[loaded]
            self._latch_batch(loaded, v, provisional=~good)
            load_ok = good & self.batch_known[loaded]
            last = self.last_elasticity[loaded]
            correction_x[:, 0] = v[loaded, _MOONEY]
            correction_x[:, 1] = freshness(self.cycles_in_batch[loaded])
            correction_x[:, 2] = self._pv_load[loaded]
            # No measured tyre yet: assume an on-target one rather than feed a NaN to a model.
            correction_x[:, 3] = np.where(np.isnan(last), 6.6, last)
        # The counter the loaded tyre will complete with; one more when the step of the tyre
        # before it is still to come.
        late = self._expects_count[loaded] & ~consistent[loaded]
        load_count = (count[loaded] + np.where(late, 2, 1)) % 65536

        cure_started = np.flatnonzero((state == CURE) & (prev_state != CURE))
        redo = cure_started[self._provisional[cure_started] & valid[cure_started]]
        if redo.size:
            self._relatch(redo, v)

        self._sum_t += np.where(in_cure, v[:, _HPV], 0.0)
        self._sum_p += np.where(in_cure, v[:, _PPV], 0.0)
        self._n_cure += in_cure
        self._cure_elapsed = np.where(in_cure, v[:, _CURE_EL], self._cure_elapsed)
        self._state[:] = state
        self._count[:] = count
        return Observation(
            cure_ended,
            quality_x,
            completed,
            realised,
            loaded,
            correction_x,
            count=count[completed],
            load_count=load_count,
            load_ok=load_ok,
            cure_started=cure_started,
        )
