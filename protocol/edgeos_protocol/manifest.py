"""The model manifest: schema, parsing, the per-task input/output contract, and writing.

A model is a ``.tflite`` file with a TOML manifest next to it (see ``docs/inference.md``)::

    schema = 1
    name = "quality"            # model family
    task = "quality"            # what the runtime uses it for: anomaly | quality | correction
    version = "1.1.0"
    file = "quality.tflite"     # relative to the manifest
    sha256 = "…"                # of the .tflite file; a mismatch refuses the model
    sample_period_s = 1.0
    trained_with = "…"          # optional: what produced it (script, seed, training run)
    parent = "quality@1.1.0"    # optional: the version it was retrained from (lineage)
    [input]                     # features (names), tags (suffixes read), window, mean, std
    [[outputs]]                 # name, unit (one per output column)
    [thresholds]                # task-specific numbers (spec limits, score threshold, sigmas)
    [baseline]                  # optional: plant recipe the correction deltas are relative to

Both products need it: the gateway loads manifests (``edgeos.inference.registry``), the cloud
registers, gates and writes them (``edgeos_cloud.models``). :func:`contract_issues` says whether a
manifest's inputs and outputs are the ones the gateway's feature code (:mod:`.features`) and
engine produce and read — the "will a gateway run it" half of the cloud's quality gate.
"""

from __future__ import annotations

import hashlib
import json
import math
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeos_protocol.errors import EdgeosError
from edgeos_protocol.features import (
    ANOMALY_FEATURES,
    CORRECTION_FEATURES,
    KEY_SUFFIXES,
    QUALITY_FEATURES,
    SAMPLE_PERIOD_S,
    WINDOW,
)

__all__ = [
    "CONTRACTS",
    "TASKS",
    "Manifest",
    "ManifestError",
    "OutputSpec",
    "TaskContract",
    "contract_issues",
    "find_manifests",
    "load_manifest",
    "parse_manifest",
    "read_verified",
    "render_manifest",
    "sha256_hex",
]

#: Tasks the gateway's engine knows.
TASKS: tuple[str, ...] = ("anomaly", "quality", "correction")


class ManifestError(EdgeosError):
    """A manifest or the model file it names failed verification (``reason`` says why).

    The gateway's ``ModelRejected`` extends it, so either side can catch one class.
    """

    def __init__(self, source: str, reason: str) -> None:
        self.source = source
        self.reason = reason
        super().__init__(f"model {source!r} rejected: {reason}")


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
    trained_with: str = ""
    parent: str = ""

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
            raise ManifestError(str(self.path), f"thresholds.{key} is missing") from None

    def output_index(self, name: str) -> int:
        for i, out in enumerate(self.outputs):
            if out.name == name:
                return i
        raise ManifestError(str(self.path), f"no output named {name!r}")


def _need(raw: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in raw:
        raise ManifestError(where, f"{key!r} is missing")
    value = raw[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ManifestError(where, f"{key!r} has the wrong type ({type(value).__name__})")
    return value


def _floats(raw: Mapping[str, Any], key: str, where: str) -> tuple[float, ...]:
    values = _need(raw, key, list, where)
    if not all(isinstance(v, int | float) and math.isfinite(v) for v in values):
        raise ManifestError(where, f"{key!r} must be a list of finite numbers")
    return tuple(float(v) for v in values)


def _numbers(raw: Mapping[str, Any], key: str, where: str) -> dict[str, float]:
    table = raw.get(key, {})
    if not isinstance(table, dict):
        raise ManifestError(where, f"[{key}] must be a table")
    out: dict[str, float] = {}
    for k, v in table.items():
        if not isinstance(v, int | float) or isinstance(v, bool) or not math.isfinite(v):
            raise ManifestError(where, f"{key}.{k} must be a finite number")
        out[str(k)] = float(v)
    return out


def parse_manifest(raw: Mapping[str, Any], path: Path) -> Manifest:
    """Check a manifest's parsed TOML; raises :class:`ManifestError` naming the problem."""
    where = str(path)
    if raw.get("schema") != 1:
        raise ManifestError(where, f"unsupported manifest schema {raw.get('schema')!r}")
    task = _need(raw, "task", str, where)
    if task not in TASKS:
        raise ManifestError(where, f"unknown task {task!r} (known: {', '.join(TASKS)})")
    sha = _need(raw, "sha256", str, where).lower()
    if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
        raise ManifestError(where, "sha256 must be 64 hex digits")
    inp = _need(raw, "input", dict, where)
    features = tuple(_need(inp, "features", list, f"{where} [input]"))
    window = int(_need(inp, "window", int, f"{where} [input]"))
    mean = _floats(inp, "mean", f"{where} [input]")
    std = _floats(inp, "std", f"{where} [input]")
    if not features or len(mean) != len(features) or len(std) != len(features):
        raise ManifestError(where, "input.mean and input.std need one value per feature")
    if any(s <= 0 for s in std) or window < 1:
        raise ManifestError(where, "input.std must be > 0 and input.window >= 1")
    outputs = tuple(
        OutputSpec(str(_need(o, "name", str, where)), str(o.get("unit", "")))
        for o in _need(raw, "outputs", list, where)
    )
    if not outputs:
        raise ManifestError(where, "at least one [[outputs]] entry is needed")
    period = float(_need(raw, "sample_period_s", (int, float), where))
    return Manifest(
        path=path,
        name=_need(raw, "name", str, where),
        task=task,
        version=_need(raw, "version", str, where),
        file=path.parent / _need(raw, "file", str, where),
        sha256=sha,
        description=str(raw.get("description", "")),
        sample_period_s=period,
        features=tuple(str(f) for f in features),
        tags=tuple(str(t) for t in inp.get("tags", [])),
        window=window,
        mean=mean,
        std=std,
        outputs=outputs,
        thresholds=_numbers(raw, "thresholds", where),
        baseline=_numbers(raw, "baseline", where),
        trained_with=str(raw.get("trained_with", "")),
        parent=str(raw.get("parent", "")),
    )


def load_manifest(path: str | Path) -> Manifest:
    """Read, parse and check a manifest; raises :class:`ManifestError` naming the problem."""
    p = Path(path)
    where = str(p)
    try:
        raw = tomllib.loads(p.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ManifestError(where, f"cannot read manifest: {exc.strerror}") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ManifestError(where, f"manifest is not valid TOML: {exc}") from exc
    return parse_manifest(raw, p)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_verified(manifest: Manifest) -> bytes:
    """The model bytes, after checking them against the manifest's sha256."""
    try:
        blob = manifest.file.read_bytes()
    except OSError as exc:
        raise ManifestError(
            str(manifest.path), f"cannot read model file {manifest.file}: {exc.strerror}"
        ) from exc
    digest = sha256_hex(blob)
    if digest != manifest.sha256:
        raise ManifestError(
            str(manifest.path),
            f"sha256 mismatch for {manifest.file.name}: manifest says {manifest.sha256[:12]}…, "
            f"file is {digest[:12]}… (corrupt or tampered; the previous model stays in service)",
        )
    return blob


def find_manifests(directory: str | Path) -> list[Path]:
    """Every ``*.toml`` manifest directly inside ``directory``, sorted by name."""
    return sorted(p for p in Path(directory).glob("*.toml") if p.is_file())


# --------------------------------------------------------------------------- contract


@dataclass(frozen=True, slots=True)
class TaskContract:
    """What the gateway feeds a task's model and what it reads back."""

    features: tuple[str, ...]
    window: int
    outputs: tuple[str, ...]
    thresholds: tuple[str, ...]
    baseline: tuple[str, ...] = ()


#: The gateway's engine, per task (``edgeos.inference.engine`` and ``gates``).
CONTRACTS: Mapping[str, TaskContract] = {
    "anomaly": TaskContract(ANOMALY_FEATURES, WINDOW, ("score",), ("score",)),
    "quality": TaskContract(
        QUALITY_FEATURES, 1, ("elasticity",), ("spec_min", "spec_max", "sigma")
    ),
    "correction": TaskContract(
        CORRECTION_FEATURES,
        1,
        ("heater.sp.delta", "press.sp.delta", "elasticity.baseline", "elasticity.proposed"),
        ("sigma_baseline", "sigma_proposed"),
        ("heater.sp", "press.sp"),
    ),
}


def contract_issues(manifest: Manifest) -> list[str]:
    """Why a gateway could not run this manifest's model as its task's model (empty: it can)."""
    contract = CONTRACTS[manifest.task]
    issues: list[str] = []
    if manifest.features != contract.features:
        issues.append(
            f"input.features {list(manifest.features)} are not the gateway's {manifest.task} "
            f"features {list(contract.features)}"
        )
    if manifest.window != contract.window:
        issues.append(f"input.window {manifest.window} != the gateway's {contract.window}")
    unknown = [t for t in manifest.tags if t not in KEY_SUFFIXES]
    if unknown:
        issues.append(f"input.tags {unknown} are not tags the gateway reads")
    names = tuple(o.name for o in manifest.outputs)
    if names != contract.outputs:
        issues.append(f"outputs {list(names)} != the gateway's {list(contract.outputs)}")
    missing = [k for k in contract.thresholds if k not in manifest.thresholds]
    if missing:
        issues.append(f"thresholds {missing} are missing")
    missing = [k for k in contract.baseline if k not in manifest.baseline]
    if missing:
        issues.append(f"baseline {missing} is missing")
    if abs(manifest.sample_period_s - SAMPLE_PERIOD_S) > 1e-9:
        issues.append(
            f"sample_period_s {manifest.sample_period_s} != the gateway's {SAMPLE_PERIOD_S}"
        )
    return issues


# --------------------------------------------------------------------------- writing


def _fmt(value: Any) -> str:
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, Sequence):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    return repr(round(float(value), 9))


def render_manifest(
    *,
    name: str,
    task: str,
    version: str,
    file: str,
    blob: bytes,
    features: Sequence[str],
    tags: Sequence[str],
    window: int,
    mean: Sequence[float],
    std: Sequence[float],
    outputs: Sequence[tuple[str, str]],
    thresholds: Mapping[str, float],
    description: str,
    trained_with: str,
    sample_period_s: float = SAMPLE_PERIOD_S,
    baseline: Mapping[str, float] | None = None,
    parent: str = "",
    header: str = "",
) -> str:
    """A manifest's TOML text (what ``models/train_all.py`` and the cloud's trainer write)."""
    lines = [f"# {header}"] if header else []
    lines += [
        "schema = 1",
        f"name = {_fmt(name)}",
        f"task = {_fmt(task)}",
        f"version = {_fmt(version)}",
        f"file = {_fmt(file)}",
        f"sha256 = {_fmt(sha256_hex(blob))}",
        f"description = {_fmt(description)}",
        f"sample_period_s = {float(sample_period_s)!r}",
        f"trained_with = {_fmt(trained_with)}",
    ]
    if parent:
        lines.append(f"parent = {_fmt(parent)}")
    lines += [
        "",
        "[input]",
        f"features = {_fmt(list(features))}",
        f"tags = {_fmt(list(tags))}",
        f"window = {int(window)}",
        f"mean = {_fmt([float(v) for v in mean])}",
        f"std = {_fmt([float(v) for v in std])}",
        "",
    ]
    for oname, unit in outputs:
        lines += ["[[outputs]]", f"name = {_fmt(oname)}", f"unit = {_fmt(unit)}", ""]
    lines.append("[thresholds]")
    lines += [f"{k} = {round(float(v), 6)!r}" for k, v in thresholds.items()]
    if baseline:
        lines += ["", "[baseline]"]
        lines += [f"{_fmt(k)} = {float(v)!r}" for k, v in baseline.items()]
    return "\n".join(lines) + "\n"
