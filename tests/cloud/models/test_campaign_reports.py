"""OTA campaign reports linked to model stages: what each gateway did with a published model.

Real parts throughout: a TUF repository (``OtaRepository.init``), the lifecycle's own publish
path (models bundle, campaign), sealed device reports authenticated by ``ReportIntake`` with
the receiver's device registry, and a real MLflow SQLite store.
"""

from __future__ import annotations

import itertools
import json
import shutil
import socket
from pathlib import Path
from typing import Any

import pytest

from edgeos.inference.selfcheck import MODELS_DIR
from edgeos_cloud.cli import main
from edgeos_cloud.models.errors import RegistryUnavailable
from edgeos_cloud.models.lifecycle import Lifecycle, LifecycleConfig
from edgeos_cloud.models.registry import ModelRegistry, RegisteredVersion
from edgeos_cloud.ota.campaign import Campaign, Stage
from edgeos_cloud.ota.reports import ReportIntake
from edgeos_cloud.ota.repository import OtaRepository
from edgeos_cloud.receiver.registry import DeviceRegistry
from edgeos_protocol.bundle import BundleSources, build_bundle
from edgeos_protocol.control import ControlKind, seal_control
from edgeos_protocol.crypto import Keyring

QUALITY = MODELS_DIR / "quality.toml"
LINEAR = MODELS_DIR / "archive" / "quality-1.0.0.toml"
GROUP = "line-a"
DEVICES = ["gw-a", "gw-b", "gw-c"]

_counter = itertools.count(1_000)


class Plant:
    """The cloud side of one group: TUF repository, device keys, report intake, lifecycle."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.repo = OtaRepository.init(tmp_path / "repo", tmp_path / "root-keys")
        self.devices = DeviceRegistry(tmp_path / "devices")
        for device in DEVICES:
            self.devices.add(device)
        self.intake = ReportIntake(self.repo.dir, self.devices.key_for)
        self.config = tmp_path / "models.toml"
        self.config.write_text(
            f'home = "life"\nstorage_url = "sqlite:///{tmp_path / "receiver.db"}"\n'
            f'ota_repo = "{self.repo.dir}"\n[groups.{GROUP}]\ndevices = {json.dumps(DEVICES)}\n'
        )
        self.life = self.lifecycle()

    def lifecycle(self, registry: ModelRegistry | None = None) -> Lifecycle:
        config = LifecycleConfig.model_validate(
            {
                "home": self.tmp / "life",
                "storage_url": f"sqlite:///{self.tmp / 'receiver.db'}",
                "ota_repo": self.repo.dir,
                "groups": {GROUP: {"devices": DEVICES}},
            }
        )
        return Lifecycle(config, registry)

    def challenger(self) -> RegisteredVersion:
        """quality@1.0.0 champion, quality@1.1.0 qualified (the gate's own checks are
        test_gate.py's; here only the published version matters)."""
        self.life.seed_champion(LINEAR, GROUP)
        version = self.life.register_manifest(QUALITY)
        return self.life.registry.set_status(
            version, "qualified", {"passed": True}, "qualified for the campaign test"
        )

    def report(
        self,
        device: str,
        outcome: str,
        bundle_version: str,
        reason: str | None = None,
        detail: str = "",
    ) -> list[str]:
        """The gateway's sealed report of its outcome with a models bundle, as it posts it."""
        ring = Keyring.of(self.devices.get(device).current_key)  # type: ignore[union-attr]
        doc: dict[str, Any] = {
            "device": device,
            "group": GROUP,
            "outcome": outcome,
            "version": f"models:{bundle_version}",
            "reason": reason,
            "detail": detail,
        }
        sealed = seal_control(
            ControlKind.OTA_REPORT,
            doc,
            ring.current,
            device,
            next(_counter),
            key_id=ring.current_id,
        )
        return self.intake.accept(sealed)

    def device_audit(self) -> list[dict[str, Any]]:
        return [a for a in self.life.registry.audit("quality") if a["campaign"]]


@pytest.fixture
def plant(tmp_path: Path) -> Plant:
    return Plant(tmp_path)


def test_each_device_outcome_is_audited_once_and_a_halted_campaign_marks_the_version(
    plant: Plant, capsys: pytest.CaptureFixture[str]
) -> None:
    life = plant.life
    new = plant.challenger()
    champion = life.registry.holder("quality", GROUP, "champion")
    published = life.publish(new, GROUP)  # max_failure_rate 0: one failure halts
    campaign, bundle = published["campaign"], published["bundle_version"]

    assert plant.report("gw-a", "committed", bundle) == [campaign]
    first = life.record_campaign_reports()
    assert first["recorded"] == [
        {
            "device": "gw-a",
            "key": new.key,
            "group": GROUP,
            "outcome": "installed",
            "stage": GROUP,
            "campaign": campaign,
        }
    ]
    [entry] = plant.device_audit()
    assert entry["reason"] == f"gw-a installed {new.key} (campaign {campaign}, stage {GROUP})"
    assert (entry["device"], entry["group"], entry["to"]) == ("gw-a", GROUP, "installed")

    # Nothing new in the campaign: nothing read again, nothing written.
    assert life.record_campaign_reports()["recorded"] == []
    assert len(plant.device_audit()) == 1

    # A refusal halts the campaign (threshold 0): the version is marked, the champion stays.
    plant.report("gw-b", "rejected", bundle, reason="unsigned", detail="targets not signed")
    assert Campaign(plant.repo, campaign).summary()["status"] == "halted"
    second = life.record_campaign_reports()
    assert [(r.get("device"), r["outcome"]) for r in second["recorded"]] == [
        ("gw-b", "refused"),
        (None, "halted"),
    ]
    marked = life.registry.get("quality", new.number)
    assert marked.campaign_halted[GROUP].startswith(f"campaign {campaign}: group {GROUP}: 50%")
    assert marked.stages[GROUP] == "challenger"
    assert life.registry.holder("quality", GROUP, "champion") == champion
    refused = plant.device_audit()[1]
    assert refused["reason"] == (
        f"gw-b refused {new.key}: unsigned (campaign {campaign}, stage {GROUP}): targets not signed"
    )
    assert plant.device_audit()[2]["to"] == "campaign_halted"

    # A device that rolled back after the halt is still recorded; the halt is not recorded twice.
    plant.report("gw-c", "rolled_back", bundle, reason="health")
    third = life.record_campaign_reports()
    assert [(r.get("device"), r["outcome"]) for r in third["recorded"]] == [("gw-c", "rolled_back")]
    assert plant.device_audit()[-1]["reason"].startswith(f"gw-c rolled back {new.key}: health")

    # A fold that lost its state (died before saving it) writes no record twice.
    (life.config.home / "state" / "campaigns.json").unlink()
    assert len(life.record_campaign_reports()["recorded"]) == 4
    assert len(plant.device_audit()) == 4

    # `show` lists each device's outcome; `list` shows the halt.
    base = ["models", "--config", str(plant.config), "--json"]
    assert main([*base, "show", new.key]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert [(i["device"], i["outcome"], i["stage"]) for i in shown["installs"]] == [
        ("gw-a", "installed", GROUP),
        ("gw-b", "refused", GROUP),
        ("gw-c", "rolled_back", GROUP),
    ]
    assert shown["campaign_halted"] == marked.campaign_halted


def test_report_about_a_bundle_the_registry_never_published_is_listed_once_and_ignored(
    plant: Plant,
) -> None:
    models = plant.tmp / "hand" / "models"
    models.mkdir(parents=True)
    for f in (QUALITY, QUALITY.with_suffix(".tflite")):
        shutil.copy2(f, models / f.name)
    bundle = build_bundle(
        "models", "7", "rpi4-aarch64", BundleSources(models=models), plant.tmp / "dist"
    )
    published = plant.repo.publish(bundle)
    Campaign.create(plant.repo, "by-hand", published.target_path, [Stage(GROUP, (GROUP,))]).start()
    assert plant.report("gw-a", "committed", "7") == ["by-hand"]

    result = plant.life.record_campaign_reports()
    assert result["recorded"] == []
    assert [(i["campaign"], i["devices"]) for i in result["ignored"]] == [("by-hand", ["gw-a"])]
    assert "not in the registry" in result["ignored"][0]["note"]
    assert plant.life.registry.audit() == []
    assert plant.life.record_campaign_reports()["ignored"] == []


def test_registry_that_is_down_defers_the_fold_and_the_next_run_records_the_report(
    plant: Plant, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    new = plant.challenger()
    published = plant.life.publish(new, GROUP, max_failure_rate=0.5)
    plant.report("gw-a", "committed", published["bundle_version"])

    # A tracking server that is not there (a port nothing listens on); no retries, no wait.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    down = plant.lifecycle(ModelRegistry(f"http://127.0.0.1:{port}"))
    with pytest.raises(RegistryUnavailable):
        down.record_campaign_reports()
    state = down.config.home / "state" / "campaigns.json"
    assert not state.exists()
    down_config = plant.tmp / "down.toml"
    down_config.write_text(
        plant.config.read_text().replace(
            'home = "life"', f'home = "life"\ntracking_uri = "http://127.0.0.1:{port}"'
        )
    )
    assert main(["models", "--config", str(down_config), "campaigns"]) == 3
    assert "deferred" in capsys.readouterr().err
    assert not state.exists() and plant.device_audit() == []

    # The registry is back: the next run folds the report it could not record.
    assert main(["models", "--config", str(plant.config), "--json", "campaigns"]) == 0
    folded = json.loads(capsys.readouterr().out)
    assert [(r["device"], r["outcome"]) for r in folded["recorded"]] == [("gw-a", "installed")]
    assert [a["device"] for a in plant.device_audit()] == ["gw-a"]
