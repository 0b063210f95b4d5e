"""An OPC UA server of the twin (asyncua), for SCADA/HMI/MES clients on the plant network.

Address space (namespace ``namespace_uri``, string node ids = the twin's tag names, stable
across restarts)::

    Objects/<device id>/                   folder of the gateway
        nest01/                            one folder per equipment instance
            heater.sp                      BaseAnalogType, Double, EngineeringUnits, EURange
                LastWriteOutcome           (plant-writable tags) "applied", "refused: …"
            gate.verdict                   0 continue, 1 correct, 2 scrap (derived tags)
            guard.learning, guard.slack …  the guard's state (stations only)
        uptime                             tags without an equipment prefix

Values carry the twin's source timestamps; quality maps to status codes (``GOOD`` → Good,
``STALE`` → UncertainLastUsableValue, ``BAD_COMM`` → BadCommunicationError, …).

**Process.** This module runs in the OPC UA server's own process
(:mod:`edgeos.northbound.opcua_child`, started by :class:`edgeos.northbound.opcua.OpcUaService`):
asyncua's per-value work (data-change callbacks, encoding publish responses, secure channels)
never runs in the scan loop's interpreter. Batches of the twin's changes arrive over a pipe; the
ones whose value or status changed are written to the address space, which notifies
subscriptions.

**Writes** to a tag variable never set the variable: they go back over the pipe to the
runtime, which decides them with ``twin.set_desired`` (type,
hard limits, rate limits, the twin's outcome records) and the Write response carries the
outcome: Good (applied, confirmed by a read), GoodCompletesAsynchronously (still pending after
``write_timeout_s``), BadOutOfRange (limits, rate), BadTypeMismatch, BadNotWritable (not enabled
for the plant), BadUserAccessDenied (anonymous or a ``read`` user), BadCommunicationError,
BadTimeout. The reason is logged and shown in the variable's ``LastWriteOutcome``.

**Security**: Basic256Sha256 Sign and SignAndEncrypt with the gateway's certificate; users
with passwords from files (``read`` or ``write`` role); anonymous off unless configured.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hmac
import logging
import math
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import urlsplit

import numpy as np
from asyncua import ua
from asyncua.crypto.permission_rules import User, UserRole
from asyncua.server.address_space import AddressSpace, AttributeService
from asyncua.server.internal_server import InternalServer
from asyncua.server.server import Server
from asyncua.ua.attribute_ids import AttributeIds
from asyncua.ua.object_ids import ObjectIds
from asyncua.ua.status_codes import StatusCodes

from edgeos.driver import Quality
from edgeos.northbound.handoff import Batch
from edgeos.northbound.hub import GUARD_METRICS
from edgeos.northbound.opcua import ChildInit
from edgeos.tags import INTEGER_TYPES, TagSpec

__all__ = ["OpcUaTwinServer", "status_of_quality"]

log = logging.getLogger("edgeos.northbound.opcua")

_SC = StatusCodes


def _status(code: int) -> ua.StatusCode:
    return ua.StatusCode(ua.UInt32(code))


def _std(identifier: int) -> ua.NodeId:
    """A node id of namespace 0 (the standard's types and objects)."""
    return ua.NodeId(ua.Int32(identifier))


def _nid(name: str, ns: int) -> ua.NodeId:
    return ua.NodeId(ua.String(name), ua.Int16(ns))


def _ts(t: dt.datetime) -> ua.DateTime:
    return cast(ua.DateTime, t)  # DateTime is datetime's subclass only for the type checker


_STATUS = {
    Quality.GOOD: _status(_SC.Good),
    Quality.STALE: _status(_SC.UncertainLastUsableValue),
    Quality.UNCERTAIN: _status(_SC.Uncertain),
    Quality.BAD: _status(_SC.Bad),
    Quality.BAD_COMM: _status(_SC.BadCommunicationError),
    Quality.BAD_DEVICE: _status(_SC.BadDeviceFailure),
    Quality.BAD_DECODE: _status(_SC.BadDecodingError),
    Quality.BAD_CONFIG: _status(_SC.BadConfigurationError),
    Quality.BAD_NO_VALUE: _status(_SC.BadWaitingForInitialData),
}
_VARIANT = {
    "int16": ua.VariantType.Int16,
    "uint16": ua.VariantType.UInt16,
    "int32": ua.VariantType.Int32,
    "uint32": ua.VariantType.UInt32,
    "int64": ua.VariantType.Int64,
    "float32": ua.VariantType.Double,
    "float64": ua.VariantType.Double,
    "bool": ua.VariantType.Boolean,
    "string": ua.VariantType.String,
}
#: Common engineering units -> UNECE Rec. 20 common codes (OPC UA Part 8 EUInformation).
_UNECE = {
    "°C": "CEL",
    "degC": "CEL",
    "K": "KEL",
    "bar": "BAR",
    "mbar": "MBR",
    "Pa": "PAL",
    "kPa": "KPA",
    "MPa": "MPA",
    "s": "SEC",
    "ms": "C26",
    "min": "MIN",
    "h": "HUR",
    "%": "P1",
    "mm": "MMT",
    "m": "MTR",
    "kg": "KGM",
    "g": "GRM",
    "N": "NEW",
    "kN": "B47",
    "Nm": "NU",
    "rpm": "RPM",
    "A": "AMP",
    "V": "VLT",
    "W": "WTT",
    "kW": "KWT",
    "Hz": "HTZ",
}
_UNITS_NS = "http://www.opcfoundation.org/UA/units/un/cefact"
#: The push yields to the server's own loop after this many values (about 1 ms of asyncua work
#: with a subscriber), so clients' requests and publishes are served between slices.
_SLICE = 64
#: Extra time the server's process gives the runtime to answer a plant write beyond
#: ``write_timeout_s`` (the runtime's loop is busy with scans; it answers in milliseconds).
_WRITE_MARGIN_S = 5.0


class _SharedDataValue(ua.DataValue):
    """A DataValue that asyncua may keep without copying.

    asyncua deep-copies every written DataValue once per monitored item
    (``MonitoredItemValues.set_current_datavalue``) in case the caller mutates it later: 30 to
    90 µs of a ~50 µs/value push path (measured; see docs/northbound.md). The push builds a new
    DataValue per write and never mutates one, so a copy is the same object.
    """

    __slots__ = ()

    def __deepcopy__(self, memo: dict[int, Any]) -> _SharedDataValue:
        return self


def status_of_quality(q: int) -> ua.StatusCode:
    """The OPC UA status code of a twin quality."""
    try:
        return _STATUS[Quality(q)]
    except ValueError:
        return _status(_SC.Bad)


def _zero(vt: ua.VariantType) -> ua.Variant:
    """The value a node holds until the first push (which sets value, status and time)."""
    if vt == ua.VariantType.Boolean:
        return ua.Variant(False, vt)
    if vt == ua.VariantType.String:
        return ua.Variant("", vt)
    return ua.Variant(0.0 if vt == ua.VariantType.Double else 0, vt)


def _unit_id(unit: str) -> int:
    code = _UNECE.get(unit)
    if code is None:
        return -1
    out = 0
    for ch in code:
        out = (out << 8) | ord(ch)
    return out


def _variant_type(tag: TagSpec) -> ua.VariantType:
    if tag.data_type in INTEGER_TYPES and tag.scale != 1.0:
        return ua.VariantType.Double
    return _VARIANT[tag.data_type]


@dataclass(slots=True)
class OpcUaCounters:
    pushes: int = 0
    values_pushed: int = 0
    #: Values of a batch whose value and status were what the node already held.
    values_unchanged: int = 0


#: Asks the runtime about a client's write: (tag index, variant type name, the value if it is
#: a plain bool/int/float/str, whether the write carries a value, user) -> (status name, text).
Decide = Callable[[int, str, object, bool, str | None], Awaitable[tuple[str, str]]]


class _Users:
    """asyncua user manager: users with passwords from files; anonymous only when allowed."""

    def __init__(self, passwords: Mapping[str, tuple[str, str]], allow_anonymous: bool) -> None:
        self._passwords = dict(passwords)
        self._anonymous = allow_anonymous
        #: asyncua's User has no role of ours: who may write, by user name.
        self.writers = frozenset(n for n, (_, role) in self._passwords.items() if role == "write")

    def get_user(
        self,
        iserver: InternalServer,
        username: str | None = None,
        password: str | None = None,
        certificate: Any = None,
    ) -> User | None:
        if username is None:
            return User(role=UserRole.User) if self._anonymous else None
        known = self._passwords.get(username)
        if known is None or password is None:
            return None
        if not hmac.compare_digest(known[0].encode(), password.encode()):
            return None
        return User(role=UserRole.User, name=username)


#: asyncua's default caller of a write (its own server-side calls).
_ADMIN = User(role=UserRole.Admin)


class _TwinAttributes(AttributeService):
    """Client writes to tag variables go to the twin's desired-state path, never to the node."""

    def __init__(self, aspace: AddressSpace, owner: OpcUaTwinServer) -> None:
        super().__init__(aspace)
        self._owner = owner

    async def write(self, params: ua.WriteParameters, user: User = _ADMIN) -> list[ua.StatusCode]:
        results: list[ua.StatusCode | None] = []
        others: list[ua.WriteValue] = []
        for wv in params.NodesToWrite:
            i = self._owner.index_of(wv.NodeId)
            if i is not None and wv.AttributeId == AttributeIds.Value:
                results.append(await self._owner.plant_write(i, wv.Value, user))
            else:
                results.append(None)
                others.append(wv)
        done = await super().write(ua.WriteParameters(NodesToWrite=others), user) if others else []
        rest = iter(done)
        return [r if r is not None else next(rest) for r in results]


class OpcUaTwinServer:
    """The twin as an asyncua address space, in the server's process (:mod:`.opcua_child`).

    Values arrive as :class:`~edgeos.northbound.handoff.Batch` es (:meth:`push`); client writes
    of tag values go to ``decide`` (which asks the runtime, :mod:`edgeos.northbound.opcua`) and
    its answer is the Write's status code.
    """

    def __init__(self, init: ChildInit, decide: Decide) -> None:
        self.config = init.config
        self.tags = init.tags
        self.device_id = init.device_id
        self.writable = init.writable
        self._passwords = init.passwords
        self._decide = decide
        self.counters = OpcUaCounters()
        self.endpoint_url = init.config.endpoint
        self.namespace_index = 0
        self._server: Server | None = None
        self._users: _Users | None = None
        self._node_ids: list[ua.NodeId] = []
        self._index: dict[ua.NodeId, int] = {}
        self._outcome_nodes: dict[int, ua.NodeId] = {}
        self._guard_nodes: dict[str, list[ua.NodeId]] = {}
        self._vtype = [_variant_type(t) for t in self.tags]
        self._is_text = np.array([vt == ua.VariantType.String for vt in self._vtype], dtype=bool)
        # What each node holds (quality 255 = nothing written yet).
        self._sent_value = np.full(len(self.tags), np.nan)
        self._sent_quality = np.full(len(self.tags), 255, dtype=np.uint8)

    def index_of(self, node_id: ua.NodeId) -> int | None:
        return self._index.get(node_id)

    # ------------------------------------------------------------------ building

    async def _build(self) -> Server:
        c = self.config
        self._users = _Users(self._passwords, c.allow_anonymous)
        server = Server(user_manager=self._users)  # type: ignore[arg-type]
        await server.init()
        server.iserver.attribute_service = _TwinAttributes(server.iserver.aspace, self)
        server.set_endpoint(c.endpoint)
        server.set_server_name(c.server_name)
        await server.set_application_uri(c.application_uri or f"urn:edgeos:{self.device_id}")
        policies: list[ua.SecurityPolicyType] = []
        if c.cert_file is not None and c.key_file is not None:
            await server.load_certificate(str(c.cert_file))
            await server.load_private_key(str(c.key_file))
        for mode in c.security:
            policies.append(
                {
                    "None": ua.SecurityPolicyType.NoSecurity,
                    "Basic256Sha256_Sign": ua.SecurityPolicyType.Basic256Sha256_Sign,
                    "Basic256Sha256_SignAndEncrypt": (
                        ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt
                    ),
                }[mode]
            )
        server.set_security_policy(policies)
        tokens: list[type] = []
        if c.allow_anonymous:
            tokens.append(ua.AnonymousIdentityToken)
        if c.users:
            tokens.append(ua.UserNameIdentityToken)
        server.set_identity_tokens(tokens)
        ns = await server.register_namespace(c.namespace_uri)
        self.namespace_index = ns
        self._add_address_space(server, ns)
        return server

    def _add_address_space(self, server: Server, ns: int) -> None:
        mgt = server.iserver.node_mgt_service
        root = _nid(self.device_id, ns)
        items = [_folder(root, self.device_id, _std(ObjectIds.ObjectsFolder), ns)]
        folders: dict[str, ua.NodeId] = {}
        props: list[ua.AddNodesItem] = []
        for i, tag in enumerate(self.tags):
            device, dot, rest = tag.name.partition(".")
            if dot:
                parent = folders.get(device)
                if parent is None:
                    parent = folders[device] = _nid(device, ns)
                    items.append(_folder(parent, device, root, ns))
                browse = rest
            else:
                parent, browse = root, tag.name
            nid = _nid(tag.name, ns)
            self._node_ids.append(nid)
            self._index[nid] = i
            writable = i in self.writable
            description = tag.description
            if rest == "gate.verdict":
                description = "gate verdict: 0 continue, 1 correct, 2 scrap"
            vt = self._vtype[i]
            numeric = vt not in (ua.VariantType.Boolean, ua.VariantType.String)
            items.append(
                _variable(
                    nid,
                    browse,
                    parent,
                    ns,
                    _zero(vt),
                    description=description,
                    writable=writable,
                    analog=numeric,
                )
            )
            if numeric:
                props.append(
                    _property(
                        _nid(f"{tag.name}#EngineeringUnits", ns),
                        "EngineeringUnits",
                        nid,
                        ua.Variant(
                            ua.EUInformation(
                                NamespaceUri=_UNITS_NS,
                                UnitId=_unit_id(tag.unit),
                                DisplayName=ua.LocalizedText(tag.unit),
                                Description=ua.LocalizedText(tag.unit),
                            ),
                            ua.VariantType.ExtensionObject,
                        ),
                        _std(ObjectIds.EUInformation),
                        ns=0,
                    )
                )
                if tag.limits is not None:
                    props.append(
                        _property(
                            _nid(f"{tag.name}#EURange", ns),
                            "EURange",
                            nid,
                            ua.Variant(
                                ua.Range(Low=tag.limits.min, High=tag.limits.max),
                                ua.VariantType.ExtensionObject,
                            ),
                            _std(ObjectIds.Range),
                            ns=0,
                        )
                    )
            if writable:
                oid = _nid(f"{tag.name}#LastWriteOutcome", ns)
                self._outcome_nodes[i] = oid
                props.append(
                    _property(
                        oid,
                        "LastWriteOutcome",
                        nid,
                        ua.Variant("", ua.VariantType.String),
                        _std(ObjectIds.String),
                        ns=ns,
                    )
                )
        stations = [t.name.partition(".")[0] for t in self.tags if t.name.endswith(".gate.verdict")]
        for station in stations:
            parent = folders[station]
            nodes = []
            for suffix, (_, kind) in GUARD_METRICS.items():
                name = f"{station}.{suffix.replace('/', '.')}"
                vt = {"bool": ua.VariantType.Boolean, "int": ua.VariantType.Int64}.get(
                    kind, ua.VariantType.Double
                )
                nid = _nid(name, ns)
                nodes.append(nid)
                items.append(
                    _variable(
                        nid,
                        suffix.replace("/", "."),
                        parent,
                        ns,
                        _zero(vt),
                        description="inference guard state (gateway-wide)",
                        writable=False,
                        analog=False,
                    )
                )
            self._guard_nodes[station] = nodes
        for result in mgt.add_nodes(items + props):
            result.StatusCode.check()

    # ------------------------------------------------------------------ run

    async def start(self) -> str:
        """Build and start the server; the endpoint's URL (with the port it bound)."""
        server = await self._build()
        await server.start()
        self._server = server
        if server.bserver is not None:
            url = urlsplit(self.config.endpoint)
            port = int(server.bserver.port)
            self.endpoint_url = f"opc.tcp://{url.hostname}:{port}{url.path}"
        return self.endpoint_url

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            await server.stop()

    async def push(self, batch: Batch) -> None:
        """Write a batch of the twin's changes to the address space (see :meth:`_push`)."""
        if self._server is not None:
            await self._push(self._server.iserver.aspace, batch)

    async def _push(self, aspace: AddressSpace, batch: Batch) -> None:
        """Write the batch's changed values to the address space (which notifies subscribers).

        A slot whose value and status are what the node already holds is skipped (the twin's
        change detection decides what changed; a tag that moved and came back between two takes
        arrives here unchanged). Every ``_SLICE`` values the server's loop gets a turn.
        """
        idx = batch.indices
        vals = batch.values
        quals = batch.quality
        sent_v = self._sent_value[idx]
        sent_q = self._sent_quality[idx]
        same = (quals == sent_q) & ((vals == sent_v) | (np.isnan(vals) & np.isnan(sent_v)))
        same &= ~self._is_text[idx]  # a string's text is not in the value column
        if batch.texts:
            same &= ~np.isin(idx, np.fromiter(batch.texts, np.int32, len(batch.texts)))
        fresh = ~same
        idx, vals, quals, stamps = idx[fresh], vals[fresh], quals[fresh], batch.source_ts[fresh]
        self._sent_value[idx] = vals
        self._sent_quality[idx] = quals
        now = dt.datetime.now(dt.UTC)
        node_ids = self._node_ids
        write = aspace.write_attribute_value
        value_attr = AttributeIds.Value
        n = 0
        for i, v, q, ts in zip(
            idx.tolist(), vals.tolist(), quals.tolist(), stamps.tolist(), strict=True
        ):
            dv = self._data_value(i, v, q, ts, now=now, texts=batch.texts)
            await write(node_ids[i], value_attr, dv)
            n += 1
            if n % _SLICE == 0:
                await asyncio.sleep(0)
        if batch.guard is not None:
            await self._push_guard(aspace, batch.guard, now)
        self.counters.pushes += 1
        self.counters.values_pushed += n
        self.counters.values_unchanged += int(np.count_nonzero(same))

    def _data_value(
        self,
        i: int,
        v: float,
        q: int,
        ts: float,
        *,
        now: dt.datetime,
        texts: Mapping[int, str | None],
    ) -> ua.DataValue:
        vt = self._vtype[i]
        status = status_of_quality(q)
        source = dt.datetime.fromtimestamp(ts, dt.UTC) if ts > 0 else now
        if q >= Quality.BAD:
            variant = ua.Variant(None, ua.VariantType.Null)
        elif vt == ua.VariantType.Double:
            variant = ua.Variant(v, vt)
        elif vt == ua.VariantType.Boolean:
            variant = ua.Variant(v != 0.0, vt)
        elif vt == ua.VariantType.String:
            variant = ua.Variant(texts.get(i) or "", vt)
        elif math.isfinite(v):
            variant = ua.Variant(int(v), vt)
        else:
            variant = ua.Variant(None, ua.VariantType.Null)
            status = _status(_SC.BadDecodingError)
        return _SharedDataValue(
            variant, StatusCode=status, SourceTimestamp=_ts(source), ServerTimestamp=_ts(now)
        )

    async def _push_guard(
        self, aspace: AddressSpace, current: Mapping[str, Any], now: dt.datetime
    ) -> None:
        kinds = [kind for _, kind in GUARD_METRICS.values()]
        for nodes in self._guard_nodes.values():
            for nid, kind, value in zip(nodes, kinds, current.values(), strict=True):
                if value is None:
                    dv = _SharedDataValue(
                        ua.Variant(None, ua.VariantType.Null),
                        StatusCode=_status(_SC.BadWaitingForInitialData),
                        SourceTimestamp=_ts(now),
                        ServerTimestamp=_ts(now),
                    )
                else:
                    vt = {"bool": ua.VariantType.Boolean, "int": ua.VariantType.Int64}.get(
                        kind, ua.VariantType.Double
                    )
                    cast = {"bool": bool, "int": int}.get(kind, float)
                    dv = _SharedDataValue(
                        ua.Variant(cast(value), vt),
                        SourceTimestamp=_ts(now),
                        ServerTimestamp=_ts(now),
                    )
                await aspace.write_attribute_value(nid, AttributeIds.Value, dv)

    # ------------------------------------------------------------------ writes

    async def plant_write(self, i: int, dv: ua.DataValue, user: User) -> ua.StatusCode:
        """A client's write of tag ``i``: decided by the runtime (``twin.set_desired``).

        The outcome comes back as the Write's status code and is shown in the variable's
        ``LastWriteOutcome``.
        """
        variant = dv.Value
        raw = None if variant is None else variant.Value
        vt = "Null" if variant is None else variant.VariantType.name
        plain = raw if isinstance(raw, bool | int | float | str) else None
        try:
            async with asyncio.timeout(self.config.write_timeout_s + _WRITE_MARGIN_S):
                code, text = await self._decide(i, vt, plain, raw is not None, user.name)
        except TimeoutError:
            log.warning("opcua: write of %s: the runtime did not answer", self.tags[i].name)
            return _status(_SC.BadTimeout)
        await self._set_outcome(i, text)
        return _status(getattr(_SC, code))

    async def _set_outcome(self, i: int, text: str) -> None:
        oid = self._outcome_nodes.get(i)
        if oid is None or self._server is None:
            return
        now = dt.datetime.now(dt.UTC)
        await self._server.iserver.aspace.write_attribute_value(
            oid,
            AttributeIds.Value,
            ua.DataValue(ua.Variant(text, ua.VariantType.String), SourceTimestamp=_ts(now)),
        )

    def stats(self) -> dict[str, int]:
        return {
            "pushes": self.counters.pushes,
            "values_pushed": self.counters.values_pushed,
            "values_unchanged": self.counters.values_unchanged,
        }


def _folder(nid: ua.NodeId, name: str, parent: ua.NodeId, ns: int) -> ua.AddNodesItem:
    item = ua.AddNodesItem()
    item.RequestedNewNodeId = nid
    item.BrowseName = ua.QualifiedName(name, ns)
    item.ParentNodeId = parent
    item.ReferenceTypeId = _std(ObjectIds.Organizes)
    item.NodeClass = ua.NodeClass.Object
    item.TypeDefinition = _std(ObjectIds.FolderType)
    attrs = ua.ObjectAttributes()
    attrs.EventNotifier = 0
    attrs.DisplayName = ua.LocalizedText(name)
    attrs.Description = ua.LocalizedText(name)
    attrs.WriteMask = 0
    attrs.UserWriteMask = 0
    item.NodeAttributes = attrs
    return item


def _variable(
    nid: ua.NodeId,
    browse: str,
    parent: ua.NodeId,
    ns: int,
    variant: ua.Variant,
    *,
    description: str,
    writable: bool,
    analog: bool,
) -> ua.AddNodesItem:
    item = ua.AddNodesItem()
    item.RequestedNewNodeId = nid
    item.BrowseName = ua.QualifiedName(browse, ns)
    item.ParentNodeId = parent
    item.ReferenceTypeId = _std(ObjectIds.Organizes)
    item.NodeClass = ua.NodeClass.Variable
    item.TypeDefinition = _std(
        ObjectIds.BaseAnalogType if analog else ObjectIds.BaseDataVariableType
    )
    attrs = ua.VariableAttributes()
    attrs.DisplayName = ua.LocalizedText(browse)
    attrs.Description = ua.LocalizedText(description or browse)
    attrs.DataType = _std(variant.VariantType.value)
    attrs.Value = variant
    attrs.ValueRank = ua.ValueRank.Scalar
    attrs.WriteMask = 0
    attrs.UserWriteMask = 0
    attrs.Historizing = False
    level = ua.AccessLevel.CurrentRead.mask
    if writable:
        level |= ua.AccessLevel.CurrentWrite.mask
    attrs.AccessLevel = level
    attrs.UserAccessLevel = level
    item.NodeAttributes = attrs
    return item


def _property(
    nid: ua.NodeId,
    name: str,
    parent: ua.NodeId,
    variant: ua.Variant,
    datatype: ua.NodeId,
    *,
    ns: int,
) -> ua.AddNodesItem:
    item = ua.AddNodesItem()
    item.RequestedNewNodeId = nid
    item.BrowseName = ua.QualifiedName(name, ns)
    item.ParentNodeId = parent
    item.ReferenceTypeId = _std(ObjectIds.HasProperty)
    item.NodeClass = ua.NodeClass.Variable
    item.TypeDefinition = _std(ObjectIds.PropertyType)
    attrs = ua.VariableAttributes()
    attrs.DisplayName = ua.LocalizedText(name)
    attrs.Description = ua.LocalizedText(name)
    attrs.DataType = datatype
    attrs.Value = variant
    attrs.ValueRank = ua.ValueRank.Scalar
    attrs.AccessLevel = ua.AccessLevel.CurrentRead.mask
    attrs.UserAccessLevel = ua.AccessLevel.CurrentRead.mask
    item.NodeAttributes = attrs
    return item
