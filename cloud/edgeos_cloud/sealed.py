"""Opening a sealed control message that a device POSTs to a cloud service.

The OTA report intake and the certificate renewal answer the same way to a body that is too
large, not sealed, of the wrong kind, from a device without a usable key, or that does not
authenticate; only the kind they accept and the words of their answers differ.
"""

from __future__ import annotations

from collections.abc import Callable
from http import HTTPStatus

from edgeos_cloud.ota.repository import ReportRefused
from edgeos_protocol.control import Control, ControlKind, open_control, parse_control_header
from edgeos_protocol.errors import EdgeosError

__all__ = ["KeyLookup", "open_sealed"]

#: ``(device, key id) → key``; raises (any exception) when there is no usable key.
KeyLookup = Callable[[str, int], bytes]


def open_sealed(
    sealed: bytes,
    kind: ControlKind,
    keys: KeyLookup,
    *,
    max_bytes: int,
    refused: type[ReportRefused],
    noun: str,
    what: str,
) -> tuple[Control, bytes]:
    """Authenticate ``sealed`` as a ``kind`` message; the message and the key that opened it.

    Raises ``refused`` with the HTTP status to answer. ``noun`` names the body in the answers
    ("report", "request"); ``what`` names the kind it must be ("a report", "a CERT_REQUEST").
    No state changes: refusing replays is the caller's.
    """
    if len(sealed) > max_bytes:
        raise refused(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"{noun} too large")
    try:
        found, device, key_id = parse_control_header(sealed)
    except EdgeosError as exc:
        raise refused(HTTPStatus.BAD_REQUEST, f"not a sealed {noun}: {exc}") from None
    if found is not kind:
        raise refused(HTTPStatus.BAD_REQUEST, f"{found.name} is not {what}")
    try:
        key = keys(device, key_id)
    except Exception as exc:  # the registry says why (unknown, revoked, wrong key)
        raise refused(HTTPStatus.FORBIDDEN, f"no key: {exc}") from None
    try:
        control = open_control(sealed, {key_id: key}, device=device, kinds=frozenset({kind}))
    except EdgeosError as exc:
        raise refused(HTTPStatus.FORBIDDEN, f"{noun} refused: {exc}") from None
    return control, key
