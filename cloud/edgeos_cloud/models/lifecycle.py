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

from edgeos_cloud.models.errors import (
    DataUnavailable,
    PublishRefused,
    VersionRefused,
    WindowRefused,
)
from edgeos_cloud.models.gate import GateConfig, GateReport, plant_recipe_rows, run_gate
from edgeos_cloud.models.registry import ModelRegistry, RegisteredVersion, TrainingRecord
from edgeos_cloud.models.replay import (
    AnomalyRows,
    QualityRows,
    load_rows,
    split_rows,
    verdict_errors,
)
from edgeos_cloud.models.state import StateFile
from edgeos_cloud.models.trainer import train_anomaly, train_correction, train_quality
from edgeos_protocol.manifest import Manifest, load_manifest

#: The tasks retrained from fleet data.
TASKS: tuple[str, ...] = ("quality", "anomaly", "correction")
_UNITS = {
    "quality": "rows with realised quality",
    "anomaly": "tyres with a realised outcome",
    "correction": "loads with a realised outcome and the recipe in force",
}

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
    #: Epochs of the quality and correction networks.
    epochs: int = Field(150, ge=1)
    #: Epochs of the anomaly autoencoder (many more windows than tyres per epoch).
    anomaly_epochs: int = Field(12, ge=1)
    seed: int = 20240601
    timeout_s: float = Field(1800.0, gt=0)
    #: Correction: fewer training loads run with a learned recipe than this → refused (the
    #: effect of a correction cannot be learned from the plant recipe alone).
    min_learned_loads: int = Field(20, ge=1)

    def epochs_for(self, task: str) -> int:
        return self.anomaly_epochs if task == "anomaly" else self.epochs


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
    #: An incremental check re-reads this much before the last sample it read, so a tyre
    #: loaded before it and measured after it is still paired (≥ one load-to-measure span).
    overlap_s: float = Field(3600.0, gt=0)


class TrackingSettings(BaseModel):
    model_config = _FROZEN
    #: Each fold re-reads this much before the newest report it folded (a batch delivered late
    #: from a gateway's spool is still folded; what was folded already is recognised, skipped).
    lateness_s: float = Field(600.0, ge=0)


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
    tracking: TrackingSettings = TrackingSettings()

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
        """(training rows, held-out replay rows) of ``group``'s quality rows in the window."""
        train, held = self.task_rows("quality", group, since_us=since_us, until_us=until_us)
        assert isinstance(train, QualityRows) and isinstance(held, QualityRows)
        return train, held

    def task_rows(
        self,
        task: str,
        group: str,
        *,
        since_us: int | None = None,
        until_us: int | None = None,
    ) -> tuple[QualityRows | AnomalyRows, QualityRows | AnomalyRows]:
        """(training rows, held-out replay rows) of ``task`` for ``group`` in the window.

        Raises :class:`DataUnavailable` (database down) and :class:`WindowRefused` (the stored
        data lack key tags the feature code needs).
        """
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r} (known: {', '.join(TASKS)})")
        fleet = load_rows(
            self.config.storage_url,
            self.config.group(group).devices,
            tasks=(task,),
            since_us=since_us,
            until_us=until_us,
        )
        rows: QualityRows | AnomalyRows = getattr(fleet, task)
        pct = self.config.gate.held_out_percent
        if isinstance(rows, AnomalyRows):
            return split_rows(rows, pct)
        return split_rows(rows, pct)

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
        replay: QualityRows | AnomalyRows | None = None,
        since_us: int | None = None,
    ) -> tuple[RegisteredVersion, GateReport]:
        """Gate ``version`` against ``group``'s champion on held-out fleet rows of its task;
        store the report.

        Raises :class:`DataUnavailable` (deferred, status unchanged) when the database is down.
        """
        if replay is None:
            task = version.tags.get("task", version.name)
            _, replay = self.task_rows(task, group, since_us=since_us)
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
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r} (known: {', '.join(TASKS)})")
        t0 = time.perf_counter()
        train, held = self.task_rows(task, group, since_us=since_us, until_us=until_us)
        if len(held) < self.config.gate.min_rows:
            raise DataUnavailable(
                f"deferred: {len(held)} held-out {_UNITS[task]} in the window "
                f"(need {self.config.gate.min_rows}); nothing was trained"
            )
        champion = self.registry.holder(task, group, "champion")
        version_text = self.registry.next_manifest_version(
            task, champion.manifest_version if champion else "1.0.0"
        )
        settings = self.config.trainer
        n_epochs = epochs or settings.epochs_for(task)
        parent = champion.key if champion else ""
        trained_with = f"edgeos-cloud models retrain --task {task} --group {group} ({reason})"
        common: dict[str, Any] = {
            "version": version_text,
            "parent": parent,
            "epochs": n_epochs,
            "seed": settings.seed,
            "python": settings.python,
            "timeout_s": settings.timeout_s,
            "trained_with": trained_with,
        }
        with self._scratch("train-") as tmp:
            extra_params: dict[str, str | int | float] = {}
            if isinstance(train, AnomalyRows):
                trained = train_anomaly(train, tmp, **common)
                extra_params = {"windows_train": int(train.windows.shape[0])}
            elif task == "correction":
                assert isinstance(held, QualityRows)
                trained, extra_params = self._train_correction(train, held, group, tmp, common)
            else:
                assert isinstance(held, QualityRows)
                trained = train_quality(train, tmp, val=held, **common)
            record = TrainingRecord(
                params={
                    "task": task,
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
                    "parent": parent,
                    **extra_params,
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

    def _train_correction(
        self,
        train: QualityRows,
        held: QualityRows,
        group: str,
        tmp: Path,
        common: dict[str, Any],
    ) -> tuple[Any, dict[str, str | int | float]]:
        """The correction's own refusals, then its trainer (see :mod:`.train.correction_tf`)."""
        from edgeos_cloud.models.gate import load_version

        champion = self.registry.holder("correction", group, "champion")
        if champion is None:
            raise WindowRefused(
                f"correction: {group} has no champion; a fleet retrain recalibrates the "
                "champion's correction (seed one with register --champion)"
            )
        champ = load_version(self.registry.download(champion, tmp / "champion"))
        if champ.model is None:
            raise WindowRefused(f"correction: the champion {champion.key} does not load")
        m = champ.manifest
        baseline = dict(m.baseline)
        plant = len(plant_recipe_rows(train, baseline))
        learned = len(train) - plant
        if learned < self.config.trainer.min_learned_loads:
            recipe = ", ".join(f"{k} {v:g}" for k, v in baseline.items())
            raise WindowRefused(
                f"correction: {learned} of {len(train)} training loads ran a recipe other than "
                f"the plant recipe ({recipe}), need {self.config.trainer.min_learned_loads}: "
                "the effect of a correction cannot be learned from the plant recipe alone "
                "(let the guard run learned recipes on the line first)"
            )
        out = champ.model.run(train.x)
        proposals = out[:, [m.output_index("heater.sp.delta"), m.output_index("press.sp.delta")]]
        trained = train_correction(
            train,
            tmp / "work",
            champion_proposals=proposals,
            baseline=baseline,
            thresholds=dict(m.thresholds),
            val=held,
            **common,
        )
        return trained, {"loads_plant_recipe": plant, "loads_learned_recipe": learned}

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

    def record_reports(self, group: str) -> list[dict[str, Any]]:
        """Promotions/demotions the group's gateways reported → per-device audit entries and
        stages; their ``model_metrics`` → tracking (one incremental fold, :mod:`.tracking`)."""
        changes: list[dict[str, Any]] = self.track(group)["changes"]
        return changes

    def record_campaign_reports(self) -> dict[str, Any]:
        """What each device did with the models bundles the OTA campaigns rolled out →
        per-device audit records, halted campaigns marked (one incremental fold,
        :mod:`.campaigns`)."""
        from edgeos_cloud.models.campaigns import CampaignFold

        return CampaignFold(self).fold()

    def track(self, group: str) -> dict[str, Any]:
        """Fold the group's new model reports into tracking (see :mod:`.tracking`)."""
        from edgeos_cloud.models.tracking import FleetTracker

        return FleetTracker(self).fold(group)

    # ------------------------------------------------------------------ drift

    def drift(self, task: str, group: str, *, since_us: int | None = None) -> dict[str, Any]:
        """The group's realised error per window against the champion's sigma.

        Incremental: each check reads only the samples and verdicts stored since the last
        sample the previous check read (minus ``overlap_s``, so a tyre loaded before that point
        and measured after it is still paired; rows already counted are recognised by their
        identity) and adds them to per-window sums kept in ``home/state/``. ``since_us`` asks
        for a one-off check from that time instead (the state is neither read nor changed).
        """
        if task != "quality":
            raise ValueError(
                f"drift is measured on the quality verdicts' realised error, not on {task}"
            )
        settings = self.config.drift
        devices = self.config.group(group).devices
        state_file = StateFile(self.config.home, f"drift-{task}-{group}")
        incremental = since_us is None
        state: dict[str, Any] = state_file.load() if incremental else {}
        overlap = int(settings.overlap_s * 1e6)
        until: dict[str, int] = state.setdefault("until", {})
        since_by_device = {d: int(until[d]) - overlap for d in devices if d in until}
        fleet = load_rows(
            self.config.storage_url,
            devices,
            since_us=since_us,
            since_by_device=since_by_device,
        )
        paired = verdict_errors(
            self.config.storage_url,
            devices,
            fleet.quality,
            since_us=since_us,
            since_by_device=since_by_device,
        )
        seen: dict[str, list[list[Any]]] = state.setdefault("seen", {})
        buckets: dict[str, list[float]] = state.setdefault("buckets", {})
        width = int(settings.window_s * 1e6)
        if paired and state.get("origin_us") is None:
            state["origin_us"] = min(p["ts_us"] for p in paired)
        known = {d: {(s, int(t)) for s, t in seen.get(d, [])} for d in devices}
        added = 0
        for p in paired:
            ident = (p["station"], int(p["ts_us"]))
            if ident in known.setdefault(p["device"], set()):
                continue
            known[p["device"]].add(ident)
            k = str((p["ts_us"] - state["origin_us"]) // width)
            b = buckets.setdefault(k, [0, 0.0])
            b[0] += 1
            b[1] += p["error"] ** 2
            added += 1
        for d in devices:
            if d in fleet.read_until_us:
                until[d] = max(int(until.get(d, 0)), fleet.read_until_us[d])
            if d in until:
                floor = int(until[d]) - overlap
                seen[d] = sorted([s, t] for s, t in known.get(d, set()) if t >= floor)
        # Only recent windows matter to the monitor; the history lives in MLflow.
        for k in sorted(buckets, key=int)[:-_KEEP_WINDOWS]:
            del buckets[k]
        champion = self.registry.holder(task, group, "champion")
        sigma = _sigma_of(self, champion) if champion else None
        windows: list[dict[str, Any]] = []
        for k in sorted(buckets, key=int):
            n, sum_sq = buckets[k]
            rms = (sum_sq / n) ** 0.5
            windows.append(
                {
                    "start_us": int(state["origin_us"]) + int(k) * width,
                    "rows": int(n),
                    "rms": round(rms, 4),
                    "drifting": bool(
                        sigma is not None
                        and n >= settings.min_rows
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
        if champion is not None and counted and added:
            self.registry.log_tracking(
                champion,
                group,
                {"error_rms": counted[-1]["rms"], "rows": counted[-1]["rows"]},
            )
        if incremental:
            state_file.save(state)
        return {
            "group": group,
            "task": task,
            "champion": champion.key if champion else None,
            "sigma": sigma,
            "threshold": settings.factor * sigma if sigma else None,
            "windows": windows,
            "drift": triggered,
            "drift_since_us": since,
            "read": {
                "since_us": since_by_device if incremental else dict.fromkeys(devices, since_us),
                "samples": fleet.samples,
                "new_pairs": added,
            },
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


#: Windows the drift state keeps (600 s windows: about two weeks).
_KEEP_WINDOWS = 2000


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
