"""Publishing a qualified version: a models-only bundle, signed into TUF, a staged campaign.

``publish_version`` refuses anything that is not ``qualified`` (the gate passed), then:

1. downloads the version's manifest and ``.tflite`` from the registry and checks the sha256
   again (what TUF signs is what the gate judged);
2. builds a ``models`` bundle (:func:`edgeos_protocol.bundle.build_bundle`) whose version is one
   above every models bundle published for that hardware (the gateways' version floor only
   lets newer bundles in);
3. publishes it into the repository (:meth:`OtaRepository.publish`, verified by unpacking) and
   creates and starts a one-stage :class:`~edgeos_cloud.ota.campaign.Campaign` pointing the
   group's channel at it; the version's ``bundle.<group>`` tag names the bundle (how the
   campaign's device reports find the version: :mod:`.campaigns`);
4. moves the version to ``challenger`` in the group (alias + audit). Gateways load every model of
   a models bundle as a challenger; their champion/challenger rule decides the promotion, and
   :meth:`Lifecycle.record_reports` records what each device reports.

A failure before step 3 leaves the repository untouched; TUF metadata is written by step 3 in
one targets/snapshot/timestamp update.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgeos_cloud.models.errors import PublishRefused
from edgeos_cloud.models.registry import RegisteredVersion
from edgeos_protocol.bundle import BundleSources, build_bundle
from edgeos_protocol.manifest import ManifestError, load_manifest, read_verified

if TYPE_CHECKING:
    from edgeos_cloud.models.lifecycle import Lifecycle

__all__ = ["next_bundle_version", "publish_challenger_bundle", "publish_version"]


def next_bundle_version(published: dict[str, dict[str, Any]], hardware: str) -> str:
    """One above the newest ``models`` bundle published for ``hardware`` (``"1"`` if none)."""
    best: tuple[int, ...] = (0,)
    for meta in published.values():
        if meta.get("kind") == "models" and meta.get("hardware") == hardware:
            try:
                best = max(best, tuple(int(p) for p in str(meta["version"]).split(".")))
            except ValueError:
                continue
    return str(best[0] + 1)


def _publish_bundle(
    lifecycle: Lifecycle, version: RegisteredVersion, group: str, repo_dir: Path
) -> tuple[RegisteredVersion, Any, Any]:
    """Steps 1–3 without a campaign: ``(version, repository, published target)``."""
    from edgeos_cloud.ota.repository import OtaRepository

    current = lifecycle.registry.get(version.name, version.number)
    if current.status != "qualified":
        raise PublishRefused(
            f"{current.key} is {current.status}: only a version that passed the gate is published"
        )
    if current.stages.get(group) in ("challenger", "champion"):
        raise PublishRefused(f"{current.key} is already {current.stages[group]} in {group}")
    hardware = lifecycle.config.group(group).hardware
    repo = OtaRepository(repo_dir)
    if not (repo.metadata_dir / "root.json").exists():
        raise PublishRefused(f"{repo_dir} is not an OTA repository (edgeos-cloud ota init)")
    with lifecycle._scratch("publish-") as tmp:
        src = lifecycle.registry.download(current, tmp / "artifacts")
        try:
            manifest = load_manifest(next(src.glob("*.toml")))
            read_verified(manifest)
        except (ManifestError, StopIteration) as exc:
            raise PublishRefused(
                f"{current.key}: the stored artifacts do not verify: {exc}"
            ) from exc
        if manifest.sha256 != current.sha256:
            raise PublishRefused(f"{current.key}: stored sha256 differs from the registered one")
        models = tmp / "models"
        models.mkdir()
        shutil.copy2(manifest.path, models / manifest.path.name)
        shutil.copy2(manifest.file, models / manifest.file.name)
        bundle_version = next_bundle_version(repo.published(), hardware)
        bundle = build_bundle(
            "models", bundle_version, hardware, BundleSources(models=models), tmp / "dist"
        )
        published = repo.publish(bundle)
    return current, repo, published


def _make_challenger(
    lifecycle: Lifecycle, current: RegisteredVersion, group: str, target: str, why: str
) -> RegisteredVersion:
    # ``bundle.<group>`` is the link from an OTA campaign's target back to the version
    # (:mod:`.campaigns` folds the campaign's device reports through it).
    lifecycle.registry.client.set_model_version_tag(
        current.name, str(current.number), f"bundle.{group}", target
    )
    lifecycle.registry.clear_campaign_halted(current, group)
    return lifecycle.registry.set_stage(
        lifecycle.registry.get(current.name, current.number), group, "challenger", why
    )


def publish_challenger_bundle(
    lifecycle: Lifecycle, version: RegisteredVersion, group: str, repo_dir: Path
) -> dict[str, Any]:
    """Steps 1, 2, 3 (publish only: **no campaign**, no channel moves) and 4: for a caller that
    runs its own staged campaign — the fleet's rollout (canary first, watch, halt + rollback:
    :meth:`edgeos_cloud.fleet.rollout.Rollouts.start_model`)."""
    current, _, published = _publish_bundle(lifecycle, version, group, repo_dir)
    staged = _make_challenger(
        lifecycle, current, group, published.target_path, f"published as {published.target_path}"
    )
    return {
        "version": staged.as_dict(),
        "bundle": published.target_path,
        "bundle_version": published.version,
        "campaign": None,
        "group": group,
    }


def publish_version(
    lifecycle: Lifecycle,
    version: RegisteredVersion,
    group: str,
    repo_dir: Path,
    *,
    max_failure_rate: float = 0.0,
    min_reports: int = 1,
) -> dict[str, Any]:
    """Publish ``version`` to ``group``'s gateways as a challenger (see the module docstring)."""
    from edgeos_cloud.ota.campaign import Campaign, Stage

    current, repo, published = _publish_bundle(lifecycle, version, group, repo_dir)
    name = f"{current.name}-{current.manifest_version.replace('.', '-')}-{group}"
    campaign = Campaign.create(
        repo,
        name,
        published.target_path,
        [Stage(group, (group,), max_failure_rate, min_reports)],
    )
    campaign.start()
    staged = _make_challenger(
        lifecycle,
        current,
        group,
        published.target_path,
        f"published as {published.target_path} (campaign {name})",
    )
    return {
        "version": staged.as_dict(),
        "bundle": published.target_path,
        "bundle_version": published.version,
        "campaign": name,
        "group": group,
    }
