"""Errors of the inference part; they extend the tree in :mod:`edgeos.errors`.

::

    EdgeosError
    └── ModelError                   REFUSE + REPORT: the model is not used; the previous one stays
        ├── ModelRejected                manifest invalid, file missing, sha256 mismatch, shapes
        │                                that do not match the manifest
        └── BackendUnavailable           no TFLite interpreter package is installed

Interpreter exceptions (``ValueError``/``RuntimeError`` from LiteRT) and the shared manifest
code's ``ManifestError`` are translated into :class:`ModelRejected` where a model is loaded, so
callers see one tree.
"""

from __future__ import annotations

from edgeos.errors import EdgeosError
from edgeos_protocol.manifest import ManifestError

__all__ = ["BackendUnavailable", "ModelError", "ModelRejected"]


class ModelError(EdgeosError):
    """A model cannot be used; whatever was serving before keeps serving."""


class ModelRejected(ModelError, ManifestError):
    """A model or its manifest failed verification (the message says which and why).

    Also a :class:`edgeos_protocol.manifest.ManifestError`: the manifest code is shared with the
    cloud, and what it raises is translated into this class where the gateway loads a model.
    """

    def __init__(self, source: str, reason: str) -> None:
        ManifestError.__init__(self, source, reason)


class BackendUnavailable(ModelError):
    """Neither ``ai-edge-litert`` nor ``tflite-runtime`` can be imported."""
