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

    [quotas]                            # per device; over quota = deferred (re-sent later)
    samples_per_s = 200000
    bytes_per_day = 8589934592

    [intake]
    max_bytes_in_flight = 67108864      # beyond it PUBACKs wait: the broker stops sending
"""

from __future__ import annotations

import datetime as dt
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
    "IntakeConfig",
    "LimitsConfig",
    "MetricsConfig",
    "QuotasConfig",
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
    """What one message may hold and cost (docs/receiver.md, "Limits").

    The ``max_*`` keys from ``max_body_bytes`` on bound an *authenticated* batch: one over
    a limit is quarantined with reason ``limit`` (its sealed bytes kept; raise the limit and
    ``quarantine reingest``), never half stored. Each is checked before what it counts is
    built.
    """

    #: Larger MQTT payloads are rejected as ``oversized`` before anything is parsed.
    max_payload_bytes: Annotated[int, Field(ge=1024, le=64 << 20)] = 16 << 20
    #: Received batches waiting for the writer; MQTT reading pauses when it is full.
    queue_size: Annotated[int, Field(ge=1, le=100_000)] = 256
    #: Decompressed body (the wire format's own cap is 64 MiB).
    max_body_bytes: Annotated[int, Field(ge=1024, le=64 << 20)] = 64 << 20
    #: msgpack values in a body (every container, key and scalar), counted while scanning.
    max_objects: Annotated[int, Field(ge=100)] = 500_000
    #: Nesting depth of a body (the body map is 1, ``meta`` 2, a value in ``meta`` 3 …).
    max_depth: Annotated[int, Field(ge=6, le=512)] = 32
    #: Entries of one msgpack array or map.
    max_container_len: Annotated[int, Field(ge=16)] = 1_000_000
    #: UTF-8 bytes of any one string in a body.
    max_string_bytes: Annotated[int, Field(ge=64)] = 1 << 20
    #: UTF-8 bytes of a tag name, a unit or an event type (also: no NUL, no control chars).
    max_name_bytes: Annotated[int, Field(ge=16, le=1 << 20)] = 1024
    #: Tags in one batch's tag table (each may become a ``tags`` row).
    max_tags: Annotated[int, Field(ge=1)] = 100_000
    #: Sample groups in one batch.
    max_groups: Annotated[int, Field(ge=1)] = 4096
    #: Sample slots (rows x columns) in one batch.
    # Bounds one batch's decoded size (about 100 bytes per sample while storing): 250,000 keeps an
    # amplification attack within +64 MB (bench/receiver_isolation.py). Keep it at or above the
    # fleet's uplink.max_batch_samples (200,000 by default).
    max_samples: Annotated[int, Field(ge=1, le=4_000_000)] = 250_000
    #: ``sample_blocks`` rows one batch may need (a block spans at most an hour of samples).
    max_blocks: Annotated[int, Field(ge=1)] = 48
    #: Events in one batch (each an ``events`` row).
    max_events: Annotated[int, Field(ge=0)] = 10_000
    #: JSON bytes of one stored event.
    max_event_bytes: Annotated[int, Field(ge=256)] = 64 << 10
    #: JSON bytes of a batch's ``meta`` as stored.
    max_meta_bytes: Annotated[int, Field(ge=256)] = 4 << 20
    #: Ranges in ``meta["skip"]``.
    max_skip_ranges: Annotated[int, Field(ge=1)] = 65_536
    #: Distinct epochs other than its own a batch's ``meta["skip"]`` may name (each is
    #: locked, advanced and acked).
    max_skip_epochs: Annotated[int, Field(ge=0)] = 16
    #: Sample and event times before this are refused (``timestamp``): an unset clock.
    min_timestamp: dt.datetime = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)
    #: … and times more than this many seconds after the batch was received.
    max_ahead_s: Annotated[float, Field(gt=0, le=100 * 366 * 86400)] = 366 * 86400.0

    @field_validator("min_timestamp")
    @classmethod
    def _check_min_timestamp(cls, value: dt.datetime) -> dt.datetime:
        if value.tzinfo is None:
            value = value.replace(tzinfo=dt.UTC)
        if value.year < 1971:
            raise ValueError("must be 1971 or later")
        return value

    @property
    def min_timestamp_us(self) -> int:
        return int(self.min_timestamp.timestamp() * 1_000_000)


class QuotasConfig(_Model):
    """Per-device quotas (one receiver process's view; see docs/receiver.md "Fleet").

    Over-quota batches are *deferred*: not stored, not acknowledged, counted in
    ``edgeos_receiver_deferred_total{reason}``; the gateway's spool keeps them and re-sends
    them later. Rates are token buckets that may go into debt by one batch, so a batch larger
    than a bucket still passes when the bucket is full (a device is slowed, never wedged).
    """

    #: Messages per second of any kind (batches, command results, statuses), sustained;
    #: checked first at the door, before a message costs anything more than its topic. A
    #: gateway sends one batch per ``uplink.interval_s`` (3 s) and drains a backlog at
    #: ``uplink.backlog_rate`` (20/s) on top; a device flooding junk is held to this rate
    #: (after ``burst_s`` of it), the rest deferred as ``messages_per_s``.
    messages_per_s: Annotated[float, Field(gt=0)] = 50.0
    #: Decoded samples per second, sustained.
    samples_per_s: Annotated[float, Field(gt=0)] = 200_000.0
    #: Events per second, sustained.
    events_per_s: Annotated[float, Field(gt=0)] = 1_000.0
    #: How many seconds of the three rates above a device may send at once (a spool backlog
    #: drained after an outage goes at the sustained rate once this is used).
    burst_s: Annotated[float, Field(gt=0, le=86_400)] = 60.0
    #: Tag names this receiver has not seen from the device before, per day.
    new_tags_per_day: Annotated[int, Field(ge=1)] = 100_000
    #: Sealed bytes per day (checked at the door, before anything is queued).
    bytes_per_day: Annotated[int, Field(ge=1 << 20)] = 8 << 30


class IntakeConfig(_Model):
    """How much the receiver holds between the broker and the writer, and how it is shared.

    Messages are acknowledged to the broker (MQTT PUBACK) only once admitted to a device's
    queue, refused or deferred, never before: when ``max_bytes_in_flight`` is reached the
    receiver withholds PUBACKs and the broker stops sending (its in-flight window), so nothing
    the broker delivered is dropped.
    """

    #: Bytes of admitted messages not yet stored (all devices); beyond it reading pauses.
    max_bytes_in_flight: Annotated[int, Field(ge=1 << 20)] = 64 << 20
    #: One device's share of the writer's queue; a device past it has further messages
    #: deferred (``reason="device_busy"``). A device with nothing queued always gets one.
    #: A gateway keeps at most ``uplink.inflight_window`` (16) batches unacknowledged, so 32
    #: leaves room for its re-sends; only a device that ignores acks reaches it.
    device_max_bytes: Annotated[int, Field(ge=1024)] = 16 << 20
    device_max_messages: Annotated[int, Field(ge=1, le=100_000)] = 32
    #: Decoded samples per writer transaction: once its batches hold this many, the writer
    #: commits and the messages it did not open go back to their lanes (behind the other
    #: devices). Storing costs ~80 bytes per sample at its peak (packing, the shadow), so this
    #: (plus one batch, ``limits.max_samples``) bounds the writer's memory, and one device's
    #: huge batches cost the others one transaction per turn. A 16,000-tag batch holds 48,000.
    max_samples_per_transaction: Annotated[int, Field(ge=1000)] = 500_000


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
    quotas: QuotasConfig = Field(default_factory=QuotasConfig)
    intake: IntakeConfig = Field(default_factory=IntakeConfig)
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
