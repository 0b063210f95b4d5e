"""Options of an OPC UA connection (``[[connections]] options = {…}``) and endpoint checks."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Self
from urllib.parse import urlsplit

from pydantic import Field, PositiveFloat, model_validator

from edgeos.driver import DriverOptions

__all__ = ["DEFAULT_PORT", "OpcUaOptions", "check_endpoint"]

#: IANA port of ``opc.tcp`` used when the endpoint names none.
DEFAULT_PORT = 4840


class OpcUaOptions(DriverOptions):
    """Driver options; validated by the config loader with key paths in every error.

    Secrets never live in the configuration file: the password is read from
    ``password_file`` (which must not be readable by group or others) at every connect.
    """

    # --- security -----------------------------------------------------------------------
    security_policy: Literal["None", "Basic256Sha256"] = "None"
    security_mode: Literal["None", "Sign", "SignAndEncrypt"] = "None"
    #: This gateway's application instance certificate (PEM or DER) and its private key.
    client_certificate: Path | None = None
    client_private_key: Path | None = None
    #: The server's certificate to trust (pinned). Without it the certificate the server
    #: offers in GetEndpoints is accepted (trust on first use, every connect).
    server_certificate: Path | None = None
    #: Must equal the URI in the client certificate's subjectAltName; by default it is taken
    #: from the certificate (or ``urn:edgeos:opcua:client`` without one).
    application_uri: str | None = None
    application_name: str = "edgeos gateway"

    # --- user identity --------------------------------------------------------------------
    username: str | None = None
    #: File holding the password (first line); required with ``username``.
    password_file: Path | None = None

    # --- session ------------------------------------------------------------------------
    session_timeout_s: Annotated[float, Field(ge=1, le=86_400)] = 60.0
    #: Deadline of one request on the wire: the timeout hint sent with every request and
    #: asyncua's own guard on its answer. A whole scan's deadline is the connection's
    #: ``scan_timeout_s``; opening the sessions has ``connect_timeout_s`` (default 5 s).
    request_timeout_s: Annotated[float, Field(gt=0, le=600)] = 10.0
    #: How often the session is probed (ServerStatus read) to detect a dead peer even when
    #: only subscriptions are configured.
    watchdog_interval_s: Annotated[float, Field(ge=0.1, le=600)] = 5.0
    #: Parallel sessions (TCP connections) to the server; subscriptions are spread over them.
    sessions: Annotated[int, Field(ge=1, le=16)] = 1

    # --- polled reads -------------------------------------------------------------------
    #: Node ids per Read service call (the server's MaxNodesPerRead operation limit).
    max_items_per_read: Annotated[int, Field(ge=1, le=100_000)] = 1000
    #: Read requests in flight at once when a scan group needs several.
    max_parallel_reads: Annotated[int, Field(ge=1, le=64)] = 4
    #: Age of a cached server value that is still acceptable, 0 = read from the device.
    read_max_age_ms: Annotated[float, Field(ge=0)] = 0.0

    # --- subscriptions ------------------------------------------------------------------
    max_items_per_subscription: Annotated[int, Field(ge=1, le=1_000_000)] = 5000
    #: Upper bound on subscriptions per session; creating more is refused at connect.
    max_subscriptions: Annotated[int, Field(ge=1, le=1000)] = 16
    #: Monitored items per CreateMonitoredItems call (MaxMonitoredItemsPerCall).
    max_items_per_call: Annotated[int, Field(ge=1, le=100_000)] = 1000
    #: Publishing interval of every subscription; by default the fastest sampling interval
    #: of the items it carries.
    publishing_interval_ms: PositiveFloat | None = None
    #: Notifications per Publish response (0 = server decides).
    max_notifications_per_publish: Annotated[int, Field(ge=0)] = 0
    #: Publishing intervals without data before the server sends a keep-alive.
    keepalive_count: Annotated[int, Field(ge=1, le=10_000)] = 10
    #: Publishing intervals without a Publish request before the server drops the
    #: subscription; must be at least three keep-alives (OPC UA Part 4, 5.13.2).
    lifetime_count: Annotated[int, Field(ge=3, le=1_000_000)] = 300
    #: Ask the server to filter changes smaller than the tag's ``deadband`` (absolute).
    server_deadband: bool = False

    @model_validator(mode="after")
    def _check(self) -> Self:
        secure = self.security_policy != "None"
        if secure and self.security_mode == "None":
            raise ValueError(
                f"security_policy {self.security_policy!r} needs security_mode "
                "'Sign' or 'SignAndEncrypt'"
            )
        if not secure and self.security_mode != "None":
            raise ValueError(
                f"security_mode {self.security_mode!r} needs a security_policy "
                "(e.g. 'Basic256Sha256')"
            )
        if secure and (self.client_certificate is None or self.client_private_key is None):
            raise ValueError(
                "security_policy 'Basic256Sha256' needs client_certificate and client_private_key"
            )
        if not secure and (
            self.client_certificate is not None or self.server_certificate is not None
        ):
            raise ValueError("certificates are set but security_policy is 'None'")
        if (self.client_certificate is None) != (self.client_private_key is None):
            raise ValueError("client_certificate and client_private_key go together")
        if self.username is not None and self.password_file is None:
            raise ValueError("username needs password_file (passwords are never inline)")
        if self.password_file is not None and self.username is None:
            raise ValueError("password_file is set but username is not")
        if self.lifetime_count < 3 * self.keepalive_count:
            raise ValueError(
                f"lifetime_count ({self.lifetime_count}) must be at least 3 x keepalive_count "
                f"({self.keepalive_count})"
            )
        return self


def check_endpoint(endpoint: str) -> str | None:
    """Error text when ``endpoint`` is not ``opc.tcp://host[:port][/path]``, else None."""
    try:
        parts = urlsplit(endpoint)
        port = parts.port
    except ValueError as exc:
        return f"endpoint {endpoint!r} is not a valid URL: {exc}"
    if parts.scheme != "opc.tcp":
        return f"endpoint {endpoint!r} must start with 'opc.tcp://' (e.g. opc.tcp://plc1:4840)"
    if not parts.hostname:
        return f"endpoint {endpoint!r} has no host (e.g. opc.tcp://plc1:4840)"
    if port == 0:
        return f"endpoint {endpoint!r}: port must be 1-65535"
    if parts.username is not None or parts.password is not None:
        return (
            f"endpoint {endpoint!r} carries credentials; use the 'username' and "
            "'password_file' options instead"
        )
    if parts.query or parts.fragment:
        return f"endpoint {endpoint!r} must not have a query or fragment"
    return None


def endpoint_host_port(endpoint: str) -> tuple[str, int]:
    """Host and port of a checked endpoint (port 4840 when the URL names none)."""
    parts = urlsplit(endpoint)
    return parts.hostname or "", parts.port or DEFAULT_PORT
