"""Configuration sections: frozen pydantic models, one per table of the file.

Tags, templates and equipment are in :mod:`edgeos.config_tags`; the root model and loading in
:mod:`edgeos.config`. Every model refuses unknown keys, so a typo is reported with its path.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, model_validator

from edgeos.clock import Clock
from edgeos.driver import DriverContext, TagBinding, load_driver_class
from edgeos_protocol.backoff import BackoffPolicy
from edgeos_protocol.profile import Bounds, GateTunables

__all__ = [
    "RECIPE_SUFFIXES",
    "ConnectionConfig",
    "ControlConfig",
    "DeviceConfig",
    "GateConfig",
    "GuardConfig",
    "InferenceConfig",
    "LoggingConfig",
    "ModelRef",
    "Name",
    "OtaConfig",
    "PromotionConfig",
    "ReconnectConfig",
    "ScanGroupConfig",
    "SoftLimits",
    "SpoolConfig",
    "TlsConfig",
    "TwinConfig",
    "UplinkConfig",
]

_NAME = r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$"
Name = Annotated[str, Field(pattern=_NAME, min_length=1, max_length=128)]


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)


class DeviceConfig(_Model):
    """Identity of this gateway."""

    id: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_\-]{0,63}$")]
    site: str = ""
    line: str = ""
    #: Hardware target; OTA refuses bundles built for another one.
    hardware: str = "generic-aarch64"
    state_dir: Path = Path("/var/lib/edgeos")


class LoggingConfig(_Model):
    format: Literal["plain", "json"] = "plain"
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"


_POLICY = BackoffPolicy()


class ReconnectConfig(_Model):
    """How a connection is re-opened (``[connections.reconnect]``); see docs/drivers.md.

    Failed attempts wait ``initial_s``, then ``multiplier`` times longer each time up to
    ``max_s``, each delay shortened by a random part of up to ``jitter`` of itself (so many
    gateways do not hit a restarted PLC in lock step). After a link that had been up drops,
    the first retry comes after ``first_retry_s``: most drops are a restarted peer or a blip.
    """

    # The defaults are BackoffPolicy's: one source for every link of edgeos.
    initial_s: Annotated[float, Field(gt=0, le=3600)] = _POLICY.initial_s
    max_s: Annotated[float, Field(gt=0, le=3600)] = _POLICY.max_s
    multiplier: Annotated[float, Field(ge=1, le=10)] = _POLICY.multiplier
    jitter: Annotated[float, Field(ge=0, le=1)] = _POLICY.jitter
    #: Delay of the first retry after a connection that had been up dropped.
    first_retry_s: Annotated[float, Field(ge=0, le=3600)] = _POLICY.first_retry_s or 0.0

    @model_validator(mode="after")
    def _order(self) -> Self:
        if self.initial_s > self.max_s:
            raise ValueError(f"initial_s ({self.initial_s}) must not exceed max_s ({self.max_s})")
        return self

    def policy(self) -> BackoffPolicy:
        return BackoffPolicy(
            initial_s=self.initial_s,
            max_s=self.max_s,
            multiplier=self.multiplier,
            jitter=self.jitter,
            first_retry_s=self.first_retry_s,
        )


class ConnectionConfig(_Model):
    """One peer: which driver talks to it, where, and driver-specific options.

    ``options`` is validated by the driver's own model (found through the ``edgeos.drivers``
    entry points) during the cross-reference pass, so errors still carry a key path.
    """

    name: Name
    driver: Annotated[str, Field(min_length=1)]
    #: ``tcp://host:port`` (Modbus TCP), ``rtu:///dev/ttyUSB0`` (Modbus RTU), ``opc.tcp://…``.
    endpoint: Annotated[str, Field(min_length=1)]
    options: dict[str, Any] = Field(default_factory=dict)
    enabled: bool = True
    #: Deadline of one whole scan of one scan group on this connection (all its requests),
    #: in seconds. Past it the connection counts as lost. One request's deadline is the
    #: driver option ``request_timeout_s``.
    scan_timeout_s: Annotated[float, Field(gt=0, le=3600)] = 10.0
    reconnect: ReconnectConfig = Field(default_factory=ReconnectConfig)

    def driver_context(
        self,
        bindings: Sequence[TagBinding],
        *,
        clock: Clock,
        scan_periods_ms: Mapping[str, float] | None = None,
    ) -> DriverContext:
        """What this connection's driver is built from: ``driver_class(context)``.

        The driver is found through the ``edgeos.drivers`` entry points and validates
        ``options`` with its own model (pydantic's ``ValidationError`` when they are bad).
        """
        return DriverContext.for_driver(
            load_driver_class(self.driver),
            connection=self.name,
            endpoint=self.endpoint,
            options=self.options,
            bindings=bindings,
            clock=clock,
            scan_periods_ms=scan_periods_ms,
        )


class ScanGroupConfig(_Model):
    name: Name
    #: Period of the group, 10 ms to one hour.
    period_ms: Annotated[float, Field(ge=10, le=3_600_000)]
    #: Higher runs first when two groups are due together.
    priority: Annotated[int, Field(ge=0, le=100)] = 50
    #: Cancel a scan job running longer than this (the scheduler's scope over reading AND
    #: applying to the twin). Unset: a late scan finishes and the ticks it overlaps are
    #: skipped (never stacked); the connection's ``scan_timeout_s`` bounds its I/O.
    timeout_ms: PositiveFloat | None = None


class TwinConfig(_Model):
    #: Seconds of history kept per tag for model windows (bounded ring).
    history_s: Annotated[float, Field(ge=0, le=86_400)] = 600
    snapshot_interval_s: Annotated[float, Field(ge=1)] = 60


class SpoolConfig(_Model):
    max_bytes: Annotated[int, Field(ge=128 << 10)] = 512 << 20
    #: Size of one segment file; unset: an eighth of ``max_bytes`` (64 KiB … 8 MiB).
    #: ``drop_oldest`` drops whole segments, so a segment is at most a quarter of the bound.
    segment_bytes: Annotated[int, Field(ge=16 << 10)] | None = None
    full_policy: Literal["drop_oldest", "refuse_new"] = "drop_oldest"
    fsync: bool = True

    @model_validator(mode="after")
    def _segments_fit(self) -> Self:
        if self.segment_bytes is not None and self.segment_bytes > self.max_bytes // 4:
            raise ValueError(
                f"segment_bytes ({self.segment_bytes}) must be at most a quarter of max_bytes "
                f"({self.max_bytes}): drop_oldest drops whole segments"
            )
        return self

    @property
    def effective_segment_bytes(self) -> int:
        if self.segment_bytes is not None:
            return self.segment_bytes
        return max(64 << 10, min(8 << 20, self.max_bytes // 8))


class TlsConfig(_Model):
    ca_file: Path
    cert_file: Path
    key_file: Path


class UplinkConfig(_Model):
    enabled: bool = True
    broker: Annotated[str, Field(min_length=1)] = "mqtts://localhost:8883"
    tls: TlsConfig | None = None
    username: str | None = None
    topic_prefix: str = "edgeos/v1"
    #: Seconds between batches: 2 to 5 (default 3).
    interval_s: Annotated[float, Field(ge=2, le=5)] = 3.0
    #: A batch is sealed early when it holds this many samples.
    # Below the receiver's default limits.max_samples (250,000): a batch the cloud would
    # quarantine as too large is never sealed. A 16,000-tag line at 1 Hz in 3 s batches is 48,000.
    max_batch_samples: Annotated[int, Field(ge=1000)] = 200_000
    cipher: Literal["chacha20-poly1305", "aes-256-gcm"] = "chacha20-poly1305"
    key_file: Path = Path("device.key")
    #: Earlier device keys during a rotation: acks and commands sealed under them are still
    #: accepted. Remove a file once the receiver has acknowledged everything sealed with it.
    retired_key_files: list[Path] = Field(default_factory=list)
    inflight_window: Annotated[int, Field(ge=1, le=1000)] = 16
    #: Backlog batches per second drained after an outage (fresh batches always go first).
    backlog_rate: PositiveFloat = 20
    spool: SpoolConfig = Field(default_factory=SpoolConfig)


class ModelRef(_Model):
    name: Name
    manifest: Path
    role: Literal["champion", "challenger"] = "champion"
    #: Equipment (prefix) the model judges; empty means every instance of its template.
    station: str = ""


#: Set-points of a station the guard writes (its recipe), by tag suffix.
RECIPE_SUFFIXES = ("heater.sp", "press.sp")


class SoftLimits(Bounds):
    """Narrower bounds for *learned* set-points of one writable tag (inside its hard limits):
    the profile format's :class:`~edgeos_protocol.profile.Bounds`, so a file and a profile
    accept exactly the same values."""

    model_config = _Model.model_config


class GuardConfig(_Model):
    enabled: bool = False
    #: Largest allowed shortfall of the learned policy's reward vs. the default policy.
    alpha: Annotated[float, Field(ge=0, le=1)] = 0.005
    #: Per writable tag (full name): a learned proposal outside these is refused (the default
    #: recipe is taken); the default recipe itself is not bound by them. Inside the hard limits.
    soft_limits: dict[Name, SoftLimits] = Field(default_factory=dict)


class GateConfig(GateTunables):
    """Overrides of the quality manifest's ``p_scrap`` / ``p_correct`` (unset: the manifest's);
    the profile format's :class:`~edgeos_protocol.profile.GateTunables`."""

    model_config = _Model.model_config


class PromotionConfig(_Model):
    min_samples: Annotated[int, Field(ge=1)] = 200
    #: Challenger's error must be this fraction below the champion's to be promoted.
    min_improvement: Annotated[float, Field(ge=0, le=1)] = 0.05


class InferenceConfig(_Model):
    enabled: bool = False
    models: list[ModelRef] = Field(default_factory=list)
    guard: GuardConfig = Field(default_factory=GuardConfig)
    promotion: PromotionConfig = Field(default_factory=PromotionConfig)
    #: The default recipe by writable tag (full name, e.g. ``nest01.heater.sp``): the guard's
    #: default for that station's set-point instead of the correction manifest's ``[baseline]``,
    #: and written once as the tag's desired value when the runtime starts (docs/configuration.md).
    setpoints: dict[Name, Annotated[float, Field(allow_inf_nan=False)]] = Field(
        default_factory=dict
    )
    gate: GateConfig = Field(default_factory=GateConfig)


class RenewalConfig(_Model):
    """Client-certificate renewal over the air (docs/credentials.md)."""

    #: Renew when the MQTT client certificate ends within this many days ("" URL: off).
    renew_before_days: PositiveFloat = 60
    check_interval_s: PositiveFloat = 3600
    retry_s: PositiveFloat = 300


class OtaConfig(_Model):
    enabled: bool = False
    repository_url: str = ""
    trusted_root: Path = Path("ota/root.json")
    group: str = "default"
    slots_dir: Path = Path("slots")
    #: Seconds a trial slot must stay healthy before it is committed.
    health_window_s: PositiveFloat = 120
    max_attempts: Annotated[int, Field(ge=1, le=10)] = 3
    check_interval_s: PositiveFloat = 300
    #: Certificate renewal talks to ``repository_url`` too (``POST /certificates``).
    renewal: RenewalConfig = Field(default_factory=RenewalConfig)


class ControlConfig(_Model):
    #: Unix socket for ``edgeos status`` and ``edgeos twin``; relative to ``device.state_dir``.
    socket: Path = Path("control.sock")
    #: ``host:port`` for Prometheus metrics; empty disables them.
    metrics_listen: str = "127.0.0.1:9108"
