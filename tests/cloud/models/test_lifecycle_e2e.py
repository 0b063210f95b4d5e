"""End to end, no mocks: drift on the simulated line → retrain from the receiver database →
gate → TUF repository → a gateway takes the new model as a challenger and promotes it.

Needs TensorFlow in the trainer's environment (``train_python`` builds ``.venv-train`` once when
missing, ~35 s from PyPI; it skips with the reason when it cannot).
"""

from __future__ import annotations

import os
import subprocess
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import edgeos_protocol
from edgeos.config import GuardConfig, PromotionConfig
from edgeos.inference.engine import InferenceEngine
from edgeos.inference.selfcheck import MODELS_DIR
from edgeos.ota.slots import SlotManager
from edgeos_cloud.models.gate import run_gate
from edgeos_cloud.models.lifecycle import Lifecycle
from edgeos_cloud.models.litert import LiteModel
from edgeos_cloud.ota.repository import OtaRepository, serving
from edgeos_protocol.manifest import load_manifest, read_verified
from edgeos_sim.simline import FleetRecorder, SimClock, SimLine, drive
from edgeos_testing.ota import (
    HARDWARE,
    Device,
    build_stub_release,
)

QUALITY = MODELS_DIR / "quality.toml"


def _gateway(tmp_path: Path, repo: OtaRepository) -> Device:
    """A gateway provisioned with a full release and the repository's trusted root."""
    bundle = build_stub_release(tmp_path)
    root = tmp_path / "device" / "slots"
    slots = SlotManager(root, hardware=HARDWARE)
    slots.provision(bundle)
    trusted = tmp_path / "device" / "root.json"
    trusted.write_bytes(repo.trusted_root())
    return Device(slots, trusted, root)


@pytest.mark.timeout(900)  # a safety net on a loaded machine, not a timed assertion
def test_drift_retrain_gate_publish_and_a_gateway_takes_the_challenger(
    tmp_path: Path, make_lifecycle: Any, fleet: Any, train_python: str
) -> None:
    repo = OtaRepository.init(tmp_path / "repo", tmp_path / "root-keys")
    life: Lifecycle = make_lifecycle(ota_repo=repo.dir, trainer={"python": train_python})
    champion = life.seed_champion(QUALITY, fleet.group)

    # The drift monitor sees the realised error of the gateways' verdicts grow.
    status = life.drift("quality", fleet.group)
    assert status["drift"], status
    assert fleet.drift_us <= status["drift_since_us"] <= fleet.drift_us + 700_000_000
    result = life.drift_and_retrain("quality", fleet.group)
    gate = result["retrain"]["gate"]
    assert gate["passed"], gate["reasons"]
    acc = next(c for c in gate["checks"] if c["name"] == "accuracy")
    assert acc["values"]["candidate_rms"] <= 0.5 * acc["values"]["champion_rms"]
    assert acc["values"]["confidence_better"] > 0.99
    candidate = life.registry.find(result["retrain"]["version"]["key"])
    assert candidate.status == "qualified" and candidate.parent == champion.key
    assert life.registry.gate_report(candidate)["passed"] is True

    # Publish: a models bundle signed into TUF, a started campaign for the group.
    published = life.publish(candidate, fleet.group)
    assert published["bundle"].startswith(f"bundles/{HARDWARE}/models/")
    assert life.registry.holder("quality", fleet.group, "challenger").key == candidate.key
    assert life.registry.holder("quality", fleet.group, "champion").key == champion.key

    # A real gateway: TUF client, A/B slot manager, the inference engine's models hook.
    device = _gateway(tmp_path, repo)
    line = SimLine(20, seed=5)
    line.new_rubber(9.0)
    engine = InferenceEngine.from_manifests(
        [MODELS_DIR / "anomaly.toml", MODELS_DIR / "correction.toml", QUALITY],
        line.stations,
        line.tag_configs(),
        guard=GuardConfig(enabled=False),
        promotion=PromotionConfig(min_samples=60, min_improvement=0.05),
        clock=SimClock(line),
    )
    loaded: list[list[dict[str, Any]]] = []
    device.slots.models_hook = lambda path: loaded.append(engine.on_models_updated(path))
    with serving(repo.dir) as server:
        results = device.client(server.url, group=fleet.group).check_and_install(device.slots)
    models = [r for r in results if r.kind == "models"]
    assert models and models[0].status == "installed", results
    assert loaded and loaded[0][0]["ok"] and loaded[0][0]["model"] == candidate.key
    assert engine.registry.challenger("quality").key == candidate.key  # type: ignore[union-attr]

    # On the new rubber the gateway's own rule promotes it; its report reaches the registry.
    log = drive(engine, line, 900, keep_events=True)
    promoted = [e for e in log.events if e["type"] == "model_promoted"]
    assert promoted and f"{promoted[0]['model']}@{promoted[0]['version']}" == candidate.key
    recorder = FleetRecorder(fleet.storage_url, fleet.registry_dir, fleet.device, line.stations)
    recorder.add(line.now, line.sample(), [e for e in log.events if e["type"].startswith("model_")])
    recorder.close()
    changes = life.record_reports(fleet.group)
    promoted_change = {"device": fleet.device, "model": candidate.key, "stage": "champion"}
    assert promoted_change | {"group_stage_moved": True} in changes
    # The device's own report is in the audit trail, tagged with the device.
    assert any(
        a["device"] == fleet.device and a["key"] == candidate.key and a["to"] == "champion"
        for a in life.registry.audit("quality")
    )
    assert life.registry.holder("quality", fleet.group, "champion").key == candidate.key
    # The device demoted the old champion to a shadow challenger; the registry says so.
    assert life.registry.get("quality", champion.number).stages[fleet.group] == "challenger"

    # Rollback = the previous champion's bytes as a new, higher version, sent as challenger.
    rolled = life.rollback("quality", fleet.group)
    again = life.registry.find(rolled["version"]["key"])
    assert rolled["rollback_of"] == champion.key and again.sha256 == champion.sha256
    assert again.manifest_version > candidate.manifest_version
    assert int(rolled["bundle_version"]) > int(published["bundle_version"])
    assert life.registry.holder("quality", fleet.group, "challenger").key == again.key
    assert life.registry.get("quality", champion.number).stages[fleet.group] == "retired"
    trail = [a["to"] for a in life.registry.audit("quality") if a["key"] == again.key]
    assert trail == ["candidate", "refused", "qualified", "challenger"]


_NAN_MODEL = """
import sys, numpy as np, tensorflow as tf
from pathlib import Path
from edgeos_protocol.features import KEY_SUFFIXES, QUALITY_FEATURES
from edgeos_protocol.manifest import load_manifest, render_manifest
out = Path(sys.argv[1]); out.mkdir(parents=True)
champ = load_manifest(sys.argv[2])
i = tf.keras.Input((5,))
# sqrt of (z_mooney + 3): fine on normal data, NaN where Mooney is 3 std below its mean.
t = tf.keras.layers.Lambda(lambda z: 6.5 + 0.01 * tf.sqrt(z[:, 3:4] + 3.0))(i)
blob = tf.lite.TFLiteConverter.from_keras_model(tf.keras.Model(i, t)).convert()
(out / "quality.tflite").write_bytes(blob)
(out / "quality.toml").write_text(render_manifest(
    name="quality", task="quality", version="9.0.0", file="quality.tflite", blob=blob,
    features=QUALITY_FEATURES, tags=KEY_SUFFIXES, window=1, mean=champ.mean, std=champ.std,
    outputs=[("elasticity", "MPa")], thresholds=dict(champ.thresholds),
    description="NaN at the low edge of Mooney", trained_with="test"))
it = tf.lite.Interpreter(model_content=blob)
x = np.array(champ.mean, dtype=np.float32)[None, :].repeat(4, 0)
z = ((x - np.array(champ.mean)) / np.array(champ.std)).astype(np.float32)
it.resize_tensor_input(it.get_input_details()[0]["index"], [4, 5]); it.allocate_tensors()
it.set_tensor(it.get_input_details()[0]["index"], z); it.invoke()
np.savez(out / "golden.npz", x=x, y=it.get_tensor(it.get_output_details()[0]["index"]))
"""


def test_model_that_outputs_nan_on_edge_inputs_is_refused(
    tmp_path: Path, train_python: str
) -> None:
    folder = tmp_path / "nan"
    script = tmp_path / "make_nan.py"
    script.write_text(textwrap.dedent(_NAN_MODEL))
    env = {**os.environ, "PYTHONPATH": str(Path(edgeos_protocol.__file__).parents[1])}
    subprocess.run(
        [train_python, str(script), str(folder), str(QUALITY)], check=True, env=env, timeout=600
    )
    m = load_manifest(folder / "quality.toml")
    lite = LiteModel(read_verified(m), input_shape=(5,), output_width=1, mean=m.mean, std=m.std)
    assert np.isfinite(lite.run(np.array([m.mean]))).all()  # fine where the goldens are
    report = run_gate(folder)
    assert not report.passed
    failed = {c.name: c for c in report.checks if not c.ok}
    assert {"integrity", "golden", "budget"}.isdisjoint(failed)
    assert failed["finite"].values["bad_edge_rows"] > 0
