"""Model manifests and the registry of loaded models (champion and challenger per task).

A model is a ``.tflite`` file with a TOML manifest next to it (see ``docs/inference.md``)::

    schema = 1
    name = "quality"            # model family
    task = "quality"            # what the runtime uses it for: anomaly | quality | correction
    version = "1.1.0"
    file = "quality.tflite"     # relative to the manifest
    sha256 = "…"                # of the .tflite file; a mismatch refuses the model
    sample_period_s = 1.0
    [input]                     # features (names), tags (suffixes read), window, mean, std
    [[outputs]]                 # name, unit (one per output column)
    [thresholds]                # task-specific numbers (spec limits, score threshold, sigmas)
    [baseline]                  # optional: plant recipe the correction deltas are relative to

Loading is all-or-nothing: the manifest is parsed and checked, the file hashed, the interpreter
built and its shapes compared with the manifest *before* the registry changes, so a bad model
raises :class:`~edgeos.inference.errors.ModelRejected` and whatever served before keeps serving.
"""

from __future__ import annotations

import hashlib
import math
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from edgeos.inference.errors import ModelRejected
from edgeos.inference.runner import Runner

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
]

Role = Literal["champion", "challenger"]
#: Tasks the engine knows.
TASKS: tuple[str, ...] = ("anomaly", "quality", "correction")


@dataclass(frozen=True, slots=True)
class OutputSpec:
    name: str
    unit: str


@dataclass(frozen=True)
class Manifest:
    """A parsed, checked manifest (the ``.tflite`` file is not read yet)."""

    path: Path
    name: str
    task: str
    version: str
    file: Path
    sha256: str
    description: str
    sample_period_s: float
    features: tuple[str, ...]
    tags: tuple[str, ...]
    window: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    outputs: tuple[OutputSpec, ...]
    thresholds: Mapping[str, float] = field(default_factory=dict)
    baseline: Mapping[str, float] = field(default_factory=dict)

    @property
    def key(self) -> str:
        """``name@version``: how events and status name the model."""
        return f"{self.name}@{self.version}"

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (self.window, len(self.features)) if self.window > 1 else (len(self.features),)

    def threshold(self, key: str) -> float:
        try:
            return self.thresholds[key]
        except KeyError:
            raise ModelRejected(str(self.path), f"thresholds.{key} is missing") from None

    def output_index(self, name: str) -> int:
        for i, out in enumerate(self.outputs):
            if out.name == name:
                return i
        raise ModelRejected(str(self.path), f"no output named {name!r}")


def _need(raw: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in raw:
        raise ModelRejected(where, f"{key!r} is missing")
    value = raw[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ModelRejected(where, f"{key!r} has the wrong type ({type(value).__name__})")
    return value


def _floats(raw: Mapping[str, Any], key: str, where: str) -> tuple[float, ...]:
    values = _need(raw, key, list, where)
    if not all(isinstance(v, int | float) and math.isfinite(v) for v in values):
        raise ModelRejected(where, f"{key!r} must be a list of finite numbers")
    return tuple(float(v) for v in values)


def load_manifest(path: str | Path) -> Manifest:
    """Parse and check a manifest; raises :class:`ModelRejected` naming the problem."""
    p = Path(path)
    where = str(p)
    try:
        raw = tomllib.loads(p.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ModelRejected(where, f"cannot read manifest: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ModelRejected(where, f"manifest is not valid TOML: {exc}") from exc
    if raw.get("schema") != 1:
        raise ModelRejected(where, f"unsupported manifest schema {raw.get('schema')!r}")
    task = _need(raw, "task", str, where)
    if task not in TASKS:
        raise ModelRejected(where, f"unknown task {task!r} (known: {', '.join(TASKS)})")
    sha = _need(raw, "sha256", str, where).lower()
    if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
        raise ModelRejected(where, "sha256 must be 64 hex digits")
    inp = _need(raw, "input", dict, where)
    features = tuple(_need(inp, "features", list, f"{where} [input]"))
    window = int(_need(inp, "window", int, f"{where} [input]"))
    mean = _floats(inp, "mean", f"{where} [input]")
    std = _floats(inp, "std", f"{where} [input]")
    if not features or len(mean) != len(features) or len(std) != len(features):
        raise ModelRejected(where, "input.mean and input.std need one value per feature")
    if any(s <= 0 for s in std) or window < 1:
        raise ModelRejected(where, "input.std must be > 0 and input.window >= 1")
    outputs = tuple(
        OutputSpec(str(_need(o, "name", str, where)), str(o.get("unit", "")))
        for o in _need(raw, "outputs", list, where)
    )
    if not outputs:
        raise ModelRejected(where, "at least one [[outputs]] entry is needed")
    thresholds = {k: float(v) for k, v in raw.get("thresholds", {}).items()}
    baseline = {k: float(v) for k, v in raw.get("baseline", {}).items()}
    period = float(_need(raw, "sample_period_s", (int, float), where))
    return Manifest(
        path=p,
        name=_need(raw, "name", str, where),
        task=task,
        version=_need(raw, "version", str, where),
        file=p.parent / _need(raw, "file", str, where),
        sha256=sha,
        description=str(raw.get("description", "")),
        sample_period_s=period,
        features=tuple(str(f) for f in features),
        tags=tuple(str(t) for t in inp.get("tags", [])),
        window=window,
        mean=mean,
        std=std,
        outputs=outputs,
        thresholds=thresholds,
        baseline=baseline,
    )


def read_verified(manifest: Manifest) -> bytes:
    """The model bytes, after checking them against the manifest's sha256."""
    try:
        blob = manifest.file.read_bytes()
    except OSError as exc:
        raise ModelRejected(
            str(manifest.path), f"cannot read model file {manifest.file}: {exc.strerror}"
        ) from exc
    digest = hashlib.sha256(blob).hexdigest()
    if digest != manifest.sha256:
        raise ModelRejected(
            str(manifest.path),
            f"sha256 mismatch for {manifest.file.name}: manifest says {manifest.sha256[:12]}…, "
            f"file is {digest[:12]}… (corrupt or tampered; the previous model stays in service)",
        )
    return blob


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


def find_manifests(directory: str | Path) -> list[Path]:
    """Every ``*.toml`` manifest directly inside ``directory``, sorted by name."""
    return sorted(p for p in Path(directory).glob("*.toml") if p.is_file())


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
