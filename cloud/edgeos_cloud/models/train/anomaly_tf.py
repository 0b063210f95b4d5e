"""Train an anomaly autoencoder from fleet windows, export it (the trainer runs it in the TF venv).

    python anomaly_tf.py --data rows.npz --out DIR --version 1.1.0 [--parent anomaly@1.0.0]
        [--epochs 12] [--seed 20240601] [--trained-with TEXT]

``rows.npz`` holds ``windows`` (m, WINDOW, 6: :data:`edgeos_protocol.features.ANOMALY_FEATURES`,
the windows the gateway's own ``StationTracker`` builds at every sample of a cure, rebuilt from
the fleet's stored samples), ``tyre`` (the tyre each window belongs to) and ``y`` (1 when that
tyre's realised modulus was out of spec). The autoencoder (same network as
``models/train_all.py``) learns the windows of tyres realised **in spec** (normal operation);
the exported graph outputs the reconstruction error. The threshold is set like
``models/train_all.py``'s: 1.25 × the 99.9 % quantile of the per-tyre maximum score (what the
gateway's verdict compares) over the in-spec training tyres. Writes ``DIR/anomaly.tflite``,
``DIR/anomaly.toml``, ``DIR/golden.npz`` and ``DIR/training.json``.
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

from edgeos_protocol.features import ANOMALY_FEATURES, KEY_SUFFIXES, WINDOW
from edgeos_protocol.manifest import render_manifest

#: At most this many windows are fitted (a seeded sample); the threshold uses every window.
MAX_FIT_WINDOWS = 60_000


def _scale(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    flat = x.reshape(-1, x.shape[-1]).astype(np.float64)
    mean, std = flat.mean(axis=0), flat.std(axis=0)
    return mean, np.maximum(std, 0.05 * np.abs(mean) + 1e-3)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--version", required=True)
    ap.add_argument("--parent", default="")
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--seed", type=int, default=20240601)
    ap.add_argument("--trained-with", default="edgeos_cloud.models.train.anomaly_tf")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()

    import tensorflow as tf  # type: ignore[import-untyped,import-not-found,unused-ignore]

    tf.keras.utils.set_random_seed(args.seed)
    tf.config.experimental.enable_op_determinism()
    keras = tf.keras
    data = np.load(args.data)
    windows = data["windows"].astype(np.float32)
    tyre = data["tyre"].astype(np.int64)
    y = data["y"].astype(np.float64)
    normal = y[tyre] == 0
    fit = windows[normal]
    rng = np.random.default_rng(args.seed)
    if len(fit) > MAX_FIT_WINDOWS:
        fit = fit[np.sort(rng.choice(len(fit), MAX_FIT_WINDOWS, replace=False))]
    mean, std = _scale(fit)
    flat_n = WINDOW * len(ANOMALY_FEATURES)
    fn = ((fit - mean) / std).reshape(len(fit), -1).astype(np.float32)

    inp = keras.Input((WINDOW, len(ANOMALY_FEATURES)), name="window")
    x = keras.layers.Flatten()(inp)
    h = keras.layers.Dense(32, activation="relu")(x)
    h = keras.layers.Dense(8, activation="relu")(h)
    h = keras.layers.Dense(32, activation="relu")(h)
    rec = keras.layers.Dense(flat_n)(h)
    ae = keras.Model(inp, rec)
    ae.compile(optimizer=keras.optimizers.Adam(2e-3), loss="mse")
    ae.fit(fn.reshape(len(fn), WINDOW, -1), fn, epochs=args.epochs, batch_size=256, verbose=0)
    err = keras.layers.Lambda(
        lambda t: tf.reduce_mean(tf.square(t[0] - t[1]), axis=1, keepdims=True), name="score"
    )([x, rec])
    model = keras.Model(inp, err)
    blob: bytes = tf.lite.TFLiteConverter.from_keras_model(model).convert()
    interp = tf.lite.Interpreter(model_content=blob)
    idx_in = interp.get_input_details()[0]["index"]
    idx_out = interp.get_output_details()[0]["index"]

    def run(rows: np.ndarray, batch: int = 512) -> np.ndarray:
        out = np.empty((len(rows), 1), np.float32)
        z = ((rows - mean) / std).astype(np.float32)
        for lo in range(0, len(z), batch):
            chunk = z[lo : lo + batch]
            interp.resize_tensor_input(idx_in, list(chunk.shape))
            interp.allocate_tensors()
            interp.set_tensor(idx_in, chunk)
            interp.invoke()
            out[lo : lo + len(chunk)] = interp.get_tensor(idx_out)
        return out

    scores = run(windows)[:, 0]
    per_tyre = np.full(len(y), -np.inf)
    np.maximum.at(per_tyre, tyre, scores)
    normal_max = per_tyre[(y == 0) & np.isfinite(per_tyre)]
    threshold = float(np.quantile(normal_max, 0.999) * 1.25)
    flags = per_tyre >= threshold
    report: dict[str, object] = {
        "rows": len(y),
        "windows": len(windows),
        "windows_fitted": len(fit),
        "threshold": threshold,
        "train_false_alarm": float(flags[y == 0].mean()) if (y == 0).any() else 0.0,
        "train_error": float((flags != (y == 1)).mean()),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "anomaly.tflite").write_bytes(blob)
    (args.out / "anomaly.toml").write_text(
        render_manifest(
            header="Generated by edgeos_cloud.models.trainer from fleet data.",
            name="anomaly",
            task="anomaly",
            version=args.version,
            file="anomaly.tflite",
            blob=blob,
            features=ANOMALY_FEATURES,
            tags=KEY_SUFFIXES,
            window=WINDOW,
            mean=[float(v) for v in mean],
            std=[float(v) for v in std],
            outputs=[("score", "")],
            thresholds={"score": threshold},
            description="autoencoder over 16 s of one nest's heater/pressure signals, retrained "
            "on the fleet's in-spec cures; output = mean squared reconstruction error",
            trained_with=args.trained_with,
            parent=args.parent,
        ),
        encoding="utf-8",
    )
    pick = np.sort(rng.choice(len(windows), min(32, len(windows)), replace=False))
    gx = windows[pick]
    np.savez(args.out / "golden.npz", x=gx, y=run(gx))
    report["seconds"] = round(time.perf_counter() - t0, 2)
    report["tensorflow"] = tf.__version__
    (args.out / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
