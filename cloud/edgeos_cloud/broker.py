"""The broker's side of the fleet's identities: the Mosquitto ACL file and config snippet.

Mosquitto (``use_identity_as_username true``) makes a client certificate's CN its MQTT
username. Two kinds of identity meet there, kept apart by role (see
:mod:`edgeos_cloud.receiver.pki`):

* **devices** — CN = device id, ``OU=device``. Rights come from *patterns* on ``%u``, so a device
  reaches only its own topics: it publishes ``<p>/<id>/batch``, ``…/status``, ``…/cmd/result``
  and reads ``<p>/<id>/ack`` and ``…/cmd``. Nothing else, in particular no wildcard
  subscription over other devices and no ``$share/…`` subscription of the receivers' group.
* **receivers** — CN = a reserved service name (``receiver``, ``receiver-2`` …), ``OU=receiver``.
  Only they get ``user`` sections: read every device's uplink topics (plain or through
  ``$share/<group>/…``), write every device's ``ack`` and ``cmd``.

No device id can be a service name (:func:`edgeos_protocol.credentials.check_device_id`, enforced
by the registry and the CA), and :func:`device_acl` refuses to grant receiver rights to a name
that is not one, so no device certificate can ever carry a receiver's username.

The snippet also sizes the broker's queues (:class:`BrokerLimits`): Mosquitto keeps **one**
queue per client session, so every device's batches wait in the same queue for a receiver's
session; at Mosquitto's default (1,000 messages) one device publishing junk faster than the
receivers read fills it within a second and the broker then silently drops *other* devices'
batches. Mosquitto has no per-client publish rate limit (EMQX and VerneMQ have one; see
docs/receiver.md, "Where the broker can still drop"), so the queue is sized in bytes for the
fleet instead: a flood then costs latency until the bound, not healthy batches.

``edgeos-cloud init DIR`` writes ``DIR/broker/acl`` and ``DIR/broker/mosquitto.conf`` (a
snippet to include in the broker's configuration); the test harness
(``edgeos_testing.mosquitto``) runs a real Mosquitto on the same two generators.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from edgeos_protocol.credentials import is_service_identity
from edgeos_protocol.topics import DEFAULT_PREFIX

__all__ = ["BrokerLimits", "device_acl", "mosquitto_config"]

#: Room in an MQTT PUBLISH packet beyond its payload: fixed header, topic, packet id.
PACKET_OVERHEAD = 64 << 10


@dataclass(frozen=True, slots=True)
class BrokerLimits:
    """Mosquitto's global queue and packet limits for an edgeos fleet (per client session).

    * ``max_packet_size`` — the receiver's ``limits.max_payload_bytes`` plus
      :data:`PACKET_OVERHEAD`: a larger message could only be refused by the receiver's door,
      so the broker refuses it first (and disconnects its sender) instead of queueing it.
    * ``max_queued_messages`` / ``max_queued_bytes`` — what the broker holds for one session
      beyond its in-flight window; whichever is reached first, later messages for the session
      are dropped. For the receivers' session size them for the fleet: batches per second of
      the whole fleet times the longest receiver pause to ride out (a restart, a database
      failover), and that times the mean batch size. Defaults: 500,000 messages (1,000
      gateways at one batch per 3 s for 25 minutes) and 1 GiB. They also bound what one
      flooding device can park in the broker before drops start again.
    * ``max_inflight_messages`` — QoS 1 messages sent to a session and not yet PUBACKed
      (Mosquitto's default 20). The receiver withholds PUBACKs when full, so this window times
      the largest payload bounds what the receiver holds unadmitted.
    """

    max_packet_size: int = (16 << 20) + PACKET_OVERHEAD
    max_queued_messages: int = 500_000
    max_queued_bytes: int = 1 << 30
    max_inflight_messages: int = 20

    @classmethod
    def for_payload(cls, max_payload_bytes: int, **kwargs: int) -> BrokerLimits:
        """Limits whose packet size matches a receiver's ``limits.max_payload_bytes``."""
        return cls(max_packet_size=max_payload_bytes + PACKET_OVERHEAD, **kwargs)

    def lines(self) -> list[str]:
        """The Mosquitto configuration lines (all global options)."""
        return [
            f"max_packet_size {self.max_packet_size}",
            f"max_queued_messages {self.max_queued_messages}",
            f"max_queued_bytes {self.max_queued_bytes}",
            f"max_inflight_messages {self.max_inflight_messages}",
        ]


def device_acl(receivers: Iterable[str] = ("receiver",), prefix: str = DEFAULT_PREFIX) -> str:
    """The ACL file text: per-device patterns (``%u`` = CN) and the receivers' rights.

    Raises ``ValueError`` for a receiver name outside the services' reserved namespace (a name
    a device could also take).
    """
    names = list(dict.fromkeys(receivers))
    for name in names:
        if not is_service_identity(name) or any(c in name for c in "#+/ \t\n"):
            raise ValueError(
                f"receiver identity {name!r} is not a reserved service name "
                "(e.g. 'receiver', 'receiver-2'): a device could take it"
            )
    lines = [
        "# edgeos broker ACL (generated by edgeos_cloud.broker; do not edit by hand).",
        "# Devices: their own topics only (%u is the certificate CN = the device id).",
        f"pattern write {prefix}/%u/batch",
        f"pattern write {prefix}/%u/status",
        f"pattern write {prefix}/%u/cmd/result",
        f"pattern read {prefix}/%u/ack",
        f"pattern read {prefix}/%u/cmd",
        "",
        "# Receivers (OU=receiver, reserved names no device can take): every device's uplink.",
    ]
    for name in names:
        lines += [
            f"user {name}",
            f"topic read {prefix}/+/batch",
            f"topic read {prefix}/+/status",
            f"topic read {prefix}/+/cmd/result",
            f"topic write {prefix}/+/ack",
            f"topic write {prefix}/+/cmd",
            "",
        ]
    return "\n".join(lines)


def mosquitto_config(
    *,
    ca_file: Path,
    cert_file: Path,
    key_file: Path,
    crl_file: Path,
    acl_file: Path | None,
    port: int = 8883,
    host: str | None = None,
    limits: BrokerLimits | None = BrokerLimits(),
) -> str:
    """The Mosquitto configuration lines of an edgeos TLS listener with the fleet's ACL.

    Client certificates are required and their CN is the username the ACL matches; anonymous
    clients are refused; revoked certificates are refused through the CA's CRL (re-read when
    the listener starts). ``limits`` sizes the broker's queues and packets
    (:class:`BrokerLimits`); ``None`` leaves Mosquitto's defaults.
    """
    listener = f"listener {port} {host}" if host else f"listener {port}"
    return "\n".join(
        [
            "per_listener_settings false",
            "allow_anonymous false",
            *(limits.lines() if limits is not None else []),
            *([f"acl_file {acl_file}"] if acl_file is not None else []),
            listener,
            f"cafile {ca_file}",
            f"certfile {cert_file}",
            f"keyfile {key_file}",
            f"crlfile {crl_file}",
            "require_certificate true",
            "use_identity_as_username true",
            "tls_version tlsv1.2",
            "",
        ]
    )
