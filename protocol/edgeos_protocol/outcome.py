"""Why an update was refused or failed, and bundle version ordering.

Every refusal carries a machine-readable :class:`Reason` (reported to the receiver and shown
by ``edgeos ota status``) plus a human-readable detail. Both exceptions sit in the edgeos tree
under :class:`~edgeos.errors.UpdateError`, whose supervisor action is "roll back: the slot is
left untouched"::

    UpdateError
    ├── InstallError         the device could not complete a step (disk full, I/O error)
    ├── FetchError           the repository could not be reached or answered HTTP errors
    └── UpdateRejected
        └── Rejected         metadata or bundle failed verification (signature, hash, …)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from functools import total_ordering

from edgeos_protocol.errors import UpdateError, UpdateRejected

__all__ = [
    "MAX_VERSION_COMPONENT",
    "FetchError",
    "InstallError",
    "Reason",
    "Rejected",
    "Version",
]


class Reason(StrEnum):
    """Machine-readable cause of a refused or failed update."""

    UNSIGNED = "unsigned"  # metadata lacks a threshold of valid signatures (or wrong keys)
    EXPIRED = "expired"  # freeze attack or a repository nobody re-signed
    ROLLBACK = "rollback"  # metadata or bundle older than what we already trust
    FAST_FORWARD = "fast_forward"  # implausibly large version (would lock out later releases)
    HASH_MISMATCH = "hash_mismatch"  # bytes differ from what was signed
    TOO_LONG = "too_long"  # more bytes than signed (endless data)
    SLOW = "slow_retrieval"  # server slower than the minimum average speed
    MIX_AND_MATCH = "mix_and_match"  # parts of two releases combined
    WRONG_HARDWARE = "wrong_hardware"
    WRONG_KIND = "wrong_kind"
    UNSAFE_ENTRY = "unsafe_entry"  # traversal, symlink, device file in a bundle
    MALFORMED = "malformed"  # not a bundle, broken manifest, bad metadata
    PREVIOUSLY_FAILED = "previously_failed"  # this version already failed its trial here
    NO_SPACE = "no_space"
    IO_ERROR = "io_error"
    NETWORK = "network"
    HEALTH = "health"  # trial slot did not prove healthy
    CRASH_LOOP = "crash_loop"  # trial slot used up its boot attempts
    CORRUPT_SLOT = "corrupt_slot"  # a slot no longer matches its manifest
    PROFILE_REFUSED = "profile_refused"  # a config profile outside this gateway's own limits


class Rejected(UpdateRejected):
    """Metadata or a bundle failed verification; nothing on the device was changed."""

    def __init__(self, reason: Reason, detail: str) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason.value}: {detail}")


class InstallError(UpdateError):
    """The device could not finish an install step; the inactive slot is discarded."""

    def __init__(self, reason: Reason, detail: str) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason.value}: {detail}")


class FetchError(UpdateError):
    """The repository was unreachable; nothing was verified, nothing changed. Retry later."""

    def __init__(self, reason: Reason, detail: str) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason.value}: {detail}")


#: Largest value of one version component. A signed bundle claiming 2**40 would raise the
#: version floor so high that no honest release could ever be installed again; refusing it
#: bounds the damage a leaked targets key (or a typo at release time) can do.
MAX_VERSION_COMPONENT = 99_999_999
_VERSION_RE = re.compile(r"^\d{1,12}(\.\d{1,12}){0,3}$")


@total_ordering
@dataclass(frozen=True, slots=True)
class Version:
    """A bundle version: an integer (``42``) or dotted integers (``1.4.2``), at most 4 parts.

    Ordering pads with zeros, so ``1.4`` == ``1.4.0`` and ``7`` < ``7.1``.
    """

    parts: tuple[int, ...]

    @classmethod
    def parse(cls, text: str | int) -> Version:
        """Parse and bound-check a version; raise :class:`Rejected` when it is unusable."""
        raw = str(text).strip()
        if not _VERSION_RE.match(raw):
            raise Rejected(Reason.MALFORMED, f"version {raw!r} is not N or N.N[.N[.N]]")
        parts = tuple(int(p) for p in raw.split("."))
        if any(p > MAX_VERSION_COMPONENT for p in parts):
            raise Rejected(
                Reason.FAST_FORWARD,
                f"version {raw} has a component above {MAX_VERSION_COMPONENT}",
            )
        return cls(parts)

    def _key(self) -> tuple[int, ...]:
        return self.parts + (0,) * (4 - len(self.parts))

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, Version):
            return NotImplemented
        return self._key() < other._key()

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Version):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __str__(self) -> str:
        return ".".join(str(p) for p in self.parts)
