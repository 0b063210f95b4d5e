"""Long-term tracking, per-device audit, incremental drift, rollback from the command line.

Two real gateway engines (committed models on LiteRT, champion/challenger rule) on simulated
lines ship their samples and events through the receiver's ingest path into SQLite; the
lifecycle folds what they reported into a real MLflow store and the Prometheus exposition.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest

from edgeos.config import GuardConfig, PromotionConfig
from edgeos.inference.engine import InferenceEngine
from edgeos.inference.selfcheck import MODELS_DIR
from edgeos_cloud.cli import main
from edgeos_cloud.models.cli import load_config
from edgeos_cloud.models.lifecycle import Lifecycle, LifecycleConfig
from edgeos_cloud.models.metrics import render
from edgeos_cloud.ota.repository import OtaRepository
from edgeos_sim.simline import FleetRecorder, SimClock, SimLine, record_run

QUALITY = MODELS_DIR / "quality.toml"
LINEAR = MODELS_DIR / "archive" / "quality-1.0.0.toml"
GROUP = "line-t"


class Gateway:
    """A simulated line, the gateway's engine on it (champion 1.0.0, challenger 1.1.0) and its
    recorder into the receiver database; ``run(seconds)`` ships what it did."""

    def __init__(self, url: str, registry_dir: Path, device: str, seed: int) -> None:
        self.line = SimLine(8, seed=seed)
        self.engine = InferenceEngine.from_manifests(
            [MODELS_DIR / "anomaly.toml", MODELS_DIR / "correction.toml", LINEAR],
            self.line.stations,
            self.line.tag_configs(),
            challengers=[QUALITY],
            guard=GuardConfig(enabled=False),
            promotion=PromotionConfig(min_samples=40, min_improvement=0.05),
            clock=SimClock(self.line),
        )
        self.recorder = FleetRecorder(url, registry_dir, device, self.line.stations)

    def run(self, seconds: int) -> None:
        record_run(self.line, self.recorder, seconds, engine=self.engine)
        self.recorder.flush()


def _lifecycle(tmp_path: Path, url: str, devices: list[str], **extra: Any) -> Lifecycle:
    return Lifecycle(
        LifecycleConfig.model_validate(
            {
                "home": tmp_path / "life",
                "storage_url": url,
                "groups": {GROUP: {"devices": devices}},
                **extra,
            }
        )
    )


def _count_events(url: str, device: str, types: tuple[str, ...]) -> int:
    from edgeos_cloud.receiver.storage import open_storage

    storage = open_storage(url)
    try:
        return len(storage.events_of_types(device, types))
    finally:
        storage.close()


def test_device_reports_fold_into_tracking_audit_and_metrics_incrementally(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'receiver.db'}"
    a = Gateway(url, tmp_path / "reg", "gw-a", seed=21)
    b = Gateway(url, tmp_path / "reg", "gw-b", seed=22)
    a.run(900)
    b.run(900)
    life = _lifecycle(tmp_path, url, ["gw-a", "gw-b"], tracking={"lateness_s": 0})
    old = life.seed_champion(LINEAR, GROUP)
    new = life.register_manifest(QUALITY)
    new, report = life.gate(new, GROUP)
    assert report.passed, report.reasons
    life.registry.set_stage(new, GROUP, "challenger", "published (test)")

    first = life.track(GROUP)
    assert first["events"]["new"] == first["events"]["read"] > 0
    # Each device promoted 1.1.0 and demoted 1.0.0: four device audit entries, one stage move.
    device_audit = [a for a in life.registry.audit("quality") if a["device"]]
    assert {(a["device"], a["key"], a["to"]) for a in device_audit} == {
        ("gw-a", new.key, "champion"),
        ("gw-b", new.key, "champion"),
        ("gw-a", old.key, "challenger"),
        ("gw-b", old.key, "challenger"),
    }
    assert life.registry.holder("quality", GROUP, "champion").key == new.key
    assert life.registry.get("quality", old.number).stages[GROUP] == "challenger"
    # The gateways' figures, per version in the group: MLflow history and Prometheus.
    figures = first["versions"][new.key]
    assert figures["promotions"] == 2 and figures["samples"] >= 80
    assert 0 < figures["error_mean"] < first["versions"][old.key]["error_mean"]
    assert 0 < figures["agreement"] <= 1 and figures["latency_ms"] > 0
    history = life.registry.tracking(life.registry.get("quality", new.number), GROUP)
    assert history["error_mean"] == [pytest.approx(figures["error_mean"])]
    text = render(life).decode()
    labels = f'group="{GROUP}",model="quality",version="1.1.0"'
    assert re.search(rf"edgeos_model_error_mean\{{{labels}\}} 0\.\d+", text)
    assert re.search(rf"edgeos_model_agreement\{{{labels}\}} [01]\.\d+", text)
    assert re.search(rf"edgeos_model_latency_ms\{{{labels}\}} \d", text)
    assert f'edgeos_model_promotions{{group="{GROUP}",model="quality"}} 2.0' in text
    assert f'edgeos_model_demotions{{group="{GROUP}",model="quality"}} 2.0' in text

    # Nothing new stored: the fold reads only from its cursor and changes nothing.
    audit_before = len(life.registry.audit("quality"))
    again = life.track(GROUP)
    # Read again: only the reports stamped at each device's cursor (one decision's: ≤ 4 each).
    assert again["events"]["new"] == 0 and again["events"]["read"] <= 8
    assert again["events"]["read"] < first["events"]["read"] / 4
    assert again["changes"] == [] and len(life.registry.audit("quality")) == audit_before
    assert life.registry.tracking(life.registry.get("quality", new.number), GROUP) == history

    # One gateway goes on: only its new reports are read and folded.
    a.run(600)
    total = _count_events(url, "gw-a", ("model_metrics", "model_promoted", "model_demoted"))
    later = life.track(GROUP)
    assert 0 < later["events"]["new"] <= later["events"]["read"] < total
    assert later["cursors"]["gw-a"] > first["cursors"]["gw-a"]
    assert later["cursors"]["gw-b"] == first["cursors"]["gw-b"]
    grown = life.registry.tracking(life.registry.get("quality", new.number), GROUP)
    assert len(grown["error_mean"]) == 2
    assert later["versions"][new.key]["samples"] > figures["samples"]


def test_report_of_a_version_the_registry_never_had_is_listed_not_recorded(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'receiver.db'}"
    Gateway(url, tmp_path / "reg", "gw-x", seed=23).run(900)
    life = _lifecycle(tmp_path, url, ["gw-x"])
    result = life.track(GROUP)
    assert {c["note"] for c in result["changes"]} == {"not in the registry"}
    assert life.registry.versions() == [] and life.registry.audit() == []
    assert result["logged"] == []


def test_drift_check_reads_only_rows_since_the_last_check_and_matches_a_full_check(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'receiver.db'}"
    line = SimLine(8, seed=31)
    engine = InferenceEngine.from_manifests(
        [MODELS_DIR / "anomaly.toml", MODELS_DIR / "correction.toml", QUALITY],
        line.stations,
        line.tag_configs(),
        guard=GuardConfig(enabled=False),
        clock=SimClock(line),
    )
    recorder = FleetRecorder(url, tmp_path / "reg", "gw-d", line.stations)
    life = _lifecycle(
        tmp_path,
        url,
        ["gw-d"],
        drift={"window_s": 300, "overlap_s": 120, "min_rows": 5},
    )
    life.seed_champion(QUALITY, GROUP)
    record_run(line, recorder, 900, engine=engine)
    recorder.flush()
    first = life.drift("quality", GROUP)
    assert first["read"]["since_us"] == {} and first["read"]["new_pairs"] > 0
    line.new_rubber(9.0)
    record_run(line, recorder, 900, engine=engine)
    recorder.close()
    second = life.drift("quality", GROUP)
    since = second["read"]["since_us"]["gw-d"]
    # It started 120 s (the overlap) before the last sample the first check read.
    assert first["windows"][-1]["start_us"] < since + 120_000_000
    assert second["read"]["samples"]["gw-d"] < 0.6 * (
        first["read"]["samples"]["gw-d"] + second["read"]["samples"]["gw-d"]
    )
    full = life.drift("quality", GROUP, since_us=1)
    assert [(w["start_us"], w["rows"]) for w in second["windows"]] == [
        (w["start_us"], w["rows"]) for w in full["windows"]
    ]
    for inc, ref in zip(second["windows"], full["windows"], strict=True):
        assert inc["rms"] == pytest.approx(ref["rms"], abs=1e-3)
    assert second["drift"] and full["drift"]
    # A third check with nothing new adds nothing.
    third = life.drift("quality", GROUP)
    assert third["read"]["new_pairs"] == 0 and third["windows"] == second["windows"]


def test_rollback_from_the_command_line_republishes_the_previous_champion_as_a_new_version(
    tmp_path: Path, fleet: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = OtaRepository.init(tmp_path / "repo", tmp_path / "root-keys")
    config = tmp_path / "models.toml"
    config.write_text(
        f'home = "life"\nstorage_url = "{fleet.storage_url}"\nota_repo = "{repo.dir}"\n'
        f'[groups.{fleet.group}]\ndevices = ["{fleet.device}"]\n'
    )
    base = ["models", "--config", str(config), "--json"]
    assert main([*base, "register", str(LINEAR), "--group", fleet.group, "--champion"]) == 0
    linear = json.loads(capsys.readouterr().out)
    folder = tmp_path / "v110"
    folder.mkdir()
    for f in (QUALITY, QUALITY.with_suffix(".tflite")):
        shutil.copy2(f, folder / f.name)
    shutil.copy2(MODELS_DIR / "golden" / "quality-1.1.0.npz", folder / "golden.npz")
    assert main([*base, "register", str(folder)]) == 0
    capsys.readouterr()
    # 1.1.0 became the group's champion (as a device's promotion report would make it).
    life = Lifecycle(load_config(config))
    v110 = life.registry.find("quality@1.1.0")
    _, old_compound = life.rows(fleet.group, until_us=fleet.drift_us)
    v110, _ = life.gate(v110, fleet.group, replay=old_compound)
    life.registry.set_stage(v110, fleet.group, "champion", "gw reported model_promoted (test)")

    assert main([*base, "rollback", "--task", "quality", "--group", fleet.group]) == 0
    rolled = json.loads(capsys.readouterr().out)
    assert rolled["rollback_of"] == "quality@1.0.0"
    assert rolled["version"]["key"] == "quality@1.2.0"
    assert rolled["version"]["sha256"] == linear["sha256"]
    assert rolled["version"]["stages"] == {fleet.group: "challenger"}
    assert rolled["bundle"].startswith("bundles/")
    # Nothing to roll back to in a group without a previous champion: refused (exit 1).
    assert main([*base, "rollback", "--task", "anomaly", "--group", fleet.group]) == 1
    assert "no previous anomaly champion" in capsys.readouterr().err
