"""Configuration: TOML → validated, frozen pydantic models.

Every error names the key path (``tags[12].modbus.address``) and says what to fix. Loading is
two passes: the schema (pydantic; :mod:`edgeos.config_models` for the sections,
:mod:`edgeos.config_tags` for tags and their driver-owned addresses), then cross-references
(:mod:`edgeos.config_check`: connections, scan groups, driver options, duplicate names) so a
file with many mistakes reports all of them at once.

Equipment templates keep a 16,000-tag line readable: a template lists one machine's tags with
relative names and addresses, and each ``[[equipment]]`` entry stamps it out ``count`` times.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from pydantic import Field, PrivateAttr, ValidationError

from edgeos.config_check import build_tags, cross_check
from edgeos.config_models import (
    ConnectionConfig,
    ControlConfig,
    DeviceConfig,
    GateConfig,
    GuardConfig,
    InferenceConfig,
    LoggingConfig,
    ModelRef,
    OtaConfig,
    PromotionConfig,
    ReconnectConfig,
    ScanGroupConfig,
    SoftLimits,
    SpoolConfig,
    TlsConfig,
    TwinConfig,
    UplinkConfig,
    _Model,
)
from edgeos.config_tags import (
    EquipmentConfig,
    TagConfig,
    TagTemplate,
    TemplateConfig,
    derived_tag,
)
from edgeos.errors import ConfigError, ConfigIssue
from edgeos.northbound.config import NorthboundConfig, check_northbound
from edgeos.tags import (
    FLOAT_TYPES,
    INTEGER_TYPES,
    DataType,
    DerivedAddress,
    Limits,
    Tag,
    TagAddress,
)
from edgeos_protocol.validation import format_validation_error

__all__ = [
    "FLOAT_TYPES",
    "INTEGER_TYPES",
    "AnyTag",
    "Config",
    "ConnectionConfig",
    "ControlConfig",
    "DataType",
    "DerivedAddress",
    "DeviceConfig",
    "EquipmentConfig",
    "GateConfig",
    "GuardConfig",
    "InferenceConfig",
    "Limits",
    "LoggingConfig",
    "ModelRef",
    "OtaConfig",
    "PromotionConfig",
    "ReconnectConfig",
    "ScanGroupConfig",
    "SoftLimits",
    "SpoolConfig",
    "Tag",
    "TagAddress",
    "TagConfig",
    "TagTemplate",
    "TemplateConfig",
    "TlsConfig",
    "TwinConfig",
    "UplinkConfig",
    "derived_tag",
    "format_validation_error",
    "load_config",
    "parse_config",
]

#: A tag as the runtime uses it, or as a configuration file declares it.
AnyTag = Tag | TagConfig


class Config(_Model):
    device: DeviceConfig
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    connections: list[ConnectionConfig] = Field(default_factory=list)
    scan_groups: list[ScanGroupConfig] = Field(
        default_factory=lambda: [ScanGroupConfig(name="default", period_ms=1000)]
    )
    tags: list[TagConfig] = Field(default_factory=list)
    templates: dict[str, TemplateConfig] = Field(default_factory=dict)
    equipment: list[EquipmentConfig] = Field(default_factory=list)
    twin: TwinConfig = Field(default_factory=TwinConfig)
    uplink: UplinkConfig = Field(default_factory=UplinkConfig)
    inference: InferenceConfig = Field(default_factory=InferenceConfig)
    ota: OtaConfig = Field(default_factory=OtaConfig)
    control: ControlConfig = Field(default_factory=ControlConfig)
    #: The plant side: Sparkplug B edge node and OPC UA server of the twin (docs/northbound.md).
    northbound: NorthboundConfig = Field(default_factory=NorthboundConfig)

    _all_tags: tuple[Tag, ...] | None = PrivateAttr(default=None)

    @property
    def all_tags(self) -> tuple[Tag, ...]:
        """Explicit tags followed by every equipment instance's tags, in twin index order.

        These are the runtime records (:class:`Tag`), built once and shared by every part.
        """
        if self._all_tags is None:
            tags, issues = build_tags(self)
            if issues:
                raise ConfigError(issues, "<config>")
            self._all_tags = tags
        return self._all_tags

    def connection(self, name: str) -> ConnectionConfig:
        for conn in self.connections:
            if conn.name == name:
                return conn
        raise KeyError(name)

    def scan_group(self, name: str) -> ScanGroupConfig:
        for group in self.scan_groups:
            if group.name == name:
                return group
        raise KeyError(name)


# --------------------------------------------------------------------------- loading


def load_config(path: str | Path, *, check_drivers: bool = True) -> Config:
    """Read and validate a TOML file; raise :class:`ConfigError` listing every issue."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(
            [ConfigIssue("", f"cannot read file: {exc.strerror}")], str(path)
        ) from exc
    config = parse_config(text, source=str(path), check_drivers=check_drivers)
    return _resolve_paths(config, path.parent)


def parse_config(text: str, *, source: str = "<string>", check_drivers: bool = True) -> Config:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([ConfigIssue("", f"not valid TOML: {exc}")], source) from exc
    try:
        config = Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc), source) from exc
    tags, issues = cross_check(config, check_drivers=check_drivers)
    issues = [*issues, *check_northbound(config.northbound, tags)]
    if issues:
        raise ConfigError(issues, source)
    config._all_tags = tags
    return config


def _resolve_paths(config: Config, base: Path) -> Config:
    """Make relative paths in the file relative to the file's folder."""

    def fix(p: Path) -> Path:
        return p if p.is_absolute() else (base / p)

    device = config.device.model_copy(update={"state_dir": fix(config.device.state_dir)})
    uplink_update: dict[str, Any] = {
        "key_file": fix(config.uplink.key_file),
        "retired_key_files": [fix(p) for p in config.uplink.retired_key_files],
    }
    if config.uplink.tls is not None:
        tls = config.uplink.tls
        uplink_update["tls"] = tls.model_copy(
            update={
                "ca_file": fix(tls.ca_file),
                "cert_file": fix(tls.cert_file),
                "key_file": fix(tls.key_file),
            }
        )
    models = [m.model_copy(update={"manifest": fix(m.manifest)}) for m in config.inference.models]
    return config.model_copy(
        update={
            "device": device,
            "uplink": config.uplink.model_copy(update=uplink_update),
            "inference": config.inference.model_copy(update={"models": models}),
            "ota": config.ota.model_copy(update={"trusted_root": fix(config.ota.trusted_root)}),
            "northbound": config.northbound.resolve_paths(base),
        }
    )
