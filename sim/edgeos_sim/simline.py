"""Adapter between the simulated tyre line (:mod:`edgeos_sim.physics`) and the inference code.

Training (``models/train_all.py``), the tests and the benchmark step the line's physics
in-process, fast-forwarded, and read the same key tags a gateway would read from the twin. This
module keeps that glue in one place:

* :class:`SimLine` owns a :class:`~edgeos_sim.physics.LinePhysics`, samples the
  :data:`~edgeos.inference.features.KEY_SUFFIXES` columns of every nest, applies set-point
  writes by tag name, and builds the writable tags' :class:`~edgeos.config.TagConfig` (hard
  limits, ``max_rate``) from the simulator's layout so the guard checks the real limits;
* :func:`lagged_optimum` turns the simulator's *true* optimum into the set-points a station
  should be given at load time, compensating the platen's first-order lag (the label the
  correction model learns), and :func:`expected_elasticity` predicts the noise-free outcome of
  a recipe written at load time (labels for the model's outcome heads).

The physics gives ground truth (hidden batch property, freshness, cycle records); nothing here
is used by the runtime on a device.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from drivers.modbus import ModbusAddress
from edgeos.config import Limits, TagConfig
from edgeos.inference.features import KEY_SUFFIXES, SAMPLE_PERIOD_S
from edgeos_sim import physics as _physics
from edgeos_sim.layout import KEY_TAG_COUNT, Layout, build_layout
from edgeos_sim.physics import LinePhysics
from edgeos_sim.recipe import (
    Setpoints,
    default_policy,
    quality,
    target_pressure,
    target_temperature,
)

__all__ = [
    "E_BEST",
    "SETPOINT_SUFFIXES",
    "DriveLog",
    "SimClock",
    "SimLine",
    "drive",
    "expected_elasticity",
    "lagged_optimum",
    "reward",
    "tyres",
]

F64 = npt.NDArray[np.float64]

#: Set-points the correction model and the guard act on.
SETPOINT_SUFFIXES: tuple[str, str] = ("heater.sp", "press.sp")
#: Elastic modulus of a perfectly cured tyre (MPa); the reward peaks there.
E_BEST = 6.6

# Physics constants the lag compensation needs, as fractions of the cycle. The simulator keeps
# them private (no public accessor yet); they are read from it when present so the labels follow
# the physics, with the values of the first physics release as the fallback.
_HEATER_TAU_F: float = getattr(_physics, "_HEATER_TAU_F", 0.15)
_PRESSURE_TAU_F: float = getattr(_physics, "_PRESSURE_TAU_F", 0.03)
_LOAD_F: float = getattr(_physics, "_LOAD_F", 0.1)
_CURE_F: float = getattr(_physics, "_NOMINAL_CURE_F", 0.6)
_RESIDUAL_BAR: float = getattr(_physics, "_RESIDUAL_BAR", 0.3)
#: Heat lost by an open mould during loading (°C/s); a literal inside the physics step.
_LOAD_LOSS_C_PER_S = 0.4


def reward(elasticity: npt.ArrayLike) -> F64:
    """Reward of a tyre: the best modulus minus the distance from it (MPa; higher is better)."""
    e = np.asarray(elasticity, dtype=np.float64)
    result: F64 = E_BEST - np.abs(e - E_BEST)
    return result


def _lag_terms(cycle_s: float) -> tuple[float, float, float]:
    tau = _HEATER_TAU_F * cycle_s
    cure = _CURE_F * cycle_s
    e0 = math.exp(-_LOAD_F * cycle_s / tau)
    h = tau / cure * (1.0 - math.exp(-cure / tau))
    return tau, e0, h


def _mean_cure_temp(sp: F64, pv0: F64, cycle_s: float) -> F64:
    tau, e0, h = _lag_terms(cycle_s)
    result: F64 = sp * (1 - h * e0) + h * e0 * pv0 - _LOAD_LOSS_C_PER_S * tau * h * (1 - e0)
    return result


def _pressure_rise(cycle_s: float) -> float:
    tau = _PRESSURE_TAU_F * cycle_s
    cure = _CURE_F * cycle_s
    return tau / cure * (1.0 - math.exp(-cure / tau))


def lagged_optimum(batch_property: F64, fresh: F64, pv0: F64, cycle_s: float) -> tuple[F64, F64]:
    """Heater and pressure set-points that, written at load, give the optimal cure means."""
    tau, e0, h = _lag_terms(cycle_s)
    t_star = target_temperature(batch_property, fresh)
    sp = (t_star - h * e0 * pv0 + _LOAD_LOSS_C_PER_S * tau * h * (1 - e0)) / (1 - h * e0)
    r = _pressure_rise(cycle_s)
    p_sp = (target_pressure(batch_property) - _RESIDUAL_BAR * r) / (1 - r)
    return np.clip(sp, 120.0, 200.0), np.clip(p_sp, 5.0, 30.0)


def expected_elasticity(
    heater_sp: F64,
    press_sp: F64,
    *,
    batch_property: F64,
    fresh: F64,
    pv0: F64,
    cycle_s: float,
) -> F64:
    """Noise-free modulus of a tyre whose recipe is written at load time (default cure)."""
    mean_t = _mean_cure_temp(heater_sp, pv0, cycle_s)
    r = _pressure_rise(cycle_s)
    mean_p = press_sp * (1 - r) + _RESIDUAL_BAR * r
    return quality(
        mean_t,
        mean_p,
        _CURE_F * cycle_s,
        batch_property=batch_property,
        freshness=fresh,
        cycle_s=cycle_s,
    )


class SimLine:
    """A simulated line stepped in-process; reads and writes by tag name like a twin would."""

    def __init__(
        self,
        nests: int = 80,
        *,
        seed: int = 0,
        cycle_s: float = 40.0,
        noise: float = 1.0,
        batch_cycles: float = 12.0,
    ) -> None:
        # Key tags only: the auxiliary signals cost time and no model reads them.
        self.layout: Layout = build_layout(nests, KEY_TAG_COUNT)
        self.physics = LinePhysics(
            self.layout, seed=seed, cycle_s=cycle_s, noise=noise, batch_cycles=batch_cycles
        )
        self.nests = nests
        self.stations: tuple[str, ...] = tuple(
            self.layout.nest_name(n) for n in range(1, nests + 1)
        )
        self.key_index = np.array(
            [[self.layout.index(f"{s}.{k}") for k in KEY_SUFFIXES] for s in self.stations],
            dtype=np.intp,
        )

    @property
    def now(self) -> float:
        return self.physics.time_s

    def sample(self) -> F64:
        """Key tag values of every station, ``(nests, len(KEY_SUFFIXES))``."""
        values = self.physics.values()
        out: F64 = values[self.key_index]
        return out

    def step(self, dt: float = SAMPLE_PERIOD_S) -> None:
        self.physics.step(dt)

    def write(self, name: str, value: float) -> None:
        """Write one set-point by full tag name (the simulator refuses values off limits)."""
        self.physics.write(self.layout.index(name), value)

    def apply(self, writes: Mapping[str, float]) -> None:
        for name, value in writes.items():
            self.write(name, value)

    def set_default(self, nests: npt.ArrayLike | None = None) -> None:
        """Put the default recipe on some (1-based) or all nests."""
        self.physics.set_setpoints(default_policy(self.physics.line_state()), nests)

    def set_recipe(self, heater: F64, pressure: F64, nests: npt.NDArray[np.int64]) -> None:
        """Heater and pressure set-points for the given 1-based nests (cure time unchanged)."""
        sp = self.physics.setpoints()
        h, p = sp.heater_c.copy(), sp.pressure_bar.copy()
        h[nests - 1] = heater
        p[nests - 1] = pressure
        self.physics.set_setpoints(Setpoints(h, p, sp.cure_s), nests)

    def tag_configs(self, suffixes: tuple[str, ...] = SETPOINT_SUFFIXES) -> dict[str, TagConfig]:
        """``TagConfig`` of the given writable tags of every nest, from the simulator's layout."""
        out: dict[str, TagConfig] = {}
        for station in self.stations:
            for suffix in suffixes:
                spec = self.layout.tag(f"{station}.{suffix}")
                assert spec.limits is not None
                out[spec.name] = TagConfig(
                    name=spec.name,
                    connection="sim",
                    unit=spec.unit,
                    resolution=spec.resolution,
                    writable=spec.writable,
                    limits=Limits(min=spec.limits[0], max=spec.limits[1]),
                    max_rate=spec.max_rate,
                    modbus=ModbusAddress(
                        unit=spec.modbus_unit,
                        address=spec.modbus_address,
                        type=spec.modbus_type,
                        scale=spec.scale,
                    ),
                )
        return out


class _Engine(Protocol):
    def step(self, values: npt.ArrayLike) -> Any: ...


@dataclass(slots=True)
class DriveLog:
    """What a closed-loop run produced (for tests, the benchmark and the docs' figures)."""

    steps: int = 0
    writes: list[tuple[float, str, float]] = field(default_factory=list)
    verdicts: list[Any] = field(default_factory=list)
    decisions: list[Any] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)


def drive(
    engine: _Engine,
    line: SimLine,
    seconds: int,
    *,
    apply: bool = True,
    keep_events: bool = False,
    before_step: Callable[[int], None] | None = None,
) -> DriveLog:
    """Step ``line`` and ``engine`` together for ``seconds`` samples; apply guarded writes.

    Writes go through :meth:`SimLine.write` (the simulator's protocol-write path), which draws
    no random numbers, so a twin line with the same seed stays on the same random stream and
    gives the exact counterfactual of every tyre.
    """
    log = DriveLog()
    for k in range(seconds):
        if before_step is not None:
            before_step(k)
        line.step(SAMPLE_PERIOD_S)
        out = engine.step(line.sample())
        log.steps += 1
        log.verdicts.extend(out.verdicts)
        log.decisions.extend(out.decisions)
        if keep_events:
            log.events.extend(out.events)
        if apply:
            for name, value in out.writes.items():
                line.write(name, value)
                log.writes.append((line.now, name, value))
    return log


def tyres(line: SimLine) -> dict[tuple[int, int], float]:
    """Measured modulus of every finished tyre by ``(nest, cycle)``."""
    return {(c.nest, c.cycle): c.elasticity for c in line.physics.cycles}


class SimClock:
    """The line's simulated time as a :class:`~edgeos.clock.Clock` (fast-forwarded runs).

    Rate limits and timestamps must follow the process time the physics lives in, not the
    wall clock of the machine that fast-forwards it.
    """

    def __init__(self, line: SimLine, wall_offset: float = 1_700_000_000.0) -> None:
        self._line = line
        self._wall_offset = wall_offset

    def monotonic(self) -> float:
        return self._line.now

    def time(self) -> float:
        return self._line.now + self._wall_offset

    async def sleep_until(self, deadline: float) -> None:
        raise RuntimeError("SimClock is stepped by the simulation; nothing sleeps on it")
