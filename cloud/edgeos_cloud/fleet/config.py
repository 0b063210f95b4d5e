"""The ``[fleet]`` section of the cloud's configuration (pydantic v2, frozen, unknown keys refused).

::

    [fleet]
    home = "/srv/fleet"                        # competitions.db (relative: to the file)
    ota_repo = "/srv/ota"                      # rollouts (edgeos-cloud ota init)
    storage_url = "sqlite:////srv/receiver/receiver.db"
    target = 6.6                               # the guard's target modulus (reward peak, MPa)

    [fleet.groups.line-a]                      # name an automatic group and/or pin devices
    fingerprints = ["fp-3f0c…"]                # gateways reporting these fingerprints
    devices = ["gw-0042"]                      # provisioned into the group, known before any report

    [fleet.competition]                        # see docs/fleet.md, "The competition"
    confidence = 0.95
    min_tyres = 200
    min_per_stratum = 5
    min_strata = 2
    margin = 0.0
    strata = ["material"]                      # and/or "device", "batch"
    material_bin_mu = 3.0

    [fleet.twin]                               # the twin simulator's screening runs
    nests = 20
    cycles = 150
    cycle_s = 40.0
    seed = 7

Only the ``[fleet]`` table is read, so it can live in a file with other sections. Errors name
the key path (``fleet.groups.line-a.devices[0]``).
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from edgeos_protocol.errors import ConfigError, ConfigIssue
from edgeos_protocol.validation import format_validation_error

__all__ = [
    "CompetitionSettings",
    "FleetConfig",
    "GroupOverride",
    "TwinSettings",
    "load_fleet_config",
    "parse_fleet_config",
]

_FROZEN = ConfigDict(frozen=True, extra="forbid")
_Name = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")]
Stratum = Literal["material", "device", "batch"]


class GroupOverride(BaseModel):
    """A named similarity group: the fingerprints it takes in and devices pinned to it."""

    model_config = _FROZEN
    fingerprints: tuple[Annotated[str, Field(pattern=r"^fp-[0-9a-f]{16}$")], ...] = ()
    devices: tuple[_Name, ...] = ()


class CompetitionSettings(BaseModel):
    """The competition rule's parameters (docs/fleet.md)."""

    model_config = _FROZEN
    #: One-sided confidence of the lower bound a winner must clear.
    confidence: float = Field(0.95, gt=0.5, lt=1.0)
    #: Tyres each competitor needs in the strata both share.
    min_tyres: int = Field(200, ge=2)
    #: Tyres each competitor needs in a stratum for the stratum to count.
    min_per_stratum: int = Field(5, ge=2)
    #: Strata both competitors must share.
    min_strata: int = Field(2, ge=1)
    #: A challenger must beat the champion by more than this (MPa of reward per tyre).
    margin: float = Field(0.0, ge=0.0)
    #: What a stratum is made of: raw-material class (Mooney bin), device (line), batch id.
    strata: tuple[Stratum, ...] = ("material",)
    #: Width of a raw-material class (Mooney units).
    material_bin_mu: float = Field(3.0, gt=0.0)

    @model_validator(mode="after")
    def _distinct(self) -> CompetitionSettings:
        if len(set(self.strata)) != len(self.strata) or not self.strata:
            raise ValueError("strata must be non-empty and without repeats")
        return self


class TwinSettings(BaseModel):
    """The twin simulator's screening runs."""

    model_config = _FROZEN
    nests: int = Field(20, ge=1, le=400)
    cycles: int = Field(150, ge=5)
    cycle_s: float = Field(40.0, gt=0.0)
    seed: int = 7


class FleetConfig(BaseModel):
    """The ``[fleet]`` table."""

    model_config = _FROZEN
    home: Path = Path("fleet")
    storage_url: str = "sqlite:///receiver.db"
    #: The TUF repository rollouts publish to (``edgeos-cloud ota init``).
    ota_repo: Path | None = None
    target: float = Field(6.6, gt=0.0)
    groups: dict[_Name, GroupOverride] = Field(default_factory=dict)
    competition: CompetitionSettings = CompetitionSettings()
    twin: TwinSettings = TwinSettings()

    @model_validator(mode="after")
    def _each_device_and_fingerprint_once(self) -> FleetConfig:
        seen: dict[str, str] = {}
        for name, group in self.groups.items():
            for item in (*group.devices, *group.fingerprints):
                if item in seen and seen[item] != name:
                    raise ValueError(f"{item!r} is in both groups {seen[item]!r} and {name!r}")
                seen[item] = name
        return self


def parse_fleet_config(raw: dict[str, object], *, base: Path | None = None) -> FleetConfig:
    """Validate a whole configuration mapping's ``[fleet]`` table; raises ``ConfigError``."""
    table = raw.get("fleet", {})
    if not isinstance(table, dict):
        raise ConfigError([ConfigIssue("fleet", "must be a table")])
    table = dict(table)
    for key in ("home", "ota_repo"):
        if base is not None and key in table and not Path(str(table[key])).is_absolute():
            table[key] = str(base / str(table[key]))
    try:
        return FleetConfig.model_validate(table)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, "fleet")) from None


def load_fleet_config(path: Path) -> FleetConfig:
    """Read ``path``'s ``[fleet]`` table; relative paths are relative to the file."""
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([ConfigIssue("", f"not TOML: {exc}")], str(path)) from None
    try:
        return parse_fleet_config(raw, base=path.resolve().parent)
    except ConfigError as exc:
        raise ConfigError(exc.issues, str(path)) from None
