"""A new gateway in a group starts with the group's champion models and profile.

Chosen path: **at first contact, through the OTA channel** (not inside the credential bundle).
The credential bundle holds secrets and is copied by hand or by a factory tool; models and
profiles change weekly, must be TUF-signed, version-floored and (for a profile) trialled with
automatic rollback — the OTA channel already does all of that. ``edgeos-cloud device add ID
--group G --channel C --fleet-home DIR --ota-repo REPO`` (:func:`enroll`):

1. records the device as *pending* in ``<home>/bootstrap/<ID>.json`` with its group and channel
   (the channel is written into the credential bundle as ``ota_group``: the installer puts it
   in ``[ota] group``);
2. points the channel at the group's current ``models`` bundle at once: models do not depend
   on the gateway's configuration, and enter as challengers beside the factory models.

At first contact — the gateway's first batch carries its ``config_summary`` —
:meth:`Bootstrap.step` validates the group's current profile against that summary and points
the channel at its ``config`` bundle; a profile that does not fit is not offered (the device is
marked ``refused`` with the reasons). The gateway's next ``ota check`` installs both, before its
guard has settled its first tyre.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from edgeos_cloud.fleet.profiles import EventSource, ProfileStore
from edgeos_cloud.fleet.rollout import Rollouts
from edgeos_protocol.credentials import check_device_id
from edgeos_protocol.fsutil import atomic_write_json, read_json
from edgeos_protocol.profile import PROFILE_FILE, parse_profile, validate

__all__ = ["Bootstrap", "Enrolment"]

State = Literal["pending", "done", "refused"]


@dataclass
class Enrolment:
    device: str
    group: str
    channel: str
    state: State = "pending"
    models: str | None = None
    config: str | None = None
    issues: list[str] = field(default_factory=list)


class Bootstrap:
    """Enrolments of new gateways (files under ``<home>/bootstrap``)."""

    def __init__(self, rollouts: Rollouts) -> None:
        self.rollouts = rollouts
        self.repo = rollouts.repo
        self.store: ProfileStore = rollouts.store
        self.dir = rollouts.home / "bootstrap"

    def _save(self, e: Enrolment) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.dir / f"{e.device}.json", asdict(e))

    def get(self, device: str) -> Enrolment:
        check_device_id(device)
        return Enrolment(**read_json(self.dir / f"{device}.json"))

    def pending(self) -> list[Enrolment]:
        if not self.dir.is_dir():
            return []
        found = [Enrolment(**read_json(p)) for p in sorted(self.dir.glob("*.json"))]
        return [e for e in found if e.state == "pending"]

    def enroll(self, device: str, group: str, channel: str | None = None) -> Enrolment:
        """Record ``device`` in ``group`` and point its channel at the group's models."""
        check_device_id(device)
        e = Enrolment(device, group, channel or device)
        current = self.rollouts.current(group)
        if "models" in current:
            self.repo.set_channels([e.channel], current["models"])
            e.models = current["models"]
        if "config" not in current:
            e.state = "done"
        self._save(e)
        return e

    def step(self, storage: EventSource, devices: Iterable[str] | None = None) -> list[Enrolment]:
        """Offer the group's profile to pending devices whose first summary has arrived."""
        pending = [e for e in self.pending() if devices is None or e.device in set(devices)]
        self.store.refresh_summaries(storage, [e.device for e in pending])
        changed = []
        for e in pending:
            summary = self.store.summary(e.device)
            target = self.rollouts.current(e.group).get("config")
            if summary is None or target is None:
                continue
            profile = parse_profile(self._profile_bytes(target))
            issues = validate(profile, summary)
            if issues:
                e.state, e.issues = "refused", [str(i) for i in issues]
            else:
                self.repo.set_channels([e.channel], target)
                e.state, e.config = "done", target
            self._save(e)
            changed.append(e)
        return changed

    def _profile_bytes(self, target: str) -> bytes:
        """The profile inside a published config bundle (read back from the repository)."""
        import tempfile

        from edgeos_protocol.bundle import extract_bundle

        path = self._target_file(target)
        with tempfile.TemporaryDirectory(prefix="bootstrap-") as tmp:
            extract_bundle(path, Path(tmp) / "x")
            return (Path(tmp) / "x" / PROFILE_FILE).read_bytes()

    def _target_file(self, target: str) -> Path:
        info = self.repo.targets().targets[target]
        directory, _, name = target.rpartition("/")
        return self.repo.targets_dir / directory / f"{info.hashes['sha256']}.{name}"
