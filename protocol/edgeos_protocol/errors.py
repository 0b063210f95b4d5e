"""The errors both ends of the protocol share: the root of edgeos's one exception tree.

::

    EdgeosError                      base; never raised itself
    ├── ConfigError                  FAIL START: print every issue with its key path, exit 2
    ├── ProvisioningError            FAIL START: credentials missing or too widely readable
    ├── WireError                    DROP + COUNT: a batch/frame cannot be opened or decoded
    │   ├── UnsupportedVersion           unknown format version or cipher suite; never guessed
    │   ├── AuthenticationFailed         AEAD tag mismatch (wrong key, forged, corrupted)
    │   └── MalformedBatch               structure is wrong after authentication succeeded
    └── UpdateError                  ROLL BACK: an OTA step failed; the slot is left untouched
        └── UpdateRejected               metadata or bundle failed verification

The gateway (:mod:`edgeos.errors`) and the cloud (:mod:`edgeos_cloud.errors`) extend this tree
with their own branches, so one ``except EdgeosError`` still catches everything either side
raises on purpose.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "AuthenticationFailed",
    "ConfigError",
    "ConfigIssue",
    "EdgeosError",
    "MalformedBatch",
    "ProvisioningError",
    "UnsupportedVersion",
    "UpdateError",
    "UpdateRejected",
    "WireError",
]


class EdgeosError(Exception):
    """Base of every error edgeos raises on purpose."""


@dataclass(frozen=True, slots=True)
class ConfigIssue:
    """One problem in a configuration file: where (dotted key path) and what to fix."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path or '<file>'}: {self.message}"


class ConfigError(EdgeosError):
    """The configuration is invalid; the runtime refuses to start."""

    def __init__(self, issues: Sequence[ConfigIssue], source: str = "") -> None:
        self.issues = tuple(issues)
        self.source = source
        head = f"{source}: " if source else ""
        lines = "\n".join(f"  {issue}" for issue in self.issues)
        super().__init__(f"{head}{len(self.issues)} configuration error(s)\n{lines}")


class ProvisioningError(EdgeosError):
    """Credentials are missing, malformed, or readable by more than the service user."""


class WireError(EdgeosError):
    """A batch could not be opened or decoded; it is dropped and counted by reason."""

    reason = "malformed"


class UnsupportedVersion(WireError):
    reason = "unsupported_version"


class AuthenticationFailed(WireError):
    reason = "authentication"


class MalformedBatch(WireError):
    reason = "malformed"


class UpdateError(EdgeosError):
    """An update step failed; the inactive slot is discarded and the active slot kept."""


class UpdateRejected(UpdateError):
    """Update metadata or a bundle failed verification."""
