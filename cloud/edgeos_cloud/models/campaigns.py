"""OTA campaign reports folded into the registry: what each device did with a published model.

A version published by :mod:`.publish` reaches the gateways as a ``models`` bundle rolled out
by an OTA campaign (:mod:`edgeos_cloud.ota.campaign`; the lifecycle's own one-stage campaign or
the fleet's canary-first rollout). Each gateway reports its outcome with that bundle — sealed,
authenticated, one per device, the latest kept — to the campaign (``POST /reports``).
:class:`CampaignFold` reads those campaigns and writes into the registry:

* per device and outcome, an audit record on every version the bundle carries, tagged with the
  device, the campaign, its stage and the report (:meth:`ModelRegistry.audit_install`):
  ``committed`` → ``installed``, ``rolled_back`` → ``rolled_back``, ``rejected`` →
  ``refused``, with the device's reason (``health``, ``unsigned``, …) and detail;
* a halted campaign: ``campaign_halted.<group>`` on each version and an audit record with the
  campaign's reason (:meth:`ModelRegistry.mark_campaign_halted`). No stage or alias moves: the
  group's champion is what the devices' own promotion reports made it, and a challenger that
  some devices already run stays their challenger until they say otherwise.

**Which versions a campaign carries** is not stored again: publishing tags each version with
the bundle's target path (``bundle.<group>``), the campaign names the same target, and
:meth:`ModelRegistry.published_bundles` reads the link back. A models campaign whose target no
registry version names (a bundle published by hand) is listed once as ignored, not an error;
campaigns of ``full`` and ``config`` bundles are not model campaigns and are skipped.

**Incremental**: ``home/state/campaigns.json`` keeps per campaign the identity (a hash) of each
device's report already folded and whether the halt was recorded; a fold writes only what is
new or changed (a device that reports again with another outcome is recorded again). The state
is saved after each campaign. Every record also carries the report's identity, and a fold
first asks the registry which of the campaign's reports it already holds, so a fold that dies
half-way (the registry went down: :class:`RegistryUnavailable`, deferred) is repeated without
writing any record twice and without losing one.
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any

from edgeos_cloud.models.registry import RegisteredVersion
from edgeos_cloud.models.state import StateFile

if TYPE_CHECKING:
    from edgeos_cloud.models.lifecycle import Lifecycle

__all__ = ["INSTALL_OUTCOMES", "CampaignFold", "installs"]

#: A campaign's device outcome → what the registry records for the version.
INSTALL_OUTCOMES: dict[str, str] = {
    "committed": "installed",
    "rolled_back": "rolled_back",
    "rejected": "refused",
}
_VERB = {"installed": "installed", "rolled_back": "rolled back", "refused": "refused"}


def _identity(*parts: Any) -> str:
    body = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.blake2b(body.encode(), digest_size=10).hexdigest()


def _stage_of(data: dict[str, Any], group: str) -> str:
    for stage in data["stages"]:
        if group in stage["groups"]:
            return str(stage["name"])
    return ""


def _sentence(device: str, outcome: str, key: str, report: dict[str, Any], where: str) -> str:
    """``gw-b installed correction@1.2.0 (campaign X, stage canary)``, with the device's reason
    and detail for a failure."""
    text = f"{device} {_VERB.get(outcome, outcome)} {key}"
    if outcome != "installed" and report.get("reason"):
        text += f": {report['reason']}"
    text += f" ({where})"
    if outcome != "installed" and report.get("detail"):
        text += f": {report['detail']}"
    return text


class CampaignFold:
    """Folds the OTA campaigns' device reports into the registry (see the module docstring)."""

    def __init__(self, lifecycle: Lifecycle) -> None:
        self.life = lifecycle
        self.state = StateFile(lifecycle.config.home, "campaigns")

    def fold(self) -> dict[str, Any]:
        """Read every campaign, record what is new; returns what was recorded and ignored."""
        from edgeos_cloud.ota.campaign import list_campaigns
        from edgeos_cloud.ota.repository import OtaRepository

        if self.life.config.ota_repo is None:
            return {"campaigns": 0, "recorded": [], "ignored": [], "note": "no ota_repo"}
        repo = OtaRepository(self.life.config.ota_repo)
        state = self.state.load()
        folded: dict[str, Any] = state.setdefault("campaigns", {})
        published = self.life.registry.published_bundles()
        recorded: list[dict[str, Any]] = []
        ignored: list[dict[str, Any]] = []
        seen = 0
        for campaign in list_campaigns(repo):
            data = campaign.load()
            if data.get("kind") != "models":
                continue
            seen += 1
            entry = folded.setdefault(campaign.name, {"devices": {}, "halted": False})
            new = {
                device: ident
                for device, report in sorted(data["devices"].items())
                if entry["devices"].get(device) != (ident := _identity(device, report))
            }
            halted = data["status"] == "halted" and not entry["halted"]
            if not new and not halted:
                continue
            carried = published.get(data["target"], [])
            if not carried:
                ignored.append(
                    {
                        "campaign": campaign.name,
                        "target": data["target"],
                        "devices": sorted(new),
                        "note": "not in the registry: no version was published as this bundle",
                    }
                )
            else:
                recorded += self._record(campaign.name, data, carried, new, halted)
            entry["devices"].update(new)
            entry["halted"] = entry["halted"] or halted
            self.state.save(state)
        return {"campaigns": seen, "recorded": recorded, "ignored": ignored}

    def _record(
        self,
        name: str,
        data: dict[str, Any],
        carried: list[tuple[RegisteredVersion, str]],
        new: dict[str, str],
        halted: bool,
    ) -> list[dict[str, Any]]:
        registry = self.life.registry
        done = registry.campaign_reports(name)
        out: list[dict[str, Any]] = []
        for device, ident in new.items():
            report = data["devices"][device]
            outcome = INSTALL_OUTCOMES.get(report["outcome"], str(report["outcome"]))
            stage = _stage_of(data, report["group"])
            where = f"campaign {name}, stage {stage}" if stage else f"campaign {name}"
            for version, group in carried:
                row = {"device": device, "key": version.key, "group": group, "outcome": outcome}
                out.append(row | {"stage": stage, "campaign": name})
                if (version.key, ident) in done:
                    continue  # written by a fold that died before saving its state
                registry.audit_install(
                    version,
                    group=group,
                    device=device,
                    outcome=outcome,
                    reason=_sentence(device, outcome, version.key, report, where),
                    campaign=name,
                    stage=stage,
                    report=ident,
                )
        if halted:
            ident = _identity("halted", data.get("halted_reason"))
            for version, group in carried:
                out.append(
                    {"key": version.key, "group": group, "campaign": name, "outcome": "halted"}
                )
                # The tag is set again (idempotent); the audit record only once.
                registry.mark_campaign_halted(
                    registry.get(version.name, version.number),
                    group,
                    campaign=name,
                    reason=str(data.get("halted_reason") or "halted"),
                    report=ident,
                    audit=(version.key, ident) not in done,
                )
        return out


def installs(lifecycle: Lifecycle, version: RegisteredVersion) -> list[dict[str, Any]]:
    """Per group and device, the latest install outcome of ``version`` its campaigns recorded
    (read from the audit trail: what ``show`` lists)."""
    latest: dict[tuple[str, str], dict[str, Any]] = {}
    for rec in lifecycle.registry.audit(version.name):
        if rec["key"] != version.key or not rec["campaign"] or not rec["device"]:
            continue
        latest[(rec["group"], rec["device"])] = {
            "group": rec["group"],
            "device": rec["device"],
            "outcome": rec["to"],
            "campaign": rec["campaign"],
            "stage": rec["stage"],
            "reason": rec["reason"],
            "at_ms": rec["at_ms"],
        }
    return [latest[k] for k in sorted(latest)]
