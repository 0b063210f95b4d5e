"""Configuration profiles: the tunable part of a gateway's configuration, as a document.

A **profile** carries only tunables — per-tag set-point defaults, gate thresholds, the guard's
α and *soft* limits, deadbands and scan periods. Hard limits, writability, connections,
addresses, identity, keys and the guard's on/off switch are not in the schema: a document that
names them is refused when it is parsed (``extra="forbid"``), so a profile cannot carry them,
let alone widen them.

A **target summary** is what a gateway reports about its own configuration (tag names, hard
limits, writable flags, scan groups, the guard's α ceiling, which tunables it applies, and the
profile in force). The gateway sends it as a ``config_summary`` event inside its sealed batches;
the cloud keeps the latest per device and validates a profile against it before anything
leaves the cloud. The gateway validates again, against its own file, before it installs one.

Both sides call the same pure :func:`validate`. A profile travels inside a TUF-signed
``config`` bundle (``config/profile.json``): TUF's signatures are the profile's signature, and
the bundle's manifest hash and the document's :meth:`Profile.digest` bind the bytes.

Canonical form: UTF-8 JSON, sorted keys, no insignificant whitespace, defaults included
(:meth:`Profile.canonical`); the content address is its sha256.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Final, Literal, Self, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from edgeos_protocol.validation import format_validation_error

__all__ = [
    "EVENT_TYPE",
    "PROFILE_FILE",
    "PROFILE_FORMAT",
    "SUMMARY_FORMAT",
    "TUNABLE_KINDS",
    "Bounds",
    "Change",
    "GateTunables",
    "GuardSummary",
    "GuardTunables",
    "Issue",
    "NameGroup",
    "Profile",
    "ProfileError",
    "ProfileInForce",
    "TagSummary",
    "TargetSummary",
    "Tunables",
    "diff",
    "group_names",
    "parse_profile",
    "parse_summary",
    "used_kinds",
    "validate",
]

PROFILE_FORMAT: Final = "edgeos-profile/1"
SUMMARY_FORMAT: Final = "edgeos-config-summary/1"
#: Where a profile sits inside a ``config`` bundle (and so inside a slot).
PROFILE_FILE = "config/profile.json"
#: The uplink event that carries a :class:`TargetSummary`.
EVENT_TYPE = "config_summary"
#: Every kind of tunable the format knows; a gateway lists those it applies.
TUNABLE_KINDS = (
    "setpoints",
    "gate",
    "guard.alpha",
    "guard.soft_limits",
    "deadbands",
    "scan_periods",
)

_NAME = r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$"
Name = Annotated[str, Field(pattern=_NAME, min_length=1, max_length=128)]
Finite = Annotated[float, Field(allow_inf_nan=False)]


class ProfileError(ValueError):
    """A profile or summary document that does not parse; ``issues`` name the key paths."""

    def __init__(self, issues: list[Issue]) -> None:
        self.issues = issues
        super().__init__("; ".join(str(i) for i in issues))


@dataclass(frozen=True, slots=True)
class Issue:
    """One reason a profile does not fit a target: the key path and what is wrong."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Bounds(_Model):
    min: Finite
    max: Finite

    @model_validator(mode="after")
    def _order(self) -> Self:
        if not self.min < self.max:
            raise ValueError(f"min ({self.min}) must be below max ({self.max})")
        return self

    @property
    def span(self) -> float:
        return self.max - self.min


class GateTunables(_Model):
    """Probabilities of being out of spec at which a tyre is scrapped / corrected."""

    p_scrap: Annotated[float, Field(gt=0, lt=1)] | None = None
    p_correct: Annotated[float, Field(gt=0, lt=1)] | None = None

    @model_validator(mode="after")
    def _order(self) -> Self:
        both = self.p_scrap is not None and self.p_correct is not None
        if both and not self.p_correct < self.p_scrap:  # type: ignore[operator]
            raise ValueError("p_correct must be below p_scrap")
        return self


class GuardTunables(_Model):
    #: The guard's budget (largest allowed shortfall against the default policy); never above
    #: the target's own ceiling (:class:`GuardSummary`).
    alpha: Annotated[float, Field(ge=0, le=1)] | None = None
    #: Narrower limits the guard keeps learned set-points in; always inside the hard limits.
    soft_limits: dict[Name, Bounds] = Field(default_factory=dict)


class Tunables(_Model):
    setpoints: dict[Name, Finite] = Field(default_factory=dict)
    gate: GateTunables = Field(default_factory=GateTunables)
    guard: GuardTunables = Field(default_factory=GuardTunables)
    deadbands: dict[Name, Annotated[float, Field(ge=0, allow_inf_nan=False)]] = Field(
        default_factory=dict
    )
    scan_periods: dict[Name, Annotated[float, Field(ge=10, le=3_600_000)]] = Field(
        default_factory=dict
    )


class Profile(_Model):
    """A versioned profile (see the module docs)."""

    format: Literal["edgeos-profile/1"] = PROFILE_FORMAT
    #: A family of profiles (usually the similarity group it was made for).
    name: Name
    #: Increases with every profile of the family; a rollback is a new, higher version.
    version: Annotated[int, Field(ge=1, le=99_999_999)]
    #: The device it was exported from, or what it was derived from (free text).
    source: Annotated[str, Field(max_length=256)] = ""
    created: Annotated[str, Field(max_length=40)] = ""
    tunables: Tunables = Field(default_factory=Tunables)

    def canonical(self) -> bytes:
        return _canonical(self.model_dump(mode="json"))

    def digest(self) -> str:
        """The content address: sha256 of :meth:`canonical`."""
        return hashlib.sha256(self.canonical()).hexdigest()

    def tunables_digest(self) -> str:
        """sha256 of the tunables alone: equal for a re-published (rolled-back) profile."""
        return hashlib.sha256(_canonical(self.tunables.model_dump(mode="json"))).hexdigest()

    def with_version(self, version: int, *, source: str | None = None) -> Profile:
        update: dict[str, Any] = {"version": version}
        if source is not None:
            update["source"] = source
        return self.model_copy(update=update)


class TagSummary(_Model):
    scan_group: Name = "default"
    deadband: Annotated[float, Field(ge=0)] = 0.0
    writable: bool = False
    #: Hard limits (only writable numeric tags have them).
    limits: Bounds | None = None


class NameGroup(_Model):
    """Tags named ``<prefix>.<suffix>`` for every prefix × suffix: a line of identical machines
    in a few lines instead of one entry per tag (``prefix`` "" means the bare suffix)."""

    prefixes: tuple[str, ...]
    suffixes: tuple[str, ...]


def group_names(names: Iterable[str]) -> tuple[NameGroup, ...]:
    """The compact form of a set of tag names (see :class:`NameGroup`); lossless."""
    by_prefix: dict[str, set[str]] = {}
    for name in names:
        prefix, dot, suffix = name.partition(".")
        if not dot:
            prefix, suffix = "", name
        by_prefix.setdefault(prefix, set()).add(suffix)
    by_shape: dict[frozenset[str], list[str]] = {}
    for prefix, suffixes in by_prefix.items():
        by_shape.setdefault(frozenset(suffixes), []).append(prefix)
    return tuple(
        NameGroup(prefixes=tuple(sorted(prefixes)), suffixes=tuple(sorted(shape)))
        for shape, prefixes in sorted(by_shape.items(), key=lambda kv: sorted(kv[1]))
    )


class GuardSummary(_Model):
    enabled: bool = False
    #: The α of the gateway's own file: a profile may tighten the guard, never loosen it.
    alpha_max: Annotated[float, Field(ge=0, le=1)] = 0.0


class ProfileInForce(_Model):
    name: Name
    version: int
    sha256: str


class TargetSummary(_Model):
    """What a gateway reports about its own configuration (the ``config_summary`` event)."""

    format: Literal["edgeos-config-summary/1"] = SUMMARY_FORMAT
    device: str
    hardware: str = ""
    #: The gateway's ``[ota] group``: the channel its bundles come through.
    ota_group: str = ""
    #: sha256 of the gateway's own configuration file (hard limits, safety settings).
    config_sha256: str = ""
    #: Writable tags, with their hard limits (what set-points and soft limits are checked on).
    tags: dict[str, TagSummary] = Field(default_factory=dict)
    #: Every other tag, by name only, grouped (a 16,000-tag line is a few kB, not megabytes: the
    #: summary travels as one event and the receiver bounds an event's size).
    other_tags: tuple[NameGroup, ...] = ()
    scan_groups: dict[str, float] = Field(default_factory=dict)
    guard: GuardSummary = Field(default_factory=GuardSummary)
    #: The tunable kinds (:data:`TUNABLE_KINDS`) this gateway applies.
    supports: tuple[str, ...] = ()
    profile: ProfileInForce | None = None
    #: Why the profile in the active slot was not applied (``None``: applied or none).
    profile_refused: str | None = None

    def canonical(self) -> bytes:
        return _canonical(self.model_dump(mode="json"))

    def has_tag(self, name: str) -> bool:
        if name in self.tags:
            return True
        prefix, dot, suffix = name.partition(".")
        if not dot:
            prefix, suffix = "", name
        return any(prefix in g.prefixes and suffix in g.suffixes for g in self.other_tags)


def _canonical(doc: Any) -> bytes:
    return json.dumps(
        doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode()


_M = TypeVar("_M", bound=BaseModel)


def _parse(model: type[_M], data: bytes | str | Mapping[str, Any]) -> _M:
    try:
        raw = json.loads(data) if isinstance(data, bytes | str) else data
    except ValueError as exc:
        raise ProfileError([Issue("", f"not JSON: {exc}")]) from exc
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise ProfileError(
            [Issue(i.path, i.message) for i in format_validation_error(exc)]
        ) from exc


def parse_profile(data: bytes | str | Mapping[str, Any]) -> Profile:
    """A profile document → :class:`Profile`; refuses unknown keys (hard limits, …)."""
    return _parse(Profile, data)


def parse_summary(data: bytes | str | Mapping[str, Any]) -> TargetSummary:
    return _parse(TargetSummary, data)


def used_kinds(profile: Profile) -> list[str]:
    """The tunable kinds the profile actually sets."""
    t = profile.tunables
    kinds = []
    if t.setpoints:
        kinds.append("setpoints")
    if t.gate.p_scrap is not None or t.gate.p_correct is not None:
        kinds.append("gate")
    if t.guard.alpha is not None:
        kinds.append("guard.alpha")
    if t.guard.soft_limits:
        kinds.append("guard.soft_limits")
    if t.deadbands:
        kinds.append("deadbands")
    if t.scan_periods:
        kinds.append("scan_periods")
    return kinds


def validate(profile: Profile, target: TargetSummary) -> list[Issue]:
    """Every reason ``profile`` does not fit ``target`` (empty: it fits). Pure.

    Tags and scan groups must exist; set-points and soft limits only on writable tags with hard
    limits, and inside them (set-points inside the soft limits too); α not above the target's
    ceiling; only tunable kinds the target applies.
    """
    issues: list[Issue] = []
    t = profile.tunables
    for kind in used_kinds(profile):
        if kind not in target.supports:
            supported = ", ".join(target.supports) or "none"
            issues.append(
                Issue(
                    f"tunables.{kind}",
                    f"{target.device} does not apply {kind} (it applies: {supported})",
                )
            )

    def writable_limits(path: str, name: str) -> Bounds | None:
        tag = target.tags.get(name)
        if tag is None:
            issues.append(Issue(path, f"no tag {name!r} on {target.device}"))
            return None
        if not tag.writable or tag.limits is None:
            issues.append(Issue(path, f"{name!r} is not a writable tag with hard limits"))
            return None
        return tag.limits

    soft = t.guard.soft_limits
    for name, bounds in sorted(soft.items()):
        path = f"tunables.guard.soft_limits.{name}"
        hard = writable_limits(path, name)
        if hard is not None and (bounds.min < hard.min or bounds.max > hard.max):
            issues.append(
                Issue(
                    path,
                    f"[{bounds.min}, {bounds.max}] is not inside the hard limits "
                    f"[{hard.min}, {hard.max}]",
                )
            )
    for name, value in sorted(t.setpoints.items()):
        path = f"tunables.setpoints.{name}"
        hard = writable_limits(path, name)
        if hard is None:
            continue
        if not hard.min <= value <= hard.max:
            issues.append(
                Issue(path, f"{value} is outside the hard limits [{hard.min}, {hard.max}]")
            )
        elif name in soft and not soft[name].min <= value <= soft[name].max:
            issues.append(Issue(path, f"{value} is outside the profile's own soft limits"))
    if t.guard.alpha is not None and t.guard.alpha > target.guard.alpha_max:
        issues.append(
            Issue(
                "tunables.guard.alpha",
                f"{t.guard.alpha} is above {target.device}'s own "
                f"alpha {target.guard.alpha_max}: a profile may tighten the guard, not loosen it",
            )
        )
    for name, deadband in sorted(t.deadbands.items()):
        path = f"tunables.deadbands.{name}"
        tag = target.tags.get(name)
        if tag is None and not target.has_tag(name):
            issues.append(Issue(path, f"no tag {name!r} on {target.device}"))
        elif (
            tag is not None
            and tag.limits is not None
            and deadband > tag.limits.max - tag.limits.min
        ):
            issues.append(Issue(path, f"{deadband} is wider than the tag's whole range"))
    for group, period in sorted(t.scan_periods.items()):
        if group not in target.scan_groups:
            issues.append(
                Issue(
                    f"tunables.scan_periods.{group}", f"no scan group {group!r} on {target.device}"
                )
            )
        elif not math.isfinite(period):
            issues.append(Issue(f"tunables.scan_periods.{group}", "not a finite period"))
    return issues


@dataclass(frozen=True, slots=True)
class Change:
    """One difference between two profiles: the key path and both values (``None``: unset)."""

    path: str
    old: Any
    new: Any

    def __str__(self) -> str:
        return f"{self.path}: {self.old!r} -> {self.new!r}"


def _flatten(doc: Any, prefix: str, out: dict[str, Any]) -> None:
    if isinstance(doc, dict) and doc:
        for key, value in doc.items():
            _flatten(value, f"{prefix}.{key}" if prefix else str(key), out)
    elif isinstance(doc, dict):
        return
    elif doc is not None:
        out[prefix] = doc


def diff(a: Profile, b: Profile) -> list[Change]:
    """The tunables that differ from ``a`` to ``b``, by key path (sorted)."""
    fa: dict[str, Any] = {}
    fb: dict[str, Any] = {}
    _flatten(a.tunables.model_dump(mode="json"), "", fa)
    _flatten(b.tunables.model_dump(mode="json"), "", fb)
    return [
        Change(path, fa.get(path), fb.get(path))
        for path in sorted(fa.keys() | fb.keys())
        if fa.get(path) != fb.get(path)
    ]
