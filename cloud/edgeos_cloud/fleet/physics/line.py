"""Physics of a tyre-curing line: every nest (curing press) vectorised with numpy.

Each nest cycles ``IDLE → LOAD → CURE → COOL → UNLOAD → LOAD …``. The platens are heated all
the time (first-order lag towards the heater set-point); the bladder is pressurised during the
cure (first-order lag towards the pressure set-point). When a tyre leaves the press its
elastic modulus is computed from what really happened during its cure — mean platen
temperature, mean bladder pressure, cure time — and from the raw-material batch it was made
of, plus noise.

The rubber compound arrives in batches. A batch has a hidden property ``p`` (≈ N(0, 1),
drifting slowly while the batch is used) that moves the best cure recipe; a fresh batch also
needs a hotter start for its first cycles. The plant's fixed recipe
(:func:`~edgeos_cloud.fleet.physics.recipe.default_policy`) is therefore *not* optimal:
:func:`~edgeos_cloud.fleet.physics.recipe.optimal_setpoints` knows the true optimum, which
later model work can try to learn from the served data (``batch.mooney`` is the observable,
noisy lab measurement of ``p``).

Time is compressed: all phase lengths and time constants are fractions of ``cycle_s``
(default 40 s), so the same dynamics play at any speed. Everything is deterministic for a
given seed and sequence of :meth:`LinePhysics.step` calls.
"""

from __future__ import annotations

from collections import deque
from typing import Literal

import numpy as np
import numpy.typing as npt

from edgeos_cloud.fleet.physics.layout import (
    AUX_CATEGORIES,
    KEY_TAG_COUNT,
    Alarm,
    CycleState,
    Layout,
)
from edgeos_cloud.fleet.physics.recipe import (
    ELASTICITY_MAX,
    ELASTICITY_MIN,
    NOMINAL_CURE_F,
    PRESSURE_TAU_F,
    RESIDUAL_BAR,
    CycleRecord,
    LineState,
    Setpoints,
    quality,
)

__all__ = ["ELASTICITY_MAX", "ELASTICITY_MIN", "CycleRecord", "LinePhysics"]

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]

_E_NOISE = 0.06

# Phase lengths as fractions of the nominal cycle; the cure length is the cure set-point.
_LOAD_F, _COOL_F, _UNLOAD_F = 0.1, 0.2, 0.1
# Time constants as fractions of the cycle (time compression keeps the shapes).
_HEATER_TAU_F = 0.15
_FAST_TAU_F = 0.05
#: Cycles over which a fresh batch's need for a hotter start fades (e-folding).
_FRESH_CYCLES = 1.5
#: Heat an open mould loses while it is loaded (°C/s).
_LOAD_LOSS_C_PER_S = 0.4

# Key-tag slots (see layout.KEY_TAGS).
(
    S_HEATER_SP,
    S_HEATER_PV,
    S_HEATER_OUT,
    S_PRESS_SP,
    S_PRESS_PV,
    S_CURE_SP,
    S_CURE_ELAPSED,
    S_COOL_TEMP,
    S_STATE,
    S_CYCLES,
    S_TYRES,
    S_ELASTICITY,
    S_OK,
    S_BATCH,
    S_MOONEY,
    S_ALARMS,
    S_STEAM,
    S_BLADDER,
    S_CURE_STATE,
    S_LAST_CYCLE,
) = range(KEY_TAG_COUNT)
_WRITABLE_SLOTS = {S_HEATER_SP: "heater_c", S_PRESS_SP: "pressure_bar", S_CURE_SP: "cure_s"}

# --------------------------------------------------------------------------- the line


class LinePhysics:
    """State and dynamics of every nest of a line.

    ``noise`` scales every random disturbance (0 gives a noise-free, still batch-varying
    line). A new raw-material batch's hidden property is drawn from
    ``N(material_mean, material_std²)`` (the defaults are the plant's usual compound).
    :meth:`values` returns the engineering value of every tag in layout order.
    """

    def __init__(
        self,
        layout: Layout,
        *,
        seed: int = 0,
        cycle_s: float = 40.0,
        noise: float = 1.0,
        batch_cycles: float = 12.0,
        cycle_log: int = 100_000,
        material_mean: float = 0.0,
        material_std: float = 1.0,
    ) -> None:
        if cycle_s <= 0:
            raise ValueError("cycle_s must be positive")
        self.layout = layout
        self.cycle_s = float(cycle_s)
        self.noise = float(noise)
        self.batch_cycles = float(batch_cycles)
        #: Distribution of a new batch's hidden property ``p`` (the twin calibrates them).
        self.material_mean = float(material_mean)
        self.material_std = float(material_std)
        self.time_s = 0.0
        self.ticks = 0
        self.rng = np.random.default_rng(seed)
        #: Finished tyres, oldest first (bounded).
        self.cycles: deque[CycleRecord] = deque(maxlen=cycle_log)
        n = self.n = layout.nests
        rng = self.rng
        cs = self.cycle_s

        # Line-wide raw-material supply.
        self._line_batch = 1
        self._line_base = self._draw_material()
        self._line_drift = 0.0
        self._next_batch_s = self._batch_length()

        # Per-nest process state.
        self.heater_sp = np.full(n, 160.0)
        self.press_sp = np.full(n, 15.0)
        self.cure_sp = np.full(n, cs * NOMINAL_CURE_F)
        self.heater_pv = self.heater_sp + rng.normal(0.0, 0.5, n) * noise
        self.press_pv = np.full(n, RESIDUAL_BAR)
        self.cool_temp = np.full(n, 35.0)
        self.bladder_temp = np.full(n, 90.0)
        self.steam = np.zeros(n)
        self.state = np.full(n, int(CycleState.IDLE), dtype=np.int64)
        self.phase_t = np.zeros(n)
        # Stagger the start so the presses do not all open at once.
        self.phase_len = rng.uniform(0.0, 0.5 * cs, n)
        self.cure_used = self.cure_sp.copy()
        self.cycle_count = np.zeros(n, dtype=np.int64)
        self.tyres = np.zeros(n, dtype=np.int64)
        self.elasticity = np.zeros(n)
        self.ok = np.zeros(n, dtype=np.int64)
        self.batch_id = np.zeros(n, dtype=np.int64)
        self.batch_property = np.zeros(n)
        self.mooney = np.zeros(n)
        self.cycles_in_batch = np.zeros(n, dtype=np.int64)
        self.cure_elapsed = np.zeros(n)
        self.cure_state = np.zeros(n)
        self.cycle_start = np.zeros(n)
        self.last_cycle_s = np.zeros(n)
        self._sum_t = np.zeros(n)
        self._sum_p = np.zeros(n)
        self._cure_time = np.zeros(n)
        self._dose = np.zeros(n)
        # Injected defects.
        self.leak = np.zeros(n)
        self.heater_max = np.full(n, np.inf)

        # Auxiliary signals: an (n, A) matrix of Ornstein-Uhlenbeck processes whose targets
        # follow the press state, so they look alive and correlate with the process.
        a = layout.tags_per_nest - KEY_TAG_COUNT
        cat = np.arange(a) % len(AUX_CATEGORIES)
        self._aux_cat = cat
        self._aux_offset = rng.uniform(5.0, 25.0, (n, a))  # zone below platen
        self._aux_base = np.select(
            [cat == 1, cat == 2, cat == 3],
            [
                rng.uniform(20.0, 60.0, (n, a)),
                rng.uniform(2.0, 15.0, (n, a)),
                rng.uniform(-10.0, 10.0, (n, a)),
            ],
            0.0,
        )
        self._aux_sigma = np.select(
            [cat == 0, cat == 1, cat == 2, cat == 3], [0.3, 0.5, 0.08, 0.4], 0.0
        )[None, :]
        self._aux_tau = np.select(
            [cat == 0, cat == 1, cat == 2, cat == 3],
            [0.2 * cs, 0.05 * cs, 0.02 * cs, 0.05 * cs],
            1.0,
        )[None, :]
        self._aux_step = rng.integers(1, 6, (n, a)).astype(np.float64)  # counters
        self._aux_phase = (1 + np.arange(a) % 4)[None, :]  # flags: on in this phase
        self._aux = np.zeros((n, a))
        self._aux_targets()
        self._aux[:] = self._aux_target
        self._alarms = np.zeros(n, dtype=np.int64)
        self._values = np.zeros((n, layout.tags_per_nest))
        self._fill_values()

    # ------------------------------------------------------------------ public API

    def values(self) -> F64:
        """Engineering value of every tag, in layout order (a fresh copy)."""
        return self._values.reshape(-1).copy()

    def setpoints(self) -> Setpoints:
        return Setpoints(self.heater_sp.copy(), self.press_sp.copy(), self.cure_sp.copy())

    def set_setpoints(self, setpoints: Setpoints, nests: npt.ArrayLike | None = None) -> None:
        """Apply a recipe (all nests, or the 1-based ``nests`` given), clipped to the limits."""
        idx = slice(None) if nests is None else np.asarray(nests, dtype=np.int64) - 1
        self.heater_sp[idx] = np.clip(np.asarray(setpoints.heater_c)[idx], 120.0, 200.0)
        self.press_sp[idx] = np.clip(np.asarray(setpoints.pressure_bar)[idx], 5.0, 30.0)
        self.cure_sp[idx] = np.clip(np.asarray(setpoints.cure_s)[idx], 1.0, 600.0)
        self._fill_values()

    def write(self, index: int, value: float) -> None:
        """Write one set-point tag by layout index (what a protocol write does).

        Raises ``KeyError`` for a tag that is not writable and ``ValueError`` for a value
        outside the tag's hard limits.
        """
        spec = self.layout.tags[index]
        if not spec.writable or spec.slot not in _WRITABLE_SLOTS:
            raise KeyError(f"{spec.name} is not writable")
        assert spec.limits is not None
        lo, hi = spec.limits
        if not (lo <= value <= hi):
            raise ValueError(f"{spec.name}: {value:g} outside [{lo:g}, {hi:g}]")
        i = spec.nest - 1
        if spec.slot == S_HEATER_SP:
            self.heater_sp[i] = value
        elif spec.slot == S_PRESS_SP:
            self.press_sp[i] = value
        else:
            self.cure_sp[i] = value
        self._values[i, spec.slot] = value

    def line_state(self) -> LineState:
        """A snapshot for policies (:func:`default_policy`, :func:`optimal_setpoints`)."""
        return LineState(
            time_s=self.time_s,
            cycle_s=self.cycle_s,
            state=self.state.copy(),
            batch_id=self.batch_id.copy(),
            batch_property=self.batch_property.copy(),
            mooney=self.mooney.copy(),
            cycles_in_batch=self.cycles_in_batch.copy(),
            freshness=np.exp(-self.cycles_in_batch / _FRESH_CYCLES),
            setpoints=self.setpoints(),
        )

    def inject_defect(
        self,
        nest: int,
        kind: Literal["pressure_leak", "heater_weak"],
        severity: float = 0.3,
    ) -> None:
        """Break a nest: a bladder leak losing ``severity`` of the pressure, or a weak heater
        that cannot heat the platen above ``200 - 100 * severity`` °C."""
        i = nest - 1
        if not 0 <= i < self.n:
            raise IndexError(f"no nest {nest}")
        if kind == "pressure_leak":
            self.leak[i] = min(max(severity, 0.0), 0.95)
        elif kind == "heater_weak":
            self.heater_max[i] = 200.0 - 100.0 * min(max(severity, 0.0), 1.0)
        else:
            raise ValueError(f"unknown defect {kind!r}")

    def clear_defects(self, nest: int | None = None) -> None:
        idx = slice(None) if nest is None else nest - 1
        self.leak[idx] = 0.0
        self.heater_max[idx] = np.inf

    def new_batch(self) -> None:
        """Start a new raw-material batch now (nests pick it up at their next load)."""
        self._line_batch += 1
        self._line_base = self._draw_material()
        self._line_drift = 0.0
        self._next_batch_s = self.time_s + self._batch_length()

    def run(self, seconds: float, dt: float = 0.1) -> None:
        """Step ``seconds`` of simulated time in steps of ``dt`` (for tests and training)."""
        for _ in range(round(seconds / dt)):
            self.step(dt)

    def step(self, dt: float) -> None:
        """Advance every nest by ``dt`` seconds of (compressed) process time."""
        if dt <= 0:
            return
        rng, noise, cs, n = self.rng, self.noise, self.cycle_s, self.n
        self.time_s += dt
        self.ticks += 1

        # Raw-material supply: slow drift inside a batch, a jump at a batch boundary.
        tau_d = 3.0 * self.batch_cycles * cs
        self._line_drift += (
            -self._line_drift * dt / tau_d
            + 0.15 * np.sqrt(2.0 * dt / tau_d) * float(rng.standard_normal()) * noise
        )
        if self.time_s >= self._next_batch_s:
            self.new_batch()

        state = self.state
        in_cure = state == CycleState.CURE

        # Platens: always heated, first-order lag towards the set-point (or a weak heater's max).
        t_eq = np.minimum(self.heater_sp, self.heater_max)
        a_h = 1.0 - np.exp(-dt / (_HEATER_TAU_F * cs))
        loss = np.where(state == CycleState.LOAD, _LOAD_LOSS_C_PER_S, 0.0)  # open mould loses heat
        self.heater_pv += (t_eq - self.heater_pv) * a_h - loss * dt
        self.heater_pv += rng.normal(0.0, 0.05, n) * np.sqrt(dt) * noise

        # Bladder pressure: held during the cure, vented otherwise.
        p_eq = np.where(in_cure, self.press_sp * (1.0 - self.leak), RESIDUAL_BAR)
        a_p = 1.0 - np.exp(-dt / (PRESSURE_TAU_F * cs))
        self.press_pv += (p_eq - self.press_pv) * a_p
        self.press_pv = np.maximum(self.press_pv, 0.0)

        a_f = 1.0 - np.exp(-dt / (_FAST_TAU_F * cs))
        bladder_eq = np.select(
            [in_cure, state == CycleState.COOL], [self.heater_pv - 3.0, 60.0], 90.0
        )
        self.bladder_temp += (bladder_eq - self.bladder_temp) * a_f
        self.cool_temp += (np.where(state == CycleState.COOL, 75.0, 35.0) - self.cool_temp) * a_f
        self.steam += (np.where(in_cure, 25.0 + 2.0 * self.press_pv, 2.0) - self.steam) * a_f

        # Cure history of the tyre in the press: what decides its quality.
        self._sum_t += np.where(in_cure, self.heater_pv * dt, 0.0)
        self._sum_p += np.where(in_cure, self.press_pv * dt, 0.0)
        self._cure_time += np.where(in_cure, dt, 0.0)
        rate = np.exp2((self.heater_pv - 163.0) / 10.0)
        self._dose += np.where(in_cure, rate * dt / (NOMINAL_CURE_F * cs), 0.0)
        self.cure_elapsed = np.where(in_cure, self._cure_time, self.cure_elapsed)
        self.cure_state = 100.0 * (1.0 - np.exp(-3.0 * self._dose))

        self.phase_t += dt
        self._advance_phases()
        self._update_alarms()
        self._aux_step_dt(dt)
        self._fill_values()

    # ------------------------------------------------------------------ internals

    def _draw_material(self) -> float:
        # One standard normal per batch whatever the parameters: the random stream (and so
        # every other disturbance) stays the same when only the material changes.
        return self.material_mean + self.material_std * float(self.rng.standard_normal())

    def _batch_length(self) -> float:
        return self.batch_cycles * self.cycle_s * float(self.rng.uniform(0.7, 1.3))

    def _advance_phases(self) -> None:
        cs = self.cycle_s
        done = self.phase_t >= self.phase_len
        if not done.any():
            return
        state = self.state
        to_load = done & ((state == CycleState.IDLE) | (state == CycleState.UNLOAD))
        to_cure = done & (state == CycleState.LOAD)
        to_cool = done & (state == CycleState.CURE)
        to_unload = done & (state == CycleState.COOL)

        finished = done & (state == CycleState.UNLOAD)
        if finished.any():
            self._finish_tyres(np.flatnonzero(finished))

        if to_load.any():
            idx = np.flatnonzero(to_load)
            new = self.batch_id[idx] != self._line_batch
            self.cycles_in_batch[idx] = np.where(new, 0, self.cycles_in_batch[idx] + 1)
            self.batch_id[idx] = self._line_batch
            self.batch_property[idx] = self._line_base + self._line_drift
            self.mooney[idx] = (
                50.0
                + 6.0 * self.batch_property[idx]
                + self.rng.normal(0.0, 0.3, idx.size) * self.noise
            )
            self.cycle_start[idx] = self.time_s
            self._sum_t[idx] = 0.0
            self._sum_p[idx] = 0.0
            self._cure_time[idx] = 0.0
            self._dose[idx] = 0.0
            self.cure_elapsed[idx] = 0.0
        if to_cure.any():
            # The cure time is latched when the cure starts, as a PLC recipe step would.
            self.cure_used[to_cure] = self.cure_sp[to_cure]

        state[to_load] = CycleState.LOAD
        state[to_cure] = CycleState.CURE
        state[to_cool] = CycleState.COOL
        state[to_unload] = CycleState.UNLOAD
        self.phase_len = np.select(
            [to_load, to_cure, to_cool, to_unload],
            [_LOAD_F * cs, self.cure_used, _COOL_F * cs, _UNLOAD_F * cs],
            self.phase_len,
        )
        self.phase_t[done] = 0.0

    def _finish_tyres(self, idx: npt.NDArray[np.intp]) -> None:
        cure = np.maximum(self._cure_time[idx], 1e-9)
        mean_t = self._sum_t[idx] / cure
        mean_p = self._sum_p[idx] / cure
        fresh = np.exp(-self.cycles_in_batch[idx] / _FRESH_CYCLES)
        e = quality(
            mean_t,
            mean_p,
            self._cure_time[idx],
            batch_property=self.batch_property[idx],
            freshness=fresh,
            cycle_s=self.cycle_s,
        )
        e = e + self.rng.normal(0.0, _E_NOISE, idx.size) * self.noise
        e = np.maximum(e, 0.0)
        ok = (e >= ELASTICITY_MIN) & (e <= ELASTICITY_MAX)
        self.elasticity[idx] = e
        self.ok[idx] = ok
        self.cycle_count[idx] += 1
        self.tyres[idx] += 1
        self.last_cycle_s[idx] = self.time_s - self.cycle_start[idx]
        for k, i in enumerate(idx.tolist()):
            self.cycles.append(
                CycleRecord(
                    time_s=self.time_s,
                    nest=i + 1,
                    cycle=int(self.cycle_count[i]),
                    batch_id=int(self.batch_id[i]),
                    batch_property=float(self.batch_property[i]),
                    freshness=float(fresh[k]),
                    mooney=float(self.mooney[i]),
                    heater_sp_c=float(self.heater_sp[i]),
                    pressure_sp_bar=float(self.press_sp[i]),
                    cure_s=float(self._cure_time[i]),
                    mean_temp_c=float(mean_t[k]),
                    mean_pressure_bar=float(mean_p[k]),
                    elasticity=float(e[k]),
                    ok=bool(ok[k]),
                )
            )

    def _update_alarms(self) -> None:
        settled = self.phase_t > 3.0 * PRESSURE_TAU_F * self.cycle_s
        in_cure = self.state == CycleState.CURE
        bits = np.where(self.heater_pv > 195.0, int(Alarm.OVERTEMP), 0)
        bits |= np.where(
            in_cure & settled & (self.press_pv < 0.85 * self.press_sp), int(Alarm.PRESSURE_LOW), 0
        )
        bits |= np.where(
            np.abs(self.heater_pv - self.heater_sp) > 8.0, int(Alarm.HEATER_DEVIATION), 0
        )
        bits |= np.where((self.cycle_count > 0) & (self.ok == 0), int(Alarm.QUALITY_REJECT), 0)
        bits |= np.where((self.batch_id > 0) & (self.cycles_in_batch == 0), int(Alarm.NEW_BATCH), 0)
        self._alarms = bits.astype(np.int64)

    def _aux_targets(self) -> None:
        state = self.state[:, None]
        cat = self._aux_cat[None, :]
        busy = (state == CycleState.LOAD) | (state == CycleState.UNLOAD)
        cooling = state == CycleState.COOL
        self._aux_target = np.select(
            [cat == 0, cat == 1, cat == 2, cat == 3],
            [
                self.heater_pv[:, None] - self._aux_offset,
                self._aux_base * np.where(cooling, 1.4, 1.0),
                self._aux_base * np.where(busy, 1.8, 0.6),
                np.clip(np.where(cooling, 80.0, 20.0) + self._aux_base, 0.0, 100.0),
            ],
            0.0,
        )

    def _aux_step_dt(self, dt: float) -> None:
        if self._aux.shape[1] == 0:
            return
        self._aux_targets()
        cat = self._aux_cat[None, :]
        alpha = 1.0 - np.exp(-dt / self._aux_tau)
        shocks = self.rng.standard_normal(self._aux.shape)
        analog = cat < 4
        self._aux = np.where(
            analog,
            self._aux
            + (self._aux_target - self._aux) * alpha
            + self._aux_sigma * np.sqrt(dt) * shocks * self.noise,
            self._aux,
        )
        # Counters count finished cycles (each column its own multiple); flags show a phase.
        counters = self.cycle_count[:, None] * self._aux_step
        flags = (self.state[:, None] == self._aux_phase).astype(np.float64)
        self._aux = np.where(cat == 4, counters, np.where(cat == 5, flags, self._aux))
        self._aux[:, self._aux_cat == 3] = np.clip(self._aux[:, self._aux_cat == 3], 0.0, 100.0)

    def _fill_values(self) -> None:
        v = self._values
        noise, rng, n = self.noise, self.rng, self.n
        v[:, S_HEATER_SP] = self.heater_sp
        v[:, S_HEATER_PV] = self.heater_pv
        out = 40.0 + 0.5 * (self.heater_sp - 120.0) + 8.0 * (self.heater_sp - self.heater_pv)
        out = np.where(
            self.heater_pv < np.minimum(self.heater_sp, self.heater_max) - 3.0, 100.0, out
        )
        v[:, S_HEATER_OUT] = np.clip(out, 0.0, 100.0)
        v[:, S_PRESS_SP] = self.press_sp
        v[:, S_PRESS_PV] = np.maximum(self.press_pv + rng.normal(0.0, 0.03, n) * noise, 0.0)
        v[:, S_CURE_SP] = self.cure_sp
        v[:, S_CURE_ELAPSED] = self.cure_elapsed
        v[:, S_COOL_TEMP] = self.cool_temp
        v[:, S_STATE] = self.state
        v[:, S_CYCLES] = self.cycle_count
        v[:, S_TYRES] = self.tyres
        v[:, S_ELASTICITY] = self.elasticity
        v[:, S_OK] = self.ok
        v[:, S_BATCH] = self.batch_id
        v[:, S_MOONEY] = self.mooney
        v[:, S_ALARMS] = self._alarms
        v[:, S_STEAM] = self.steam
        v[:, S_BLADDER] = self.bladder_temp
        v[:, S_CURE_STATE] = self.cure_state
        v[:, S_LAST_CYCLE] = self.last_cycle_s
        v[:, KEY_TAG_COUNT:] = self._aux
