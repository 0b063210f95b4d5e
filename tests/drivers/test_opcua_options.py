"""OPC UA driver: options, endpoint checks, status mapping, error translation (no network)."""

from __future__ import annotations

from pathlib import Path

import pytest
from asyncua import ua
from asyncua.ua.status_codes import StatusCodes
from asyncua.ua.uaerrors import UaStatusCodeError
from pydantic import ValidationError

from drivers.opcua import OpcUaDriver, OpcUaOptions, check_endpoint
from drivers.opcua.codec import decode_datavalues, to_variant
from drivers.opcua.errors import quality_of, translate
from edgeos.clock import VirtualClock
from edgeos.config import ConnectionConfig, TagConfig
from edgeos.driver import Driver, Quality, TagBinding, load_driver_class
from edgeos.errors import ConnectError, ProtocolError, TimeoutError_, WriteRefused

EP = "opc.tcp://plc1:4840/ua"


def test_entry_point_loads_the_driver_and_it_satisfies_the_protocol() -> None:
    cls = load_driver_class("opcua")
    assert cls is OpcUaDriver
    assert cls.options_model is OpcUaOptions
    conn = ConnectionConfig(name="c", driver="opcua", endpoint=EP)
    assert isinstance(OpcUaDriver(conn.driver_context([], clock=VirtualClock())), Driver)


@pytest.mark.parametrize(
    ("endpoint", "fragment"),
    [
        ("tcp://plc1:4840", "opc.tcp://"),
        ("opc.tcp://:4840", "no host"),
        ("opc.tcp://plc1:99999", "not a valid URL"),
        ("opc.tcp://plc1:0", "port must be"),
        ("opc.tcp://user:pw@plc1:4840", "credentials"),
        ("opc.tcp://plc1:4840/x?y=1", "query"),
    ],
)
def test_check_endpoint_names_the_problem(endpoint: str, fragment: str) -> None:
    error = OpcUaDriver.check_endpoint(endpoint)
    assert error is not None
    assert fragment in error


@pytest.mark.parametrize("endpoint", ["opc.tcp://plc1:4840/ua", "opc.tcp://10.0.0.5", EP])
def test_check_endpoint_accepts_valid(endpoint: str) -> None:
    assert check_endpoint(endpoint) is None


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"security_policy": "Basic256Sha256"}, "needs security_mode"),
        ({"security_mode": "Sign"}, "needs a security_policy"),
        (
            {"security_policy": "Basic256Sha256", "security_mode": "Sign"},
            "client_certificate",
        ),
        ({"username": "op"}, "password_file"),
        ({"password": "inline"}, "Extra inputs"),
        ({"password_file": "/x"}, "username is not"),
        ({"security_policy": "Aes128"}, "Input should be"),
        ({"max_items_per_read": 0}, "greater than or equal"),
        ({"keepalive_count": 50, "lifetime_count": 100}, "lifetime_count"),
        ({"server_certificate": "/s.der"}, "security_policy is 'None'"),
    ],
)
def test_options_refuse_inconsistent_settings(options: dict[str, object], fragment: str) -> None:
    with pytest.raises(ValidationError) as info:
        OpcUaOptions.model_validate(options)
    assert fragment in str(info.value)


def test_options_are_frozen() -> None:
    opts = OpcUaOptions(
        security_policy="Basic256Sha256",
        security_mode="SignAndEncrypt",
        client_certificate=Path("c.pem"),
        client_private_key=Path("k.pem"),
        username="op",
        password_file=Path("pw"),
    )
    with pytest.raises(ValidationError):
        opts.sessions = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    ("code", "quality"),
    [
        (StatusCodes.Good, Quality.GOOD),
        (StatusCodes.UncertainLastUsableValue, Quality.UNCERTAIN),
        (StatusCodes.BadNodeIdUnknown, Quality.BAD_CONFIG),
        (StatusCodes.BadNotReadable, Quality.BAD_CONFIG),
        (StatusCodes.BadSensorFailure, Quality.BAD_DEVICE),
        (StatusCodes.BadCommunicationError, Quality.BAD_DEVICE),
        (StatusCodes.BadWaitingForInitialData, Quality.BAD_NO_VALUE),
        # Info bits (here: data value overflow) do not change the verdict.
        (StatusCodes.Good | 0x0480, Quality.GOOD),
    ],
)
def test_status_codes_map_to_quality(code: int, quality: Quality) -> None:
    assert quality_of(code) is quality


def test_decode_marks_bad_values_nan_with_status_name_as_reason() -> None:
    dvs = [
        ua.DataValue(ua.Variant(1.5, ua.VariantType.Double)),
        ua.DataValue(StatusCode=ua.StatusCode(StatusCodes.BadNodeIdUnknown)),
        ua.DataValue(StatusCode=ua.StatusCode(StatusCodes.BadSensorFailure)),
        ua.DataValue(ua.Variant("x", ua.VariantType.String)),  # not a number
        ua.DataValue(ua.Variant(True, ua.VariantType.Boolean)),
    ]
    block = decode_datavalues([10, 11, 12, 13, 14], dvs, frozenset(), received=5.0)
    assert block.indices.tolist() == [10, 11, 12, 13, 14]
    assert block.quality.tolist() == [
        Quality.GOOD,
        Quality.BAD_CONFIG,
        Quality.BAD_DEVICE,
        Quality.BAD_DECODE,
        Quality.GOOD,
    ]
    assert block.values[0] == 1.5
    assert block.values[4] == 1.0
    assert all(v != v for v in block.values[1:4])  # NaN
    assert block.bad_reasons == {"BadNodeIdUnknown": 1, "BadSensorFailure": 1, "decode": 1}
    assert block.source_ts.tolist() == [5.0] * 5  # no timestamps → receive time


def test_translate_maps_foreign_errors_into_the_tree() -> None:
    assert isinstance(translate(ConnectionRefusedError(), "connect", EP), ConnectError)
    assert isinstance(translate(TimeoutError(), "read", EP), TimeoutError_)
    assert isinstance(translate(TimeoutError(), "connect", EP), ConnectError)
    assert isinstance(translate(ConnectionError("gone"), "read", EP), ConnectError)
    refused = translate(UaStatusCodeError(StatusCodes.BadUserAccessDenied), "connect", EP)
    assert isinstance(refused, ConnectError)
    assert "login refused" in str(refused)
    assert isinstance(
        translate(UaStatusCodeError(StatusCodes.BadSessionIdInvalid), "read", EP), ProtocolError
    )
    assert isinstance(translate(RuntimeError("?"), "read", EP), ProtocolError)


@pytest.mark.parametrize(
    ("dtype", "value", "fragment"),
    [("int16", 40000, "does not fit int16"), ("uint32", -1, "does not fit uint32")],
)
def test_to_variant_refuses_values_the_type_cannot_hold(
    dtype: str, value: int, fragment: str
) -> None:
    with pytest.raises(WriteRefused, match=fragment):
        to_variant("t", dtype, value)


def test_too_many_subscriptions_is_a_construction_error() -> None:
    conn = ConnectionConfig(
        name="c",
        driver="opcua",
        endpoint=EP,
        options={"max_items_per_subscription": 1, "max_subscriptions": 2},
    )
    tags = [
        TagBinding(
            i,
            TagConfig(
                name=f"t{i}",
                connection="c",
                resolution=0.1,
                opcua={"node_id": f"ns=2;s=v{i}", "mode": "subscribe"},
            ),
        )
        for i in range(3)
    ]
    with pytest.raises(ValueError, match="max_subscriptions"):
        OpcUaDriver(conn.driver_context(tags, clock=VirtualClock()))
