"""Over-the-air updates: TUF-verified bundles into A/B slots, health-gated commit, rollback.

Parts (see ``docs/ota.md``):

* :mod:`edgeos_protocol.bundle`     – build and safely unpack release bundles (full/models/config)
* :mod:`edgeos.ota.slots`      – A/B slots, boot check, commit and rollback (state in
  :mod:`edgeos.ota.state`, trees and wheels in :mod:`edgeos.ota.install`)
* :mod:`edgeos.ota.health`, :mod:`edgeos.ota.trial` – runtime health and the health-gated commit
* :mod:`edgeos.ota.client`     – the gateway's TUF client (python-tuf ngclient)
* :mod:`edgeos_cloud.ota.repository` – the TUF repository (python-tuf) and its HTTP server
* :mod:`edgeos_cloud.ota.campaign`   – staged roll-outs with failure-rate gates
* :mod:`edgeos.ota.cli`        – ``gateway_main`` / ``repo_main`` for the console scripts

Only the device-side essentials are re-exported here, so the boot check (which runs before
every service start) does not import python-tuf.
"""

from edgeos.ota.health import HealthFile, HealthReport
from edgeos.ota.slots import SlotManager
from edgeos.ota.state import BootDecision
from edgeos.ota.trial import TrialMonitor, TrialOutcome
from edgeos_protocol.bundle import BundleSources, Manifest, build_bundle, read_manifest
from edgeos_protocol.outcome import FetchError, InstallError, Reason, Rejected, Version

__all__ = [
    "BootDecision",
    "BundleSources",
    "FetchError",
    "HealthFile",
    "HealthReport",
    "InstallError",
    "Manifest",
    "Reason",
    "Rejected",
    "SlotManager",
    "TrialMonitor",
    "TrialOutcome",
    "Version",
    "build_bundle",
    "read_manifest",
]
