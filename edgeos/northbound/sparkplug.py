"""A Sparkplug B edge node of the twin on the plant broker (Sparkplug 3.0; see docs/northbound.md).

* One **edge node** per gateway (``spBv1.0/<group>/…/<edge node>``) and one **device** per
  equipment instance (``nest01``); tags without an equipment prefix are node metrics.
* **Births** (NBIRTH, then a DBIRTH per device) carry every metric's name, alias, datatype,
  timestamp, value and properties (``engUnit``, ``engLow``/``engHigh`` from the hard limits,
  ``deadband``, ``readOnly``, ``Quality``, ``Documentation``). NBIRTH also carries ``bdSeq``,
  ``Node Control/Rebirth`` and ``Edge Info/Last Command``.
* **Data** (NDATA/DDATA) by exception: the columns the twin reported as changed (each tag's
  deadband), coalesced over ``publish_interval_ms``, aliases only, with source timestamps.
* ``bdSeq`` (0–255) increments per MQTT session, is carried by the NDEATH registered as the MQTT
  will, and is kept in ``state_dir`` across restarts; ``seq`` (0–255) starts at 0 with NBIRTH
  and counts every later message of the node except NDEATH.
* ``Node Control/Rebirth`` (NCMD) re-sends the births (same ``bdSeq``, ``seq`` from 0).
* **Primary host** (``primary_host_id``): births wait for ``spBv1.0/STATE/<host>`` to say
  online; while it is offline (or the broker is away) changes are *held* (bounded by
  ``hold_max_values``, the oldest dropped and counted) and sent with ``is_historical`` after the
  next births. A STATE offline newer than the last seen ends the session with an NDEATH.
* **DCMD** for a metric enabled in ``writes`` goes through ``twin.set_desired`` (type, hard
  limits, rate limits, the same outcome records as any write); anything else is refused with a
  reason, which the node publishes as ``Edge Info/Last Command`` and logs. Nothing refused
  reaches the PLC.

The payload is the specification's protobuf schema encoded by Google's ``protobuf`` runtime
(:mod:`edgeos.northbound.sparkplug_schema`); the MQTT client is aiomqtt, as for the uplink.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import ssl
from collections import Counter, deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiomqtt
import numpy as np
import numpy.typing as npt

from edgeos.clock import Clock
from edgeos.driver import Quality, Value
from edgeos.errors import ConnectError
from edgeos.northbound.config import SparkplugConfig, plant_writable
from edgeos.northbound.hub import GUARD_METRICS, GuardStats, Hub, PlantNames, read_secret
from edgeos.northbound.sparkplug_schema import DATATYPES, Payload
from edgeos.tags import INTEGER_TYPES, TagSpec
from edgeos.twin import DesiredChange, Twin
from edgeos_protocol.aio import in_own_task, reraise_lost_cancellation
from edgeos_protocol.backoff import Backoff

__all__ = ["NAMESPACE", "SparkplugCounters", "SparkplugNode", "quality_code"]

log = logging.getLogger("edgeos.northbound.sparkplug")

NAMESPACE = "spBv1.0"
REBIRTH = "Node Control/Rebirth"
LAST_COMMAND = "Edge Info/Last Command"

# Value kinds: which oneof field carries the value.
_K_INT, _K_LONG, _K_FLOAT, _K_DOUBLE, _K_BOOL, _K_STRING = range(6)
_DATATYPE = {
    "int16": ("Int16", _K_INT),
    "uint16": ("UInt16", _K_INT),
    "int32": ("Int32", _K_INT),
    "uint32": ("UInt32", _K_INT),
    "int64": ("Int64", _K_LONG),
    "float32": ("Float", _K_FLOAT),
    "float64": ("Double", _K_DOUBLE),
    "bool": ("Boolean", _K_BOOL),
    "string": ("String", _K_STRING),
}
_MASK32 = 0xFFFFFFFF
_MASK64 = 0xFFFFFFFFFFFFFFFF

#: Twin quality -> the OPC DA quality code Ignition and most hosts read from ``Quality``.
_QUALITY = {
    Quality.GOOD: 192,
    Quality.STALE: 84,  # uncertain, last usable value
    Quality.UNCERTAIN: 64,
    Quality.BAD: 0,
    Quality.BAD_COMM: 24,  # comm failure
    Quality.BAD_DEVICE: 12,  # device failure
    Quality.BAD_DECODE: 0,
    Quality.BAD_CONFIG: 4,  # configuration error
    Quality.BAD_NO_VALUE: 32,  # waiting for initial data
}


def quality_code(q: int) -> int:
    """The ``Quality`` property value of a twin quality (OPC DA: 192 good, 64 uncertain, …)."""
    try:
        return _QUALITY[Quality(q)]
    except ValueError:
        return 0


def _kind(tag: TagSpec) -> tuple[int, int]:
    """(Sparkplug datatype number, value kind) of a tag's engineering value."""
    dtype = tag.data_type
    if dtype in INTEGER_TYPES and tag.scale != 1.0:  # scaled: the engineering value is real
        return DATATYPES["Double"], _K_DOUBLE
    name, kind = _DATATYPE[dtype]
    return DATATYPES[name], kind


def _set_value(metric: Any, kind: int, v: float, text: str | None) -> None:
    if kind == _K_DOUBLE:
        metric.double_value = v
    elif kind == _K_INT:
        metric.int_value = int(v) & _MASK32
    elif kind == _K_BOOL:
        metric.boolean_value = v != 0.0
    elif kind == _K_LONG:
        metric.long_value = int(v) & _MASK64
    elif kind == _K_FLOAT:
        metric.float_value = v
    elif text is not None:
        metric.string_value = text
    else:
        metric.is_null = True


def _property(props: Any, key: str, datatype: str, value: Value) -> None:
    props.keys.append(key)
    pv = props.values.add()
    pv.type = DATATYPES[datatype]
    if datatype == "String":
        pv.string_value = str(value)
    elif datatype == "Boolean":
        pv.boolean_value = bool(value)
    elif datatype == "Int32":
        pv.int_value = int(value) & _MASK32
    else:
        pv.double_value = float(value)


def _signed(raw: int, bits: int) -> int:
    return raw - (1 << bits) if raw >= 1 << (bits - 1) else raw


class CommandRefused(Exception):
    """A DCMD/NCMD metric the node does not carry out; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _HostOffline(Exception):
    """The primary host application went offline: end the session (NDEATH, reconnect)."""


@dataclass(slots=True)
class _Held:
    idx: npt.NDArray[np.int32]
    values: npt.NDArray[np.float64]
    quality: npt.NDArray[np.uint8]
    ts_ms: npt.NDArray[np.int64]
    text: dict[int, str]


@dataclass(slots=True)
class SparkplugCounters:
    """What the node did, for ``edgeos status`` and the benchmark."""

    state: str = "starting"
    connects: int = 0
    connect_failures: int = 0
    births: int = 0
    rebirths: int = 0
    data_messages: int = 0
    data_metrics: int = 0
    data_bytes: int = 0
    held_values: int = 0
    held_dropped: int = 0
    historical_sent: int = 0
    host_offline: int = 0
    state_ignored: int = 0
    commands: Counter[str] = field(default_factory=Counter)

    def as_dict(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "connects": self.connects,
            "connect_failures": self.connect_failures,
            "births": self.births,
            "rebirths": self.rebirths,
            "data_messages": self.data_messages,
            "data_metrics": self.data_metrics,
            "data_bytes": self.data_bytes,
            "bytes_per_value": round(self.data_bytes / self.data_metrics, 2)
            if self.data_metrics
            else None,
            "held_values": self.held_values,
            "held_dropped": self.held_dropped,
            "historical_sent": self.historical_sent,
            "host_offline": self.host_offline,
            "state_ignored": self.state_ignored,
            "commands": dict(self.commands),
        }


class SparkplugNode:
    """The edge node; :meth:`run` until cancelled (a child of the runtime's TaskGroup)."""

    def __init__(
        self,
        config: SparkplugConfig,
        twin: Twin,
        hub: Hub,
        *,
        edge_node_id: str,
        clock: Clock,
        guard_stats: GuardStats | None = None,
        state_dir: Path | None = None,
    ) -> None:
        self.config = config
        self.twin = twin
        self.clock = clock
        self.group = config.group_id
        self.node = config.edge_node_id or edge_node_id
        self.names = PlantNames.of(twin.tags)
        self.feed = hub.feed("sparkplug")
        self.writable = plant_writable(config.writes, twin.tags)
        self.guard_stats = guard_stats
        self.counters = SparkplugCounters()
        self._bdseq_file = None if state_dir is None else state_dir / "sparkplug.bdseq"
        self._bdseq = self._load_bdseq()
        self._seq = 0
        n = len(twin)
        kinds = [_kind(t) for t in twin.tags]
        self._datatype = [d for d, _ in kinds]
        self._kind = [k for _, k in kinds]
        self._sent_quality = np.full(n, 255, dtype=np.uint8)
        self._by_name = {name: i for i, name in enumerate(twin.names)}
        # Aliases: twin column + 1 for tags, then the node's own metrics, then guard metrics.
        self._alias_rebirth = n + 1
        self._alias_last_command = n + 2
        self._guard_alias0 = n + 3
        self._last_command = ""
        self._last_command_sent = ""
        self._guard_sent: dict[str, Any] = {}
        self._hold: deque[_Held] = deque()
        self._held = 0
        self._client: aiomqtt.Client | None = None
        self._live = False
        self._send_lock = asyncio.Lock()
        self._host_online = config.primary_host_id is None
        self._host_ts = -1
        self._host_event = asyncio.Event()
        self._outcomes_running = 0
        self._lost = False
        self._tg: asyncio.TaskGroup | None = None

    # ------------------------------------------------------------------ topics

    def topic(self, kind: str, device: str | None = None) -> str:
        base = f"{NAMESPACE}/{self.group}/{kind}/{self.node}"
        return base if device is None else f"{base}/{device}"

    @property
    def state_topic(self) -> str | None:
        host = self.config.primary_host_id
        return None if host is None else f"{NAMESPACE}/STATE/{host}"

    # ------------------------------------------------------------------ bdSeq

    def _load_bdseq(self) -> int:
        if self._bdseq_file is None:
            return 255  # the first session uses 0
        try:
            return int(self._bdseq_file.read_text(encoding="ascii").strip()) % 256
        except (OSError, ValueError):
            return 255

    def _next_bdseq(self) -> int:
        self._bdseq = (self._bdseq + 1) % 256
        if self._bdseq_file is not None:
            try:
                self._bdseq_file.write_text(f"{self._bdseq}\n", encoding="ascii")
            except OSError as exc:
                log.warning("cannot keep the Sparkplug bdSeq in %s: %s", self._bdseq_file, exc)
        return self._bdseq

    @property
    def bdseq(self) -> int:
        return self._bdseq

    def _next_seq(self) -> int:
        seq = self._seq
        self._seq = (seq + 1) % 256
        return seq

    # ------------------------------------------------------------------ run

    async def run(self) -> None:
        """Publish by exception and reconnect (``reconnect`` policy) until cancelled."""
        async with asyncio.TaskGroup() as tg:
            self._tg = tg
            tg.create_task(self._pump(), name="sparkplug-pump")
            tg.create_task(self._connection_loop(), name="sparkplug-connection")

    async def _connection_loop(self) -> None:
        backoff = Backoff(self.config.reconnect.policy())
        while True:
            served = False
            try:
                async with self._session() as client:
                    served = True
                    backoff.succeeded()
                    if self._lost:
                        log.info("sparkplug: plant broker connection recovered")
                        self._lost = False
                    await in_own_task(self._serve(client), name="sparkplug-session")
            except _HostOffline:
                continue  # a new session at once: NDEATH was sent, births wait for the host
            except (aiomqtt.MqttError, ConnectError, OSError) as exc:
                reraise_lost_cancellation(exc)
                self.counters.connect_failures += 1
                if served:
                    backoff.lost()
                if not self._lost:
                    log.warning("sparkplug: plant broker connection lost: %s", exc)
                    self._lost = True
            self.counters.state = "disconnected"
            await self.clock.sleep_until(self.clock.monotonic() + backoff.next_delay())

    def _tls_context(self) -> ssl.SSLContext:
        tls = self.config.tls
        if tls is None:
            raise ConnectError("an mqtts:// plant broker needs northbound.sparkplug.tls")
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        try:
            context.load_verify_locations(cafile=str(tls.ca_file))
            if tls.cert_file is not None and tls.key_file is not None:
                context.load_cert_chain(str(tls.cert_file), str(tls.key_file))
        except (OSError, ssl.SSLError) as exc:
            raise ConnectError(f"plant broker TLS credentials not usable: {exc}") from exc
        return context

    def _death(self) -> bytes:
        p = Payload()
        p.timestamp = int(self.clock.time() * 1000)
        m = p.metrics.add()
        m.name = "bdSeq"
        m.timestamp = p.timestamp
        m.datatype = DATATYPES["Int64"]
        m.long_value = self._bdseq
        return bytes(p.SerializeToString())

    @contextlib.asynccontextmanager
    async def _session(self) -> AsyncIterator[aiomqtt.Client]:
        c = self.config
        url = urlsplit(c.broker)
        secure = url.scheme == "mqtts"
        assert url.hostname is not None  # validated by the config model
        password = None
        if c.password_file is not None:
            password = read_secret(c.password_file, "northbound.sparkplug.password_file")
        self._next_bdseq()
        client = aiomqtt.Client(
            url.hostname,
            url.port or (8883 if secure else 1883),
            username=c.username,
            password=password,
            identifier=c.client_id or f"{self.group}-{self.node}",
            will=aiomqtt.Will(self.topic("NDEATH"), self._death(), qos=1, retain=False),
            keepalive=c.keepalive_s,
            tls_context=self._tls_context() if secure else None,
            clean_session=True,
            timeout=10.0,
        )
        self.counters.state = "connecting"
        async with client:
            self.counters.connects += 1
            self.counters.state = "connected"
            reraise_lost_cancellation()
            broken = False
            try:
                yield client
            except (aiomqtt.MqttError, OSError):
                broken = True
                raise
            finally:
                async with self._send_lock:
                    self._live = False
                    self._client = None
                if not broken:
                    # An orderly end (shutdown, host offline): the will fires only when the
                    # connection breaks, so the node says it is dead itself.
                    with contextlib.suppress(aiomqtt.MqttError):
                        await client.publish(self.topic("NDEATH"), self._death(), qos=1, timeout=2)

    async def _serve(self, client: aiomqtt.Client) -> None:
        subscriptions = [
            (self.topic("NCMD"), 1),
            (f"{NAMESPACE}/{self.group}/DCMD/{self.node}/+", 1),
        ]
        if self.state_topic is not None:
            subscriptions.append((self.state_topic, 1))
            self._host_online = False  # until a STATE says so in this session
        await client.subscribe(subscriptions)
        async with self._send_lock:
            self._client = client
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._receive(client), name="sparkplug-receive")
                tg.create_task(self._go_live(), name="sparkplug-birth")
        except BaseExceptionGroup as group:
            match, rest = group.split((aiomqtt.MqttError, OSError, _HostOffline))
            if rest is not None or match is None:
                raise
            first: BaseException = match
            while isinstance(first, BaseExceptionGroup):
                first = first.exceptions[0]
            raise first from group

    async def _go_live(self) -> None:
        """Births once the primary host is online, then the held values as historical."""
        while not self._host_online:
            self._host_event.clear()
            await self._host_event.wait()
        async with self._send_lock:
            await self._births()
            await self._flush_hold()
            self._live = True
        self.counters.state = "online"
        self.feed.wake()

    # ------------------------------------------------------------------ births

    def _birth_metric(self, payload: Any, i: int, now_ms: int) -> None:
        tag = self.twin.tags[i]
        m = payload.metrics.add()
        m.name = self.names.metric[i] if self.names.device_of[i] >= 0 else tag.name
        m.alias = i + 1
        m.datatype = self._datatype[i]
        ts = float(self.twin.source_ts[i])
        m.timestamp = int(ts * 1000) if ts > 0 else now_ms
        q = int(self.twin.quality[i])
        v = float(self.twin.values[i])
        if q >= Quality.BAD or (self._kind[i] != _K_STRING and not math.isfinite(v)):
            m.is_null = True
        else:
            _set_value(m, self._kind[i], v, self.twin.text(i))
        props = m.properties
        if tag.unit:
            _property(props, "engUnit", "String", tag.unit)
        if tag.limits is not None:
            _property(props, "engLow", "Double", tag.limits.min)
            _property(props, "engHigh", "Double", tag.limits.max)
        if tag.deadband:
            _property(props, "deadband", "Double", tag.deadband)
        _property(props, "readOnly", "Boolean", i not in self.writable)
        _property(props, "Quality", "Int32", quality_code(q))
        if tag.description:
            _property(props, "Documentation", "String", tag.description)
        self._sent_quality[i] = q

    def _guard_values(self) -> dict[str, Any]:
        stats = self.guard_stats() if self.guard_stats is not None else None
        if stats is None:
            return {}
        return {suffix: stats.get(key) for suffix, (key, _) in GUARD_METRICS.items()}

    def _guard_metric(self, payload: Any, s: int, k: int, value: Any, now_ms: int) -> Any:
        _, (_, kind) = list(GUARD_METRICS.items())[k]
        m = payload.metrics.add()
        m.alias = self._guard_alias0 + s * len(GUARD_METRICS) + k
        m.timestamp = now_ms
        if value is None:
            m.is_null = True
        elif kind == "bool":
            m.boolean_value = bool(value)
        elif kind == "int":
            m.long_value = int(value) & _MASK64
        else:
            m.double_value = float(value)
        return m

    async def _births(self) -> None:
        """NBIRTH (seq 0, bdSeq, node metrics) and a DBIRTH per device. Under the send lock."""
        client = self._client
        if client is None:
            raise aiomqtt.MqttError("not connected")
        now_ms = int(self.clock.time() * 1000)
        self._seq = 0
        nb = Payload()
        nb.timestamp = now_ms
        nb.seq = self._next_seq()
        m = nb.metrics.add()
        m.name = "bdSeq"
        m.timestamp = now_ms
        m.datatype = DATATYPES["Int64"]
        m.long_value = self._bdseq
        m = nb.metrics.add()
        m.name = REBIRTH
        m.alias = self._alias_rebirth
        m.timestamp = now_ms
        m.datatype = DATATYPES["Boolean"]
        m.boolean_value = False
        m = nb.metrics.add()
        m.name = LAST_COMMAND
        m.alias = self._alias_last_command
        m.timestamp = now_ms
        m.datatype = DATATYPES["String"]
        m.string_value = self._last_command
        self._last_command_sent = self._last_command
        device_of = self.names.device_of
        for i in np.flatnonzero(device_of < 0).tolist():
            self._birth_metric(nb, i, now_ms)
        await client.publish(self.topic("NBIRTH"), nb.SerializeToString(), qos=0)
        guard = self._guard_values()
        self._guard_sent = dict(guard)
        order = np.argsort(device_of, kind="stable")
        starts = np.searchsorted(device_of[order], np.arange(len(self.names.devices) + 1))
        stations = set(self.names.stations)
        for d, device in enumerate(self.names.devices):
            db = Payload()
            db.timestamp = now_ms
            db.seq = self._next_seq()
            for i in order[starts[d] : starts[d + 1]].tolist():
                self._birth_metric(db, i, now_ms)
            if device in stations:
                s = self.names.stations.index(device)
                for k, (suffix, (_, kind)) in enumerate(GUARD_METRICS.items()):
                    gm = self._guard_metric(db, s, k, guard.get(suffix), now_ms)
                    gm.name = suffix
                    gm.datatype = DATATYPES[
                        {"bool": "Boolean", "int": "Int64", "float": "Double"}[kind]
                    ]
            await client.publish(self.topic("DBIRTH", device), db.SerializeToString(), qos=0)
        self.counters.births += 1

    # ------------------------------------------------------------------ data

    def _snapshot(self, idx: npt.NDArray[np.int32]) -> _Held:
        ts = self.twin.source_ts[idx]
        ts_ms = np.where(ts > 0, ts * 1000.0, self.clock.time() * 1000.0).astype(np.int64)
        text = {}
        for i in idx.tolist():
            if self._kind[i] == _K_STRING:
                s = self.twin.text(i)
                if s is not None:
                    text[i] = s
        return _Held(idx, self.twin.values[idx].copy(), self.twin.quality[idx].copy(), ts_ms, text)

    def _data_payload(self, snap: _Held, sel: npt.NDArray[np.intp], historical: bool) -> Any:
        p = Payload()
        p.timestamp = int(self.clock.time() * 1000)
        metrics = p.metrics
        kinds = self._kind
        sent_q = self._sent_quality
        text = snap.text
        for i, v, q, t in zip(
            snap.idx[sel].tolist(),
            snap.values[sel].tolist(),
            snap.quality[sel].tolist(),
            snap.ts_ms[sel].tolist(),
            strict=True,
        ):
            m = metrics.add()
            m.alias = i + 1
            m.timestamp = t
            if historical:
                m.is_historical = True
            kind = kinds[i]
            if q >= 16 or (kind != _K_STRING and math.isnan(v)):
                m.is_null = True
            else:
                _set_value(m, kind, v, text.get(i))
            if q != sent_q[i]:
                _property(m.properties, "Quality", "Int32", quality_code(q))
                sent_q[i] = q
        return p

    async def _publish_snapshot(self, snap: _Held, *, historical: bool) -> None:
        """NDATA/DDATA for one snapshot (grouped by device). Under the send lock."""
        client = self._client
        if client is None:
            raise aiomqtt.MqttError("not connected")
        dev = self.names.device_of[snap.idx]
        order = np.argsort(dev, kind="stable")
        sorted_dev = dev[order]
        bounds = np.flatnonzero(np.diff(sorted_dev)) + 1
        for sel in np.split(order, bounds):
            if sel.shape[0] == 0:
                continue
            d = int(dev[sel[0]])
            payload = self._data_payload(snap, sel, historical)
            if d < 0:
                self._add_node_extras(payload)
            payload.seq = self._next_seq()
            data = payload.SerializeToString()
            topic = self.topic("NDATA") if d < 0 else self.topic("DDATA", self.names.devices[d])
            await client.publish(topic, data, qos=0)
            self.counters.data_messages += 1
            self.counters.data_metrics += len(sel)
            self.counters.data_bytes += len(data)
            if historical:
                self.counters.historical_sent += len(sel)

    def _add_node_extras(self, payload: Any) -> None:
        if self._last_command != self._last_command_sent:
            m = payload.metrics.add()
            m.alias = self._alias_last_command
            m.timestamp = payload.timestamp
            m.string_value = self._last_command
            self._last_command_sent = self._last_command

    async def _publish_extras(self) -> None:
        """The node's and the guard's own metrics when they changed. Under the send lock."""
        client = self._client
        if client is None:
            raise aiomqtt.MqttError("not connected")
        now_ms = int(self.clock.time() * 1000)
        if self._last_command != self._last_command_sent:
            p = Payload()
            p.timestamp = now_ms
            self._add_node_extras(p)
            p.seq = self._next_seq()
            await client.publish(self.topic("NDATA"), p.SerializeToString(), qos=0)
        guard = self._guard_values()
        changed = [k for k, v in guard.items() if self._guard_sent.get(k) != v]
        if not changed:
            return
        self._guard_sent = dict(guard)
        keys = list(GUARD_METRICS)
        for s, station in enumerate(self.names.stations):
            p = Payload()
            p.timestamp = now_ms
            for suffix in changed:
                self._guard_metric(p, s, keys.index(suffix), guard[suffix], now_ms)
            p.seq = self._next_seq()
            await client.publish(self.topic("DDATA", station), p.SerializeToString(), qos=0)

    def _hold_append(self, snap: _Held) -> None:
        limit = self.config.hold_max_values
        n = int(snap.idx.shape[0])
        if n == 0:
            return
        self._hold.append(snap)
        self._held += n
        self.counters.held_values += n
        while self._held > limit and self._hold:
            old = self._hold.popleft()
            self._held -= int(old.idx.shape[0])
            self.counters.held_dropped += int(old.idx.shape[0])

    async def _flush_hold(self) -> None:
        while self._hold:
            snap = self._hold[0]
            await self._publish_snapshot(snap, historical=True)
            self._hold.popleft()
            self._held -= int(snap.idx.shape[0])

    async def _pump(self) -> None:
        """Take the twin's changes every ``publish_interval_ms``: publish when live, else hold."""
        interval = self.config.publish_interval_ms / 1000.0
        next_at = self.clock.monotonic()
        while True:
            await self.feed.wait()
            now = self.clock.monotonic()
            if now < next_at:
                await self.clock.sleep_until(next_at)
            next_at = max(now, next_at) + interval
            idx = self.feed.take()
            snap = self._snapshot(idx) if idx.shape[0] else None
            async with self._send_lock:
                if not self._live:
                    if snap is not None:
                        self._hold_append(snap)
                    continue
                try:
                    if snap is not None:
                        await self._publish_snapshot(snap, historical=False)
                    await self._publish_extras()
                except aiomqtt.MqttError:
                    # The session is failing; its receive task reconnects. Keep the values.
                    if snap is not None:
                        self._hold_append(snap)

    # ------------------------------------------------------------------ receiving

    async def _receive(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            topic = message.topic.value
            payload = message.payload
            data = bytes(payload) if isinstance(payload, bytes | bytearray) else b""
            if topic == self.state_topic:
                self._on_state(data)
                continue
            parts = topic.split("/")
            if len(parts) >= 4 and parts[2] == "NCMD":
                await self._on_ncmd(data)
            elif len(parts) == 5 and parts[2] == "DCMD":
                self._on_dcmd(parts[4], data)

    def _on_state(self, data: bytes) -> None:
        try:
            doc = json.loads(data)
            online = doc["online"]
            ts = int(doc["timestamp"])
            if not isinstance(online, bool):
                raise TypeError("online is not a boolean")
        except (ValueError, KeyError, TypeError) as exc:
            self.counters.state_ignored += 1
            log.warning("sparkplug: ignored a malformed STATE message: %s", exc)
            return
        if ts < self._host_ts:
            self.counters.state_ignored += 1  # older than what we know: a stale retained one
            return
        self._host_ts = ts
        was = self._host_online
        self._host_online = online
        self._host_event.set()
        if was and not online:
            self.counters.host_offline += 1
            log.warning("sparkplug: primary host %s went offline", self.config.primary_host_id)
            if self._live:
                raise _HostOffline()

    async def _on_ncmd(self, data: bytes) -> None:
        try:
            payload = Payload.FromString(data)
        except Exception as exc:  # protobuf's DecodeError; its class is an implementation detail
            self._command_outcome(f"NCMD refused: payload does not decode ({exc})", "malformed")
            return
        for m in payload.metrics:
            if (m.name == REBIRTH or m.alias == self._alias_rebirth) and m.boolean_value:
                self.counters.rebirths += 1
                async with self._send_lock:
                    if self._live:
                        await self._births()
            else:
                name = m.name or f"alias {m.alias}"
                self._command_outcome(f"NCMD {name} refused: unknown node command", "unknown")

    def _command_outcome(self, text: str, counter: str) -> None:
        self.counters.commands[counter] += 1
        self._last_command = text
        if counter not in ("accepted", "applied"):
            log.info("sparkplug: %s", text)
        self.feed.wake()

    def _resolve(self, device: str, m: Any) -> int:
        if m.alias:
            i = int(m.alias) - 1
            if not 0 <= i < len(self.twin) or self.names.devices[self.names.device_of[i]] != device:
                raise CommandRefused(f"unknown metric alias {m.alias} on device {device}")
            return i
        if not m.name:
            raise CommandRefused("a metric without name or alias")
        full = f"{device}.{m.name.replace('/', '.')}"
        i = self._by_name.get(full, -1)
        if i < 0 or self.names.device_of[i] < 0:
            raise CommandRefused(f"unknown metric {m.name!r} on device {device}")
        return i

    def _command_value(self, i: int, m: Any) -> Value:
        which = m.WhichOneof("value")
        if which is None or m.is_null:
            raise CommandRefused("the command carries no value")
        raw = getattr(m, which)
        dtype = self.twin.tags[i].data_type
        if which == "int_value" and dtype in ("int16", "int32"):
            return _signed(int(raw), 32)
        if which == "long_value" and dtype == "int64":
            return _signed(int(raw), 64)
        if which in ("int_value", "long_value"):
            # The host's datatype says whether the 32/64 bits are signed.
            signed = {DATATYPES["Int8"], DATATYPES["Int16"], DATATYPES["Int32"], DATATYPES["Int64"]}
            if m.datatype in signed:
                return _signed(int(raw), 32 if which == "int_value" else 64)
            return int(raw)
        value: Value = raw
        return value

    def _on_dcmd(self, device: str, data: bytes) -> None:
        try:
            payload = Payload.FromString(data)
        except Exception as exc:  # protobuf's DecodeError
            self._command_outcome(
                f"DCMD to {device} refused: payload does not decode ({exc})", "malformed"
            )
            return
        if device not in self.names.devices:
            self._command_outcome(f"DCMD refused: unknown device {device!r}", "unknown")
            return
        for m in payload.metrics:
            try:
                i = self._resolve(device, m)
                name = self.twin.tags[i].name
                if i not in self.writable:
                    raise CommandRefused(f"{name} is read-only from the plant")
                value = self._command_value(i, m)
            except CommandRefused as exc:
                kind = "read_only" if "read-only" in exc.reason else "unknown"
                if "no value" in exc.reason:
                    kind = "malformed"
                self._command_outcome(f"DCMD refused: {exc.reason}", kind)
                continue
            change = self.twin.set_desired(name, value, source="sparkplug")
            if change.done:
                self._command_outcome(
                    f"DCMD {name} = {value!r} v{change.version} {change.outcome()}", change.status
                )
                continue
            self._command_outcome(f"DCMD {name} = {value!r} v{change.version} pending", "accepted")
            self._watch(change)

    def _watch(self, change: DesiredChange) -> None:
        # Bounded: a flood of commands must not become a flood of tasks; the twin records the
        # outcome of every change regardless (events, `edgeos twin get`).
        if self._outcomes_running >= 64 or self._tg is None:
            self.counters.commands["outcome_untracked"] += 1
            return
        self._outcomes_running += 1
        self._tg.create_task(self._await_outcome(change), name=f"sparkplug-dcmd:{change.name}")

    async def _await_outcome(self, change: DesiredChange) -> None:
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.config.command_timeout_s):
                    await change.wait()
            self._command_outcome(
                f"DCMD {change.name} = {change.value!r} v{change.version} {change.outcome()}",
                change.status,
            )
        finally:
            self._outcomes_running -= 1

    def stats(self) -> dict[str, Any]:
        doc = self.counters.as_dict()
        doc["bdseq"] = self._bdseq
        doc["live"] = self._live
        doc["host_online"] = self._host_online
        doc["held_now"] = self._held
        return doc
