"""Generate training data from the simulated line, train the three models, export ``.tflite``.

Run with the training venv (TensorFlow is not a runtime dependency)::

    .venv-train/bin/python models/train_all.py            # writes models/*.tflite, *.toml, golden/

Everything is seeded, so a re-run reproduces the same data; TensorFlow's op determinism is
switched on, so on the same machine and TensorFlow version the weights are the same too.

Models (all tiny dense networks, float32, dynamic batch dimension):

``anomaly``     autoencoder over a window of one nest's key signals; the exported graph outputs
                the reconstruction error (mean squared, normalised units) as the anomaly score.
``quality``     regressor: a finished cure's summary features → elastic modulus (MPa).
                1.1.0 is a small MLP (the champion); 1.0.0 is the linear baseline it replaced,
                kept in ``models/archive/`` for champion/challenger tests and rollbacks.
``correction``  at load time: batch, freshness, platen temperature, last quality → heater and
                pressure set-point deltas against the plant recipe, plus the predicted modulus
                under the plant recipe and under the proposal (the guard's estimates).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import numpy as np

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))

from edgeos_cloud.fleet.physics.recipe import ELASTICITY_MAX, ELASTICITY_MIN  # noqa: E402
from edgeos_protocol.features import (  # noqa: E402
    ANOMALY_FEATURES,
    CORRECTION_FEATURES,
    KEY_SUFFIXES,
    QUALITY_FEATURES,
    SAMPLE_PERIOD_S,
    WINDOW,
    StationTracker,
    freshness,
)
from edgeos_protocol.manifest import render_manifest  # noqa: E402
from edgeos_sim.simline import (  # noqa: E402
    E_BEST,
    SimLine,
    expected_elasticity,
    lagged_optimum,
)

SEED = 20240601
CYCLE_S = 40.0
BASE_HEATER = 160.0
BASE_PRESS = 15.0


def log(msg: str) -> None:
    print(f"[train_all {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------- data


def generate(
    seed: int, seconds: int, nests: int = 80, *, explore: bool = True
) -> dict[str, np.ndarray]:
    """Run the line under a mix of recipes and collect model rows (normal operation only)."""
    rng = np.random.default_rng(seed + 7)
    line = SimLine(nests, seed=seed, cycle_s=CYCLE_S)
    tracker = StationTracker(nests)
    windows: list[np.ndarray] = []
    q_pending: dict[int, np.ndarray] = {}
    qx: list[np.ndarray] = []
    qy: list[float] = []
    cx: list[np.ndarray] = []
    cy: list[np.ndarray] = []
    for step in range(seconds):
        line.step(SAMPLE_PERIOD_S)
        obs = tracker.observe(line.sample())
        if step % 3 == 0:
            full = np.flatnonzero(tracker.window_full)
            windows.append(tracker.window[full].copy())
        for k, i in enumerate(obs.cure_ended.tolist()):
            q_pending[i] = obs.quality_x[k]
        for k, i in enumerate(obs.completed.tolist()):
            x = q_pending.pop(i, None)
            if x is not None:
                qx.append(x)
                qy.append(float(obs.realised[k]))
        if obs.loaded.size:
            ph = line.physics
            idx = obs.loaded
            p = ph.batch_property[idx]
            f = freshness(ph.cycles_in_batch[idx])
            pv0 = ph.heater_pv[idx]
            h_opt, p_opt = lagged_optimum(p, f, pv0, CYCLE_S)
            e_def = expected_elasticity(
                np.full(idx.size, BASE_HEATER),
                np.full(idx.size, BASE_PRESS),
                batch_property=p,
                fresh=f,
                pv0=pv0,
                cycle_s=CYCLE_S,
            )
            e_opt = expected_elasticity(
                h_opt, p_opt, batch_property=p, fresh=f, pv0=pv0, cycle_s=CYCLE_S
            )
            cx.append(obs.correction_x)
            cy.append(np.stack([h_opt - BASE_HEATER, p_opt - BASE_PRESS, e_def, e_opt], axis=1))
            if explore:
                # A mix of recipes so every model sees the states other recipes lead to.
                u = rng.random(idx.size)
                heater = np.where(
                    u < 0.35,
                    BASE_HEATER,
                    np.where(
                        u < 0.7, h_opt + rng.normal(0, 3, idx.size), rng.uniform(140, 190, idx.size)
                    ),
                )
                press = np.where(
                    u < 0.35,
                    BASE_PRESS,
                    np.where(
                        u < 0.7, p_opt + rng.normal(0, 1, idx.size), rng.uniform(8, 24, idx.size)
                    ),
                )
                line.set_recipe(np.clip(heater, 120, 200), np.clip(press, 5, 30), idx + 1)
    return {
        "windows": np.concatenate(windows).astype(np.float32),
        "qx": np.array(qx),
        "qy": np.array(qy),
        "cx": np.concatenate(cx),
        "cy": np.concatenate(cy),
    }


def defect_windows(
    seed: int, seconds: int = 1200, nests: int = 40
) -> tuple[np.ndarray, np.ndarray]:
    """Windows from a line where half the nests have a defect: (windows, is_defect)."""
    line = SimLine(nests, seed=seed, cycle_s=CYCLE_S)
    tracker = StationTracker(nests)
    rng = np.random.default_rng(seed)
    bad = np.zeros(nests, dtype=bool)
    for n in range(1, nests + 1, 2):
        kind = "pressure_leak" if n % 4 == 1 else "heater_weak"
        sev = (
            float(rng.uniform(0.2, 0.5))
            if kind == "pressure_leak"
            else float(rng.uniform(0.5, 0.7))
        )
        line.physics.inject_defect(n, kind, sev)
        bad[n - 1] = True
    out, lab = [], []
    for step in range(seconds):
        line.step(SAMPLE_PERIOD_S)
        tracker.observe(line.sample())
        if step > 120 and step % 4 == 0:
            out.append(tracker.window.copy())
            lab.append(bad.copy())
    return np.concatenate(out), np.concatenate(lab)


# --------------------------------------------------------------------------- models


def _scale(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std per column; a near-constant column gets 5 % of its mean as its std, so a
    value the plant never varied in training (e.g. the cure time) cannot blow up on a device."""
    flat = x.reshape(-1, x.shape[-1])
    mean, std = flat.mean(axis=0), flat.std(axis=0)
    return mean, np.maximum(std, 0.05 * np.abs(mean) + 1e-3)


def build_and_train(data: dict[str, np.ndarray], val: dict[str, np.ndarray]) -> dict[str, object]:
    import tensorflow as tf

    tf.keras.utils.set_random_seed(SEED)
    tf.config.experimental.enable_op_determinism()
    keras = tf.keras
    out: dict[str, object] = {}

    # --- anomaly autoencoder ---------------------------------------------------------------
    w = data["windows"]
    a_mean, a_std = _scale(w)
    wn = ((w - a_mean) / a_std).reshape(len(w), -1).astype(np.float32)
    flat = wn.shape[1]
    inp = keras.Input((WINDOW, len(ANOMALY_FEATURES)), name="window")
    x = keras.layers.Flatten()(inp)
    h = keras.layers.Dense(32, activation="relu")(x)
    h = keras.layers.Dense(8, activation="relu")(h)
    h = keras.layers.Dense(32, activation="relu")(h)
    rec = keras.layers.Dense(flat)(h)
    ae = keras.Model(inp, rec)
    ae.compile(optimizer=keras.optimizers.Adam(2e-3), loss="mse")
    ae.fit(wn.reshape(len(w), WINDOW, -1), wn, epochs=12, batch_size=256, verbose=0, shuffle=True)
    err = keras.layers.Lambda(
        lambda t: tf.reduce_mean(tf.square(t[0] - t[1]), axis=1, keepdims=True), name="score"
    )([x, rec])
    out["anomaly"] = (keras.Model(inp, err), a_mean, a_std)

    # --- quality regressors -------------------------------------------------------------------
    qx, qy = data["qx"], data["qy"]
    q_mean, q_std = _scale(qx)
    y_mean, y_std = float(qy.mean()), float(qy.std())
    qxn = ((qx - q_mean) / q_std).astype(np.float32)
    qyn = ((qy - y_mean) / y_std).astype(np.float32)

    def regressor(hidden: int) -> keras.Model:
        i = keras.Input((len(QUALITY_FEATURES),), name="features")
        t = i
        for _ in range(2 if hidden else 0):
            t = keras.layers.Dense(hidden, activation="tanh")(t)
        t = keras.layers.Dense(1)(t)
        t = keras.layers.Rescaling(y_std, offset=y_mean, name="elasticity")(t)
        m = keras.Model(i, t)
        m.compile(optimizer=keras.optimizers.Adam(3e-3), loss="mse")
        return m

    lin = regressor(0)
    lin.fit(qxn, qyn * y_std + y_mean, epochs=60, batch_size=128, verbose=0)
    mlp = regressor(32)
    mlp.fit(qxn, qyn * y_std + y_mean, epochs=150, batch_size=128, verbose=0)
    out["quality-1.0.0"] = (lin, q_mean, q_std)
    out["quality-1.1.0"] = (mlp, q_mean, q_std)

    # --- correction --------------------------------------------------------------------------
    cx, cy = data["cx"], data["cy"]
    c_mean, c_std = _scale(cx)
    cy_mean, cy_std = cy.mean(axis=0), cy.std(axis=0) + 1e-6
    cxn = ((cx - c_mean) / c_std).astype(np.float32)
    i = keras.Input((len(CORRECTION_FEATURES),), name="state")
    t = keras.layers.Dense(32, activation="tanh")(i)
    t = keras.layers.Dense(32, activation="tanh")(t)
    t = keras.layers.Dense(4)(t)
    t = keras.layers.Rescaling(
        cy_std.astype(np.float32), offset=cy_mean.astype(np.float32), name="proposal"
    )(t)
    corr = keras.Model(i, t)
    # Loss in normalised units so the four heads weigh the same.
    corr.compile(
        optimizer=keras.optimizers.Adam(3e-3),
        loss=lambda y, p: tf.reduce_mean(tf.square((y - p) / cy_std.astype(np.float32))),
    )
    corr.fit(cxn, cy.astype(np.float32), epochs=150, batch_size=128, verbose=0)
    out["correction"] = (corr, c_mean, c_std)
    del val
    return out


def to_tflite(model: object) -> bytes:
    import tensorflow as tf

    conv = tf.lite.TFLiteConverter.from_keras_model(model)
    blob: bytes = conv.convert()
    return blob


class TFLiteRunner:
    """TensorFlow's own interpreter on the exported bytes (what the goldens are made with)."""

    def __init__(self, blob: bytes, mean: np.ndarray, std: np.ndarray) -> None:
        import tensorflow as tf

        self.it = tf.lite.Interpreter(model_content=blob)
        self.mean, self.std = mean.astype(np.float32), std.astype(np.float32)
        self.inp = self.it.get_input_details()[0]["index"]
        self.out = self.it.get_output_details()[0]["index"]
        self.batch = -1

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = ((x - self.mean) / self.std).astype(np.float32)
        if x.shape[0] != self.batch:
            self.it.resize_tensor_input(self.inp, list(x.shape))
            self.it.allocate_tensors()
            self.batch = x.shape[0]
        self.it.set_tensor(self.inp, x)
        self.it.invoke()
        return np.array(self.it.get_tensor(self.out))


# --------------------------------------------------------------------------- evaluation


def closed_loop(
    corr: TFLiteRunner, seed: int, seconds: int, nests: int = 80, learned: bool = True
) -> dict[str, float]:
    """Apply the correction model (or the plant recipe) at every load; residuals of its heads."""
    line = SimLine(nests, seed=seed, cycle_s=CYCLE_S)
    tracker = StationTracker(nests)
    pending: dict[int, float] = {}
    real, pred = [], []
    for _ in range(seconds):
        line.step(SAMPLE_PERIOD_S)
        obs = tracker.observe(line.sample())
        for k, i in enumerate(obs.completed.tolist()):
            if i in pending:
                real.append(float(obs.realised[k]))
                pred.append(pending.pop(i))
        if obs.loaded.size:
            y = corr(obs.correction_x)
            if learned:
                heater = np.clip(BASE_HEATER + y[:, 0], 120, 200)
                press = np.clip(BASE_PRESS + y[:, 1], 5, 30)
                line.set_recipe(heater, press, obs.loaded + 1)
            for k, i in enumerate(obs.loaded.tolist()):
                pending[i] = float(y[k, 3] if learned else y[k, 2])
    r, p = np.array(real[200:]), np.array(pred[200:])
    res = r - p
    return {
        "n": float(r.size),
        "mean_elasticity": float(r.mean()),
        "reject_rate": float(((r < ELASTICITY_MIN) | (r > ELASTICITY_MAX)).mean()),
        "bias": float(res.mean()),
        "rms": float(np.sqrt((res**2).mean())),
    }


# --------------------------------------------------------------------------- export


def write_manifest(
    path: Path,
    *,
    name: str,
    task: str,
    version: str,
    blob: bytes,
    features: tuple[str, ...],
    tags: tuple[str, ...],
    window: int,
    mean: np.ndarray,
    std: np.ndarray,
    outputs: list[tuple[str, str]],
    thresholds: dict[str, float],
    description: str,
    baseline: dict[str, float] | None = None,
) -> None:
    path.write_text(
        render_manifest(
            header="Generated by models/train_all.py; edit the script, not this file.",
            name=name,
            task=task,
            version=version,
            file=path.with_suffix(".tflite").name,
            blob=blob,
            features=features,
            tags=tags,
            window=window,
            mean=[float(v) for v in mean],
            std=[float(v) for v in std],
            outputs=outputs,
            thresholds=thresholds,
            description=description,
            trained_with=f"models/train_all.py seed={SEED}",
            baseline=baseline,
        ),
        encoding="utf-8",
    )


def golden(path: Path, runner: TFLiteRunner, x: np.ndarray) -> None:
    y = runner(x)
    np.savez(path, x=x.astype(np.float32), y=y.astype(np.float32))


def main() -> int:
    t0 = time.perf_counter()
    log("generating data from the simulated line (in-process, fast-forwarded)")
    train = generate(SEED, 6000)
    more = generate(SEED + 1, 6000)
    for k in train:
        train[k] = np.concatenate([train[k], more[k]])
    val = generate(SEED + 2, 3000)
    log(
        f"rows: windows={len(train['windows'])} quality={len(train['qy'])} "
        f"correction={len(train['cy'])}"
    )
    models = build_and_train(train, val)
    (ROOT / "golden").mkdir(exist_ok=True)
    (ROOT / "archive").mkdir(exist_ok=True)
    report: dict[str, object] = {}

    # anomaly
    model, mean, std = models["anomaly"]
    blob = to_tflite(model)
    run = TFLiteRunner(blob, mean, std)
    s_val = run(val["windows"][::5])[:, 0]
    threshold = float(np.quantile(s_val, 0.999) * 1.25)
    dw, dl = defect_windows(SEED + 3)
    s_def = run(dw)[:, 0]
    flag = s_def > threshold
    report["anomaly"] = {
        "threshold": threshold,
        "val_false_alarm": float((s_val > threshold).mean()),
        "defect_window_recall": float(flag[dl].mean()),
        "normal_window_false_alarm": float(flag[~dl].mean()),
        "bytes": len(blob),
    }
    (ROOT / "anomaly.tflite").write_bytes(blob)
    write_manifest(
        ROOT / "anomaly.toml",
        name="anomaly",
        task="anomaly",
        version="1.0.0",
        blob=blob,
        features=ANOMALY_FEATURES,
        tags=KEY_SUFFIXES,
        window=WINDOW,
        mean=mean,
        std=std,
        outputs=[("score", "")],
        thresholds={"score": threshold},
        description="autoencoder over 16 s of one nest's heater/pressure signals; "
        "output = mean squared reconstruction error (normalised)",
    )
    gx = np.concatenate([val["windows"][:24:3], dw[dl][:8]])
    golden(ROOT / "golden" / "anomaly-1.0.0.npz", run, gx)

    # quality (two versions)
    q_thr = {
        "spec_min": ELASTICITY_MIN,
        "spec_max": ELASTICITY_MAX,
        "p_scrap": 0.5,
        "p_correct": 0.2,
    }
    for key, fname, where, desc in (
        ("quality-1.1.0", "quality", ROOT, "MLP 5-32-32-1 over a cure's summary features"),
        (
            "quality-1.0.0",
            "quality-1.0.0",
            ROOT / "archive",
            "linear baseline (superseded by 1.1.0)",
        ),
    ):
        model, mean, std = models[key]
        blob = to_tflite(model)
        run = TFLiteRunner(blob, mean, std)
        pred = run(val["qx"])[:, 0]
        res = val["qy"] - pred
        rms = float(np.sqrt((res**2).mean()))
        version = key.split("-", 1)[1]
        report[key] = {
            "val_rms_mpa": rms,
            "val_mae_mpa": float(np.abs(res).mean()),
            "bytes": len(blob),
        }
        (where / f"{fname}.tflite").write_bytes(blob)
        write_manifest(
            where / f"{fname}.toml",
            name="quality",
            task="quality",
            version=version,
            blob=blob,
            features=QUALITY_FEATURES,
            tags=KEY_SUFFIXES,
            window=1,
            mean=mean,
            std=std,
            outputs=[("elasticity", "MPa")],
            thresholds={**q_thr, "sigma": rms},
            description=desc,
        )
        golden(ROOT / "golden" / f"quality-{version}.npz", run, val["qx"][:32])

    # correction
    model, mean, std = models["correction"]
    blob = to_tflite(model)
    run = TFLiteRunner(blob, mean, std)
    learned = closed_loop(run, SEED + 4, 3000)
    default = closed_loop(run, SEED + 4, 3000, learned=False)
    report["correction"] = {"learned": learned, "default": default, "bytes": len(blob)}
    (ROOT / "correction.tflite").write_bytes(blob)
    write_manifest(
        ROOT / "correction.toml",
        name="correction",
        task="correction",
        version="1.0.0",
        blob=blob,
        features=CORRECTION_FEATURES,
        tags=KEY_SUFFIXES,
        window=1,
        mean=mean,
        std=std,
        outputs=[
            ("heater.sp.delta", "°C"),
            ("press.sp.delta", "bar"),
            ("elasticity.baseline", "MPa"),
            ("elasticity.proposed", "MPa"),
        ],
        thresholds={
            "target": E_BEST,
            # RMS (bias included) of realised minus predicted modulus, closed loop, per head.
            "sigma_baseline": float(np.hypot(default["bias"], default["rms"])),
            "sigma_proposed": float(np.hypot(learned["bias"], learned["rms"])),
            "confidence_k": 2.0,
        },
        description="load-time recipe correction (heater, pressure deltas vs the plant recipe) "
        "with predicted outcomes of both recipes",
        baseline={"heater.sp": BASE_HEATER, "press.sp": BASE_PRESS},
    )
    golden(ROOT / "golden" / "correction-1.0.0.npz", run, val["cx"][:32])
    report["seconds"] = round(time.perf_counter() - t0, 1)
    (ROOT / "golden" / "training_report.json").write_text(json.dumps(report, indent=2) + "\n")
    log(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
