"""The automatic quality gate every new version passes before it can be published.

Checks, in order (every check runs and is reported, so a refused version says everything that
is wrong with it, not only the first thing):

``integrity``   manifest schema, sha256 of the ``.tflite``, the task's input/output contract
                (:func:`edgeos_protocol.manifest.contract_issues`: the gateway's feature names,
                window, outputs, thresholds), and the LiteRT interpreter loads the flatbuffer with
                the declared shapes.
``golden``      the version's golden inputs reproduce its golden outputs on the **LiteRT
                interpreter the gateways run** (``ai-edge-litert``) within 1e-4.
``finite``      no NaN/inf over the replay rows and over adversarial edge inputs: every input at
                the limits of its range (the wider of the replay set's min/max and the manifest's
                mean ± 6 std), alone and in corners.
``budget``      median invoke time at batch 1 and the file size within the target's budget.
``accuracy``    on the held-out replay rows drawn from the fleet's stored data, the candidate's
                error is compared with the current champion's on *exactly the same rows*, each
                task by the metric the gateway's champion/challenger rule uses:
                quality — RMS of predicted vs realised modulus; anomaly — share of tyres
                misjudged (largest cure score ≥ threshold vs realised out of spec); correction —
                RMS of the baseline head vs the realised modulus of tyres run with the plant
                recipe. Refused when worse than ``champion × (1 + tolerance)`` (a rate: plus
                1/n). The report gives both values, the paired difference, its standard error
                and the confidence that the candidate is better (normal approximation).

The report (a JSON-able dict) is stored with the version by :meth:`ModelRegistry.set_status`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from edgeos_cloud.models.errors import LifecycleError
from edgeos_cloud.models.litert import LiteModel, interpreter_version
from edgeos_cloud.models.replay import AnomalyRows, QualityRows
from edgeos_protocol.manifest import (
    Manifest,
    ManifestError,
    contract_issues,
    load_manifest,
    read_verified,
)

__all__ = ["Check", "GateConfig", "GateReport", "load_version", "run_gate"]

F64 = npt.NDArray[np.float64]


@dataclass(frozen=True, slots=True)
class GateConfig:
    """The gate's limits (``[gate]`` in the lifecycle configuration)."""

    #: Candidate RMS may exceed the champion's by this fraction at most.
    tolerance: float = 0.05
    #: Fewer held-out rows than this: the accuracy check is deferred, not passed.
    min_rows: int = 30
    #: Median single-row invoke time on the gate's machine (µs).
    latency_budget_us: float = 500.0
    #: Largest ``.tflite`` the target takes (bytes).
    max_bytes: int = 256 * 1024
    #: Golden outputs must match within this (absolute and relative).
    golden_tolerance: float = 1e-4


@dataclass(slots=True)
class Check:
    name: str
    ok: bool
    detail: str
    values: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class GateReport:
    model: str
    passed: bool
    checks: list[Check]
    interpreter: str
    seconds: float
    champion: str | None = None

    @property
    def reasons(self) -> list[str]:
        return [f"{c.name}: {c.detail}" for c in self.checks if not c.ok]

    def summary(self) -> str:
        if self.passed:
            return "passed: " + "; ".join(f"{c.name}: {c.detail}" for c in self.checks)
        return "refused: " + "; ".join(self.reasons)

    def as_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "passed": self.passed,
            "reasons": self.reasons,
            "champion": self.champion,
            "interpreter": self.interpreter,
            "seconds": round(self.seconds, 4),
            "checks": [asdict(c) for c in self.checks],
        }


@dataclass(slots=True)
class LoadedVersion:
    manifest: Manifest
    model: LiteModel | None
    blob: bytes
    problems: list[str]


def load_version(model_dir: Path) -> LoadedVersion:
    """Manifest + verified bytes + LiteRT model of a version folder; problems are collected."""
    manifests = sorted(model_dir.glob("*.toml"))
    if len(manifests) != 1:
        raise LifecycleError(f"{model_dir} must hold exactly one manifest, found {len(manifests)}")
    try:
        manifest = load_manifest(manifests[0])
    except ManifestError as exc:
        raise LifecycleError(f"manifest: {exc.reason}") from exc
    problems = [f"contract: {issue}" for issue in contract_issues(manifest)]
    try:
        blob = read_verified(manifest)
    except ManifestError as exc:
        return LoadedVersion(manifest, None, b"", [*problems, exc.reason])
    try:
        model = LiteModel(
            blob,
            input_shape=manifest.input_shape,
            output_width=len(manifest.outputs),
            mean=manifest.mean,
            std=manifest.std,
        )
    except LifecycleError as exc:
        return LoadedVersion(manifest, None, blob, [*problems, str(exc)])
    return LoadedVersion(manifest, model, blob, problems)


def edge_inputs(
    manifest: Manifest, replay_x: npt.NDArray[np.floating[Any]] | None, *, seed: int = 0
) -> F64:
    """Adversarial rows at the limits of every input's range (see the module docstring)."""
    mean = np.asarray(manifest.mean)
    std = np.asarray(manifest.std)
    lo, hi = mean - 6 * std, mean + 6 * std
    if replay_x is not None and replay_x.size:
        flat = replay_x.reshape(-1, len(mean))
        lo = np.minimum(lo, np.nanmin(flat, axis=0))
        hi = np.maximum(hi, np.nanmax(flat, axis=0))
    rows = [lo, hi, mean]
    for j in range(len(mean)):
        for v in (lo[j], hi[j]):
            r = mean.copy()
            r[j] = v
            rows.append(r)
    rng = np.random.default_rng(seed)
    corners = np.where(rng.random((64, len(mean))) < 0.5, lo, hi)
    x = np.vstack([np.array(rows), corners])
    if manifest.window > 1:
        x = np.repeat(x[:, None, :], manifest.window, axis=1)
    result: F64 = x
    return result


#: Loads within this of the plant recipe (°C, bar) ran the plant recipe (correction replay).
PLANT_RECIPE_TOL = 0.05


def _compare(
    metric: str,
    err_c: F64,
    err_h: F64 | None,
    n: int,
    cfg: GateConfig,
    *,
    unit: str,
    resolution: float = 0.0,
) -> Check:
    """Candidate vs champion on the same rows: ``metric`` of the per-row errors.

    ``rms`` compares root-mean-square errors, ``rate`` mean 0/1 errors (misjudged tyres; the
    limit gets one row's worth of ``resolution``: a rate on n rows is not finer than 1/n).
    """

    def score(e: F64) -> float:
        return float(np.sqrt(np.mean(e**2))) if metric == "rms" else float(np.mean(e))

    s_c = score(err_c)
    values: dict[str, Any] = {"rows": n, "metric": metric, f"candidate_{metric}": round(s_c, 5)}
    if not np.isfinite(s_c):
        return Check("accuracy", False, "candidate error is not finite", values)
    if err_h is None:
        return Check(
            "accuracy", True, f"{metric} {s_c:.4f}{unit} on {n} rows (no champion)", values
        )
    s_h = score(err_h)
    d = (err_c**2 - err_h**2) if metric == "rms" else (err_c - err_h)
    se = float(d.std(ddof=1) / math.sqrt(n)) if n > 1 else math.inf
    mean_d = float(d.mean())
    # A zero spread: the sign of the difference decides outright.
    z = -mean_d / se if se > 0 else math.copysign(math.inf, -mean_d) if mean_d else 0.0
    confidence = 0.5 * (1.0 + math.erf(z / math.sqrt(2.0))) if math.isfinite(z) else float(z > 0)
    limit = s_h * (1.0 + cfg.tolerance) + resolution
    values.update(
        {f"champion_{metric}": round(s_h, 5)},
        limit=round(limit, 5),
        tolerance=cfg.tolerance,
        paired_diff=round(mean_d, 6),
        paired_se=round(se, 6),
        confidence_better=round(confidence, 4),
        ratio=round(s_c / s_h, 4) if s_h > 0 else None,
    )
    ok = s_c <= limit
    verdict = "within" if ok else "worse than"
    return Check(
        "accuracy",
        ok,
        f"{metric} {s_c:.4f} vs champion {s_h:.4f}{unit} on the same {n} rows ({verdict} the "
        f"limit {limit:.4f}; P(candidate better) = {confidence:.3f})",
        values,
    )


def _too_few(n: int, cfg: GateConfig, what: str) -> Check | None:
    if n < cfg.min_rows:
        return Check(
            "accuracy",
            False,
            f"deferred: {n} held-out {what}, need {cfg.min_rows}",
            {"rows": n},
        )
    return None


def _accuracy(
    cand: LiteModel, champ: LiteModel | None, rows: QualityRows | None, cfg: GateConfig
) -> Check:
    """Quality: RMS of predicted vs realised modulus."""
    if rows is None:
        return Check("accuracy", False, "no replay set (the receiver database gave no rows)")
    n = len(rows.y)
    few = _too_few(n, cfg, "rows with realised quality")
    if few is not None:
        return few
    ec = cand.run(rows.x)[:, 0].astype(np.float64) - rows.y
    eh = None if champ is None else champ.run(rows.x)[:, 0].astype(np.float64) - rows.y
    return _compare("rms", ec, eh, n, cfg, unit=" MPa")


def _anomaly_errors(model: LiteModel, threshold: float, rows: AnomalyRows) -> F64:
    """Per tyre: 1 when the flag (largest cure score ≥ threshold) ≠ out of spec (the gateway's)."""
    scores = model.run(rows.windows)[:, 0].astype(np.float64)
    per_tyre = np.full(len(rows), -np.inf)
    np.maximum.at(per_tyre, rows.tyre, scores)
    flags = per_tyre >= threshold
    result: F64 = (flags != (rows.y > 0.5)).astype(np.float64)
    return result


def _accuracy_anomaly(
    cand: LoadedVersion, champ: LoadedVersion | None, rows: AnomalyRows | None, cfg: GateConfig
) -> Check:
    """Anomaly: share of held-out tyres misjudged (flag vs realised out of spec)."""
    if rows is None:
        return Check("accuracy", False, "no replay set (the receiver database gave no tyres)")
    n = len(rows)
    few = _too_few(n, cfg, "tyres with a realised outcome")
    if few is not None:
        return few
    assert cand.model is not None
    ec = _anomaly_errors(cand.model, cand.manifest.threshold("score"), rows)
    eh = None
    if champ is not None and champ.model is not None:
        eh = _anomaly_errors(champ.model, champ.manifest.threshold("score"), rows)
    check = _compare("rate", ec, eh, n, cfg, unit="", resolution=1.0 / n)
    out = rows.y > 0.5
    check.values["out_of_spec_rows"] = int(out.sum())
    check.values["candidate_false_alarms"] = int(((ec > 0) & ~out).sum())
    if eh is not None:
        check.values["champion_false_alarms"] = int(((eh > 0) & ~out).sum())
    return check


def _baseline_errors(loaded: LoadedVersion, rows: QualityRows) -> F64:
    assert loaded.model is not None
    head = loaded.manifest.output_index("elasticity.baseline")
    result: F64 = loaded.model.run(rows.x)[:, head].astype(np.float64) - rows.y
    return result


def plant_recipe_rows(rows: QualityRows, baseline: dict[str, float]) -> QualityRows:
    """The correction rows whose tyre ran the plant recipe (``baseline``)."""
    if rows.applied is None or not len(rows):
        return rows.take(np.zeros(len(rows), np.bool_))
    base = np.array([baseline.get("heater.sp", 160.0), baseline.get("press.sp", 15.0)])
    mask = np.all(np.abs(rows.applied - base) <= PLANT_RECIPE_TOL, axis=1)
    return rows.take(mask)


def _accuracy_correction(
    cand: LoadedVersion, champ: LoadedVersion | None, rows: QualityRows | None, cfg: GateConfig
) -> Check:
    """Correction: RMS of the baseline head vs the realised modulus of tyres run with the plant
    recipe — the only head whose outcome is observed for both models (the gateway's metric)."""
    if rows is None:
        return Check("accuracy", False, "no replay set (the receiver database gave no loads)")
    baseline = dict((champ or cand).manifest.baseline)
    plant = plant_recipe_rows(rows, baseline)
    n = len(plant)
    few = _too_few(n, cfg, f"loads run with the plant recipe (of {len(rows)} loads)")
    if few is not None:
        return few
    ec = _baseline_errors(cand, plant)
    eh = _baseline_errors(champ, plant) if champ is not None and champ.model is not None else None
    check = _compare("rms", ec, eh, n, cfg, unit=" MPa (baseline head, plant recipe)")
    check.values["loads"] = len(rows)
    return check


def run_gate(
    model_dir: Path,
    *,
    champion_dir: Path | None = None,
    replay: QualityRows | AnomalyRows | None = None,
    config: GateConfig | None = None,
) -> GateReport:
    """Run every check on the version in ``model_dir`` (see the module docstring)."""
    cfg = config or GateConfig()
    t0 = time.perf_counter()
    checks: list[Check] = []
    version = load_version(model_dir)
    m = version.manifest
    checks.append(
        Check(
            "integrity",
            not version.problems,
            "; ".join(version.problems) or "schema, sha256, contract and interpreter load ok",
            {"sha256": m.sha256, "bytes": len(version.blob)},
        )
    )
    model = version.model
    champ_key = None
    champ_model = None
    champ: LoadedVersion | None = None
    if champion_dir is not None:
        champ = load_version(champion_dir)
        champ_key = champ.manifest.key
        champ_model = champ.model
    if model is None:
        return GateReport(
            m.key, False, checks, interpreter_version(), time.perf_counter() - t0, champ_key
        )

    golden = model_dir / "golden.npz"
    if not golden.exists():
        checks.append(Check("golden", False, "no golden.npz with the version"))
    else:
        with np.load(golden) as data:
            gx, gy = data["x"], data["y"]
        y = model.run(gx)
        err = float(np.max(np.abs(y - gy))) if y.size else 0.0
        tol = cfg.golden_tolerance
        ok = bool(np.allclose(y, gy, rtol=tol, atol=tol)) and y.shape == gy.shape
        checks.append(
            Check(
                "golden",
                ok,
                f"{gx.shape[0]} golden rows reproduced on LiteRT, max error {err:.2e}"
                if ok
                else f"golden outputs differ on LiteRT (max error {err:.3g} > {tol})",
                {"rows": int(gx.shape[0]), "max_abs_error": err},
            )
        )

    use_replay = replay is not None and replay.task == m.task and len(replay.y) > 0
    replay_x = replay.x if use_replay and replay is not None else None
    edges = edge_inputs(m, replay_x)
    bad_edges = int((~np.isfinite(model.run(edges))).any(axis=1).sum())
    bad_replay = 0
    if replay_x is not None:
        bad_replay = int((~np.isfinite(model.run(replay_x))).any(axis=1).sum())
    checks.append(
        Check(
            "finite",
            bad_edges == 0 and bad_replay == 0,
            f"non-finite outputs on {bad_edges} of {len(edges)} edge inputs and {bad_replay} "
            f"replay rows",
            {"edge_rows": len(edges), "bad_edge_rows": bad_edges, "bad_replay_rows": bad_replay},
        )
    )

    latency_us = model.time_invoke(1) * 1e6
    size = len(version.blob)
    ok = latency_us <= cfg.latency_budget_us and size <= cfg.max_bytes
    checks.append(
        Check(
            "budget",
            ok,
            f"invoke {latency_us:.1f} µs (budget {cfg.latency_budget_us:g}), {size} bytes "
            f"(budget {cfg.max_bytes})",
            {"latency_us": round(latency_us, 3), "bytes": size},
        )
    )

    judged = replay if use_replay else None
    if m.task == "quality":
        assert judged is None or isinstance(judged, QualityRows)
        checks.append(_accuracy(model, champ_model, judged, cfg))
    elif m.task == "anomaly":
        assert judged is None or isinstance(judged, AnomalyRows)
        checks.append(_accuracy_anomaly(version, champ, judged, cfg))
    else:
        assert judged is None or isinstance(judged, QualityRows)
        checks.append(_accuracy_correction(version, champ, judged, cfg))
    passed = all(c.ok for c in checks)
    return GateReport(
        m.key, passed, checks, interpreter_version(), time.perf_counter() - t0, champ_key
    )


def golden_rows(x: Sequence[Sequence[float]] | F64, model: LiteModel) -> tuple[F64, F64]:
    """Golden inputs and the LiteRT outputs for them (used when re-publishing a version)."""
    arr = np.asarray(x, dtype=np.float64)
    return arr, model.run(arr).astype(np.float64)
