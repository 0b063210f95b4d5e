"""Staged roll-outs: canary → wave → everyone, stopped by the failure rate of a group.

A campaign is one JSON file in ``<repo>/campaigns/<name>.json``. Starting it points the first
stage's groups at the bundle (signed channel pointers, see :mod:`edgeos_cloud.ota.repository`);
devices report ``committed``, ``rolled_back`` or ``rejected`` (with a reason) to the
repository server's ``POST /reports``, sealed under their device keys
(:mod:`edgeos_cloud.ota.reports`): only an authenticated :class:`DeviceReport` is ever
recorded, one per device. :meth:`Campaign.advance` moves to the next stage only
when the current stage has enough reports and no group's failure rate is above the stage's
threshold. A report that pushes a group past its threshold halts the campaign at once: no
further group is pointed at the bundle. Devices that already rolled back keep the failed
version on their local deny list, so a halted campaign does not make them retry.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from edgeos_cloud.ota.reports import OUTCOMES, DeviceReport
from edgeos_cloud.ota.repository import OtaRepository
from edgeos_protocol.fsutil import atomic_write_json, read_json

__all__ = ["Campaign", "Stage", "list_campaigns", "record_report"]

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")


@dataclass(frozen=True, slots=True)
class Stage:
    """One step of a roll-out: which groups get the bundle and how many failures we tolerate."""

    name: str
    groups: tuple[str, ...]
    #: A group whose share of failed devices goes *above* this halts the campaign.
    max_failure_rate: float = 0.1
    #: Reports needed from this stage before :meth:`Campaign.advance` moves on.
    min_reports: int = 1

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "groups": list(self.groups),
            "max_failure_rate": self.max_failure_rate,
            "min_reports": self.min_reports,
        }

    @classmethod
    def parse(cls, text: str) -> Stage:
        """``name:group1,group2[:rate[:min_reports]]`` (the CLI form)."""
        parts = text.split(":")
        if len(parts) < 2 or not parts[1]:
            raise ValueError(f"stage {text!r}: expected name:group[,group][:rate[:min]]")
        rate = float(parts[2]) if len(parts) > 2 else 0.1
        minimum = int(parts[3]) if len(parts) > 3 else 1
        return cls(parts[0], tuple(parts[1].split(",")), rate, minimum)


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _bare_version(text: str) -> str:
    return text.split(":", 1)[1] if ":" in text else text


class Campaign:
    """A roll-out of one published bundle through ordered stages."""

    def __init__(self, repo: OtaRepository, name: str) -> None:
        if not _NAME_RE.match(name):
            raise ValueError(f"bad campaign name {name!r}")
        self.repo = repo
        self.name = name
        self.path = repo.dir / "campaigns" / f"{name}.json"

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, Any]]:
        """Read-modify-write under an exclusive lock (the server thread and CLI may race)."""
        self.path.parent.mkdir(exist_ok=True)
        fd = os.open(self.path.parent / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            data: dict[str, Any] = read_json(self.path)
            yield data
            atomic_write_json(self.path, data)
        finally:
            os.close(fd)

    @classmethod
    def create(
        cls, repo: OtaRepository, name: str, target_path: str, stages: Sequence[Stage]
    ) -> Campaign:
        """Define a campaign for an already published bundle (nothing is rolled out yet)."""
        if not stages:
            raise ValueError("a campaign needs at least one stage")
        meta = repo.published().get(target_path)
        if meta is None:
            raise KeyError(f"{target_path} is not a published bundle")
        campaign = cls(repo, name)
        if campaign.path.exists():
            raise FileExistsError(f"campaign {name} exists")
        campaign.path.parent.mkdir(exist_ok=True)
        atomic_write_json(
            campaign.path,
            {
                "name": name,
                "target": target_path,
                "kind": meta["kind"],
                "version": meta["version"],
                "hardware": meta["hardware"],
                "stages": [s.to_json() for s in stages],
                "stage": -1,
                "status": "created",
                "halted_reason": None,
                "created": _now(),
                "devices": {},
            },
        )
        return campaign

    def load(self) -> dict[str, Any]:
        data: dict[str, Any] = read_json(self.path)
        return data

    def _stages(self, data: dict[str, Any]) -> list[Stage]:
        return [
            Stage(s["name"], tuple(s["groups"]), s["max_failure_rate"], s["min_reports"])
            for s in data["stages"]
        ]

    def start(self) -> None:
        """Roll out to the first stage."""
        with self._locked() as data:
            if data["status"] != "created":
                raise RuntimeError(f"campaign {self.name} is {data['status']}")
            stage = self._stages(data)[0]
            self.repo.set_channels(stage.groups, data["target"])
            data["stage"], data["status"] = 0, "running"

    def record(self, report: DeviceReport) -> bool:
        """Store one authenticated device report; ``True`` if it belongs to this campaign.

        Only :class:`~edgeos_cloud.ota.reports.DeviceReport` (made by
        :class:`~edgeos_cloud.ota.reports.ReportIntake` from a sealed report) is accepted: an
        unauthenticated document can neither advance nor halt a campaign. Halts the campaign
        when the reporting device's group passes its stage's threshold.
        """
        if not isinstance(report, DeviceReport):
            raise TypeError("campaigns take only authenticated DeviceReport objects")
        device, outcome = report.device, report.outcome
        if outcome not in OUTCOMES:
            raise ValueError(f"unknown outcome {outcome!r}")
        with self._locked() as data:
            if _bare_version(report.version) != data["version"]:
                return False
            group = report.group
            stages = self._stages(data)
            if not any(group in s.groups for s in stages):
                return False
            data["devices"][device] = {
                "group": group,
                "outcome": outcome,
                "reason": report.reason,
                "detail": report.detail,
                "at": report.at or _now(),
                "key_id": report.key_id,
            }
            if data["status"] == "running":
                for stage in stages[: data["stage"] + 1]:
                    for g in stage.groups:
                        rate, n = self._failure_rate(data, g)
                        if n and rate > stage.max_failure_rate:
                            data["status"] = "halted"
                            data["halted_reason"] = (
                                f"group {g}: {rate:.0%} of {n} device(s) failed "
                                f"(threshold {stage.max_failure_rate:.0%})"
                            )
            return True

    def halt(self, reason: str) -> None:
        """Stop a running campaign for a reason of the caller's (a fleet rollout's canaries did
        worse than the champion they replaced): no further stage is pointed at the bundle."""
        with self._locked() as data:
            if data["status"] in ("created", "running"):
                data["status"] = "halted"
                data["halted_reason"] = reason[:500]

    @staticmethod
    def _failure_rate(data: dict[str, Any], group: str) -> tuple[float, int]:
        reports = [d for d in data["devices"].values() if d["group"] == group]
        if not reports:
            return 0.0, 0
        failed = sum(1 for d in reports if d["outcome"] != "committed")
        return failed / len(reports), len(reports)

    def advance(self) -> str:
        """Move to the next stage if the current one is healthy; returns the new status."""
        with self._locked() as data:
            if data["status"] != "running":
                raise RuntimeError(f"campaign {self.name} is {data['status']}")
            stages = self._stages(data)
            current = stages[data["stage"]]
            reported = sum(1 for d in data["devices"].values() if d["group"] in current.groups)
            if reported < current.min_reports:
                raise RuntimeError(
                    f"stage {current.name} has {reported} report(s), needs {current.min_reports}"
                )
            if data["stage"] + 1 >= len(stages):
                data["status"] = "done"
            else:
                data["stage"] += 1
                self.repo.set_channels(stages[data["stage"]].groups, data["target"])
            return str(data["status"])

    def summary(self) -> dict[str, Any]:
        """Status, per-group counts and the per-device report."""
        data = self.load()
        groups: dict[str, dict[str, Any]] = {}
        for stage in self._stages(data):
            for g in stage.groups:
                rate, n = self._failure_rate(data, g)
                groups[g] = {"stage": stage.name, "reports": n, "failure_rate": rate}
        return {
            "name": data["name"],
            "target": data["target"],
            "version": data["version"],
            "status": data["status"],
            "stage": data["stages"][data["stage"]]["name"] if data["stage"] >= 0 else None,
            "halted_reason": data["halted_reason"],
            "groups": groups,
            "devices": data["devices"],
        }


def list_campaigns(repo: OtaRepository) -> list[Campaign]:
    """Every campaign of ``repo``, by name (a reader's view: nothing is locked or changed)."""
    directory = repo.dir / "campaigns"
    if not directory.is_dir():
        return []
    return [Campaign(repo, path.stem) for path in sorted(directory.glob("*.json"))]


def record_report(repo_dir: Path, report: DeviceReport) -> list[str]:
    """Give an authenticated report to every campaign it belongs to; returns their names."""
    repo = OtaRepository(repo_dir)
    names: list[str] = []
    directory = repo.dir / "campaigns"
    if not directory.is_dir():
        return names
    for path in sorted(directory.glob("*.json")):
        campaign = Campaign(repo, path.stem)
        if campaign.record(report):
            names.append(campaign.name)
    return names
