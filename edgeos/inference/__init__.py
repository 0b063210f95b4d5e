"""On-device inference: model registry, LiteRT runner, check gates, champion/challenger, guard.

The runtime uses :class:`InferenceEngine` (see :mod:`edgeos.inference.engine` for the whole
interface); the other names are its parts, public for tools, tests and the OTA agent.

Names are imported lazily, so ``python -m edgeos.inference.selfcheck`` runs on a device image
that has only numpy and an interpreter package (no pydantic).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from edgeos.inference.engine import EngineOutput, InferenceEngine
    from edgeos.inference.errors import BackendUnavailable, ModelError, ModelRejected
    from edgeos.inference.gates import GateVerdict, QualityGate
    from edgeos.inference.guard import ActuationGuard, GuardDecision
    from edgeos.inference.registry import LoadedModel, Manifest, ModelRegistry, load_manifest
    from edgeos.inference.runner import Runner

__all__ = [
    "ActuationGuard",
    "BackendUnavailable",
    "EngineOutput",
    "GateVerdict",
    "GuardDecision",
    "InferenceEngine",
    "LoadedModel",
    "Manifest",
    "ModelError",
    "ModelRegistry",
    "ModelRejected",
    "QualityGate",
    "Runner",
    "load_manifest",
]

_WHERE = {
    "EngineOutput": "engine",
    "InferenceEngine": "engine",
    "BackendUnavailable": "errors",
    "ModelError": "errors",
    "ModelRejected": "errors",
    "GateVerdict": "gates",
    "QualityGate": "gates",
    "ActuationGuard": "guard",
    "GuardDecision": "guard",
    "LoadedModel": "registry",
    "Manifest": "registry",
    "ModelRegistry": "registry",
    "load_manifest": "registry",
    "Runner": "runner",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'edgeos.inference' has no attribute {name!r}")
    return getattr(importlib.import_module(f"edgeos.inference.{module}"), name)
