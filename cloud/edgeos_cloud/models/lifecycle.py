"""The model lifecycle: what ``edgeos-cloud models …`` and the drift monitor run.

One :class:`Lifecycle` ties the parts together for a configuration (:class:`LifecycleConfig`,
``models.toml``): the MLflow registry (:mod:`.registry`), the receiver database the replay and
training rows come from (:mod:`.replay`), the trainer (:mod:`.trainer`), the quality gate
(:mod:`.gate`) and the TUF repository the bundles go to (:mod:`.publish`).

Every step either completes or changes nothing: a refused version keeps status ``refused``
and is never published; the group's champion alias moves only on a device's promotion report.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from edgeos_cloud.models.errors import DataUnavailable, PublishRefused, VersionRefused
from edgeos_cloud.models.gate import GateConfig, GateReport, run_gate
from edgeos_cloud.models.registry import ModelRegistry, RegisteredVersion, TrainingRecord
from edgeos_cloud.models.replay import QualityRows, load_quality_rows, split_rows, verdict_errors
from edgeos_cloud.models.trainer import train_quality
from edgeos_protocol.manifest import Manifest, load_manifest

__all__ = ["GroupConfig", "Lifecycle", "LifecycleConfig"]

_FROZEN = ConfigDict(frozen=True, extra="forbid")


class GroupConfig(BaseModel):
    """A similarity group: gateways on lines alike enough to share models."""

    model_config = _FROZEN
    devices: tuple[str, ...]
    hardware: str = "rpi4-aarch64"


class GateSettings(BaseModel):
    model_config = _FROZEN
    tolerance: float = Field(0.05, ge=0.0)
    min_rows: int = Field(30, ge=1)
    latency_budget_us: float = Field(500.0, gt=0)
    max_bytes: int = Field(256 * 1024, gt=0)
    held_out_percent: int = Field(30, ge=5, le=80)


class TrainerSettings(BaseModel):
    model_config = _FROZEN
    python: str | None = None
    epochs: int = Field(150, ge=1)
    seed: int = 20240601
    timeout_s: float = Field(1800.0, gt=0)


class DriftSettings(BaseModel):
    model_config = _FROZEN
    #: Length of one window of realised errors (seconds).
    window_s: float = Field(600.0, gt=0)
    #: A window drifts when its RMS error exceeds ``factor`` × the champion's manifest sigma.
    factor: float = Field(5.0, gt=1.0)
    #: This many consecutive drifting windows (the latest included) trigger a retrain.
    windows: int = Field(2, ge=1)
    #: Fewer paired errors than this in a window: the window does not count.
    min_rows: int = Field(20, ge=1)


class LifecycleConfig(BaseModel):
    """``models.toml``: where the registry, the data and the repository are; the groups."""

    model_config = _FROZEN
    #: Folder of the default registry (``mlflow.db``, ``artifacts/``) and the work folders.
    home: Path
    #: A team's MLflow tracking server (``http://…``); default: SQLite under ``home``.
    tracking_uri: str | None = None
    #: The receiver database (``sqlite:///…`` or ``postgresql://…``).
    storage_url: str
    #: The TUF repository (``edgeos-cloud ota init``); needed to publish.
    ota_repo: Path | None = None
    groups: dict[str, GroupConfig] = Field(default_factory=dict)
    gate: GateSettings = GateSettings()
    trainer: TrainerSettings = TrainerSettings()
    drift: DriftSettings = DriftSettings()

    def group(self, name: str) -> GroupConfig:
        try:
            return self.groups[name]
        except KeyError:
            raise KeyError(f"no group {name!r} in the configuration") from None


class Lifecycle:
    """The lifecycle operations over one configuration (see the module docstring)."""

    def __init__(self, config: LifecycleConfig, registry: ModelRegistry | None = None) -> None:
        self.config = config
        if registry is None:
            if config.tracking_uri:
                registry = ModelRegistry(config.tracking_uri)
            else:
                registry = ModelRegistry.at(config.home)
        self.registry = registry

    @property
    def gate_config(self) -> GateConfig:
        g = self.config.gate
        return GateConfig(
            tolerance=g.tolerance,
            min_rows=g.min_rows,
            latency_budget_us=g.latency_budget_us,
            max_bytes=g.max_bytes,
        )

    @contextmanager
    def _scratch(self, prefix: str) -> Iterator[Path]:
        work = self.config.home / "work"
        work.mkdir(parents=True, exist_ok=True)
        path = Path(tempfile.mkdtemp(prefix=prefix, dir=work))
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)

    # ------------------------------------------------------------------ data

    def rows(
        self, group: str, *, since_us: int | None = None, until_us: int | None = None
    ) -> tuple[QualityRows, QualityRows]:
        """(training rows, held-out replay rows) of ``group``'s devices in the window."""
        rows = load_quality_rows(
            self.config.storage_url,
            self.config.group(group).devices,
            since_us=since_us,
            until_us=until_us,
        )
        return split_rows(rows, self.config.gate.held_out_percent)

    # ------------------------------------------------------------------ versions

    def register_dir(
        self, model_dir: Path, *, training: TrainingRecord | None = None
    ) -> RegisteredVersion:
        return self.registry.register(model_dir, training=training)

    def register_manifest(
        self, manifest_path: Path, golden: Path | None = None
    ) -> RegisteredVersion:
        """Register a committed model (manifest + ``.tflite`` + golden file) as a candidate."""
        manifest = load_manifest(manifest_path)
        if golden is None:
            golden = manifest.path.parent / "golden" / f"{manifest.name}-{manifest.version}.npz"
            if not golden.exists():
                golden = manifest.path.parent.parent / "golden" / golden.name
        with self._scratch("register-") as tmp:
            folder = tmp / "model"
            folder.mkdir()
            shutil.copy2(manifest.path, folder / manifest.path.name)
            shutil.copy2(manifest.file, folder / manifest.file.name)
            if golden.exists():
                shutil.copy2(golden, folder / "golden.npz")
            return self.registry.register(
                folder,
                training=TrainingRecord(
                    params={"source": str(manifest.path), "trained_with": manifest.trained_with}
                ),
            )

    def gate(
        self,
        version: RegisteredVersion,
        group: str,
        *,
        replay: QualityRows | None = None,
        since_us: int | None = None,
    ) -> tuple[RegisteredVersion, GateReport]:
        """Gate ``version`` against ``group``'s champion on held-out fleet rows; store the report.

        Raises :class:`DataUnavailable` (deferred, status unchanged) when the database is down.
        """
        if replay is None:
            _, replay = self.rows(group, since_us=since_us)
        champion = self.registry.holder(version.name, group, "champion")
        with self._scratch("gate-") as tmp:
            cand_dir = self.registry.download(version, tmp / "candidate")
            champ_dir = None
            if champion is not None and champion.number != version.number:
                champ_dir = self.registry.download(champion, tmp / "champion")
            report = run_gate(
                cand_dir, champion_dir=champ_dir, replay=replay, config=self.gate_config
            )
        data = report.as_dict() | {"group": group, "replay": replay.describe()}
        status = "qualified" if report.passed else "refused"
        return self.registry.set_status(version, status, data, report.summary()), report

    def seed_champion(self, manifest_path: Path, group: str) -> RegisteredVersion:
        """Register what a group's gateways run today (a committed model) as its champion."""
        version = self.register_manifest(manifest_path)
        if version.status == "candidate":
            version, report = self.gate(version, group, replay=QualityRows.empty())
            if not report.passed and any(c.name != "accuracy" for c in report.checks if not c.ok):
                raise VersionRefused(f"{version.key}: {report.summary()}", report.as_dict())
            if version.status != "qualified":
                # No replay rows is not a defect of the shipped model: it is what runs today.
                judged = "; ".join(f"{c.name}: {c.detail}" for c in report.checks if c.ok)
                version = self.registry.set_status(
                    version,
                    "qualified",
                    report.as_dict(),
                    f"seeded as what the fleet runs (accuracy not judged); {judged}",
                )
        return self.registry.set_stage(version, group, "champion", "seeded: runs on the fleet")

    # ------------------------------------------------------------------ retraining

    def retrain(
        self,
        task: str,
        group: str,
        *,
        since_us: int | None = None,
        until_us: int | None = None,
        epochs: int | None = None,
        reason: str = "by hand",
    ) -> dict[str, Any]:
        """Rows → trainer → registry (candidate) → gate; returns what happened.

        Raises :class:`DataUnavailable` (deferred) when the database is down or the window has
        too few realised outcomes; nothing is registered then.
        """
        if task != "quality":
            raise DataUnavailable(
                f"retraining {task} from fleet data is not implemented yet (quality only)"
            )
        t0 = time.perf_counter()
        train, held = self.rows(group, since_us=since_us, until_us=until_us)
        if len(held) < self.config.gate.min_rows:
            raise DataUnavailable(
                f"deferred: {len(held)} held-out rows with realised outcomes in the window "
                f"(need {self.config.gate.min_rows}); nothing was trained"
            )
        champion = self.registry.holder(task, group, "champion")
        version_text = self.registry.next_manifest_version(
            task, champion.manifest_version if champion else "1.0.0"
        )
        settings = self.config.trainer
        n_epochs = epochs or settings.epochs
        with self._scratch("train-") as tmp:
            trained = train_quality(
                train,
                tmp,
                version=version_text,
                parent=champion.key if champion else "",
                val=held,
                epochs=n_epochs,
                seed=settings.seed,
                python=settings.python,
                timeout_s=settings.timeout_s,
                trained_with=f"edgeos-cloud models retrain --group {group} ({reason})",
            )
            record = TrainingRecord(
                params={
                    "group": group,
                    "devices": ",".join(sorted(set(train.device))),
                    "since_us": str(int(train.ts_us.min())),
                    "until_us": str(int(train.ts_us.max())),
                    "rows_train": len(train),
                    "rows_held_out": len(held),
                    "epochs": n_epochs,
                    "seed": settings.seed,
                    "code": _code_version(),
                    "reason": reason,
                    "parent": champion.key if champion else "",
                },
                metrics={
                    k: float(v)
                    for k, v in trained.report.items()
                    if isinstance(v, int | float) and not isinstance(v, bool)
                },
            )
            version = self.registry.register(trained.directory, training=record)
        version, report = self.gate(version, group, replay=held)
        return {
            "version": version.as_dict(),
            "gate": report.as_dict(),
            "train_seconds": round(trained.seconds, 2),
            "seconds": round(time.perf_counter() - t0, 2),
            "rows": {"train": len(train), "held_out": len(held)},
        }

    # ------------------------------------------------------------------ publishing

    def publish(self, version: RegisteredVersion, group: str, **kwargs: Any) -> dict[str, Any]:
        from edgeos_cloud.models.publish import publish_version

        if self.config.ota_repo is None:
            raise PublishRefused("no ota_repo in the configuration")
        return publish_version(self, version, group, self.config.ota_repo, **kwargs)

    def rollback(self, task: str, group: str) -> dict[str, Any]:
        """Re-publish the group's previous champion as a new version (floors forbid going back)."""
        previous = self._previous_champion(task, group)
        with self._scratch("rollback-") as tmp:
            src = self.registry.download(previous, tmp / "src")
            old = load_manifest(next(src.glob("*.toml")))
            new_version = self.registry.next_manifest_version(task, previous.manifest_version)
            folder = tmp / "model"
            folder.mkdir()
            shutil.copy2(old.file, folder / old.file.name)
            if (src / "golden.npz").exists():
                shutil.copy2(src / "golden.npz", folder / "golden.npz")
            text = old.path.read_text(encoding="utf-8")
            text = _retag(text, old, new_version, parent=previous.key)
            (folder / old.path.name).write_text(text, encoding="utf-8")
            version = self.registry.register(
                folder,
                training=TrainingRecord(params={"rollback_of": previous.key, "group": group}),
            )
        self.registry.client.set_model_version_tag(
            version.name, str(version.number), "rollback_of", previous.key
        )
        version, report = self.gate(version, group)
        failed = {c.name for c in report.checks if not c.ok}
        if failed - {"accuracy"}:
            raise VersionRefused(f"rollback {version.key}: {report.summary()}", report.as_dict())
        if failed:
            # Rolling back says the current champion is wrong in a way the replay rows do not
            # show; the old model was judged when it was new. Everything else must still pass.
            version = self.registry.set_status(
                version,
                "qualified",
                report.as_dict(),
                f"rollback of {previous.key}: accuracy against the current champion waived; "
                + report.summary(),
            )
        return self.publish(version, group) | {"rollback_of": previous.key}

    def _previous_champion(self, task: str, group: str) -> RegisteredVersion:
        current = self.registry.holder(task, group, "champion")
        seen: list[str] = []
        for rec in self.registry.audit(task):
            if rec["group"] == group and rec["to"] == "champion" and rec["key"] not in seen:
                seen.append(rec["key"])
        for key in reversed(seen):
            if current is None or key != current.key:
                return self.registry.find(key)
        raise PublishRefused(f"{group} has no previous {task} champion to roll back to")

    # ------------------------------------------------------------------ device reports

    def record_reports(self, group: str, *, since_us: int | None = None) -> list[dict[str, Any]]:
        """Promotions/demotions the group's gateways reported → stages + audit records."""
        from edgeos_cloud.models.replay import _open

        storage = _open(self.config.storage_url)
        changes: list[dict[str, Any]] = []
        try:
            events = [
                (device, ev)
                for device in self.config.group(group).devices
                for ev in storage.events(device, since_us)
                if ev.get("type") in ("model_promoted", "model_demoted")
            ]
        finally:
            storage.close()
        for device, ev in events:
            key = f"{ev['model']}@{ev['version']}"
            try:
                version = self.registry.find(key)
            except KeyError:
                continue
            stage = "champion" if ev["type"] == "model_promoted" else "challenger"
            if version.stages.get(group) == stage or version.status != "qualified":
                continue
            self.registry.set_stage(version, group, stage, f"{device} reported {ev['type']}")
            changes.append({"device": device, "model": key, "stage": stage})
        return changes

    # ------------------------------------------------------------------ drift

    def drift(self, task: str, group: str, *, since_us: int | None = None) -> dict[str, Any]:
        """The group's realised error per window against the champion's sigma."""
        settings = self.config.drift
        rows = load_quality_rows(
            self.config.storage_url, self.config.group(group).devices, since_us=since_us
        )
        paired = verdict_errors(
            self.config.storage_url, self.config.group(group).devices, rows, since_us=since_us
        )
        champion = self.registry.holder(task, group, "champion")
        sigma = _sigma_of(self, champion) if champion else None
        windows: list[dict[str, Any]] = []
        if paired:
            width = int(settings.window_s * 1e6)
            start = min(p["ts_us"] for p in paired)
            buckets: dict[int, list[float]] = {}
            for p in paired:
                buckets.setdefault((p["ts_us"] - start) // width, []).append(p["error"])
            for k in sorted(buckets):
                errs = buckets[k]
                rms = float(sum(e * e for e in errs) / len(errs)) ** 0.5
                windows.append(
                    {
                        "start_us": start + k * width,
                        "rows": len(errs),
                        "rms": round(rms, 4),
                        "drifting": bool(
                            sigma is not None
                            and len(errs) >= settings.min_rows
                            and rms > settings.factor * sigma
                        ),
                    }
                )
        counted = [w for w in windows if w["rows"] >= settings.min_rows]
        tail = counted[-settings.windows :]
        triggered = len(tail) == settings.windows and all(w["drifting"] for w in tail)
        # Retrain on everything since the drift began: the start of the run of drifting windows.
        run = list(reversed(counted))
        first = next((i for i, w in enumerate(run) if not w["drifting"]), len(run))
        since = run[first - 1]["start_us"] if triggered and first > 0 else None
        if champion is not None and counted:
            self.registry.log_tracking(
                champion,
                group,
                {"error_rms": counted[-1]["rms"], "rows": counted[-1]["rows"]},
            )
        return {
            "group": group,
            "task": task,
            "champion": champion.key if champion else None,
            "sigma": sigma,
            "threshold": settings.factor * sigma if sigma else None,
            "windows": windows,
            "drift": triggered,
            "drift_since_us": since,
        }

    def drift_and_retrain(self, task: str, group: str, **kwargs: Any) -> dict[str, Any]:
        """The drift monitor's one step: when the group drifts, retrain on post-drift data."""
        status = self.drift(task, group)
        if not status["drift"]:
            return {"drift": status, "retrain": None}
        result = self.retrain(
            task,
            group,
            since_us=status["drift_since_us"],
            reason=f"drift: RMS above {status['threshold']:.3f} MPa",
            **kwargs,
        )
        return {"drift": status, "retrain": result}


def _sigma_of(lifecycle: Lifecycle, version: RegisteredVersion) -> float | None:
    with lifecycle._scratch("sigma-") as tmp:
        folder = lifecycle.registry.download(version, tmp)
        manifest = load_manifest(next(folder.glob("*.toml")))
    return manifest.thresholds.get("sigma")


def _retag(text: str, manifest: Manifest, version: str, *, parent: str) -> str:
    lines = []
    for line in text.splitlines():
        if line.startswith("version = "):
            lines += [f'version = "{version}"', f'parent = "{parent}"']
        elif not line.startswith("parent = "):
            lines.append(line)
    del manifest
    return "\n".join(lines) + "\n"


def _code_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"edgeos-cloud {version('edgeos-cloud')}"
    except PackageNotFoundError:
        return "edgeos-cloud (source)"
