"""The Digital Twin Simulator: the line physics run in the cloud, fast, calibrated per group.

It screens candidate recipes (profiles, combinations of two winners) before any line runs
them. It is the simulator's own physics (:mod:`edgeos_cloud.fleet.physics`), played at the
level of tyres instead of 1 s samples: every tyre's recipe is written at its load (that is
where the guard decides), and the cure of a first-order platen and bladder from that moment
has a closed form (:mod:`.physics.cure`), so one cycle of every nest is one vectorised
expression. No protocol, no clock: 150 cycles of 20 nests take milliseconds.

**Raw material.** Batches follow the physics: a line-wide batch lasts ``batch_cycles`` cycles
(× U(0.7, 1.3)); its hidden property ``p ~ N(material_mean, material_std²)`` drifts slowly
(Ornstein–Uhlenbeck, σ 0.15, τ = 3 batches) while it is used; a fresh batch needs a hotter
start (``freshness``); the lab reads Mooney ``50 + 6 p + mooney_offset`` (± 0.3).

**Calibration** (:func:`calibrate`, :func:`calibrate_from_storage`). From a group's stored
data — the gateway's own feature code on the receiver's samples gives, per tyre, the mean
platen temperature and bladder pressure over its cure, the cure time, the Mooney reading,
the freshness and the realised modulus — fit the parameters the plant does not know: the
compound's Mooney offset (a new rubber reads differently), hence each tyre's ``p`` and the
group's material distribution, and the residual noise. The fit minimises the squared error of
the physics' quality model over the offset and the bias of the stored cure-mean pressure (1 s
samples undercount a bladder that rises in about a second: ~0.6 bar measured) on a grid, then
a finer grid; the rest follow.

**Screening** (:meth:`TwinSimulator.screen`) runs every candidate on the *same* batches and
the same per-tyre noise (common random numbers), so differences between candidates are not
buried in the material's variance; each result carries its paired difference from the first
candidate (the plant default) with a standard error.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from edgeos_cloud.fleet.physics.cure import E_BEST, expected_elasticity, reward
from edgeos_cloud.fleet.physics.recipe import (
    ELASTICITY_MAX,
    ELASTICITY_MIN,
    NOMINAL_CURE_F,
    quality,
)

__all__ = [
    "DEFAULT_RECIPE",
    "Candidate",
    "Materials",
    "ScreenResult",
    "TwinParams",
    "TwinRun",
    "TwinSimulator",
    "calibrate",
    "calibrate_from_storage",
]

F64 = npt.NDArray[np.float64]

#: The plant's recipe (``recipe.default_policy``) for the set-points a candidate may change.
DEFAULT_RECIPE: Mapping[str, float] = {"heater.sp": 160.0, "press.sp": 15.0}
_FRESH_CYCLES = 1.5
_MOONEY_BASE, _MOONEY_PER_P = 50.0, 6.0

#: A recipe chosen per cycle from what a gateway observes: (mooney, freshness) of every nest
#: → (heater set-point, pressure set-point) of every nest.
RecipeFn = Callable[[F64, F64], tuple[F64, F64]]


@dataclass(frozen=True, slots=True)
class Candidate:
    """A recipe to screen: the set-points it changes (absolute values, by tag suffix)."""

    name: str
    setpoints: Mapping[str, float] = field(default_factory=dict)

    @classmethod
    def default(cls) -> Candidate:
        return cls("default", {})

    def recipe(self) -> tuple[float, float]:
        sp = {**DEFAULT_RECIPE, **self.setpoints}
        unknown = set(sp) - set(DEFAULT_RECIPE)
        if unknown:
            raise ValueError(f"{self.name}: the twin cannot set {sorted(unknown)}")
        return sp["heater.sp"], sp["press.sp"]


@dataclass(frozen=True, slots=True)
class TwinParams:
    """A group's twin: its raw material, noise and cycle (what :func:`calibrate` fits)."""

    material_mean: float = 0.0
    material_std: float = 1.0
    mooney_offset: float = 0.0
    #: What the stored cure-mean pressure misses (bar): 1 s samples of a bladder that rises in
    #: about a second undercount its mean; fitted, not assumed.
    pressure_bias: float = 0.0
    noise_mpa: float = 0.06
    cycle_s: float = 40.0
    batch_cycles: float = 12.0
    #: Tyres the calibration used and its residual RMS (MPa); 0/NaN for defaults.
    rows: int = 0
    rms: float = math.nan

    def as_dict(self) -> dict[str, Any]:
        return {
            k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in asdict(self).items()
        }


@dataclass(frozen=True, slots=True)
class Materials:
    """What every cycle of a twin run loads: ``(cycles,)`` line-wide arrays."""

    batch: npt.NDArray[np.int64]
    batch_property: F64
    freshness: F64
    mooney: F64


@dataclass(frozen=True, slots=True)
class TwinRun:
    """One candidate's run: ``(cycles, nests)`` moduli and rewards."""

    elasticity: F64
    rewards: F64

    @property
    def mean_reward(self) -> float:
        return float(self.rewards.mean())

    @property
    def reject_rate(self) -> float:
        e = self.elasticity
        return float(np.mean((e < ELASTICITY_MIN) | (e > ELASTICITY_MAX)))


@dataclass(frozen=True, slots=True)
class ScreenResult:
    candidate: str
    setpoints: Mapping[str, float]
    mean_reward: float
    reject_rate: float
    tyres: int
    #: Paired (common random numbers) difference from the first candidate screened, per tyre.
    vs_first: float
    vs_first_se: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "candidate": self.candidate,
            "setpoints": dict(self.setpoints),
            "mean_reward": round(self.mean_reward, 5),
            "reject_rate": round(self.reject_rate, 5),
            "tyres": self.tyres,
            "vs_first": round(self.vs_first, 5),
            "vs_first_se": round(self.vs_first_se, 5),
        }


class TwinSimulator:
    """The physics of one of the group's lines, tyre by tyre (see the module docstring)."""

    def __init__(self, params: TwinParams | None = None, *, nests: int = 20, seed: int = 7) -> None:
        self.params = params or TwinParams()
        self.nests = nests
        self.seed = seed
        self.target = E_BEST

    def materials(self, cycles: int, seed: int | None = None) -> Materials:
        """The batches a line loads over ``cycles`` cycles (deterministic for a seed)."""
        prm = self.params
        rng = np.random.default_rng(self.seed if seed is None else seed)
        batch = np.zeros(cycles, np.int64)
        p = np.zeros(cycles)
        fresh = np.zeros(cycles)
        tau = 3.0 * prm.batch_cycles
        k, b, drift = 0, 0, 0.0
        while k < cycles:
            b += 1
            base = prm.material_mean + prm.material_std * float(rng.standard_normal())
            length = max(1, round(prm.batch_cycles * float(rng.uniform(0.7, 1.3))))
            drift = 0.0
            for j in range(min(length, cycles - k)):
                drift += -drift / tau + 0.15 * math.sqrt(2.0 / tau) * float(rng.standard_normal())
                batch[k], p[k], fresh[k] = b, base + drift, math.exp(-j / _FRESH_CYCLES)
                k += 1
        mooney = _MOONEY_BASE + _MOONEY_PER_P * p + prm.mooney_offset + rng.normal(0.0, 0.3, cycles)
        return Materials(batch, p, fresh, mooney)

    def noise(self, cycles: int, seed: int | None = None) -> F64:
        rng = np.random.default_rng((self.seed if seed is None else seed) + 1_000_003)
        out: F64 = rng.normal(0.0, self.params.noise_mpa, (cycles, self.nests))
        return out

    def run(
        self,
        recipe: Candidate | RecipeFn,
        cycles: int,
        *,
        seed: int | None = None,
        noise: bool = True,
    ) -> TwinRun:
        """Every nest loads ``cycles`` tyres under ``recipe``; moduli and rewards."""
        m = self.materials(cycles, seed)
        cs = self.params.cycle_s
        n = self.nests
        p = np.repeat(m.batch_property[:, None], n, 1)
        f = np.repeat(m.freshness[:, None], n, 1)
        if isinstance(recipe, Candidate):
            h0, p0 = recipe.recipe()
            heater = np.full((cycles, n), h0)
            press = np.full((cycles, n), p0)
        else:
            heater = np.empty((cycles, n))
            press = np.empty((cycles, n))
            for k in range(cycles):
                heater[k], press[k] = recipe(np.full(n, m.mooney[k]), np.full(n, m.freshness[k]))
        # The platen starts each load where the previous recipe left it (it settles within
        # a cycle: τ = 0.15 cycle).
        pv0 = np.vstack([np.full((1, n), DEFAULT_RECIPE["heater.sp"]), heater[:-1]])
        e = expected_elasticity(heater, press, batch_property=p, fresh=f, pv0=pv0, cycle_s=cs)
        if noise:
            e = np.maximum(e + self.noise(cycles, seed), 0.0)
        return TwinRun(e, reward(e, self.target))

    def screen(
        self, candidates: Sequence[Candidate], *, cycles: int, seed: int | None = None
    ) -> list[ScreenResult]:
        """Run every candidate on the same batches and noise; paired differences from the first."""
        runs = [self.run(c, cycles, seed=seed) for c in candidates]
        first = runs[0].rewards
        out = []
        for c, r in zip(candidates, runs, strict=True):
            # Per-cycle line means are the paired units (tyres of one cycle share a batch).
            diff = (r.rewards - first).mean(axis=1)
            se = float(diff.std(ddof=1) / math.sqrt(diff.size)) if diff.size > 1 else 0.0
            out.append(
                ScreenResult(
                    c.name,
                    dict(c.setpoints),
                    r.mean_reward,
                    r.reject_rate,
                    r.rewards.size,
                    float(diff.mean()),
                    se,
                )
            )
        return out


# --------------------------------------------------------------------------- calibration


def _sse(offset: float, bias: float, x: F64, y: F64, cycle_s: float) -> float:
    p = (x[:, 3] - _MOONEY_BASE - offset) / _MOONEY_PER_P
    pred = quality(
        x[:, 0], x[:, 1] + bias, x[:, 2], batch_property=p, freshness=x[:, 4], cycle_s=cycle_s
    )
    return float(np.sum((y - pred) ** 2))


def _argmin(
    offsets: Iterable[float], biases: Iterable[float], x: F64, y: F64, cs: float
) -> tuple[float, float]:
    pairs = [(float(o), float(b)) for o in offsets for b in biases]
    return min(pairs, key=lambda ob: _sse(ob[0], ob[1], x, y, cs))


def calibrate(
    x: npt.ArrayLike,
    realised: npt.ArrayLike,
    *,
    cycle_s: float | None = None,
    batch_cycles: float = 12.0,
    offsets: Iterable[float] | None = None,
) -> TwinParams:
    """Fit a group's twin from tyres: ``x`` rows are the gateway's quality features
    (cure mean platen °C, cure mean bladder bar, cure s, Mooney, freshness), ``realised`` the
    measured moduli. Raises ``ValueError`` with fewer than 20 tyres."""
    xa = np.asarray(x, np.float64)
    y = np.asarray(realised, np.float64)
    ok = np.isfinite(xa).all(axis=1) & np.isfinite(y)
    xa, y = xa[ok], y[ok]
    if y.size < 20:
        raise ValueError(f"{y.size} tyres are too few to calibrate the twin (need 20)")
    cs = float(np.median(xa[:, 2]) / NOMINAL_CURE_F) if cycle_s is None else float(cycle_s)
    grid = np.arange(-30.0, 30.0001, 0.5) if offsets is None else np.asarray(list(offsets))
    o1, b1 = _argmin(grid, np.arange(-1.5, 1.5001, 0.25), xa, y, cs)
    best, bias = _argmin(
        np.arange(o1 - 0.5, o1 + 0.5001, 0.05), np.arange(b1 - 0.25, b1 + 0.2501, 0.05), xa, y, cs
    )
    p = (xa[:, 3] - _MOONEY_BASE - best) / _MOONEY_PER_P
    rms = math.sqrt(_sse(best, bias, xa, y, cs) / y.size)
    return TwinParams(
        material_mean=float(p.mean()),
        material_std=float(p.std(ddof=1)),
        mooney_offset=round(best, 3),
        pressure_bias=round(bias, 3),
        noise_mpa=rms,
        cycle_s=cs,
        batch_cycles=batch_cycles,
        rows=int(y.size),
        rms=rms,
    )


def calibrate_from_storage(
    storage_url: str,
    devices: Sequence[str],
    *,
    since_us: int | None = None,
    until_us: int | None = None,
    cycle_s: float | None = None,
) -> TwinParams:
    """:func:`calibrate` on a group's tyres rebuilt from the receiver's database with the
    gateway's own feature code (the model lifecycle's replay rows)."""
    from edgeos_cloud.models.replay import load_quality_rows

    rows = load_quality_rows(storage_url, devices, since_us=since_us, until_us=until_us)
    return calibrate(rows.x, rows.y, cycle_s=cycle_s)
