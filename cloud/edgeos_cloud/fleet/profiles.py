"""Configuration profiles in the cloud: stored by content address, validated, bundled.

A profile (:mod:`edgeos_protocol.profile`) is stored once per content address
(``<home>/profiles/<sha256>.json``) and indexed by ``(name, version)``; a version, once stored,
never changes. Gateways report their configuration in a ``config_summary`` event (stored by the
receiver with every other event); :meth:`ProfileStore.refresh_summaries` keeps the latest per
device in ``<home>/summaries/<device>.json``. Before a profile leaves the cloud it is validated
against the latest summary of **every** target (:meth:`ProfileStore.check`): a target without a
summary, or for which any value is outside its hard limits, refuses the whole build.

The bundle is a ``config`` bundle holding ``config/profile.json``; published into the TUF
repository it is signed by the targets role — TUF's signature is the profile's signature.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol

from edgeos_protocol.bundle import BundleSources, build_bundle
from edgeos_protocol.fsutil import atomic_write_json, read_json
from edgeos_protocol.profile import (
    EVENT_TYPE,
    PROFILE_FILE,
    Change,
    Issue,
    Profile,
    ProfileError,
    TargetSummary,
    diff,
    parse_profile,
    parse_summary,
    validate,
)

__all__ = [
    "EventSource",
    "ProfileStore",
    "ProfilesRefused",
    "build_profile_bundle",
    "next_config_version",
]


class ProfilesRefused(ValueError):
    """A profile does not fit one or more targets; ``issues`` maps device → reasons."""

    def __init__(self, issues: Mapping[str, list[Issue]]) -> None:
        self.issues = dict(issues)
        lines = [f"{dev}: {i}" for dev, found in sorted(self.issues.items()) for i in found]
        super().__init__("profile refused — " + "; ".join(lines))


class EventSource(Protocol):
    """What the receiver's storage offers (``Storage.events``)."""

    def events(self, device: str, since_us: int | None = None) -> list[dict[str, Any]]: ...


class ProfileStore:
    """Profiles by content address and version, and the latest summary per device."""

    def __init__(self, home: Path) -> None:
        self.home = Path(home)
        self.profiles_dir = self.home / "profiles"
        self.summaries_dir = self.home / "summaries"
        self.index_path = self.home / "profiles.json"

    def _index(self) -> dict[str, dict[str, str]]:
        if not self.index_path.exists():
            return {}
        data: dict[str, dict[str, str]] = read_json(self.index_path)
        return data

    def put(self, profile: Profile) -> str:
        """Store ``profile``; returns its digest. The same name and version with other content
        is refused: a version is immutable."""
        digest = profile.digest()
        index = self._index()
        known = index.get(profile.name, {}).get(str(profile.version))
        if known is not None and known != digest:
            raise ValueError(
                f"{profile.name} v{profile.version} is already stored with other content"
            )
        self.profiles_dir.mkdir(parents=True, exist_ok=True)
        path = self.profiles_dir / f"{digest}.json"
        if not path.exists():
            path.write_bytes(profile.canonical())
        index.setdefault(profile.name, {})[str(profile.version)] = digest
        atomic_write_json(self.index_path, index)
        return digest

    def get(self, digest: str) -> Profile:
        if not all(c in "0123456789abcdef" for c in digest) or len(digest) != 64:
            raise KeyError(digest)
        return parse_profile((self.profiles_dir / f"{digest}.json").read_bytes())

    def version(self, name: str, version: int) -> Profile:
        return self.get(self._index()[name][str(version)])

    def latest(self, name: str) -> Profile | None:
        versions = self._index().get(name, {})
        return self.version(name, max(int(v) for v in versions)) if versions else None

    def next_version(self, name: str) -> int:
        latest = self.latest(name)
        return 1 if latest is None else latest.version + 1

    def diff(self, a: str, b: str) -> list[Change]:
        return diff(self.get(a), self.get(b))

    # ------------------------------------------------------------------ summaries

    def record_summary(self, summary: TargetSummary, ts_us: int = 0) -> None:
        self.summaries_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(
            self.summaries_dir / f"{summary.device}.json",
            {"ts_us": ts_us, "summary": summary.model_dump(mode="json")},
        )

    def summary(self, device: str) -> TargetSummary | None:
        path = self.summaries_dir / f"{device}.json"
        if "/" in device or not path.exists():
            return None
        return parse_summary(read_json(path)["summary"])

    def refresh_summaries(self, storage: EventSource, devices: Iterable[str]) -> list[str]:
        """Take each device's newest stored ``config_summary`` event; returns devices updated.

        The events come out of the devices' sealed batches (authenticated by the receiver); a
        summary naming another device than the one that sent it is ignored.
        """
        updated = []
        for device in devices:
            path = self.summaries_dir / f"{device}.json"
            since = int(read_json(path).get("ts_us", 0)) + 1 if path.exists() else None
            newest: tuple[int, dict[str, Any]] | None = None
            for event in storage.events(device, since):
                if event.get("type") == EVENT_TYPE and isinstance(event.get("summary"), dict):
                    ts = int(event.get("ts_us", 0))
                    if newest is None or ts >= newest[0]:
                        newest = (ts, event["summary"])
            if newest is None:
                continue
            try:
                summary = parse_summary(newest[1])
            except ProfileError:
                continue
            if summary.device != device:
                continue
            self.record_summary(summary, newest[0])
            updated.append(device)
        return updated

    def check(self, profile: Profile, devices: Iterable[str]) -> dict[str, list[Issue]]:
        """Issues per device (only devices with issues); no summary is an issue too."""
        found: dict[str, list[Issue]] = {}
        for device in devices:
            summary = self.summary(device)
            if summary is None:
                found[device] = [Issue("", "no config_summary reported yet: cannot validate")]
                continue
            issues = validate(profile, summary)
            if issues:
                found[device] = issues
        return found

    def require_fit(self, profile: Profile, devices: Iterable[str]) -> None:
        issues = self.check(profile, devices)
        if issues:
            raise ProfilesRefused(issues)


def next_config_version(published: Mapping[str, Mapping[str, Any]], hardware: str) -> str:
    """One above the newest ``config`` bundle published for ``hardware`` (``"1"`` if none)."""
    best = 0
    for meta in published.values():
        if meta.get("kind") == "config" and meta.get("hardware") == hardware:
            try:
                best = max(best, int(str(meta["version"]).split(".")[0]))
            except ValueError:
                continue
    return str(best + 1)


def build_profile_bundle(
    store: ProfileStore,
    profile: Profile,
    devices: Iterable[str],
    *,
    hardware: str,
    version: str,
    out_dir: Path,
) -> Path:
    """Validate against every target's summary, then build the ``config`` bundle."""
    devices = list(devices)
    store.require_fit(profile, devices)
    store.put(profile)
    with tempfile.TemporaryDirectory(prefix="profile-") as tmp:
        config = Path(tmp) / "config"
        config.mkdir()
        (config / Path(PROFILE_FILE).name).write_bytes(profile.canonical())
        return build_bundle("config", version, hardware, BundleSources(config=config), out_dir)
