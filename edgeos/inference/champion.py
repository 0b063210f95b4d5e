"""Champion/challenger: a challenger runs in shadow on the champion's inputs, and a rule decides.

For every task with a challenger, :meth:`ChampionChallenger.run` invokes both models on the
same rows (only the champion's outputs are acted on) and records, per model:

* **agreement** with the champion (quality: predictions within the champion's ``sigma``;
  anomaly: same flag at each model's own threshold; correction: heater delta within 1 °C and
  pressure delta within 0.5 bar),
* **error against the realised quality** when the tyre is measured: quality → ``|ŷ − e|``;
  anomaly → ``flag ≠ (e out of spec)``; correction → ``|ŷ_baseline − e|`` on tyres made with the
  plant recipe (the only head whose outcome is observed for both models),
* **latency** of each invoke (the runner's histogram).

**Rule** (:class:`~edgeos.config.PromotionConfig`): once both models have ``min_samples``
realised errors since the last decision, the challenger is promoted when its mean error is at
least ``min_improvement`` (fraction) below the champion's; the champion is then demoted to
challenger and keeps running in shadow, so a promotion that turns out worse is reversed by the
same rule. Otherwise the champion is kept. Every decision, promotion and demotion is an event.

A model update always enters as a challenger (:meth:`on_models_updated`); only a task with no
champion at all takes a new model straight into service (there is nothing to compare with).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from edgeos.config import PromotionConfig
from edgeos.inference.errors import ModelRejected
from edgeos.inference.registry import LoadedModel, ModelRegistry, find_manifests

__all__ = ["ChampionChallenger", "ModelMetrics"]

log = logging.getLogger(__name__)

F32 = npt.NDArray[np.float32]


@dataclass(slots=True)
class ModelMetrics:
    """Running metrics of one model since the last decision (and in total)."""

    rows: int = 0
    agreed: int = 0
    compared: int = 0
    errors: list[float] = field(default_factory=list)
    total_samples: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "agreement": round(self.agreed / self.compared, 4) if self.compared else None,
            "samples": len(self.errors),
            "mean_error": round(float(np.mean(self.errors)), 5) if self.errors else None,
            "total_samples": self.total_samples,
        }


def _out_of_spec(model: LoadedModel, e: float) -> float:
    lo = model.manifest.thresholds.get("spec_min", 6.0)
    hi = model.manifest.thresholds.get("spec_max", 7.2)
    return float(not lo <= e <= hi)


class ChampionChallenger:
    """Shadow runs, metrics and the promotion rule over a :class:`ModelRegistry`."""

    def __init__(
        self,
        registry: ModelRegistry,
        promotion: PromotionConfig,
        *,
        emit: Callable[[dict[str, Any]], None],
        now: Callable[[], float],
    ) -> None:
        self.registry = registry
        self.promotion = promotion
        self._emit = emit
        self._now = now
        self.metrics: dict[str, ModelMetrics] = {}
        # (task, station) → (champion key, prediction, challenger key, prediction)
        self._pending: dict[tuple[str, int], tuple[str, float, str, float]] = {}
        #: Called with the task name after a promotion (the engine re-reads thresholds).
        self.on_swap: Callable[[str], None] = lambda task: None

    def _m(self, model: LoadedModel) -> ModelMetrics:
        return self.metrics.setdefault(model.key, ModelMetrics())

    # ------------------------------------------------------------------ shadow runs

    def run(self, task: str, x: npt.ArrayLike) -> tuple[F32, F32 | None]:
        """Champion outputs (a copy) and, when a challenger exists, its outputs in shadow."""
        champ = self.registry.champion(task)
        if champ is None:
            raise KeyError(f"no champion for task {task!r}")
        y = champ.runner.run(x).copy()
        self._m(champ).rows += y.shape[0]
        chall = self.registry.challenger(task)
        if chall is None:
            return y, None
        z = chall.runner.run(x).copy()
        m = self._m(chall)
        m.rows += z.shape[0]
        m.compared += z.shape[0]
        m.agreed += int(np.count_nonzero(self._agree(task, champ, chall, y, z)))
        return y, z

    def _agree(
        self, task: str, champ: LoadedModel, chall: LoadedModel, y: F32, z: F32
    ) -> npt.NDArray[np.bool_]:
        if task == "anomaly":
            a = y[:, 0] >= champ.manifest.threshold("score")
            b = z[:, 0] >= chall.manifest.threshold("score")
            return np.asarray(a == b)
        if task == "quality":
            sigma = champ.manifest.thresholds.get("sigma", 0.1)
            return np.asarray(np.abs(y[:, 0] - z[:, 0]) <= sigma)
        return np.asarray((np.abs(y[:, 0] - z[:, 0]) <= 1.0) & (np.abs(y[:, 1] - z[:, 1]) <= 0.5))

    def expect(self, task: str, station: int, champion: float, challenger: float | None) -> None:
        """Remember both predictions for ``station``'s current tyre (see the module docstring)."""
        champ = self.registry.champion(task)
        chall = self.registry.challenger(task)
        if champ is None or chall is None or challenger is None:
            return
        self._pending[(task, station)] = (champ.key, champion, chall.key, challenger)

    def realised(self, station: int, elasticity: float) -> None:
        """The tyre at ``station`` was measured: score both models of every task, then decide."""
        for task in ("anomaly", "quality", "correction"):
            pending = self._pending.pop((task, station), None)
            if pending is None:
                continue
            champ = self.registry.champion(task)
            chall = self.registry.challenger(task)
            if champ is None or chall is None:
                continue
            keys = {champ.key: champ, chall.key: chall}
            for key, pred in ((pending[0], pending[1]), (pending[2], pending[3])):
                model = keys.get(key)
                if model is None:  # the models changed while the tyre was curing
                    continue
                truth = _out_of_spec(model, elasticity) if task == "anomaly" else elasticity
                m = self._m(model)
                m.errors.append(abs(pred - truth))
                m.total_samples += 1
            self._decide(task)

    # ------------------------------------------------------------------ the rule

    def _decide(self, task: str) -> None:
        champ = self.registry.champion(task)
        chall = self.registry.challenger(task)
        if champ is None or chall is None:
            return
        mc, mh = self._m(champ), self._m(chall)
        need = self.promotion.min_samples
        if len(mc.errors) < need or len(mh.errors) < need:
            return
        e_champ = float(np.mean(mc.errors))
        e_chall = float(np.mean(mh.errors))
        promote = e_chall <= e_champ * (1.0 - self.promotion.min_improvement)
        base = {
            "task": task,
            "ts": self._now(),
            "samples": len(mh.errors),
            "champion_error": round(e_champ, 5),
            "challenger_error": round(e_chall, 5),
            "min_improvement": self.promotion.min_improvement,
        }
        for model, role, m in ((champ, "champion", mc), (chall, "challenger", mh)):
            self._emit(
                {
                    "type": "model_metrics",
                    "task": task,
                    "model": model.manifest.name,
                    "version": model.version,
                    "role": role,
                    "ts": base["ts"],
                    **m.as_dict(),
                    "latency": model.runner.latency.summary_ms(),
                }
            )
        mc.errors.clear()
        mh.errors.clear()
        mc.agreed = mc.compared = mh.agreed = mh.compared = 0
        if not promote:
            self._emit(
                {"type": "promotion_check", "outcome": "kept", "champion": champ.key, **base}
            )
            return
        self.registry.swap(task)
        log.info("promoted %s over %s (error %.4g vs %.4g)", chall.key, champ.key, e_chall, e_champ)
        self._emit(
            {
                "type": "model_promoted",
                "model": chall.manifest.name,
                "version": chall.version,
                "previous": champ.key,
                **base,
            }
        )
        self._emit(
            {
                "type": "model_demoted",
                "model": champ.manifest.name,
                "version": champ.version,
                "replaced_by": chall.key,
                "role": "challenger",
                **base,
            }
        )
        self.on_swap(task)

    # ------------------------------------------------------------------ updates

    def add(self, path: str | Path) -> LoadedModel:
        """Load one manifest as challenger (or champion when the task has none).

        Raises :class:`ModelRejected`; on failure nothing changes.
        """
        model = self.registry.load(path)
        task = model.task
        champ = self.registry.champion(task)
        if champ is None:
            self.registry.place(model, "champion")
            self._emit(self._update_event(model, "champion", None))
            self.on_swap(task)
            return model
        if champ.key == model.key:
            self._emit(self._update_event(model, "unchanged", None))
            return champ
        previous = self.registry.place(model, "challenger")
        if previous is not None and previous.key != model.key:
            self.metrics.pop(previous.key, None)
        # Fresh comparison window for both.
        self._m(champ).errors.clear()
        self.metrics[model.key] = ModelMetrics()
        self._pending = {k: v for k, v in self._pending.items() if k[0] != task}
        self._emit(self._update_event(model, "challenger", previous))
        return model

    def on_models_updated(self, path: str | Path) -> list[dict[str, Any]]:
        """Hook for the OTA agent: load every manifest in ``path`` as a challenger.

        ``path`` is a folder of manifests, or an installed models bundle (its ``models/``).

        Returns one result per manifest (``{"manifest", "ok", "model"|"error"}``). A rejected
        model (bad manifest, sha256 mismatch…) is reported as an event and skipped; the models
        in service are untouched.
        """
        results: list[dict[str, Any]] = []
        # A models bundle unpacks as ``<version>/models/*.toml`` (edgeos_protocol.bundle).
        manifests = find_manifests(path) or find_manifests(Path(path) / "models")
        for manifest in manifests:
            try:
                model = self.add(manifest)
            except ModelRejected as exc:
                log.warning("%s", exc)
                self._emit(
                    {
                        "type": "model_rejected",
                        "manifest": str(manifest),
                        "reason": exc.reason,
                        "ts": self._now(),
                    }
                )
                results.append({"manifest": str(manifest), "ok": False, "error": exc.reason})
                continue
            results.append({"manifest": str(manifest), "ok": True, "model": model.key})
        return results

    def _update_event(
        self, model: LoadedModel, role: str, replaced: LoadedModel | None
    ) -> dict[str, Any]:
        return {
            "type": "model_loaded",
            "task": model.task,
            "model": model.manifest.name,
            "version": model.version,
            "role": role,
            "replaced": replaced.key if replaced is not None else None,
            "ts": self._now(),
        }

    def stats(self) -> dict[str, Any]:
        return {
            "models": self.registry.describe(),
            "metrics": {k: m.as_dict() for k, m in self.metrics.items()},
        }
