"""The registry of loaded models (champion and challenger per task) and model loading.

The manifest itself (schema, parsing, the per-task contract) is shared with the cloud and lives
in :mod:`edgeos_protocol.manifest`; see its docstring and ``docs/inference.md`` for the fields.
This module re-exports its names and translates its ``ManifestError`` into the gateway's
:class:`~edgeos.inference.errors.ModelRejected`.

Loading is all-or-nothing: the manifest is parsed and checked, the file hashed, the interpreter
built and its shapes compared with the manifest *before* the registry changes, so a bad model
raises :class:`~edgeos.inference.errors.ModelRejected` and whatever served before keeps serving.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from edgeos.inference.errors import ModelRejected
from edgeos.inference.runner import Runner
from edgeos_protocol import manifest as _manifest
from edgeos_protocol.manifest import TASKS, Manifest, ManifestError, OutputSpec, find_manifests

__all__ = [
    "TASKS",
    "LoadedModel",
    "Manifest",
    "ModelRegistry",
    "OutputSpec",
    "Role",
    "find_manifests",
    "load_manifest",
    "load_model",
    "read_verified",
]

Role = Literal["champion", "challenger"]


def load_manifest(path: str | Path) -> Manifest:
    """Parse and check a manifest; raises :class:`ModelRejected` naming the problem."""
    try:
        return _manifest.load_manifest(path)
    except ModelRejected:
        raise
    except ManifestError as exc:
        raise ModelRejected(exc.source, exc.reason) from exc


def read_verified(manifest: Manifest) -> bytes:
    """The model bytes, after checking them against the manifest's sha256."""
    try:
        return _manifest.read_verified(manifest)
    except ManifestError as exc:
        raise ModelRejected(exc.source, exc.reason) from exc


@dataclass(frozen=True)
class LoadedModel:
    """A verified model with its runner."""

    manifest: Manifest
    runner: Runner

    @property
    def key(self) -> str:
        return self.manifest.key

    @property
    def task(self) -> str:
        return self.manifest.task

    @property
    def version(self) -> str:
        return self.manifest.version


def load_model(path: str | Path, *, max_batch: int = 80, backend: str | None = None) -> LoadedModel:
    """Manifest → verified bytes → runner; raises :class:`ModelRejected` on any problem."""
    manifest = load_manifest(path)
    blob = read_verified(manifest)
    # mean/std are per feature; they broadcast over the window axis of windowed inputs.
    runner = Runner(
        blob,
        input_shape=manifest.input_shape,
        output_width=len(manifest.outputs),
        mean=manifest.mean,
        std=manifest.std,
        max_batch=max_batch,
        backend=backend,
        name=manifest.key,
    )
    return LoadedModel(manifest, runner)


class ModelRegistry:
    """Champion and challenger per task. Changes happen only after a model fully loaded."""

    def __init__(self, *, max_batch: int = 80, backend: str | None = None) -> None:
        self.max_batch = max_batch
        self.backend = backend
        self._champion: dict[str, LoadedModel] = {}
        self._challenger: dict[str, LoadedModel] = {}

    def load(self, path: str | Path) -> LoadedModel:
        """Load and verify a model without placing it (raises :class:`ModelRejected`)."""
        return load_model(path, max_batch=self.max_batch, backend=self.backend)

    def place(self, model: LoadedModel, role: Role) -> LoadedModel | None:
        """Put a loaded model in a role; returns the model it displaced (if any)."""
        slots = self._champion if role == "champion" else self._challenger
        previous = slots.get(model.task)
        slots[model.task] = model
        return previous

    def champion(self, task: str) -> LoadedModel | None:
        return self._champion.get(task)

    def challenger(self, task: str) -> LoadedModel | None:
        return self._challenger.get(task)

    def drop_challenger(self, task: str) -> LoadedModel | None:
        return self._challenger.pop(task, None)

    def swap(self, task: str) -> tuple[LoadedModel, LoadedModel]:
        """Challenger becomes champion and the champion becomes the (shadow) challenger."""
        new, old = self._challenger[task], self._champion[task]
        self._champion[task], self._challenger[task] = new, old
        return new, old

    def __iter__(self) -> Iterator[tuple[Role, LoadedModel]]:
        for task in TASKS:
            if task in self._champion:
                yield "champion", self._champion[task]
            if task in self._challenger:
                yield "challenger", self._challenger[task]

    def describe(self) -> dict[str, dict[str, str]]:
        """``{task: {"champion": "name@version", "challenger": …}}`` for the status surface."""
        out: dict[str, dict[str, str]] = {}
        for role, model in self:
            out.setdefault(model.task, {})[role] = model.key
        return out
