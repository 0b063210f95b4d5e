"""Model registry on MLflow: versions, their artifacts and runs, stages per group, the audit trail.

Everything MLflow already does is done by MLflow (``MlflowClient``); this module only decides
*what* is written:

* **A version** is an MLflow registered-model version of the model family (``quality``, …). Its
  source run holds the artifacts under ``model/`` — the ``.tflite``, its manifest, the golden
  inputs/outputs (``golden.npz``) and the training report — and the training run's params
  (data window, devices, code version, hyper-parameters) and metrics. Version tags:
  ``manifest_version``, ``sha256`` (of the ``.tflite``: what the manifest names, TUF signs and
  the gateway verifies), ``manifest_sha256`` (the version's content address: registering the
  same manifest twice returns the existing version), ``parent`` (lineage, ``name@version``) and
  ``status`` (``candidate`` → ``qualified`` | ``refused``, set by the gate only).
* **Stages per similarity group**: ``challenger`` and ``champion`` are registry *aliases*
  (``challenger-<group>``, ``champion-<group>``: at most one version each); ``stage.<group>``
  tags add ``retired``. They change only through :meth:`ModelRegistry.set_stage`, and every
  change is an **audit record**: a run in the ``edgeos-lifecycle-audit`` experiment (params
  model, version, group, from, to, reason; MLflow stamps the time).
* **Campaign reports**: a version published as a models bundle carries the bundle's target
  path in its ``bundle.<group>`` tag (:mod:`.publish`); :meth:`ModelRegistry.published_bundles`
  reads that link back, and each device's install outcome reported to the bundle's OTA
  campaign is an audit record tagged with the device, the campaign and the report
  (:meth:`ModelRegistry.audit_install`, folded by :mod:`.campaigns`). A halted campaign sets
  ``campaign_halted.<group>`` (:meth:`ModelRegistry.mark_campaign_halted`).
* **Long-term tracking**: one run per (version, group) in ``edgeos-tracking/<name>``, whose
  metrics (error against realised quality, agreement, latency, promotions) are logged with
  their timestamps by :meth:`ModelRegistry.log_tracking`.

Versions are never overwritten: a rollback registers the previous champion's bytes again as a
*new* version (``rollback_of`` tag), because the gateways' version floor forbids going back by
number.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeos_cloud.models.errors import RegistryUnavailable, VersionRefused
from edgeos_protocol.manifest import Manifest, ManifestError, load_manifest, read_verified

__all__ = [
    "AUDIT_EXPERIMENT",
    "GROUP_STAGES",
    "ModelRegistry",
    "RegisteredVersion",
    "TrainingRecord",
]

log = logging.getLogger(__name__)

#: Stages a version can hold in a group, in lifecycle order (``candidate``/``qualified`` are
#: group-independent statuses of the version itself).
GROUP_STAGES: tuple[str, ...] = ("challenger", "champion", "retired")
STATUSES: tuple[str, ...] = ("candidate", "qualified", "refused")
AUDIT_EXPERIMENT = "edgeos-lifecycle-audit"
_GROUP_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")


@dataclass(frozen=True, slots=True)
class TrainingRecord:
    """What produced a version: logged as the source run's params, metrics and tags."""

    params: Mapping[str, str | int | float] = field(default_factory=dict)
    metrics: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class RegisteredVersion:
    """A registry version as the lifecycle sees it."""

    name: str
    number: int
    manifest_version: str
    sha256: str
    run_id: str
    parent: str
    status: str
    stages: Mapping[str, str]
    tags: Mapping[str, str]

    @property
    def key(self) -> str:
        """``name@manifest_version`` — how gateways, events and manifests name it."""
        return f"{self.name}@{self.manifest_version}"

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.number,
            "key": self.key,
            "manifest_version": self.manifest_version,
            "sha256": self.sha256,
            "run_id": self.run_id,
            "parent": self.parent,
            "status": self.status,
            "stages": dict(self.stages),
            "gate": self.tags.get("gate_summary", ""),
            "campaign_halted": self.campaign_halted,
        }

    @property
    def campaign_halted(self) -> dict[str, str]:
        """Per group, why the campaign that last published this version there halted."""
        prefix = "campaign_halted."
        return {k[len(prefix) :]: v for k, v in self.tags.items() if k.startswith(prefix)}


_AUDIT_TAGS = ("key", "group", "device", "from", "to", "reason", "campaign", "stage", "report")


def _check_group(group: str) -> str:
    if not _GROUP_RE.match(group):
        raise ValueError(f"bad group name {group!r} (letters, digits, '-', '_')")
    return group


class ModelRegistry:
    """The lifecycle's view of an MLflow tracking + model registry store.

    ``tracking_uri`` is ``sqlite:///path/mlflow.db`` (the default set-up, see :meth:`at`) or a
    team's tracking server URL; ``artifact_root`` is where new experiments keep artifacts (a
    local folder by default; a server decides its own).
    """

    def __init__(
        self,
        tracking_uri: str,
        *,
        artifact_root: str | None = None,
        registry_uri: str | None = None,
    ) -> None:
        try:
            from mlflow import MlflowClient
        except ImportError as exc:
            raise RegistryUnavailable(
                f"MLflow is not installed ({exc}); pip install 'edgeos-cloud[models]'"
            ) from exc
        self.tracking_uri = tracking_uri
        self.artifact_root = artifact_root
        with self._translated("open the registry"):
            self.client = MlflowClient(tracking_uri=tracking_uri, registry_uri=registry_uri)

    @classmethod
    def at(cls, directory: str | Path) -> ModelRegistry:
        """The default set-up: SQLite store and a local artifact folder inside ``directory``."""
        d = Path(directory).resolve()
        try:
            d.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RegistryUnavailable(f"cannot create the registry folder {d}: {exc}") from exc
        return cls(f"sqlite:///{d / 'mlflow.db'}", artifact_root=(d / "artifacts").as_uri())

    # ------------------------------------------------------------------ errors

    @contextmanager
    def _translated(self, what: str) -> Iterator[None]:
        """MLflow and database errors → :class:`RegistryUnavailable` (one place)."""
        try:
            yield
        except (RegistryUnavailable, VersionRefused, KeyError, ValueError):
            raise
        except Exception as exc:  # MlflowException, sqlalchemy errors, OSError, requests errors
            raise RegistryUnavailable(
                f"model registry {self.tracking_uri}: cannot {what}: {type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}"
            ) from exc

    def _experiment(self, name: str) -> str:
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            return str(exp.experiment_id)
        location = f"{self.artifact_root}/{name}" if self.artifact_root else None
        return str(self.client.create_experiment(name, artifact_location=location))

    # ------------------------------------------------------------------ reading

    def _version(self, mv: Any) -> RegisteredVersion:
        tags = dict(mv.tags or {})
        stages = {k.split(".", 1)[1]: v for k, v in tags.items() if k.startswith("stage.")}
        return RegisteredVersion(
            name=str(mv.name),
            number=int(mv.version),
            manifest_version=tags.get("manifest_version", ""),
            sha256=tags.get("sha256", ""),
            run_id=str(mv.run_id or ""),
            parent=tags.get("parent", ""),
            status=tags.get("status", "candidate"),
            stages=stages,
            tags=tags,
        )

    def versions(self, name: str | None = None) -> list[RegisteredVersion]:
        """Every version (of one family), oldest first."""
        with self._translated("list versions"):
            found = self.client.search_model_versions(
                f"name = '{name}'" if name else "", max_results=10_000
            )
        return sorted((self._version(mv) for mv in found), key=lambda v: (v.name, v.number))

    def get(self, name: str, number: int) -> RegisteredVersion:
        with self._translated(f"read {name} v{number}"):
            return self._version(self.client.get_model_version(name, str(number)))

    def find(self, key: str) -> RegisteredVersion:
        """A version by ``name@manifest_version`` or ``name/number``; raises ``KeyError``."""
        if "/" in key:
            name, number = key.split("/", 1)
            return self.get(name, int(number))
        name, _, mv = key.partition("@")
        for v in self.versions(name):
            if v.manifest_version == mv:
                return v
        raise KeyError(f"no registered version {key}")

    def holder(self, name: str, group: str, stage: str) -> RegisteredVersion | None:
        """The version holding ``champion``/``challenger`` in ``group`` (alias), if any."""
        if stage not in ("champion", "challenger"):
            raise ValueError(f"only champion/challenger are held by one version, not {stage}")
        with self._translated(f"read the {stage} of {group}"):
            try:
                rm = self.client.get_registered_model(name)
            except Exception as exc:
                if "RESOURCE_DOES_NOT_EXIST" in str(exc) or "not found" in str(exc).lower():
                    return None
                raise
            number = (rm.aliases or {}).get(f"{stage}-{_check_group(group)}")
            if number is None:
                return None
            return self._version(self.client.get_model_version(name, str(number)))

    def download(self, version: RegisteredVersion, dest: Path) -> Path:
        """The version's ``model/`` artifacts in ``dest`` (a fresh folder); returns it."""
        dest.mkdir(parents=True, exist_ok=True)
        with self._translated(f"download {version.key}"):
            path = Path(self._download(version.run_id, "model", dest))
        return path

    def _download(self, run_id: str, artifact: str, dest: Path) -> str:
        """MLflow's artifact repository for the run, whose thread pool is shut down after use
        (MLflow starts one per repository and never stops it)."""
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        repo = get_artifact_repository(self.client.get_run(run_id).info.artifact_uri)
        try:
            return str(repo.download_artifacts(artifact, str(dest)))  # type: ignore[no-untyped-call]
        finally:
            pool = getattr(repo, "thread_pool", None)
            if pool is not None:
                pool.shutdown(wait=True)

    def gate_report(self, version: RegisteredVersion) -> dict[str, Any] | None:
        with tempfile.TemporaryDirectory() as tmp, self._translated("read a gate report"):
            try:
                path = self._download(version.run_id, "gate/report.json", Path(tmp))
            except Exception as exc:
                if "No such file" in str(exc) or "does not exist" in str(exc).lower():
                    return None
                raise
            data: dict[str, Any] = json.loads(Path(path).read_text())
            return data

    def next_manifest_version(self, name: str, floor: str = "1.0.0") -> str:
        """One minor step above every version of ``name`` registered or ``floor``."""

        def parts(text: str) -> tuple[int, ...]:
            try:
                return tuple(int(p) for p in text.split("."))
            except ValueError:
                return (0,)

        top = max([parts(floor), *(parts(v.manifest_version) for v in self.versions(name))])
        major, minor = [*top, 0, 0][:2]
        return f"{major}.{minor + 1}.0"

    # ------------------------------------------------------------------ writing

    def register(
        self,
        model_dir: Path,
        *,
        training: TrainingRecord | None = None,
        extra_tags: Mapping[str, str] | None = None,
    ) -> RegisteredVersion:
        """Register the model in ``model_dir`` (one manifest, its ``.tflite``, ``golden.npz``).

        The manifest must parse and its sha256 must match the file (else
        :class:`VersionRefused`, nothing written). Registering the same content again returns
        the existing version. The new version's status is ``candidate``.
        """
        manifests = sorted(model_dir.glob("*.toml"))
        if len(manifests) != 1:
            raise VersionRefused(f"{model_dir} must hold exactly one manifest, found {manifests}")
        try:
            manifest = load_manifest(manifests[0])
            read_verified(manifest)
        except ManifestError as exc:
            raise VersionRefused(f"not registered: {exc.reason}") from exc
        content = hashlib.sha256(manifests[0].read_bytes()).hexdigest()
        for existing in self.versions(manifest.name):
            if existing.tags.get("manifest_sha256") == content:
                return existing
            if existing.manifest_version == manifest.version:
                raise VersionRefused(
                    f"{manifest.key} is already registered with other content (v{existing.number})"
                    "; versions are immutable: give the new model a new version"
                )
        training = training or TrainingRecord()
        with self._translated(f"register {manifest.key}"):
            exp = self._experiment(f"edgeos-models/{manifest.name}")
            run = self.client.create_run(exp, run_name=manifest.key)
            run_id = run.info.run_id
            try:
                for k, v in training.params.items():
                    self.client.log_param(run_id, k, str(v)[:6000])
                for k, v in training.metrics.items():
                    self.client.log_metric(run_id, k, float(v))
                self.client.set_tag(run_id, "edgeos.model", manifest.key)
                self.client.log_artifacts(run_id, str(model_dir), "model")
            finally:
                self.client.set_terminated(run_id)
            from mlflow.exceptions import MlflowException

            try:
                self.client.get_registered_model(manifest.name)
            except MlflowException as exc:
                # Only a missing model is created; a registry that is down stays an error.
                if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
                self.client.create_registered_model(
                    manifest.name, description=f"edgeos {manifest.task} models"
                )
            tags = {
                "manifest_version": manifest.version,
                "sha256": manifest.sha256,
                "manifest_sha256": content,
                "task": manifest.task,
                "parent": manifest.parent,
                "status": "candidate",
                **(extra_tags or {}),
            }
            mv = self.client.create_model_version(
                manifest.name, source=f"runs:/{run_id}/model", run_id=run_id, tags=tags
            )
        version = self._version(mv)
        self._audit(version, "", "", "candidate", "registered")
        return version

    def set_status(
        self, version: RegisteredVersion, status: str, report: Mapping[str, Any], summary: str
    ) -> RegisteredVersion:
        """The gate's decision: store its report with the version and set its status."""
        if status not in STATUSES:
            raise ValueError(f"unknown status {status!r}")
        with self._translated(f"store the gate report of {version.key}"):
            self.client.log_dict(version.run_id, dict(report), "gate/report.json")
            for k, v in (("status", status), ("gate_summary", summary[:4000])):
                self.client.set_model_version_tag(version.name, str(version.number), k, v)
        self._audit(version, "", version.status, status, summary)
        return self.get(version.name, version.number)

    def set_stage(
        self, version: RegisteredVersion, group: str, stage: str, reason: str
    ) -> RegisteredVersion:
        """Move ``version`` to ``stage`` in ``group``; the displaced holder is retired."""
        _check_group(group)
        if stage not in GROUP_STAGES:
            raise ValueError(f"unknown stage {stage!r} (known: {GROUP_STAGES})")
        if stage in ("challenger", "champion") and version.status != "qualified":
            raise VersionRefused(
                f"{version.key} is {version.status}: only a qualified version can be {stage}"
            )
        previous_stage = version.stages.get(group, "")
        if previous_stage == stage:
            return version
        with self._translated(f"set {version.key} {stage} in {group}"):
            if stage in ("challenger", "champion"):
                displaced = self.holder(version.name, group, stage)
                alias = f"{stage}-{group}"
                self.client.set_registered_model_alias(version.name, alias, str(version.number))
                if displaced is not None and displaced.number != version.number:
                    self._set_stage_tag(displaced, group, "retired", f"replaced by {version.key}")
            for other in ("challenger", "champion"):
                if other != stage and previous_stage == other:
                    self.client.delete_registered_model_alias(version.name, f"{other}-{group}")
            self._set_stage_tag(version, group, stage, reason)
        return self.get(version.name, version.number)

    def _set_stage_tag(
        self, version: RegisteredVersion, group: str, stage: str, reason: str
    ) -> None:
        before = version.stages.get(group, "")
        if stage == "retired":
            for alias in ("challenger", "champion"):
                holder = self.holder(version.name, group, alias)
                if holder is not None and holder.number == version.number:
                    self.client.delete_registered_model_alias(version.name, f"{alias}-{group}")
        self.client.set_model_version_tag(
            version.name, str(version.number), f"stage.{group}", stage
        )
        self._audit(version, group, before, stage, reason)

    def _audit(
        self,
        version: RegisteredVersion,
        group: str,
        before: str,
        after: str,
        reason: str,
        *,
        device: str = "",
        extra: Mapping[str, str] | None = None,
    ) -> None:
        with self._translated("write an audit record"):
            exp = self._experiment(AUDIT_EXPERIMENT)
            who = f" [{device}]" if device else ""
            run = self.client.create_run(
                exp,
                run_name=f"{version.key} {group or '*'}{who}: {before or '-'} → {after}",
                tags={
                    **(extra or {}),
                    "model": version.name,
                    "version": str(version.number),
                    "key": version.key,
                    "group": group,
                    "device": device,
                    "from": before,
                    "to": after,
                    "reason": reason[:4000],
                },
            )
            self.client.set_terminated(run.info.run_id)

    def audit_device(
        self,
        version: RegisteredVersion,
        *,
        group: str,
        device: str,
        before: str,
        after: str,
        reason: str,
    ) -> None:
        """What one device did with ``version`` (its own promotion/demotion report): an audit
        record tagged with the device, whether or not the group's stage changed."""
        _check_group(group)
        self._audit(version, group, before, after, reason, device=device)

    def audit_install(
        self,
        version: RegisteredVersion,
        *,
        group: str,
        device: str,
        outcome: str,
        reason: str,
        campaign: str,
        stage: str,
        report: str,
    ) -> None:
        """One device's outcome with the models bundle that carried ``version`` (``installed``,
        ``rolled_back``, ``refused``), as its OTA campaign received it: an audit record tagged
        with the device, the campaign, its stage and the report's identity (``report``, what
        makes folding the same report twice recognisable: :meth:`campaign_reports`)."""
        _check_group(group)
        self._audit(
            version,
            group,
            "",
            outcome,
            reason,
            device=device,
            extra={"campaign": campaign, "stage": stage, "report": report},
        )

    def mark_campaign_halted(
        self,
        version: RegisteredVersion,
        group: str,
        *,
        campaign: str,
        reason: str,
        report: str,
        audit: bool = True,
    ) -> RegisteredVersion:
        """The campaign that published ``version`` to ``group`` halted: tag
        ``campaign_halted.<group>`` and (``audit``) an audit record. Stages and aliases do not
        move (the champion alias moves only on a device's own report; see :mod:`.campaigns`)."""
        _check_group(group)
        text = f"campaign {campaign}: {reason}"[:4000]
        with self._translated(f"mark {version.key} halted in {group}"):
            self.client.set_model_version_tag(
                version.name, str(version.number), f"campaign_halted.{group}", text
            )
        if not audit:
            return self.get(version.name, version.number)
        self._audit(
            version,
            group,
            version.stages.get(group, ""),
            "campaign_halted",
            text,
            extra={"campaign": campaign, "report": report},
        )
        return self.get(version.name, version.number)

    def clear_campaign_halted(self, version: RegisteredVersion, group: str) -> None:
        """Drop ``campaign_halted.<group>`` (the version is published to ``group`` again)."""
        if f"campaign_halted.{group}" not in version.tags:
            return
        with self._translated(f"clear the halted mark of {version.key}"):
            self.client.delete_model_version_tag(
                version.name, str(version.number), f"campaign_halted.{group}"
            )

    def published_bundles(self) -> dict[str, list[tuple[RegisteredVersion, str]]]:
        """Bundle target path → the (version, group) pairs published as it (the
        ``bundle.<group>`` tags :mod:`.publish` sets): which versions a campaign carries."""
        out: dict[str, list[tuple[RegisteredVersion, str]]] = {}
        for version in self.versions():
            for tag, target in version.tags.items():
                if tag.startswith("bundle."):
                    out.setdefault(target, []).append((version, tag.split(".", 1)[1]))
        return out

    def campaign_reports(self, campaign: str) -> set[tuple[str, str]]:
        """``(key, report)`` of every audit record already written for ``campaign``'s reports."""
        return {
            (a["key"], a["report"])
            # Campaign names are letters, digits, '_', '.', '-' (Campaign refuses others).
            for a in self._audit_runs(f"tags.campaign = '{campaign}'")
            if a["report"]
        }

    def audit(self, name: str | None = None) -> list[dict[str, Any]]:
        """Every stage/status change and device report (oldest first; ``device`` is empty for
        the registry's own records; ``campaign``, ``stage`` and ``report`` only on the records
        of campaign reports)."""
        return self._audit_runs(f"tags.model = '{name}'" if name else "")

    def _audit_runs(self, filter_string: str) -> list[dict[str, Any]]:
        with self._translated("read the audit trail"):
            exp = self.client.get_experiment_by_name(AUDIT_EXPERIMENT)
            if exp is None:
                return []
            runs = self.client.search_runs(
                [exp.experiment_id],
                filter_string=filter_string,
                order_by=["attributes.start_time ASC"],
                max_results=50_000,
            )
        return [
            {"at_ms": int(r.info.start_time), **{k: r.data.tags.get(k, "") for k in _AUDIT_TAGS}}
            for r in runs
        ]

    # ------------------------------------------------------------------ tracking

    def log_tracking(
        self,
        version: RegisteredVersion,
        group: str,
        metrics: Mapping[str, float],
        *,
        timestamp_ms: int | None = None,
    ) -> None:
        """Append long-term metrics of ``version`` in ``group`` (one tracking run each)."""
        _check_group(group)
        tag = f"tracking.{group}"
        with self._translated(f"log tracking metrics of {version.key}"):
            run_id = version.tags.get(tag)
            if not run_id:
                exp = self._experiment(f"edgeos-tracking/{version.name}")
                run_id = self.client.create_run(
                    exp,
                    run_name=f"{version.key} in {group}",
                    tags={"key": version.key, "group": group},
                ).info.run_id
                self.client.set_model_version_tag(version.name, str(version.number), tag, run_id)
            for k, v in metrics.items():
                self.client.log_metric(run_id, k, float(v), timestamp=timestamp_ms)

    def tracking(self, version: RegisteredVersion, group: str) -> dict[str, list[float]]:
        """The tracked metrics' histories of ``version`` in ``group``."""
        current = self.get(version.name, version.number)
        run_id = current.tags.get(f"tracking.{group}")
        if not run_id:
            return {}
        with self._translated("read tracking metrics"):
            run = self.client.get_run(run_id)
            return {
                k: [m.value for m in self.client.get_metric_history(run_id, k)]
                for k in run.data.metrics
            }


def copy_model_dir(manifest: Manifest, dest: Path, *, golden: Path | None = None) -> Path:
    """Copy a manifest, its ``.tflite`` and golden file into ``dest`` (a registrable folder)."""
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy2(manifest.path, dest / manifest.path.name)
    shutil.copy2(manifest.file, dest / manifest.file.name)
    if golden is not None and golden.exists():
        shutil.copy2(golden, dest / "golden.npz")
    return dest
