"""Similarity groups: which gateways are comparable.

A gateway's group comes from its **fingerprint** (:mod:`edgeos_protocol.fleet`: equipment
templates and their tag names, model tasks and input contracts, hardware target), reported in
its first batch and stored by the receiver as an event. Gateways with the same fingerprint are
in the same automatic group, named by the fingerprint key (``fp-…``). The ``[fleet.groups]``
configuration overrides that: a named group takes in fingerprints (renaming the automatic
group) and pins devices (a gateway provisioned into a group is in it before it reports at all,
and stays there whatever it reports).

Precedence for one device: pinned by ``devices`` → the group naming its latest fingerprint →
the automatic group of its latest fingerprint → no group (never reported, or only malformed
reports).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from edgeos_cloud.fleet.config import FleetConfig
from edgeos_protocol.fleet import (
    FINGERPRINT_EVENT,
    Fingerprint,
    FingerprintError,
    parse_fingerprint_report,
)

__all__ = ["GroupDirectory", "GroupInfo"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class GroupInfo:
    """One similarity group as the directory sees it."""

    name: str
    members: tuple[str, ...]
    #: Fingerprint keys of its members (a pinned device may differ from the others).
    fingerprints: tuple[str, ...]
    #: ``"config"`` (named in ``[fleet.groups]``) or ``"fingerprint"`` (automatic).
    source: str
    hardware: tuple[str, ...]
    templates: tuple[str, ...]
    tasks: tuple[str, ...]

    def as_dict(self) -> dict[str, Any]:
        return {
            "group": self.name,
            "members": list(self.members),
            "fingerprints": list(self.fingerprints),
            "source": self.source,
            "hardware": list(self.hardware),
            "templates": list(self.templates),
            "tasks": list(self.tasks),
        }


class GroupDirectory:
    """Devices → groups, from the fingerprint reports in the receiver's database and the config.

    A snapshot: build it again (or call :meth:`refresh`) to see new reports. ``storage`` is an
    open receiver storage (``edgeos_cloud.receiver.storage.open_storage``); it is only read.
    """

    def __init__(self, storage: Any, config: FleetConfig | None = None) -> None:
        self._storage = storage
        self.config = config or FleetConfig()
        self._fingerprints: dict[str, Fingerprint] = {}
        self._group: dict[str, str] = {}
        self._devices: list[str] = []
        self.refresh()

    @classmethod
    def of_reports(
        cls, reports: Mapping[str, Fingerprint], config: FleetConfig | None = None
    ) -> GroupDirectory:
        """A directory over fingerprints already in hand (tools, tests, the bench)."""
        directory = cls.__new__(cls)
        directory._storage = None
        directory.config = config or FleetConfig()
        directory._fingerprints = dict(reports)
        directory._group = {}
        directory._devices = sorted(reports)
        directory._assign(directory._devices)
        return directory

    @classmethod
    def from_url(cls, storage_url: str, config: FleetConfig | None = None) -> GroupDirectory:
        """Open the receiver database at ``storage_url``, read it, close it."""
        from edgeos_cloud.receiver.storage import open_storage

        storage = open_storage(storage_url)
        try:
            return cls(storage, config)
        finally:
            storage.close()

    # ------------------------------------------------------------------ reading

    def refresh(self) -> None:
        """Re-read every device's latest fingerprint report."""
        if self._storage is None:
            return
        devices = [s.device for s in self._storage.device_summaries()]
        self._devices = devices
        self._fingerprints = {}
        for device in devices:
            fp = self._latest_fingerprint(device)
            if fp is not None:
                self._fingerprints[device] = fp
        self._assign(devices)

    def _latest_fingerprint(self, device: str) -> Fingerprint | None:
        latest: Fingerprint | None = None
        for ev in self._storage.events(device):
            if ev.get("type") != FINGERPRINT_EVENT:
                continue
            try:
                latest = parse_fingerprint_report(ev)
            except FingerprintError as exc:
                # A bad report costs only its device: it keeps its previous fingerprint.
                log.warning("device %s: %s", device, exc)
        return latest

    def _assign(self, devices: Iterable[str]) -> None:
        by_fingerprint: dict[str, str] = {}
        pinned: dict[str, str] = {}
        for name, group in self.config.groups.items():
            for key in group.fingerprints:
                by_fingerprint[key] = name
            for device in group.devices:
                pinned[device] = name
        self._group = dict(pinned)
        for device in devices:
            if device in pinned:
                continue
            fp = self._fingerprints.get(device)
            if fp is not None:
                self._group[device] = by_fingerprint.get(fp.key, fp.key)

    # ------------------------------------------------------------------ the interface

    def group_of(self, device: str) -> str | None:
        """The device's group (``None``: not pinned and no valid fingerprint report)."""
        return self._group.get(device)

    def members(self, group: str) -> list[str]:
        """Devices in ``group``, sorted."""
        return sorted(d for d, g in self._group.items() if g == group)

    def fingerprint(self, device: str) -> Fingerprint | None:
        """The device's latest valid fingerprint."""
        return self._fingerprints.get(device)

    def group_names(self) -> list[str]:
        """Every group with a member, and every configured group, sorted."""
        return sorted(set(self._group.values()) | set(self.config.groups))

    def groups(self) -> list[GroupInfo]:
        out = []
        for name in self.group_names():
            members = self.members(name)
            fps = [self._fingerprints[d] for d in members if d in self._fingerprints]
            out.append(
                GroupInfo(
                    name=name,
                    members=tuple(members),
                    fingerprints=tuple(sorted({f.key for f in fps})),
                    source="config" if name in self.config.groups else "fingerprint",
                    hardware=tuple(sorted({f.hardware for f in fps})),
                    templates=tuple(sorted({t for f in fps for t in f.templates})),
                    tasks=tuple(sorted({t for f in fps for t in f.models})),
                )
            )
        return out

    def ungrouped(self) -> list[str]:
        """Devices the receiver knows that are in no group (no valid report, not pinned)."""
        return sorted(d for d in self._devices if d not in self._group)
