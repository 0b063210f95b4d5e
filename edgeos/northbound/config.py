"""Configuration of the plant-facing interfaces: ``[northbound.sparkplug]``, ``[northbound.opcua]``.

Frozen pydantic models like every other section (unknown keys are errors, every error names its
key path). Plant writes are off unless a tag matches one of the interface's ``writes`` globs
*and* the tag itself is ``writable`` (with limits) in ``[[tags]]``: :func:`check_northbound`
reports patterns that match no writable tag, so a typo cannot silently leave a set-point
read-only (or a read-only tag seemingly writable).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Literal, Self
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from edgeos.config_models import ReconnectConfig
from edgeos.errors import ConfigIssue
from edgeos.tags import TagSpec

__all__ = [
    "NorthboundConfig",
    "OpcUaServerConfig",
    "OpcUaUser",
    "PlantTlsConfig",
    "SparkplugConfig",
    "check_northbound",
    "plant_writable",
]

# Sparkplug ids are MQTT topic levels: no wildcards, no separators.
_SPB_ID = r"^[^+#/\s]{1,64}$"


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)


class PlantTlsConfig(_Model):
    """TLS to the plant broker: the plant's CA, and a client certificate where it wants one."""

    ca_file: Path
    cert_file: Path | None = None
    key_file: Path | None = None

    @model_validator(mode="after")
    def _pair(self) -> Self:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError(
                "cert_file and key_file go together (a client certificate and its key)"
            )
        return self


class SparkplugConfig(_Model):
    """A Sparkplug B edge node on the plant broker (``[northbound.sparkplug]``)."""

    enabled: bool = True
    #: ``mqtt://host:port`` or ``mqtts://host:port`` (the plant's broker, not the cloud's).
    broker: Annotated[str, Field(min_length=1)] = "mqtts://localhost:8883"
    tls: PlantTlsConfig | None = None
    username: str | None = None
    #: First line is the password; must not be readable by group or others.
    password_file: Path | None = None
    group_id: Annotated[str, Field(pattern=_SPB_ID)] = "edgeos"
    #: Edge node id; default: ``[device] id``.
    edge_node_id: Annotated[str, Field(pattern=_SPB_ID)] | None = None
    #: MQTT client id; default: ``<group_id>-<edge_node_id>``.
    client_id: str | None = None
    #: The primary host application's id (``spBv1.0/STATE/<id>``): births wait for it to be
    #: online, data is held while it is offline and sent flagged historical when it returns.
    primary_host_id: Annotated[str, Field(pattern=_SPB_ID)] | None = None
    keepalive_s: Annotated[int, Field(ge=5, le=3600)] = 30
    #: Changes are coalesced into at most one NDATA/DDATA per device per interval.
    publish_interval_ms: Annotated[float, Field(ge=0, le=60_000)] = 100
    #: Values held while the primary host (or the broker) is away; the oldest are dropped
    #: (and counted) beyond it.
    hold_max_values: Annotated[int, Field(ge=0, le=10_000_000)] = 100_000
    #: Glob patterns of writable tags that accept DCMD (e.g. ``"nest*.heater.sp"``).
    writes: list[str] = Field(default_factory=list)
    #: How long a DCMD's outcome is awaited for the ``Edge Info/Last Command`` metric.
    command_timeout_s: Annotated[float, Field(gt=0, le=300)] = 15.0
    reconnect: ReconnectConfig = Field(default_factory=ReconnectConfig)

    @field_validator("broker")
    @classmethod
    def _broker_url(cls, v: str) -> str:
        url = urlsplit(v)
        if url.scheme not in ("mqtt", "mqtts") or not url.hostname:
            raise ValueError(f"broker {v!r} is not mqtt://host:port or mqtts://host:port")
        return v

    @model_validator(mode="after")
    def _credentials(self) -> Self:
        if (self.username is None) != (self.password_file is None):
            raise ValueError("username and password_file go together (passwords are never inline)")
        if urlsplit(self.broker).scheme == "mqtts" and self.tls is None:
            raise ValueError("an mqtts:// broker needs tls = { ca_file = … }")
        return self


class OpcUaUser(_Model):
    """A user of the OPC UA server; ``write`` may write the tags listed in ``writes``."""

    name: Annotated[str, Field(min_length=1, max_length=64)]
    #: First line is the password; must not be readable by group or others.
    password_file: Path
    role: Literal["read", "write"] = "read"


SecurityMode = Literal["Basic256Sha256_Sign", "Basic256Sha256_SignAndEncrypt", "None"]
_SECURE: tuple[SecurityMode, ...] = ("Basic256Sha256_Sign", "Basic256Sha256_SignAndEncrypt")


class OpcUaServerConfig(_Model):
    """An OPC UA server of the twin (``[northbound.opcua]``)."""

    enabled: bool = True
    endpoint: Annotated[str, Field(pattern=r"^opc\.tcp://")] = "opc.tcp://0.0.0.0:4840/edgeos/"
    server_name: str = "edgeos gateway"
    #: Application URI; default: the certificate's URI, else ``urn:edgeos:<device id>``.
    application_uri: str | None = None
    namespace_uri: Annotated[str, Field(min_length=1)] = "urn:edgeos:twin"
    #: The gateway's application instance certificate (PEM or DER) and its RSA key.
    cert_file: Path | None = None
    key_file: Path | None = None
    security: list[SecurityMode] = Field(
        default_factory=lambda: list(_SECURE),
        min_length=1,
    )
    allow_anonymous: bool = False
    users: list[OpcUaUser] = Field(default_factory=list)
    #: Glob patterns of writable tags that ``write`` users may write.
    writes: list[str] = Field(default_factory=list)
    #: A write waits this long for its outcome; still pending then: GoodCompletesAsynchronously.
    write_timeout_s: Annotated[float, Field(ge=0, le=60)] = 5.0

    @model_validator(mode="after")
    def _security(self) -> Self:
        secured = [s for s in self.security if s != "None"]
        if secured and (self.cert_file is None or self.key_file is None):
            raise ValueError(f"security {secured} needs cert_file and key_file")
        if not self.allow_anonymous and not self.users:
            raise ValueError("no one could log in: add users or set allow_anonymous = true")
        names = [u.name for u in self.users]
        if len(set(names)) != len(names):
            raise ValueError("users have duplicate names")
        return self


class NorthboundConfig(_Model):
    """``[northbound]``: the plant-facing interfaces; each is off unless configured."""

    sparkplug: SparkplugConfig | None = None
    opcua: OpcUaServerConfig | None = None

    @property
    def enabled(self) -> bool:
        return bool(
            (self.sparkplug is not None and self.sparkplug.enabled)
            or (self.opcua is not None and self.opcua.enabled)
        )

    def resolve_paths(self, base: Path) -> NorthboundConfig:
        """Relative file paths made relative to ``base`` (the configuration file's folder)."""

        def fix(p: Path | None) -> Path | None:
            return p if p is None or p.is_absolute() else base / p

        update: dict[str, object] = {}
        if self.sparkplug is not None:
            sp = self.sparkplug
            tls = sp.tls
            if tls is not None:
                tls = tls.model_copy(
                    update={
                        "ca_file": fix(tls.ca_file),
                        "cert_file": fix(tls.cert_file),
                        "key_file": fix(tls.key_file),
                    }
                )
            update["sparkplug"] = sp.model_copy(
                update={"tls": tls, "password_file": fix(sp.password_file)}
            )
        if self.opcua is not None:
            ua = self.opcua
            users = [u.model_copy(update={"password_file": fix(u.password_file)}) for u in ua.users]
            update["opcua"] = ua.model_copy(
                update={
                    "cert_file": fix(ua.cert_file),
                    "key_file": fix(ua.key_file),
                    "users": users,
                }
            )
        return self.model_copy(update=update)


def plant_writable(patterns: Sequence[str], tags: Sequence[TagSpec]) -> frozenset[int]:
    """Twin columns a plant interface may write: writable tags matching one of ``patterns``."""
    if not patterns:
        return frozenset()
    rx = re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in patterns))
    return frozenset(i for i, t in enumerate(tags) if t.writable and rx.match(t.name))


def check_northbound(
    config: NorthboundConfig, tags: Sequence[TagSpec], *, path: str = "northbound"
) -> list[ConfigIssue]:
    """Cross-references: every ``writes`` pattern must match at least one writable tag."""
    issues: list[ConfigIssue] = []
    sections: list[tuple[str, Sequence[str]]] = []
    if config.sparkplug is not None:
        sections.append(("sparkplug", config.sparkplug.writes))
    if config.opcua is not None:
        sections.append(("opcua", config.opcua.writes))
    for section, patterns in sections:
        for k, pattern in enumerate(patterns):
            matched = [t for t in tags if fnmatch.fnmatchcase(t.name, pattern)]
            if not matched:
                issues.append(
                    ConfigIssue(f"{path}.{section}.writes[{k}]", f"{pattern!r} matches no tag")
                )
            elif not any(t.writable for t in matched):
                issues.append(
                    ConfigIssue(
                        f"{path}.{section}.writes[{k}]",
                        f"{pattern!r} matches only read-only tags (e.g. {matched[0].name}); "
                        "declare them writable with limits in [[tags]] first",
                    )
                )
    return issues
