"""Check gates: model outputs → a verdict per station and tyre (continue / correct / scrap).

The gate judges a tyre when its cure ends, before it is measured: the quality model predicts
its elastic modulus ``ŷ`` and the manifest gives the model's residual ``sigma`` and the spec
limits. With a normal error model the probability that the tyre is out of spec is::

    p_out = Φ((spec_min − ŷ) / σ) + 1 − Φ((spec_max − ŷ) / σ)

* ``scrap``     when ``p_out ≥ p_scrap`` (manifest, default 0.5; a configuration profile's
  ``gate.p_scrap`` / ``[inference.gate]`` overrides it, and ``p_correct`` alike, for every
  quality model the gate follows); confidence = ``p_out``;
* ``correct``   when ``p_out ≥ p_correct`` (the tyre is probably fine but the station drifts
  towards a limit), or when the anomaly score seen during the cure reached the anomaly model's
  threshold (the process looks abnormal: a leak, a weak heater); confidence = ``1 − p_out`` for
  the first reason, ``1 − exp(−score / threshold)`` (≥ 0.63 at the threshold) for the second;
* ``continue``  otherwise; confidence = ``1 − p_out``.

A verdict leaves the gate three ways: as twin values a PLC or MES can read
(``<station>.gate.verdict`` = 0/1/2, ``.gate.confidence``, ``.gate.elasticity``), as an uplink
event (``type = "verdict"``), and as counters for the status surface.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from edgeos_protocol.manifest import Manifest

__all__ = ["VERDICT_CODES", "GateVerdict", "QualityGate", "Verdict"]

Verdict = Literal["continue", "correct", "scrap"]
#: Numeric code of each verdict in the ``<station>.gate.verdict`` twin tag.
VERDICT_CODES: dict[str, int] = {"continue": 0, "correct": 1, "scrap": 2}

F64 = npt.NDArray[np.float64]


_SQRT2 = math.sqrt(2.0)


def _phi(z: F64) -> F64:
    """Standard normal CDF, no scipy (a plain loop beats ``np.vectorize`` for a few rows)."""
    return np.fromiter((0.5 * (1.0 + math.erf(v / _SQRT2)) for v in z.tolist()), np.float64, z.size)


@dataclass(frozen=True, slots=True)
class GateVerdict:
    """One verdict on one tyre."""

    station: str
    verdict: Verdict
    reason: str
    confidence: float
    model: str
    version: str
    ts: float
    predicted: float
    p_out: float
    anomaly_score: float

    def event(self) -> dict[str, Any]:
        """The uplink event (plain dict, msgpack-able)."""
        return {
            "type": "verdict",
            "station": self.station,
            "verdict": self.verdict,
            "reason": self.reason,
            "confidence": round(self.confidence, 4),
            "model": self.model,
            "version": self.version,
            "ts": self.ts,
            "predicted": round(self.predicted, 4),
            "anomaly_score": round(self.anomaly_score, 4),
        }

    def twin_values(self) -> dict[str, float]:
        """Values for the twin, by full tag name."""
        return {
            f"{self.station}.gate.verdict": float(VERDICT_CODES[self.verdict]),
            f"{self.station}.gate.confidence": round(self.confidence, 4),
            f"{self.station}.gate.elasticity": round(self.predicted, 4),
        }


class QualityGate:
    """Turns quality predictions (and anomaly scores) into verdicts; counts them."""

    def __init__(
        self,
        quality: Manifest,
        anomaly: Manifest | None = None,
        *,
        p_scrap: float | None = None,
        p_correct: float | None = None,
    ) -> None:
        #: The configuration's thresholds; they outlive a promotion (``None``: the manifest's).
        self.overrides = (p_scrap, p_correct)
        self.set_models(quality, anomaly)
        self.counts: Counter[str] = Counter()
        self.by_station: dict[str, Counter[str]] = {}

    def set_models(self, quality: Manifest, anomaly: Manifest | None) -> None:
        """Follow a promotion: thresholds come from the serving models' manifests."""
        self.quality = quality
        self.spec_min = quality.threshold("spec_min")
        self.spec_max = quality.threshold("spec_max")
        self.sigma = max(quality.threshold("sigma"), 1e-6)
        p_scrap, p_correct = self.overrides
        self.p_scrap = p_scrap if p_scrap is not None else quality.thresholds.get("p_scrap", 0.5)
        self.p_correct = (
            p_correct if p_correct is not None else quality.thresholds.get("p_correct", 0.2)
        )
        self.anomaly = anomaly
        self.anomaly_threshold = anomaly.threshold("score") if anomaly is not None else math.inf

    def p_out(self, predicted: F64) -> F64:
        """Probability that each tyre is out of spec given the prediction."""
        lo = _phi((self.spec_min - predicted) / self.sigma)
        hi = 1.0 - _phi((self.spec_max - predicted) / self.sigma)
        result: F64 = np.clip(lo + hi, 0.0, 1.0)
        return result

    def judge(
        self,
        stations: list[str],
        predicted: npt.ArrayLike,
        anomaly_scores: npt.ArrayLike,
        ts: float,
    ) -> list[GateVerdict]:
        pred = np.asarray(predicted, dtype=np.float64)
        scores = np.asarray(anomaly_scores, dtype=np.float64)
        p_out = self.p_out(pred)
        out: list[GateVerdict] = []
        q = self.quality
        for i, station in enumerate(stations):
            y, p, s = float(pred[i]), float(p_out[i]), float(scores[i])
            verdict: Verdict
            if p >= self.p_scrap:
                verdict = "scrap"
                side = (
                    f"below spec min {self.spec_min:g}"
                    if y < self.spec_min
                    else f"above spec max {self.spec_max:g}"
                    if y > self.spec_max
                    else "at the spec limit"
                )
                reason = f"predicted elasticity {y:.2f} MPa {side} (P(out of spec)={p:.2f})"
                conf = p
            elif p >= self.p_correct:
                verdict = "correct"
                reason = f"predicted elasticity {y:.2f} MPa near a spec limit (P(out)={p:.2f})"
                conf = 1.0 - p
            elif s >= self.anomaly_threshold:
                verdict = "correct"
                reason = f"anomaly score {s:.2f} >= {self.anomaly_threshold:.2f} during the cure"
                conf = 1.0 - math.exp(-s / self.anomaly_threshold)
            else:
                verdict = "continue"
                reason = f"predicted elasticity {y:.2f} MPa in spec"
                conf = 1.0 - p
            v = GateVerdict(station, verdict, reason, conf, q.name, q.version, ts, y, p, s)
            self.counts[verdict] += 1
            self.by_station.setdefault(station, Counter())[verdict] += 1
            out.append(v)
        return out

    def stats(self) -> dict[str, Any]:
        return {
            "verdicts": dict(self.counts),
            "model": self.quality.key,
            "p_scrap": self.p_scrap,
            "p_correct": self.p_correct,
        }
