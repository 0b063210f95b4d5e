"""The cure of one tyre in closed form: what a recipe written at load time gives, and the reward.

:class:`~edgeos_cloud.fleet.physics.line.LinePhysics` steps first-order lags; for a recipe
written when a tyre is loaded (the guard's decision point), the mean platen temperature and
mean bladder pressure over the cure have a closed form. That makes a tyre's noise-free modulus
one vectorised expression: the twin simulator (:mod:`edgeos_cloud.fleet.twinsim`) and the
correction model's labels (``edgeos_sim.simline``) both use it.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

from edgeos_cloud.fleet.physics.line import _HEATER_TAU_F, _LOAD_F, _LOAD_LOSS_C_PER_S
from edgeos_cloud.fleet.physics.recipe import (
    NOMINAL_CURE_F,
    PRESSURE_TAU_F,
    RESIDUAL_BAR,
    quality,
    target_pressure,
    target_temperature,
)

__all__ = [
    "E_BEST",
    "expected_elasticity",
    "lagged_optimum",
    "mean_cure_pressure",
    "mean_cure_temp",
    "reward",
]

F64 = npt.NDArray[np.float64]

#: Elastic modulus of a perfectly cured tyre (MPa); the reward peaks there (the guard's target).
E_BEST = 6.6


def reward(elasticity: npt.ArrayLike, target: float = E_BEST) -> F64:
    """Reward of a tyre: the best modulus minus the distance from it (MPa; higher is better)."""
    e = np.asarray(elasticity, dtype=np.float64)
    result: F64 = target - np.abs(e - target)
    return result


def _lag_terms(cycle_s: float) -> tuple[float, float, float]:
    tau = _HEATER_TAU_F * cycle_s
    cure = NOMINAL_CURE_F * cycle_s
    e0 = math.exp(-_LOAD_F * cycle_s / tau)
    h = tau / cure * (1.0 - math.exp(-cure / tau))
    return tau, e0, h


def mean_cure_temp(sp: npt.ArrayLike, pv0: npt.ArrayLike, cycle_s: float) -> F64:
    """Mean platen temperature over a nominal cure when ``sp`` is written at load, the platen
    being at ``pv0``."""
    tau, e0, h = _lag_terms(cycle_s)
    s, p0 = np.asarray(sp, np.float64), np.asarray(pv0, np.float64)
    result: F64 = s * (1 - h * e0) + h * e0 * p0 - _LOAD_LOSS_C_PER_S * tau * h * (1 - e0)
    return result


def _pressure_rise(cycle_s: float) -> float:
    tau = PRESSURE_TAU_F * cycle_s
    cure = NOMINAL_CURE_F * cycle_s
    return tau / cure * (1.0 - math.exp(-cure / tau))


def mean_cure_pressure(sp: npt.ArrayLike, cycle_s: float) -> F64:
    """Mean bladder pressure over a nominal cure at set-point ``sp``."""
    r = _pressure_rise(cycle_s)
    result: F64 = np.asarray(sp, np.float64) * (1 - r) + RESIDUAL_BAR * r
    return result


def lagged_optimum(batch_property: F64, fresh: F64, pv0: F64, cycle_s: float) -> tuple[F64, F64]:
    """Heater and pressure set-points that, written at load, give the optimal cure means."""
    tau, e0, h = _lag_terms(cycle_s)
    t_star = target_temperature(batch_property, fresh)
    sp = (t_star - h * e0 * pv0 + _LOAD_LOSS_C_PER_S * tau * h * (1 - e0)) / (1 - h * e0)
    r = _pressure_rise(cycle_s)
    p_sp = (target_pressure(batch_property) - RESIDUAL_BAR * r) / (1 - r)
    return np.clip(sp, 120.0, 200.0), np.clip(p_sp, 5.0, 30.0)


def expected_elasticity(
    heater_sp: npt.ArrayLike,
    press_sp: npt.ArrayLike,
    *,
    batch_property: npt.ArrayLike,
    fresh: npt.ArrayLike,
    pv0: npt.ArrayLike,
    cycle_s: float,
) -> F64:
    """Noise-free modulus of a tyre whose recipe is written at load time (default cure)."""
    return quality(
        mean_cure_temp(heater_sp, pv0, cycle_s),
        mean_cure_pressure(press_sp, cycle_s),
        NOMINAL_CURE_F * cycle_s,
        batch_property=np.asarray(batch_property, np.float64),
        freshness=np.asarray(fresh, np.float64),
        cycle_s=cycle_s,
    )
