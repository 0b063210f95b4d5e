"""One exception tree for edgeos; each branch says what the supervisor does with it.

::

    EdgeosError                      base; never raised itself
    ├── ConfigError                  FAIL START: print every issue with its key path, exit 2
    ├── ProvisioningError            FAIL START: credentials missing or too widely readable
    ├── TransportError               RETRY: the connection is broken; supervisor reconnects
    │   ├── ConnectError                 could not connect (refused, unreachable, handshake)
    │   ├── TimeoutError_                the peer did not answer inside the scope's deadline
    │   └── ProtocolError                the peer answered garbage; the connection is reset
    ├── TagError                     DROP + COUNT: one tag's value is bad; the scan goes on
    │   ├── DecodeError                  registers/bytes do not decode to the declared type
    │   └── DeviceException              the device answered with an exception code
    ├── WriteRefused                 DROP + COUNT + REPORT: a write was refused before the wire
    ├── WireError                    DROP + COUNT: a batch/frame cannot be opened or decoded
    │   ├── UnsupportedVersion           unknown format version or cipher suite; never guessed
    │   ├── AuthenticationFailed         AEAD tag mismatch (wrong key, forged, corrupted)
    │   └── MalformedBatch               structure is wrong after authentication succeeded
    ├── StorageError                 QUARANTINE: a spool segment / snapshot is corrupt
    │   └── SpoolFull                    the configured full-disk policy refused a batch
    ├── UpdateError                  ROLL BACK: an OTA step failed; the slot is left untouched
    │   └── UpdateRejected               metadata or bundle failed verification
    └── ModelError                   REFUSE + REPORT: the model is not used; the previous one
        ├── ModelRejected                stays (defined in edgeos.inference.errors, which the
        └── BackendUnavailable           inference part imports lazily)

Library errors (pymodbus, asyncua, OSError, …) are translated into this tree in one place per
part (``raise ConnectError(...) from exc``) so the supervisor never sees foreign exceptions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "AuthenticationFailed",
    "ConfigError",
    "ConfigIssue",
    "ConnectError",
    "DecodeError",
    "DeviceException",
    "EdgeosError",
    "MalformedBatch",
    "ProtocolError",
    "ProvisioningError",
    "SpoolFull",
    "StorageError",
    "TagError",
    "TimeoutError_",
    "TransportError",
    "UnsupportedVersion",
    "UpdateError",
    "UpdateRejected",
    "WireError",
    "WriteRefused",
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


class TransportError(EdgeosError):
    """The connection to a peer is unusable; the supervisor reconnects with backoff."""

    kind = "transport"


class ConnectError(TransportError):
    kind = "connect"


class TimeoutError_(TransportError):  # noqa: N801 - avoids shadowing the builtin
    kind = "timeout"


class ProtocolError(TransportError):
    kind = "protocol"


class TagError(EdgeosError):
    """A single tag could not be read; it goes bad, the rest of the scan continues."""


class DecodeError(TagError):
    pass


class DeviceException(TagError):
    """The device answered with a protocol-level exception (e.g. Modbus code 2)."""

    def __init__(self, code: int, message: str = "") -> None:
        self.code = code
        super().__init__(message or f"device exception code {code}")


class WriteRefused(EdgeosError):
    """A write was refused before it reached the wire (limits, rate, not writable)."""

    def __init__(self, tag: str, reason: str) -> None:
        self.tag = tag
        self.reason = reason
        super().__init__(f"write to {tag!r} refused: {reason}")


class WireError(EdgeosError):
    """A batch could not be opened or decoded; it is dropped and counted by reason."""

    reason = "malformed"


class UnsupportedVersion(WireError):
    reason = "unsupported_version"


class AuthenticationFailed(WireError):
    reason = "authentication"


class MalformedBatch(WireError):
    reason = "malformed"


class StorageError(EdgeosError):
    """Persistent state is corrupt or unwritable; the part is quarantined."""


class SpoolFull(StorageError):
    """The spool is at its bound and the policy is ``refuse_new``."""


class UpdateError(EdgeosError):
    """An update step failed; the inactive slot is discarded and the active slot kept."""


class UpdateRejected(UpdateError):
    """Update metadata or a bundle failed verification."""
