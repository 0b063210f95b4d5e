"""The gateway's branches of edgeos's one exception tree; each branch says what the supervisor
does with it. The root is shared with the cloud in :mod:`edgeos_protocol.errors` and re-exported
here.

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

from edgeos_protocol.errors import (
    AuthenticationFailed,
    ConfigError,
    ConfigIssue,
    EdgeosError,
    MalformedBatch,
    ProvisioningError,
    UnsupportedVersion,
    UpdateError,
    UpdateRejected,
    WireError,
)

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


class StorageError(EdgeosError):
    """Persistent state is corrupt or unwritable; the part is quarantined."""


class SpoolFull(StorageError):
    """The spool is at its bound and the policy is ``refuse_new``."""
