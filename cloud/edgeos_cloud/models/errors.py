"""Errors of the model lifecycle; they extend the one tree rooted in :mod:`edgeos_protocol.errors`.

::

    EdgeosError
    └── LifecycleError               nothing was changed: the registry, the repository and the
        │                            champion are as they were; the message says why
        ├── RegistryUnavailable          the MLflow tracking/registry store cannot be reached
        ├── DataUnavailable              DEFER: the receiver database is down, or the window
        │                                holds too few realised outcomes to train or judge on
        ├── WindowRefused                the window lacks what a task needs (key tags, a recipe
        │                                other than the plant's); waiting will not fix it
        ├── TrainingFailed               the trainer subprocess failed (its log tail is included)
        ├── VersionRefused               the quality gate refused a version (``report`` says why)
        └── PublishRefused               a version cannot be published (not qualified, no bundle)

MLflow's ``MlflowException`` and the database drivers' errors are translated in one place each
(:mod:`.registry`, :mod:`.replay`), so callers see this tree only.
"""

from __future__ import annotations

from typing import Any

from edgeos_protocol.errors import EdgeosError

__all__ = [
    "DataUnavailable",
    "LifecycleError",
    "PublishRefused",
    "RegistryUnavailable",
    "TrainingFailed",
    "VersionRefused",
    "WindowRefused",
]


class LifecycleError(EdgeosError):
    """A lifecycle step was refused or deferred; nothing was half-done."""


class RegistryUnavailable(LifecycleError):
    """The MLflow store cannot be reached or answered with an error."""


class DataUnavailable(LifecycleError):
    """The receiver database is unreachable, or holds too little realised data (deferred)."""


class WindowRefused(LifecycleError):
    """The training window lacks the fields or the variety a task needs (the reason says)."""


class TrainingFailed(LifecycleError):
    """The trainer subprocess did not produce a model."""


class VersionRefused(LifecycleError):
    """The quality gate refused a version; ``report`` is the gate's report (a dict)."""

    def __init__(self, message: str, report: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.report = report or {}


class PublishRefused(LifecycleError):
    """A version may not be published (not qualified, already published, bundle problem)."""
