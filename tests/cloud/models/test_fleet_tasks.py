"""Anomaly and correction rows from the receiver database, their refusals and replay gate.

Real receiver database (SQLite, through the receiver's ingest path), real MLflow store, the
LiteRT interpreter on the committed models; no TensorFlow here (see test_retrain_tasks_tf.py).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgeos.inference.selfcheck import MODELS_DIR
from edgeos_cloud.models.errors import DataUnavailable, WindowRefused
from edgeos_cloud.models.lifecycle import Lifecycle, LifecycleConfig
from edgeos_cloud.models.replay import load_rows
from edgeos_protocol.features import CURE, KEY_SUFFIXES, StationTracker
from edgeos_sim.simline import FleetRecorder, SimLine

ANOMALY = MODELS_DIR / "anomaly.toml"
CORRECTION = MODELS_DIR / "correction.toml"
_STATE = KEY_SUFFIXES.index("cycle.state")
_SP = [KEY_SUFFIXES.index("heater.sp"), KEY_SUFFIXES.index("press.sp")]


@dataclass
class LiveRun:
    """What the gateway's own tracker computed live, and the database the line was shipped to."""

    url: str
    anomaly: list[tuple[np.ndarray, float]]  # (cure windows, realised) per judged tyre
    correction: list[tuple[np.ndarray, np.ndarray, float]]  # (x at load, recipe, realised)


@pytest.fixture(scope="module")
def live_run(tmp_path_factory: pytest.TempPathFactory) -> LiveRun:
    """A line whose recipe changes at every load (as a trial would), tracked live by the
    gateway's ``StationTracker`` exactly as the engine does, and shipped to a database."""
    tmp = tmp_path_factory.mktemp("skew")
    line = SimLine(4, seed=3)
    url = f"sqlite:///{tmp / 'r.db'}"
    recorder = FleetRecorder(url, tmp / "reg", "gw-skew", line.stations)
    live = StationTracker(4)
    rng = np.random.default_rng(1)
    cure_w: dict[int, list[np.ndarray]] = {}
    a_pending: dict[int, list[np.ndarray]] = {}
    c_pending: dict[int, list[Any]] = {}
    anomaly: list[tuple[np.ndarray, float]] = []
    correction: list[tuple[np.ndarray, np.ndarray, float]] = []
    for _ in range(900):
        line.step(1.0)
        values = line.sample()
        recorder.add(line.now, values)
        obs = live.observe(values)
        if live.window_full.all():
            for i in np.flatnonzero(values[:, _STATE] == CURE).tolist():
                cure_w.setdefault(i, []).append(live.window[i].copy())
        for i in obs.cure_ended.tolist():
            a_pending[i] = cure_w.pop(i, [])
        for k, i in enumerate(obs.completed.tolist()):
            e = float(obs.realised[k])
            got = a_pending.pop(i, None)
            if got:
                anomaly.append((np.array(got), e))
            c = c_pending.pop(i, None)
            if c is not None and c[1] is not None and int(obs.count[k]) == c[2]:
                correction.append((c[0], c[1], e))
        for k, i in enumerate(obs.loaded.tolist()):
            cure_w.pop(i, None)
            if obs.load_ok[k]:
                c_pending[i] = [obs.correction_x[k].copy(), None, int(obs.load_count[k])]
            else:
                c_pending.pop(i, None)
            heater, press = 160.0 + rng.normal(0, 4), 15.0 + rng.normal(0, 1.5)
            line.set_recipe(np.array([heater]), np.array([press]), np.array([i + 1]))
        for i in obs.cure_started.tolist():
            if i in c_pending:
                c_pending[i][1] = values[i, _SP].copy()
    recorder.close()
    return LiveRun(url, anomaly, correction)


def test_anomaly_windows_from_the_receiver_database_are_the_gateways(live_run: LiveRun) -> None:
    """No train/serve skew: every judged tyre's cure windows and outcome, as the gateway saw."""
    stored = load_rows(live_run.url, ["gw-skew"], tasks=("anomaly",)).anomaly
    assert len(stored) == len(live_run.anomaly) >= 40
    # Both lists are in the order the tyres were measured (station order within a second).
    # The cloud's 1 s grid starts one sample after the first stored one, so its window fills one
    # second later: only a first cure (one per station) may have one window fewer.
    short = []
    for t in range(len(stored)):
        windows = stored.windows[stored.tyre == t]
        live_windows, live_e = live_run.anomaly[t]
        if windows.shape != live_windows.shape:
            assert windows.shape[0] == live_windows.shape[0] - 1
            np.testing.assert_allclose(windows, live_windows[1:], atol=2.1e-3)
            short.append(t)
            continue
        # Differences of two tags quantised to 0.001 on the wire.
        np.testing.assert_allclose(windows, live_windows, atol=2.1e-3)
        assert stored.realised[t] == pytest.approx(live_e, abs=1e-3)
        assert stored.y[t] == float(not 6.0 <= stored.realised[t] <= 7.2)
    assert all(t < 4 for t in short)


def test_correction_loads_from_the_receiver_database_are_the_gateways(live_run: LiveRun) -> None:
    """No train/serve skew: features at each load, the recipe in force, the realised modulus."""
    stored = load_rows(live_run.url, ["gw-skew"], tasks=("correction",)).correction
    assert stored.applied is not None
    assert len(stored) == len(live_run.correction) >= 40
    live_x = np.array([c[0] for c in live_run.correction])
    live_d = np.array([c[1] for c in live_run.correction])
    live_y = np.array([c[2] for c in live_run.correction])
    order = np.lexsort((stored.y, stored.ts_us))
    key = np.lexsort((live_y, np.arange(len(live_y))))
    np.testing.assert_allclose(stored.x[order], live_x[key], atol=1e-3)
    np.testing.assert_allclose(stored.applied[order], live_d[key], atol=1e-3)
    np.testing.assert_allclose(stored.y[order], live_y[key], atol=1e-3)
    # The recipes really varied (what the correction's outcome model needs).
    assert stored.applied[:, 0].std() > 1.0


def test_correction_window_run_only_with_the_plant_recipe_is_refused(
    make_lifecycle: Any, fleet: Any
) -> None:
    life: Lifecycle = make_lifecycle()
    life.seed_champion(CORRECTION, fleet.group)
    before = life.registry.versions()
    with pytest.raises(
        WindowRefused, match=r"0 of \d+ training loads ran a recipe other than the plant"
    ):
        life.retrain("correction", fleet.group)
    assert life.registry.versions() == before


def test_correction_retrain_without_a_champion_is_refused(make_guarded_lifecycle: Any) -> None:
    life: Lifecycle = make_guarded_lifecycle()
    with pytest.raises(WindowRefused, match="has no champion"):
        life.retrain("correction", "line-g")
    assert life.registry.versions() == []


def test_anomaly_window_without_realised_outcomes_is_deferred_and_nothing_registered(
    make_lifecycle: Any, fleet: Any
) -> None:
    life: Lifecycle = make_lifecycle()
    with pytest.raises(DataUnavailable, match="deferred: 0 held-out tyres with a realised"):
        life.retrain("anomaly", fleet.group, since_us=fleet.end_us + 1)
    assert life.registry.versions() == []


def test_correction_window_without_realised_outcomes_is_deferred(
    make_guarded_lifecycle: Any, guarded_fleet: Any
) -> None:
    life: Lifecycle = make_guarded_lifecycle()
    with pytest.raises(DataUnavailable, match="deferred: 0 held-out loads with a realised"):
        life.retrain("correction", "line-g", since_us=guarded_fleet.end_us + 1)


def test_unknown_task_is_refused_as_a_usage_error(make_lifecycle: Any, fleet: Any) -> None:
    life: Lifecycle = make_lifecycle()
    with pytest.raises(ValueError, match="unknown task 'vibration'"):
        life.retrain("vibration", fleet.group)


def test_window_whose_samples_lack_key_tags_is_refused_naming_them(tmp_path: Path) -> None:
    """A gateway that does not ship ``batch.mooney``: the feature code cannot run; the refusal
    names the tags instead of deferring forever on '0 rows'."""
    from edgeos_protocol.batch import TagTable, ValueKind

    line = SimLine(2, seed=2)
    url = f"sqlite:///{tmp_path / 'r.db'}"
    recorder = FleetRecorder(url, tmp_path / "reg", "gw-partial", line.stations)
    keep = [j for j, s in enumerate(KEY_SUFFIXES) if s != "batch.mooney"]
    names = [f"{st}.{KEY_SUFFIXES[j]}" for st in line.stations for j in keep]
    recorder.table = TagTable(
        np.arange(len(names)),
        names,
        [ValueKind.NUMBER] * len(names),
        [0.001] * len(names),
        [""] * len(names),
    )
    for _ in range(120):
        line.step(1.0)
        recorder.add(line.now, line.sample()[:, keep])
    recorder.close()
    life = Lifecycle(
        LifecycleConfig.model_validate(
            {
                "home": tmp_path / "life",
                "storage_url": url,
                "groups": {"g": {"devices": ["gw-partial"]}},
            }
        )
    )
    for task in ("quality", "anomaly", "correction"):
        with pytest.raises(WindowRefused, match=r"lack the key tags batch\.mooney"):
            life.retrain(task, "g")


def test_anomaly_version_that_flags_normal_tyres_is_refused_on_the_same_rows(
    tmp_path: Path, make_lifecycle: Any, fleet: Any
) -> None:
    """The anomaly replay metric: misjudged tyres (flag vs realised out of spec), candidate and
    champion on the same held-out tyres. The committed bytes with a threshold far too low flag
    every tyre: refused, with both rates and the false alarms in the report."""
    life: Lifecycle = make_lifecycle()
    champion = life.seed_champion(ANOMALY, fleet.group)
    folder = tmp_path / "touchy"
    folder.mkdir()
    shutil.copy2(ANOMALY.with_suffix(".tflite"), folder / "anomaly.tflite")
    shutil.copy2(MODELS_DIR / "golden" / "anomaly-1.0.0.npz", folder / "golden.npz")
    text = ANOMALY.read_text().replace('version = "1.0.0"', 'version = "1.0.1"')
    text = text.replace("score = 0.701116", "score = 0.000001")
    (folder / "anomaly.toml").write_text(text)
    touchy = life.registry.register(folder)
    _, held = life.task_rows("anomaly", fleet.group, until_us=fleet.drift_us)
    touchy, report = life.gate(touchy, fleet.group, replay=held)
    assert touchy.status == "refused" and report.champion == champion.key
    acc = next(c for c in report.checks if c.name == "accuracy")
    assert not acc.ok and acc.values["metric"] == "rate"
    assert acc.values["rows"] == len(held)
    assert acc.values["candidate_false_alarms"] == len(held) - acc.values["out_of_spec_rows"]
    assert acc.values["candidate_rate"] > acc.values["champion_rate"]
    assert {c.name for c in report.checks if not c.ok} == {"accuracy"}


def test_committed_anomaly_model_judged_against_itself_passes(
    make_lifecycle: Any, fleet: Any
) -> None:
    """Same rows, same model: rates equal, within the limit (the 1/n resolution included)."""
    from edgeos_cloud.models.gate import run_gate

    life: Lifecycle = make_lifecycle()
    _, held = life.task_rows("anomaly", fleet.group, until_us=fleet.drift_us)
    folder = life.config.home / "anomaly"
    folder.mkdir(parents=True)
    shutil.copy2(ANOMALY, folder / ANOMALY.name)
    shutil.copy2(ANOMALY.with_suffix(".tflite"), folder / "anomaly.tflite")
    shutil.copy2(MODELS_DIR / "golden" / "anomaly-1.0.0.npz", folder / "golden.npz")
    report = run_gate(folder, champion_dir=folder, replay=held)
    acc = next(c for c in report.checks if c.name == "accuracy")
    assert report.passed, report.reasons
    assert acc.values["candidate_rate"] == acc.values["champion_rate"]
