"""An independent Sparkplug B host application for tests and benchmarks.

Independent of the edge node under test on purpose: the node encodes with Google's protobuf
runtime; this host decodes (and encodes its few commands) **by hand** from the wire format of
the specification's payload definition (``sparkplug_b.proto``: field numbers, wire types), so a
mistake in one cannot hide in the other.

API::

    async with SparkplugHost(broker, group="line3", host_id="scada") as host:
        await host.set_state(online=True)                     # spBv1.0/STATE/scada, retained
        birth = await host.expect(kind="NBIRTH")              # -> HostMessage
        data = await host.expect(kind="DDATA", device="nest01", where=lambda m: ...)
        await host.rebirth("gw-1")
        await host.dcmd("gw-1", "nest01", [Metric(name="heater/sp", datatype=10, value=190.0)])

Every message the host saw is in ``host.messages`` (topic, kind, node, device, decoded payload).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "HostDecodeError",
    "HostMessage",
    "Metric",
    "SparkplugHost",
    "SpbPayload",
    "decode_payload",
    "encode_payload",
]

# DataType numbers of the specification (sparkplug_b.proto, enum DataType).
INT8, INT16, INT32, INT64 = 1, 2, 3, 4
UINT8, UINT16, UINT32, UINT64 = 5, 6, 7, 8
FLOAT, DOUBLE, BOOLEAN, STRING = 9, 10, 11, 12


class HostDecodeError(ValueError):
    """The bytes are not a Sparkplug B payload."""


@dataclass
class Metric:
    name: str | None = None
    alias: int | None = None
    timestamp: int | None = None
    datatype: int | None = None
    is_historical: bool = False
    is_null: bool = False
    value: Any = None
    properties: dict[str, Any] = field(default_factory=dict)


@dataclass
class SpbPayload:
    timestamp: int | None = None
    seq: int | None = None
    metrics: list[Metric] = field(default_factory=list)

    def by_name(self) -> dict[str, Metric]:
        return {m.name: m for m in self.metrics if m.name is not None}


# ------------------------------------------------------------------ protobuf wire format


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        if pos >= len(buf):
            raise HostDecodeError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise HostDecodeError("varint too long")


def _fields(buf: bytes) -> list[tuple[int, int, Any]]:
    out = []
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            if pos + 8 > len(buf):
                raise HostDecodeError("truncated fixed64")
            value, pos = buf[pos : pos + 8], pos + 8
        elif wire == 2:
            n, pos = _varint(buf, pos)
            if pos + n > len(buf):
                raise HostDecodeError("truncated length-delimited field")
            value, pos = buf[pos : pos + n], pos + n
        elif wire == 5:
            if pos + 4 > len(buf):
                raise HostDecodeError("truncated fixed32")
            value, pos = buf[pos : pos + 4], pos + 4
        else:
            raise HostDecodeError(f"unsupported wire type {wire}")
        out.append((number, wire, value))
    return out


def _signed(v: int, bits: int) -> int:
    return v - (1 << bits) if v >= 1 << (bits - 1) else v


def _scalar(number: int, value: Any, datatype: int | None, base: int) -> Any:
    """A value field (int/long/float/double/bool/string at ``base`` + 0..5)."""
    k = number - base
    if k == 0:
        return _signed(value, 32) if datatype in (INT8, INT16, INT32) else value
    if k == 1:
        return _signed(value, 64) if datatype == INT64 else value
    if k == 2:
        return struct.unpack("<f", value)[0]
    if k == 3:
        return struct.unpack("<d", value)[0]
    if k == 4:
        return bool(value)
    if k == 5:
        return bytes(value).decode("utf-8")
    raise HostDecodeError(f"unexpected value field {number}")


def _property_value(buf: bytes) -> Any:
    ptype = None
    value = None
    for number, _, v in _fields(buf):
        if number == 1:
            ptype = v
        elif number == 2 and v:
            return None
        elif 3 <= number <= 8:
            value = _scalar(number, v, ptype, 3)
    return value


def _metric(buf: bytes) -> Metric:
    m = Metric()
    raw: tuple[int, Any] | None = None
    for number, _, v in _fields(buf):
        if number == 1:
            m.name = bytes(v).decode("utf-8")
        elif number == 2:
            m.alias = v
        elif number == 3:
            m.timestamp = v
        elif number == 4:
            m.datatype = v
        elif number == 5:
            m.is_historical = bool(v)
        elif number == 7:
            m.is_null = bool(v)
        elif number == 9:
            keys: list[str] = []
            values: list[Any] = []
            for pn, _, pv in _fields(v):
                if pn == 1:
                    keys.append(bytes(pv).decode("utf-8"))
                elif pn == 2:
                    values.append(_property_value(pv))
            if len(keys) != len(values):
                raise HostDecodeError("property set with unequal keys and values")
            m.properties = dict(zip(keys, values, strict=True))
        elif 10 <= number <= 15:
            raw = (number, v)
    if raw is not None:
        m.value = _scalar(raw[0], raw[1], m.datatype, 10)
    return m


def decode_payload(buf: bytes) -> SpbPayload:
    """Decode a Sparkplug B payload (timestamp, seq, metrics) by hand."""
    p = SpbPayload()
    for number, wire, v in _fields(buf):
        if number == 1 and wire == 0:
            p.timestamp = v
        elif number == 2 and wire == 2:
            p.metrics.append(_metric(v))
        elif number == 3 and wire == 0:
            p.seq = v
    return p


def _key(number: int, wire: int) -> bytes:
    return _enc_varint((number << 3) | wire)


def _enc_varint(v: int) -> bytes:
    out = bytearray()
    v &= (1 << 64) - 1
    while True:
        b = v & 0x7F
        v >>= 7
        if v:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _len_field(number: int, data: bytes) -> bytes:
    return _key(number, 2) + _enc_varint(len(data)) + data


def encode_metric(m: Metric) -> bytes:
    out = b""
    if m.name is not None:
        out += _len_field(1, m.name.encode())
    if m.alias is not None:
        out += _key(2, 0) + _enc_varint(m.alias)
    if m.timestamp is not None:
        out += _key(3, 0) + _enc_varint(m.timestamp)
    if m.datatype is not None:
        out += _key(4, 0) + _enc_varint(m.datatype)
    v = m.value
    if v is None:
        out += _key(7, 0) + b"\x01"
    elif m.datatype == BOOLEAN:
        out += _key(14, 0) + (b"\x01" if v else b"\x00")
    elif m.datatype == STRING:
        out += _len_field(15, str(v).encode())
    elif m.datatype == DOUBLE:
        out += _key(13, 1) + struct.pack("<d", float(v))
    elif m.datatype == FLOAT:
        out += _key(12, 5) + struct.pack("<f", float(v))
    elif m.datatype in (INT64, UINT64):
        out += _key(11, 0) + _enc_varint(int(v))
    else:
        out += _key(10, 0) + _enc_varint(int(v) & 0xFFFFFFFF)
    return out


def encode_payload(metrics: list[Metric], *, timestamp: int | None = None) -> bytes:
    """A command payload (NCMD/DCMD), encoded by hand."""
    out = _key(1, 0) + _enc_varint(timestamp if timestamp is not None else int(time.time() * 1000))
    for m in metrics:
        out += _len_field(2, encode_metric(m))
    return out


# ------------------------------------------------------------------ the host application


@dataclass
class HostMessage:
    topic: str
    kind: str
    node: str | None
    device: str | None
    payload: SpbPayload | None
    raw: bytes
    error: str | None = None


class SparkplugHost:
    """A host application on a real broker: subscribes to a group, records, sends commands."""

    def __init__(self, broker: Any, *, group: str, host_id: str = "scada") -> None:
        self.broker = broker
        self.group = group
        self.host_id = host_id
        self.messages: list[HostMessage] = []
        self._cond = asyncio.Condition()
        self._client: Any = None
        self._reader: asyncio.Task[None] | None = None
        self._stack = contextlib.AsyncExitStack()

    async def __aenter__(self) -> SparkplugHost:
        self._client = await self._stack.enter_async_context(self.broker.client(self.host_id))
        await self._client.subscribe(f"spBv1.0/{self.group}/#", qos=1)
        self._reader = asyncio.create_task(self._read(), name="sparkplug-host-reader")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        await self._stack.aclose()

    async def _read(self) -> None:
        async for message in self._client.messages:
            topic = message.topic.value
            raw = bytes(message.payload) if isinstance(message.payload, bytes | bytearray) else b""
            parts = topic.split("/")
            kind = parts[2] if len(parts) > 2 else ""
            node = parts[3] if len(parts) > 3 else None
            device = parts[4] if len(parts) > 4 else None
            payload = None
            error = None
            try:
                payload = decode_payload(raw)
            except HostDecodeError as exc:
                error = str(exc)
            async with self._cond:
                self.messages.append(HostMessage(topic, kind, node, device, payload, raw, error))
                self._cond.notify_all()

    async def expect(
        self,
        *,
        kind: str,
        device: str | None = None,
        where: Callable[[HostMessage], bool] | None = None,
        after: int = 0,
        wait_s: float = 20.0,
    ) -> HostMessage:
        """The first message from index ``after`` of that kind (and device) matching ``where``."""

        def find() -> HostMessage | None:
            for m in self.messages[after:]:
                if m.kind != kind or (device is not None and m.device != device):
                    continue
                if where is None or where(m):
                    return m
            return None

        async with asyncio.timeout(wait_s), self._cond:
            await self._cond.wait_for(lambda: find() is not None)
        found = find()
        assert found is not None
        return found

    def index_of(self, message: HostMessage) -> int:
        return self.messages.index(message) + 1

    async def set_state(self, *, online: bool, timestamp: int | None = None) -> None:
        """The primary host's STATE (Sparkplug 3.0 JSON), retained, QoS 1."""
        ts = timestamp if timestamp is not None else int(time.time() * 1000)
        doc = json.dumps({"online": online, "timestamp": ts}).encode()
        await self._client.publish(f"spBv1.0/STATE/{self.host_id}", doc, qos=1, retain=True)

    async def publish_raw(self, topic: str, data: bytes) -> None:
        await self._client.publish(topic, data, qos=1)

    async def rebirth(self, node: str) -> None:
        payload = encode_payload(
            [Metric(name="Node Control/Rebirth", datatype=BOOLEAN, value=True)]
        )
        await self._client.publish(f"spBv1.0/{self.group}/NCMD/{node}", payload, qos=1)

    async def dcmd(self, node: str, device: str, metrics: list[Metric]) -> None:
        payload = encode_payload(metrics)
        await self._client.publish(f"spBv1.0/{self.group}/DCMD/{node}/{device}", payload, qos=1)
