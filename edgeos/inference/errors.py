"""Errors of the inference part; they extend the tree in :mod:`edgeos.errors`.

::

    EdgeosError
    └── ModelError                   REFUSE + REPORT: the model is not used; the previous one stays
        ├── ModelRejected                manifest invalid, file missing, sha256 mismatch, shapes
        │                                that do not match the manifest
        └── BackendUnavailable           no TFLite interpreter package is installed

Interpreter exceptions (``ValueError``/``RuntimeError`` from LiteRT) are translated into
:class:`ModelRejected` where a model is loaded, so callers see one tree.
"""

from __future__ import annotations

from edgeos.errors import EdgeosError

__all__ = ["BackendUnavailable", "ModelError", "ModelRejected"]


class ModelError(EdgeosError):
    """A model cannot be used; whatever was serving before keeps serving."""


class ModelRejected(ModelError):
    """A model or its manifest failed verification (the message says which and why)."""

    def __init__(self, source: str, reason: str) -> None:
        self.source = source
        self.reason = reason
        super().__init__(f"model {source!r} rejected: {reason}")


class BackendUnavailable(ModelError):
    """Neither ``ai-edge-litert`` nor ``tflite-runtime`` can be imported."""
