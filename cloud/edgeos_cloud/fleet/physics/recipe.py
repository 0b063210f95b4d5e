"""The recipe model of the tyre-curing line: what makes a good tyre, and the true optimum.

A tyre's elastic modulus peaks at a recipe (platen temperature, bladder pressure, cure time)
that depends on the raw-material batch's hidden property ``p`` and, for a fresh batch, on how
many cycles it has been in use. :func:`default_policy` is the plant's fixed recipe;
:func:`optimal_setpoints` is the simulator's secret.
:class:`~edgeos_cloud.fleet.physics.line.LinePhysics` plays the dynamics.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

__all__ = [
    "ELASTICITY_MAX",
    "ELASTICITY_MIN",
    "CycleRecord",
    "LineState",
    "Setpoints",
    "default_policy",
    "optimal_setpoints",
    "quality",
    "target_cure_s",
    "target_pressure",
    "target_temperature",
]

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]

#: Specification window of the elastic modulus (MPa); outside it the tyre is a reject.
ELASTICITY_MIN = 6.0
ELASTICITY_MAX = 7.2
#: Elastic modulus at the perfect recipe (MPa).
_E_BEST = 6.7
#: Nominal cure length as a fraction of the cycle (the plant's fixed recipe).
NOMINAL_CURE_F = 0.6
#: Bladder pressure time constant as a fraction of the cycle (time compression keeps shapes).
PRESSURE_TAU_F = 0.03
#: Bladder pressure outside the cure (bar).
RESIDUAL_BAR = 0.3


@dataclass(frozen=True, slots=True)
class Setpoints:
    """Recipe of every nest: heater temperature (°C), bladder pressure (bar), cure time (s)."""

    heater_c: F64
    pressure_bar: F64
    cure_s: F64


@dataclass(frozen=True, slots=True)
class LineState:
    """What a policy may look at (copies; one entry per nest)."""

    time_s: float
    cycle_s: float
    state: I64
    batch_id: I64
    #: Hidden true property of the loaded batch (a model only sees ``mooney``).
    batch_property: F64
    #: Measured Mooney viscosity of the loaded batch (MU), served as ``batch.mooney``.
    mooney: F64
    cycles_in_batch: I64
    #: 1 for the first cycle of a batch, fading towards 0.
    freshness: F64
    setpoints: Setpoints


@dataclass(frozen=True, slots=True)
class CycleRecord:
    """One finished tyre: what went in, what came out (ground truth for model work)."""

    time_s: float
    nest: int
    cycle: int
    batch_id: int
    batch_property: float
    freshness: float
    mooney: float
    heater_sp_c: float
    pressure_sp_bar: float
    cure_s: float
    mean_temp_c: float
    mean_pressure_bar: float
    elasticity: float
    ok: bool


# --------------------------------------------------------------------------- the model


def target_temperature(batch_property: F64, freshness: F64) -> F64:
    """Platen temperature giving the best tyre for this batch (°C)."""
    return 162.0 + 3.0 * batch_property + 6.0 * freshness


def target_pressure(batch_property: F64) -> F64:
    """Mean bladder pressure during the cure giving the best tyre (bar)."""
    return 15.5 + 1.0 * batch_property


def target_cure_s(batch_property: F64, cycle_s: float) -> F64:
    """Cure time giving the best tyre (s, compressed time)."""
    return cycle_s * NOMINAL_CURE_F * (1.04 + 0.04 * batch_property)


def quality(
    mean_temp_c: F64 | float,
    mean_pressure_bar: F64 | float,
    cure_s: F64 | float,
    *,
    batch_property: F64 | float,
    freshness: F64 | float,
    cycle_s: float,
) -> F64:
    """Expected elastic modulus (MPa, noise-free) of a tyre cured this way.

    A smooth peak at the batch's optimum: temperature error counts per 10 °C, pressure error
    per 3 bar, cure-time error per 10 % of the nominal cure.
    """
    p = np.asarray(batch_property, dtype=np.float64)
    f = np.asarray(freshness, dtype=np.float64)
    dt = (np.asarray(mean_temp_c) - target_temperature(p, f)) / 10.0
    dp = (np.asarray(mean_pressure_bar) - target_pressure(p)) / 3.0
    dc = (np.asarray(cure_s) - target_cure_s(p, cycle_s)) / (0.1 * NOMINAL_CURE_F * cycle_s)
    result: F64 = _E_BEST - 1.2 * dt**2 - 0.8 * dp**2 - 0.5 * dc**2
    return result


def _pressure_rise_factor(cure_s: F64, cycle_s: float) -> F64:
    """Fraction of the pressure step lost to the first-order rise over a cure of ``cure_s``."""
    tau = PRESSURE_TAU_F * cycle_s
    safe = np.maximum(cure_s, 1e-9)
    factor: F64 = tau / safe * (1.0 - np.exp(-safe / tau))
    return factor


def default_policy(state: LineState) -> Setpoints:
    """The plant's fixed recipe: 160 °C, 15 bar, 60 % of the cycle curing, for every batch."""
    n = state.state.shape[0]
    return Setpoints(
        heater_c=np.full(n, 160.0),
        pressure_bar=np.full(n, 15.0),
        cure_s=np.full(n, state.cycle_s * NOMINAL_CURE_F),
    )


def optimal_setpoints(state: LineState) -> Setpoints:
    """The true best recipe for each nest's loaded batch (the simulator's secret).

    The pressure set-point is raised just enough that the *mean* pressure over the cure,
    including the bladder's rise time, hits the target. Set-points are clipped to the
    writable limits of the tags.
    """
    p, f, cs = state.batch_property, state.freshness, state.cycle_s
    cure = np.clip(target_cure_s(p, cs), 1.0, 600.0)
    rise = _pressure_rise_factor(cure, cs)
    pressure = (target_pressure(p) - RESIDUAL_BAR * rise) / (1.0 - rise)
    return Setpoints(
        heater_c=np.clip(target_temperature(p, f), 120.0, 200.0),
        pressure_bar=np.clip(pressure, 5.0, 30.0),
        cure_s=cure,
    )
