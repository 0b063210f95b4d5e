"""The one place where asyncua and OS exceptions become edgeos errors, and status codes qualities.

Every network call of the driver runs inside :func:`translate_errors`; nothing from asyncua,
``OSError`` or ``asyncio`` leaves the driver except ``CancelledError`` (which must propagate).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from typing import Literal

from asyncua import ua
from asyncua.common.utils import ServiceError
from asyncua.ua.status_codes import StatusCodes
from asyncua.ua.uaerrors import UaError, UaStatusCodeError, UaStructParsingError

from edgeos.driver import Quality
from edgeos.errors import (
    ConnectError,
    EdgeosError,
    ProtocolError,
    TimeoutError_,
    TransportError,
)

__all__ = ["Phase", "quality_of", "status_name", "translate", "translate_errors"]

#: What the driver was doing; the same failure means different things in each phase.
Phase = Literal["connect", "subscribe", "read", "write", "close"]

_S = StatusCodes

#: Status codes that say the node/attribute itself is wrong: fixing needs a config change.
CONFIG_STATUS: frozenset[int] = frozenset(
    {
        _S.BadNodeIdUnknown,
        _S.BadNodeIdInvalid,
        _S.BadAttributeIdInvalid,
        _S.BadIndexRangeInvalid,
        _S.BadIndexRangeNoData,
        _S.BadDataEncodingInvalid,
        _S.BadDataEncodingUnsupported,
        _S.BadNotReadable,
        _S.BadNotWritable,
        _S.BadUserAccessDenied,
        _S.BadTypeMismatch,
        _S.BadMonitoredItemFilterUnsupported,
        _S.BadFilterNotAllowed,
        _S.BadDeadbandFilterInvalid,
    }
)

#: Login refused: wrong user, password or identity token.
_LOGIN_STATUS: frozenset[int] = frozenset(
    {
        _S.BadUserAccessDenied,
        _S.BadIdentityTokenInvalid,
        _S.BadIdentityTokenRejected,
        _S.BadUserSignatureInvalid,
    }
)

#: The secure channel could not be established (certificates, policy, mode).
_SECURITY_STATUS: frozenset[int] = frozenset(
    {
        _S.BadSecurityChecksFailed,
        _S.BadCertificateInvalid,
        _S.BadCertificateUntrusted,
        _S.BadCertificateTimeInvalid,
        _S.BadCertificateHostNameInvalid,
        _S.BadCertificateUriInvalid,
        _S.BadCertificateUseNotAllowed,
        _S.BadCertificateRevoked,
        _S.BadCertificateIssuerRevoked,
        _S.BadCertificateRevocationUnknown,
        _S.BadSecurityPolicyRejected,
        _S.BadSecurityModeRejected,
        _S.BadNonceInvalid,
        _S.BadApplicationSignatureInvalid,
    }
)

_TIMEOUT_STATUS: frozenset[int] = frozenset({_S.BadTimeout, _S.BadRequestTimeout})

_STATUS_MASK = 0xFFFF0000


@cache
def status_name(code: int) -> str:
    """``BadNodeIdUnknown`` for a status code (info bits ignored)."""
    name, _ = ua.status_codes.get_name_and_doc(code & _STATUS_MASK)
    return name


@cache
def _status_doc(code: int) -> str:
    _, doc = ua.status_codes.get_name_and_doc(code & _STATUS_MASK)
    return doc.rstrip(".")


def describe_status(code: int) -> str:
    """``BadNodeIdUnknown (The node id refers to a node that does not exist…)``."""
    doc = _status_doc(code)
    return f"{status_name(code)} ({doc})" if doc else status_name(code)


def quality_of(code: int) -> Quality:
    """Tag quality for a value's status code.

    Good → GOOD, Uncertain → UNCERTAIN, node/attribute problems → BAD_CONFIG,
    ``BadWaitingForInitialData`` → BAD_NO_VALUE (the item exists; no sample yet), any other
    Bad → BAD_DEVICE.
    """
    severity = code >> 30
    if severity == 0:
        return Quality.GOOD
    if severity == 1:
        return Quality.UNCERTAIN
    masked = code & _STATUS_MASK
    if masked in CONFIG_STATUS:
        return Quality.BAD_CONFIG
    if masked == _S.BadWaitingForInitialData:
        return Quality.BAD_NO_VALUE
    return Quality.BAD_DEVICE


def translate(exc: BaseException, phase: Phase, endpoint: str) -> EdgeosError:
    """Map one foreign exception to the edgeos tree; the message names the endpoint."""
    if isinstance(exc, EdgeosError):
        return exc
    where = f"{endpoint}: {phase}"
    # builtins.TimeoutError is asyncio.TimeoutError and a subclass of OSError: test it first.
    if isinstance(exc, TimeoutError):
        if phase == "connect":
            return ConnectError(
                f"{where}: no answer during the handshake (server overloaded, or it cannot "
                "decrypt our messages: check server_certificate and security settings)"
            )
        return TimeoutError_(f"{where}: no answer within the request timeout")
    if isinstance(exc, ConnectionRefusedError):
        return ConnectError(f"{where}: connection refused (is the server running on that port?)")
    if isinstance(exc, ConnectionError):
        detail = str(exc) or type(exc).__name__
        return ConnectError(f"{where}: connection lost ({detail})")
    if isinstance(exc, OSError):
        detail = exc.strerror or str(exc) or type(exc).__name__
        return ConnectError(f"{where}: {detail}")
    if isinstance(exc, UaStatusCodeError) and isinstance(exc.code, int):
        return _translate_status(exc.code, phase, where)
    if isinstance(exc, ServiceError):
        return _translate_status(int(exc.code), phase, where)
    if isinstance(exc, UaStructParsingError):
        return ProtocolError(f"{where}: undecodable message from the server")
    if isinstance(exc, UaError):
        # asyncua raises bare UaError for handshake problems such as a pinned server
        # certificate that does not match the one the server presents.
        cls = ConnectError if phase == "connect" else ProtocolError
        return cls(f"{where}: {exc}")
    if isinstance(exc, ValueError | TypeError) and phase == "connect":
        # Certificates or keys that do not parse surface from cryptography as ValueError.
        return ConnectError(f"{where}: {type(exc).__name__}: {exc}")
    return ProtocolError(f"{where}: unexpected {type(exc).__name__}: {exc}")


def _translate_status(code: int, phase: Phase, where: str) -> TransportError:
    masked = code & _STATUS_MASK
    text = describe_status(code)
    if masked in _TIMEOUT_STATUS:
        return TimeoutError_(f"{where}: {text}")
    if phase == "connect":
        if masked in _LOGIN_STATUS:
            return ConnectError(f"{where}: login refused by the server: {text}")
        if masked in _SECURITY_STATUS:
            return ConnectError(f"{where}: secure channel refused: {text}")
        return ConnectError(f"{where}: {text}")
    return ProtocolError(f"{where}: {text}")


@contextmanager
def translate_errors(phase: Phase, endpoint: str) -> Iterator[None]:
    """Run a block and re-raise any foreign exception as its edgeos equivalent.

    ``CancelledError`` is a ``BaseException`` and passes through untouched, as it must.
    """
    try:
        yield
    except EdgeosError:
        raise
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        raise translate(exc, phase, endpoint) from exc
