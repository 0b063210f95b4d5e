"""Train a correction model from fleet loads and export it (run by the trainer in the TF venv).

    python correction_tf.py --data rows.npz --out DIR --version 1.1.0 [--parent …]
        --baseline-heater 160 --baseline-press 15 --target 6.6 --confidence-k 2
        [--epochs 150] [--seed 20240601] [--trained-with TEXT]

``rows.npz``: ``x`` (n, 4: :data:`edgeos_protocol.features.CORRECTION_FEATURES` at each load, from
the gateway's own ``StationTracker``), ``d`` (n, 2: the heater and pressure set-points in force
during that tyre's cure minus the plant recipe), ``y`` (the realised modulus), ``dir`` (n, 2: the
champion's proposed deltas for the same rows), and ``val_*`` for the report.

From fleet data only the outcome of the recipe actually run is observed, so the model is built
in three steps:

1. an **outcome model** ``f(x, Δ) → modulus`` is fitted on every load (plant recipe and learned
   recipes alike);
2. labels: the plant recipe's outcome ``f(x, 0)``, and the proposal ``s*·dir(x)`` — the
   champion's correction scaled by the ``s*`` in ``[0, 1.5]`` whose predicted modulus
   ``f(x, s·dir)`` is nearest the target (the smallest such ``s`` on ties). The proposal stays on
   the direction the fleet has run: the fleet recalibrates how far to correct, it does not
   invent corrections it has never observed;
3. the gateway's network (4-32-32-4, ``models/train_all.py``) is fitted to those labels.

``sigma_baseline`` is the RMS residual of the baseline head on loads run with the plant recipe;
``sigma_proposed`` that of the outcome model on loads run with a learned recipe (validation rows
when there are enough), combined with the proposal head's fit error. Writes
``DIR/correction.tflite``, ``DIR/correction.toml``, ``DIR/golden.npz``, ``DIR/training.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import numpy as np

from edgeos_protocol.features import CORRECTION_FEATURES, KEY_SUFFIXES
from edgeos_protocol.manifest import render_manifest

#: Loads within this of the plant recipe (°C, bar) ran the plant recipe.
PLANT_RECIPE_TOL = 0.05
SCALES = np.linspace(0.0, 1.5, 31)


def _scale(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean, std = x.mean(axis=0), x.std(axis=0)
    return mean, np.maximum(std, 0.05 * np.abs(mean) + 1e-3)


def _rms(a: np.ndarray) -> float:
    return float(np.sqrt(np.mean(a**2))) if a.size else float("nan")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--version", required=True)
    ap.add_argument("--parent", default="")
    ap.add_argument("--epochs", type=int, default=150)
    ap.add_argument("--seed", type=int, default=20240601)
    ap.add_argument("--baseline-heater", type=float, required=True)
    ap.add_argument("--baseline-press", type=float, required=True)
    ap.add_argument("--target", type=float, required=True)
    ap.add_argument("--confidence-k", type=float, default=2.0)
    ap.add_argument("--trained-with", default="edgeos_cloud.models.train.correction_tf")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()

    import tensorflow as tf  # type: ignore[import-untyped,import-not-found,unused-ignore]

    tf.keras.utils.set_random_seed(args.seed)
    tf.config.experimental.enable_op_determinism()
    keras = tf.keras
    data = np.load(args.data)
    x = data["x"].astype(np.float64)
    d = data["d"].astype(np.float64)
    y = data["y"].astype(np.float64)
    direction = data["dir"].astype(np.float64)

    # 1. outcome model f(x, Δ)
    xd = np.hstack([x, d])
    o_mean, o_std = _scale(xd)
    y_mean, y_std = float(y.mean()), float(max(y.std(), 1e-3))
    i = keras.Input((xd.shape[1],), name="state_recipe")
    t = keras.layers.Dense(32, activation="tanh")(i)
    t = keras.layers.Dense(32, activation="tanh")(t)
    t = keras.layers.Dense(1)(t)
    t = keras.layers.Rescaling(y_std, offset=y_mean)(t)
    outcome = keras.Model(i, t)
    outcome.compile(optimizer=keras.optimizers.Adam(3e-3), loss="mse")
    outcome.fit(
        ((xd - o_mean) / o_std).astype(np.float32),
        y.astype(np.float32),
        epochs=args.epochs,
        batch_size=64,
        verbose=0,
    )

    def f(xs: np.ndarray, ds: np.ndarray) -> np.ndarray:
        z = ((np.hstack([xs, ds]) - o_mean) / o_std).astype(np.float32)
        return np.asarray(outcome.predict(z, batch_size=4096, verbose=0))[:, 0].astype(np.float64)

    # 2. labels
    n = len(x)
    e_base = f(x, np.zeros_like(d))
    grid = np.stack([f(x, s * direction) for s in SCALES], axis=1)  # (n, scales)
    best = np.argmin(np.abs(grid - args.target) + 1e-6 * np.arange(len(SCALES)), axis=1)
    s_star = SCALES[best]
    labels = np.stack(
        [
            s_star * direction[:, 0],
            s_star * direction[:, 1],
            e_base,
            grid[np.arange(n), best],
        ],
        axis=1,
    )

    # 3. the gateway's network on the labels
    c_mean, c_std = _scale(x)
    l_mean, l_std = labels.mean(axis=0), labels.std(axis=0) + 1e-6
    i = keras.Input((len(CORRECTION_FEATURES),), name="state")
    t = keras.layers.Dense(32, activation="tanh")(i)
    t = keras.layers.Dense(32, activation="tanh")(t)
    t = keras.layers.Dense(4)(t)
    t = keras.layers.Rescaling(
        l_std.astype(np.float32), offset=l_mean.astype(np.float32), name="proposal"
    )(t)
    corr = keras.Model(i, t)
    scale = l_std.astype(np.float32)
    corr.compile(
        optimizer=keras.optimizers.Adam(3e-3),
        loss=lambda a, b: tf.reduce_mean(tf.square((a - b) / scale)),
    )
    corr.fit(
        ((x - c_mean) / c_std).astype(np.float32),
        labels.astype(np.float32),
        epochs=args.epochs,
        batch_size=64,
        verbose=0,
    )
    blob: bytes = tf.lite.TFLiteConverter.from_keras_model(corr).convert()
    interp = tf.lite.Interpreter(model_content=blob)

    def run(rows: np.ndarray) -> np.ndarray:
        z = ((rows - c_mean) / c_std).astype(np.float32)
        idx_in = interp.get_input_details()[0]["index"]
        interp.resize_tensor_input(idx_in, list(z.shape))
        interp.allocate_tensors()
        interp.set_tensor(idx_in, z)
        interp.invoke()
        return np.array(interp.get_tensor(interp.get_output_details()[0]["index"]))

    # sigmas: residuals of realised outcomes, on validation rows when there are enough
    vx, vd, vy = x, d, y
    if "val_x" in data and len(data["val_y"]) >= 20:
        vx, vd, vy = data["val_x"], data["val_d"], data["val_y"]
    plant = np.all(np.abs(vd) <= PLANT_RECIPE_TOL, axis=1)
    pred = run(vx)
    sigma_b = _rms(vy[plant] - pred[plant, 2])
    learned_res = vy[~plant] - f(vx[~plant], vd[~plant])
    fit_p = _rms(run(x)[:, 3] - labels[:, 3])
    sigma_p = float(np.hypot(_rms(learned_res), fit_p)) if (~plant).sum() >= 5 else float("nan")
    if not np.isfinite(sigma_b):
        sigma_b = _rms(y - f(x, d))
    if not np.isfinite(sigma_p):
        sigma_p = float(np.hypot(sigma_b, fit_p))
    report: dict[str, object] = {
        "rows": n,
        "plant_recipe_rows": int(np.all(np.abs(d) <= PLANT_RECIPE_TOL, axis=1).sum()),
        "outcome_train_rms": _rms(y - f(x, d)),
        "sigma_baseline": sigma_b,
        "sigma_proposed": sigma_p,
        "mean_scale": float(s_star.mean()),
        "label_fit_rms": _rms(run(x) - labels),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "correction.tflite").write_bytes(blob)
    (args.out / "correction.toml").write_text(
        render_manifest(
            header="Generated by edgeos_cloud.models.trainer from fleet data.",
            name="correction",
            task="correction",
            version=args.version,
            file="correction.tflite",
            blob=blob,
            features=CORRECTION_FEATURES,
            tags=KEY_SUFFIXES,
            window=1,
            mean=[float(v) for v in c_mean],
            std=[float(v) for v in c_std],
            outputs=[
                ("heater.sp.delta", "°C"),
                ("press.sp.delta", "bar"),
                ("elasticity.baseline", "MPa"),
                ("elasticity.proposed", "MPa"),
            ],
            thresholds={
                "target": args.target,
                "sigma_baseline": sigma_b,
                "sigma_proposed": sigma_p,
                "confidence_k": args.confidence_k,
            },
            description="load-time recipe correction retrained on fleet loads: outcome heads "
            "from realised moduli, the champion's correction rescaled by the fleet's outcome model",
            trained_with=args.trained_with,
            parent=args.parent,
            baseline={"heater.sp": args.baseline_heater, "press.sp": args.baseline_press},
        ),
        encoding="utf-8",
    )
    gx = x[: min(32, len(x))]
    np.savez(args.out / "golden.npz", x=gx.astype(np.float32), y=run(gx).astype(np.float32))
    report["seconds"] = round(time.perf_counter() - t0, 2)
    report["tensorflow"] = tf.__version__
    (args.out / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
