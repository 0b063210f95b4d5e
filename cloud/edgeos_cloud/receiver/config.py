"""Receiver configuration: TOML → validated, frozen pydantic models (errors name the key path).

Example ``receiver.toml`` (relative paths are relative to the file's folder)::

    [broker]
    url = "mqtts://broker.example:8883"
    group = "receivers"                 # shared subscription group ($share/<group>/…);
                                        # "" = plain subscription (brokers without $share)
    [broker.tls]
    ca_file = "pki/ca.crt"
    cert_file = "pki/receiver.crt"
    key_file = "pki/receiver.key"

    [storage]
    url = "sqlite:///data/receiver.db"  # or "postgresql://user@host/db"

    [registry]
    dir = "registry"                    # device keys and the CA (ca/)

    [metrics]
    listen = "127.0.0.1:9109"           # "" disables the endpoint
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    PositiveFloat,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from edgeos_protocol.backoff import BackoffPolicy
from edgeos_protocol.errors import ConfigError, ConfigIssue
from edgeos_protocol.topics import DEFAULT_PREFIX, TopicKind, subscription
from edgeos_protocol.validation import format_validation_error

__all__ = [
    "BrokerConfig",
    "CommandsConfig",
    "LimitsConfig",
    "MetricsConfig",
    "ReceiverConfig",
    "RegistryConfig",
    "StorageConfig",
    "TlsConfig",
    "load_receiver_config",
    "parse_receiver_config",
]


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)


class TlsConfig(_Model):
    ca_file: Path
    cert_file: Path
    key_file: Path


class BrokerConfig(_Model):
    #: ``mqtts://host:port`` (TLS, needs ``tls``) or ``mqtt://host:port`` (plain).
    url: Annotated[str, Field(min_length=1)] = "mqtts://localhost:8883"
    tls: TlsConfig | None = None
    #: Plain-mode username (with TLS the certificate's CN is the identity).
    username: str | None = None
    #: Shared subscription group: receivers in one group split the devices' batches. ``""``
    #: subscribes plainly (``<prefix>/+/batch``) for brokers without shared subscriptions
    #: (the demo's embedded amqtt); run only one receiver then, or every receiver stores
    #: (and deduplicates) every batch. Also accepted as ``shared_group``.
    group: Annotated[
        str,
        Field(
            pattern=r"^[A-Za-z0-9_\-]{0,64}$",
            validation_alias=AliasChoices("group", "shared_group"),
        ),
    ] = "receivers"
    client_id: str = ""
    topic_prefix: str = DEFAULT_PREFIX
    keepalive_s: Annotated[int, Field(ge=5, le=3600)] = 30
    #: Reconnect delay after a failed attempt: starts here, doubles up to ``reconnect_max_s``,
    #: each jittered into [d/2, d]. The first retry after a connection that was up drops comes
    #: sooner (0.1 s, or ``reconnect_s`` if that is smaller): most drops are a broker restart.
    reconnect_s: PositiveFloat = 2.0
    reconnect_max_s: PositiveFloat = 30.0

    @field_validator("url")
    @classmethod
    def _check_url(cls, url: str) -> str:
        if not url.startswith(("mqtt://", "mqtts://")):
            raise ValueError("broker url must start with mqtt:// or mqtts://")
        parts = urlsplit(url)
        try:
            port = parts.port
        except ValueError:
            port = -1
        if not parts.hostname or port in (-1, 0) or parts.path not in ("", "/"):
            raise ValueError(f"broker url {url!r} must be mqtt[s]://host[:port]")
        return url

    @field_validator("reconnect_max_s")
    @classmethod
    def _check_reconnect_max(cls, value: float, info: ValidationInfo) -> float:
        low = info.data.get("reconnect_s")
        if low is not None and value < low:
            raise ValueError(f"must be >= reconnect_s ({low})")
        return value

    @property
    def reconnect_policy(self) -> BackoffPolicy:
        """The broker link's :class:`~edgeos_protocol.backoff.BackoffPolicy`."""
        return BackoffPolicy(
            initial_s=self.reconnect_s,
            max_s=self.reconnect_max_s,
            first_retry_s=min(0.1, self.reconnect_s),
        )

    @property
    def host(self) -> str:
        host = urlsplit(self.url).hostname
        assert host is not None  # checked by the validator
        return host

    @property
    def port(self) -> int:
        """The URL's port; 8883 for ``mqtts://`` and 1883 for ``mqtt://`` when it has none."""
        return urlsplit(self.url).port or (8883 if self.uses_tls else 1883)

    @property
    def uses_tls(self) -> bool:
        return self.url.startswith("mqtts://")

    def topic(self, kind: TopicKind, *, shared: bool = True) -> str:
        """The subscription filter ``<prefix>/+/<kind>``, through the shared group if any."""
        return subscription(kind, self.topic_prefix, group=self.group if shared else "")


class StorageConfig(_Model):
    #: ``sqlite:///relative/or//absolute/path.db`` or ``postgresql://…`` (needs the
    #: ``postgres`` extra: psycopg 3).
    url: Annotated[str, Field(min_length=1)] = "sqlite:///receiver.db"
    #: Batches stored in one transaction when several wait (amortizes the commit's fsync).
    max_batches_per_transaction: Annotated[int, Field(ge=1, le=256)] = 8
    #: SQLite ``synchronous``: "full" fsyncs every commit, so an ack always means durable.
    sqlite_synchronous: Literal["full", "normal"] = "full"

    @field_validator("url")
    @classmethod
    def _check_url(cls, url: str) -> str:
        if not url.startswith(("sqlite:///", "postgresql://", "postgres://")):
            raise ValueError("storage url must be sqlite:///PATH or postgresql://…")
        return url


class RegistryConfig(_Model):
    #: Device keys (``devices/``) and the CA (``ca/``).
    dir: Path = Path("registry")


class MetricsConfig(_Model):
    #: ``host:port`` for the Prometheus endpoint; empty disables it.
    listen: str = "127.0.0.1:9109"


class LimitsConfig(_Model):
    #: Larger MQTT payloads are rejected as ``oversized`` before anything is parsed.
    max_payload_bytes: Annotated[int, Field(ge=1024, le=64 << 20)] = 16 << 20
    #: Received batches waiting for the writer; MQTT reading pauses when it is full.
    queue_size: Annotated[int, Field(ge=1, le=100_000)] = 256


class CommandsConfig(_Model):
    #: How often pending commands (``shadow set``) are looked for and sent.
    poll_s: PositiveFloat = 1.0
    #: An unanswered command is sent again after this long (the device deduplicates).
    resend_s: PositiveFloat = 30.0


class ReceiverConfig(_Model):
    broker: BrokerConfig = Field(default_factory=BrokerConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    commands: CommandsConfig = Field(default_factory=CommandsConfig)
    #: Broker URL written into provisioning bundles (defaults to ``broker.url``).
    public_broker_url: str = ""
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @property
    def device_broker_url(self) -> str:
        return self.public_broker_url or self.broker.url


def parse_receiver_config(
    text: str, *, source: str = "", base: Path | None = None
) -> ReceiverConfig:
    """Validate TOML text; relative paths resolve against ``base`` when given."""
    try:
        raw: dict[str, Any] = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([ConfigIssue("", f"not valid TOML: {exc}")], source) from exc
    try:
        config = ReceiverConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc), source) from exc
    issues = []
    if config.broker.uses_tls and config.broker.tls is None:
        issues.append(ConfigIssue("broker.tls", "an mqtts:// broker needs [broker.tls] files"))
    if issues:
        raise ConfigError(issues, source)
    return _resolve(config, base) if base is not None else config


def load_receiver_config(path: str | Path) -> ReceiverConfig:
    """Read and validate a receiver TOML file; raise :class:`ConfigError` listing every issue."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(
            [ConfigIssue("", f"cannot read file: {exc.strerror}")], str(path)
        ) from exc
    return parse_receiver_config(text, source=str(path), base=path.parent)


def _resolve(config: ReceiverConfig, base: Path) -> ReceiverConfig:
    def fix(p: Path) -> Path:
        return p if p.is_absolute() else base / p

    broker = config.broker
    if broker.tls is not None:
        tls = broker.tls.model_copy(
            update={
                "ca_file": fix(broker.tls.ca_file),
                "cert_file": fix(broker.tls.cert_file),
                "key_file": fix(broker.tls.key_file),
            }
        )
        broker = broker.model_copy(update={"tls": tls})
    storage = config.storage
    if storage.url.startswith("sqlite:///"):
        db = Path(storage.url.removeprefix("sqlite:///"))
        storage = storage.model_copy(update={"url": f"sqlite:///{fix(db)}"})
    registry = config.registry.model_copy(update={"dir": fix(config.registry.dir)})
    return config.model_copy(update={"broker": broker, "storage": storage, "registry": registry})
