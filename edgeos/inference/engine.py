"""The inference engine: what the runtime calls once per sample of the line.

Interface (small on purpose)::

    engine = InferenceEngine.from_config(config.inference, stations, tags, clock=clock)
    names = engine.input_tags          # (stations, len(KEY_SUFFIXES)) full tag names to read
    out = engine.step(values)          # values: the same shape, engineering units, NaN = bad
    out.writes                         # {tag: value} guarded set-point writes (limits checked)
    out.twin                           # {tag: value} gate outputs for the twin (PLC/MES reads)
    out.events                         # uplink events (verdicts, guard decisions, models, …)
    await engine.step_async(values)    # same, in a worker thread (large lines, slow CPUs)
    engine.set_learning(False)         # the operator switch
    engine.on_models_updated(path)     # OTA hook: new models enter as challengers
    engine.stats()                     # status surface

Per call, the engine advances a :class:`~edgeos_protocol.features.StationTracker` (cycle
phases, cure accumulators, anomaly windows), runs the anomaly model once on every station's
window in one batched invoke, and at the events of a cycle runs the other models on the stations
concerned: the quality gate when a cure ends, the shadow scoring when a tyre is measured, the
correction model and the guard when a tyre is loaded. Feed it at the sample period the models
were trained on (``sample_period_s`` in the manifests, 1 s for the committed ones).

**The default recipe.** The correction model proposes *deltas* against the recipe it was
trained with (its manifest's ``[baseline]``), and predicts the outcome of both. The plant's
default recipe in force is that baseline unless the configuration names a set-point for the
station's tag (``[inference] setpoints`` or a profile's ``setpoints``): then the guard's default
for that tag is the configured value, while the learned proposal stays the model's own recipe
(baseline + delta — the one its prediction is for). For such a station the model's predicted
default outcome is for a recipe that is not in force, so the guard bounds the default's reward
by the best reward there is (``E*``): learned actions are taken only on slack the line has
earned, never on a counterfactual nobody predicted, and the α budget stays honest. The
model's default-outcome prediction is not scored against such tyres either.
"""

from __future__ import annotations

import asyncio
import math
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from edgeos.clock import Clock, SystemClock
from edgeos.config import AnyTag, GateConfig, GuardConfig, InferenceConfig, PromotionConfig
from edgeos.config_models import RECIPE_SUFFIXES
from edgeos.inference.champion import ChampionChallenger
from edgeos.inference.errors import ModelRejected
from edgeos.inference.gates import GateVerdict, QualityGate
from edgeos.inference.guard import ActuationGuard, GuardDecision
from edgeos.inference.registry import LoadedModel, ModelRegistry
from edgeos_protocol.features import CURE, KEY_SUFFIXES, Observation, StationTracker

__all__ = ["RECIPE_SUFFIXES", "EngineOutput", "InferenceEngine"]

F64 = npt.NDArray[np.float64]
_STATE_COL = KEY_SUFFIXES.index("cycle.state")
#: Columns of the set-points the guard writes (:data:`RECIPE_SUFFIXES`) in the engine's input
#: (read back when a cure starts).
_SETPOINT_COLS = {k: KEY_SUFFIXES.index(k) for k in RECIPE_SUFFIXES}
#: Correction inputs further than this many training standard deviations from the training mean
#: are out of distribution: the model's bounds do not hold there, so the guard takes the default.
OOD_Z = 4.0

#: Default recipe per station: ``baseline(stations) → {suffix: values}``.
BaselineFn = Callable[[npt.NDArray[np.int64]], Mapping[str, F64]]


@dataclass(slots=True)
class EngineOutput:
    """What one :meth:`InferenceEngine.step` produced."""

    verdicts: list[GateVerdict] = field(default_factory=list)
    decisions: list[GuardDecision] = field(default_factory=list)
    writes: dict[str, float] = field(default_factory=dict)
    twin: dict[str, float] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)


class InferenceEngine:
    """Check gates, champion/challenger and guarded actuation for one line of stations."""

    def __init__(
        self,
        registry: ModelRegistry,
        stations: Sequence[str],
        tags: Mapping[str, AnyTag],
        *,
        guard: GuardConfig | None = None,
        promotion: PromotionConfig | None = None,
        clock: Clock | None = None,
        baseline: BaselineFn | None = None,
        setpoints: Mapping[str, float] | None = None,
        gate: GateConfig | None = None,
    ) -> None:
        self.registry = registry
        self.stations = tuple(stations)
        self.clock: Clock = clock or SystemClock()
        self.tracker = StationTracker(len(self.stations))
        self._events: list[dict[str, Any]] = []
        self.cc = ChampionChallenger(
            registry, promotion or PromotionConfig(), emit=self._events.append, now=self.clock.time
        )
        self.cc.on_swap = self._follow_models
        self._guard_config = guard or GuardConfig()
        self._tags = dict(tags)
        self._baseline_fn = baseline
        #: The configured default recipe by full tag name (overrides the model's baseline).
        self.setpoints = dict(setpoints or {})
        self._gate_config = gate or GateConfig()
        self.gate: QualityGate | None = None
        self.guard: ActuationGuard | None = None
        self._cure_max = np.zeros(len(self.stations))
        self._scores = np.zeros(len(self.stations))
        # Largest challenger anomaly score during the current cure (shadow scoring).
        self._cure_z = np.zeros(len(self.stations))
        self._lock = threading.Lock()
        self.steps = 0
        self._follow_models("quality")
        self._follow_models("correction")

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_config(
        cls,
        config: InferenceConfig,
        stations: Sequence[str],
        tags: Mapping[str, AnyTag],
        *,
        clock: Clock | None = None,
        backend: str | None = None,
        baseline: BaselineFn | None = None,
    ) -> InferenceEngine:
        """Load every ``[[inference.models]]`` entry in its role; raises ``ModelRejected``."""
        registry = ModelRegistry(max_batch=max(len(stations), 1), backend=backend)
        for ref in config.models:
            registry.place(registry.load(ref.manifest), ref.role)
        for task in {m.task for _, m in registry}:
            if registry.champion(task) is None:
                raise ModelRejected(task, "a challenger is configured but no champion")
        return cls(
            registry,
            stations,
            tags,
            guard=config.guard,
            promotion=config.promotion,
            clock=clock,
            baseline=baseline,
            setpoints=config.setpoints,
            gate=config.gate,
        )

    @classmethod
    def from_manifests(
        cls,
        champions: Sequence[str | Path],
        stations: Sequence[str],
        tags: Mapping[str, AnyTag],
        *,
        challengers: Sequence[str | Path] = (),
        backend: str | None = None,
        **kwargs: Any,
    ) -> InferenceEngine:
        """Convenience for tools and tests: manifests by path, champions then challengers."""
        registry = ModelRegistry(max_batch=max(len(stations), 1), backend=backend)
        for path in champions:
            registry.place(registry.load(path), "champion")
        for path in challengers:
            registry.place(registry.load(path), "challenger")
        return cls(registry, stations, tags, **kwargs)

    def _follow_models(self, task: str) -> None:
        quality = self.registry.champion("quality")
        anomaly = self.registry.champion("anomaly")
        if quality is not None:
            if self.gate is None:
                self.gate = QualityGate(
                    quality.manifest,
                    anomaly.manifest if anomaly else None,
                    p_scrap=self._gate_config.p_scrap,
                    p_correct=self._gate_config.p_correct,
                )
            else:
                self.gate.set_models(quality.manifest, anomaly.manifest if anomaly else None)
        corr = self.registry.champion("correction")
        if corr is not None and self.guard is None:
            m = corr.manifest
            self.guard = ActuationGuard(
                self._guard_config,
                self._tags,
                target=m.thresholds.get("target", 6.6),
                k=m.thresholds.get("confidence_k", 2.0),
            )

    # ------------------------------------------------------------------ interface

    @property
    def input_tags(self) -> list[list[str]]:
        """Full tag names the runtime reads for :meth:`step`, one row per station."""
        return [[f"{s}.{k}" for k in KEY_SUFFIXES] for s in self.stations]

    def set_learning(self, enabled: bool, who: str = "operator") -> dict[str, Any]:
        """The operator switch for learned actions (takes effect at the next decision)."""
        if self.guard is None:
            event = {
                "type": "guard_switch",
                "learning": False,
                "requested": enabled,
                "by": who,
                "ts": self.clock.time(),
            }
        else:
            event = self.guard.set_learning(enabled, ts=self.clock.time(), who=who)
        self._events.append(event)
        return event

    def on_models_updated(self, path: str | Path) -> list[dict[str, Any]]:
        """OTA hook: every manifest in ``path`` is verified and enters as a challenger."""
        with self._lock:
            return self.cc.on_models_updated(path)

    async def step_async(self, values: npt.ArrayLike) -> EngineOutput:
        """:meth:`step` in a worker thread, so the event loop keeps its scan deadlines."""
        return await asyncio.to_thread(self.step, values)

    def step(self, values: npt.ArrayLike) -> EngineOutput:
        """Advance one sample: ``values`` is ``(stations, len(KEY_SUFFIXES))``."""
        with self._lock:
            return self._step(np.asarray(values, dtype=np.float64))

    # ------------------------------------------------------------------ the work

    def _step(self, v: F64) -> EngineOutput:
        out = EngineOutput()
        ts = self.clock.time()
        now = self.clock.monotonic()
        obs = self.tracker.observe(v)
        self.steps += 1
        names = self.stations

        anomaly = self.registry.champion("anomaly")
        if anomaly is not None and bool(self.tracker.window_full.all()):
            y, z = self.cc.run("anomaly", self.tracker.window)
            self._scores[:] = y[:, 0]
            in_cure = v[:, _STATE_COL] == CURE
            self._cure_max = np.where(in_cure, np.maximum(self._cure_max, y[:, 0]), self._cure_max)
            if z is not None:
                self._cure_z = np.where(in_cure, np.maximum(self._cure_z, z[:, 0]), self._cure_z)

        # 1. Cures that ended: judge the tyre.
        if obs.cure_ended.size and self.gate is not None:
            idx = obs.cure_ended
            y, z = self.cc.run("quality", obs.quality_x)
            verdicts = self.gate.judge([names[i] for i in idx], y[:, 0], self._cure_max[idx], ts)
            for k, i in enumerate(idx.tolist()):
                self.cc.expect("quality", i, float(y[k, 0]), None if z is None else float(z[k, 0]))
                if anomaly is not None:
                    self._expect_anomaly(i)
            for verdict in verdicts:
                out.verdicts.append(verdict)
                out.events.append(verdict.event())
                out.twin.update(verdict.twin_values())

        # 2. Tyres measured: score the models, settle the guard's budget.
        for k, i in enumerate(obs.completed.tolist()):
            e = float(obs.realised[k])
            if not math.isfinite(e):
                continue
            self.cc.realised(i, e)
            if self.guard is not None:
                settled = self.guard.settle(names[i], e, int(obs.count[k]))
                if settled is not None:
                    out.events.append(settled | {"ts": ts})

        # 3. Tyres loaded: propose a recipe, let the guard decide.
        if obs.loaded.size:
            self._cure_max[obs.loaded] = 0.0
            self._cure_z[obs.loaded] = 0.0
            if self.registry.champion("correction") is not None and self.guard is not None:
                self._correct(obs, now, out)

        # 4. Cures that started: the recipe in force is the one the tyre is accounted by.
        if obs.cure_started.size and self.guard is not None:
            for i in obs.cure_started.tolist():
                s = names[i]
                self.guard.confirm(
                    s, {f"{s}.{k}": float(v[i, c]) for k, c in _SETPOINT_COLS.items()}
                )

        if anomaly is not None:
            for i, s in enumerate(names):
                out.twin[f"{s}.gate.anomaly"] = round(float(self._scores[i]), 4)
        out.events.extend(self._events)
        self._events.clear()
        return out

    def _expect_anomaly(self, i: int) -> None:
        champ = self.registry.champion("anomaly")
        chall = self.registry.challenger("anomaly")
        if champ is None or chall is None:
            return
        flag_c = float(self._cure_max[i] >= champ.manifest.threshold("score"))
        flag_z = float(self._cure_z[i] >= chall.manifest.threshold("score"))
        self.cc.expect("anomaly", i, flag_c, flag_z)

    def _doubts(self, obs: Observation, m: Any) -> list[str | None]:
        """Why each loaded station's correction inputs cannot be trusted (None: they can)."""
        x = obs.correction_x
        mean = np.asarray(m.mean, dtype=np.float64)
        std = np.maximum(np.asarray(m.std, dtype=np.float64), 1e-12)
        zs = np.abs((x - mean) / std)
        known = self.tracker.batch_known
        out: list[str | None] = []
        for k, i in enumerate(obs.loaded.tolist()):
            if not bool(obs.load_ok[k]):
                out.append(
                    "batch history unknown (cold start)"
                    if not bool(known[i])
                    else "load not seen with a consistent sample (previous tyre unmeasured)"
                )
                continue
            far = np.flatnonzero(~(zs[k] <= OOD_Z))
            if far.size:
                j = int(far[0])
                out.append(
                    f"{m.features[j]} = {x[k, j]:.4g} outside the training range (|z| > {OOD_Z:g})"
                )
                continue
            out.append(None)
        return out

    def _correct(self, obs: Observation, now: float, out: EngineOutput) -> None:
        champ = self.registry.champion("correction")
        assert champ is not None and self.guard is not None
        m = champ.manifest
        idx, x = obs.loaded, obs.correction_x
        doubts = self._doubts(obs, m)
        y, z = self.cc.run("correction", x)
        frame = self._baseline(idx, m)
        i_h, i_p = m.output_index("heater.sp.delta"), m.output_index("press.sp.delta")
        i_eb, i_ep = m.output_index("elasticity.baseline"), m.output_index("elasticity.proposed")
        sig_b = m.threshold("sigma_baseline")
        sig_p = m.threshold("sigma_proposed")
        for k, i in enumerate(idx.tolist()):
            station = self.stations[i]
            model_recipe = {s: float(frame[s][k]) for s in frame}
            proposal = {
                "heater.sp": model_recipe["heater.sp"] + float(y[k, i_h]),
                "press.sp": model_recipe["press.sp"] + float(y[k, i_p]),
            }
            baseline = {s: self.setpoints.get(f"{station}.{s}", v) for s, v in model_recipe.items()}
            # The model's default-outcome prediction holds only for the recipe it was made for.
            moved = baseline != model_recipe
            decision = self.guard.decide(
                station,
                baseline=baseline,
                proposal=proposal,
                predicted_default=float(y[k, i_eb]),
                sigma_default=math.inf if moved else sig_b,
                predicted_learned=float(y[k, i_ep]),
                sigma_learned=sig_p,
                now=now,
                doubt=doubts[k],
                tyre=int(obs.load_count[k]),
            )
            if decision.action == "default" and not moved:
                self.cc.expect(
                    "correction", i, float(y[k, i_eb]), None if z is None else float(z[k, i_eb])
                )
            out.decisions.append(decision)
            out.events.append(decision.event())
            out.writes.update(decision.writes)

    def _baseline(self, idx: npt.NDArray[np.int64], m: Any) -> Mapping[str, F64]:
        if self._baseline_fn is not None:
            return self._baseline_fn(idx)
        # The recipe the correction model was trained against (its manifest's [baseline]).
        return {s: np.full(idx.size, v) for s, v in m.baseline.items()}

    # ------------------------------------------------------------------ status

    def stats(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "stations": len(self.stations),
            "gate": self.gate.stats() if self.gate is not None else None,
            "guard": self.guard.stats() if self.guard is not None else None,
            "setpoints": dict(self.setpoints),
            "models": self.cc.stats(),
            "runners": {m.key: m.runner.stats() for _, m in self.registry},
        }

    def models(self) -> list[LoadedModel]:
        return [m for _, m in self.registry]
