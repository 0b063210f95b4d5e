"""The OPC UA driver: batched polled reads, batched subscriptions, typed writes (asyncua).

Shape of one connection::

    OpcUaDriver
    ├── session 0 … n-1      one asyncua Client each (socket, secure channel, session)
    │   └── subscriptions    ≤ max_subscriptions per session, ≤ max_items_per_subscription each
    └── poll plan            per scan group: Read requests of ≤ max_items_per_read node ids

asyncua's high-level ``Subscription`` hands every monitored item to the application in its
own task; at 10,000+ notifications per second that costs more than the decoding itself. The
driver therefore registers its own publish callback on the session and turns each
DataChangeNotification into ONE columnar :class:`~edgeos.driver.ReadResult`.

Reconnects belong to the supervisor: asyncua's auto-reconnect stays off. When asyncua's
watchdog (or a failed request, or a subscription status change) reports the session dead, the
driver sets :attr:`OpcUaDriver.connection_lost`, calls :attr:`OpcUaDriver.on_connection_lost`,
and raises the stored :class:`~edgeos.errors.TransportError` from the next read or write. The
supervisor then calls :meth:`~OpcUaDriver.close` and :meth:`~OpcUaDriver.connect`, which
builds fresh sessions and re-creates every subscription.

Planning lives in :mod:`drivers.opcua.plan`, credentials in :mod:`drivers.opcua.security`,
value conversion in :mod:`drivers.opcua.codec`.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
from asyncua import ua
from asyncua.client.client import Client
from asyncua.crypto import security_policies
from asyncua.ua.attribute_ids import AttributeIds

from edgeos.driver import (
    DriverContext,
    DriverStats,
    LossSignal,
    Quality,
    ReadResult,
    SubscriptionSink,
    TagBinding,
    Value,
    check_write,
)
from edgeos.errors import (
    ConnectError,
    DeviceException,
    EdgeosError,
    ProtocolError,
    TransportError,
    WriteRefused,
)
from edgeos.histogram import Histogram

from .address import OpcUaAddress
from .codec import concat, decode_datavalues, to_variant
from .errors import Phase, describe_status, quality_of, status_name, translate_errors
from .options import OpcUaOptions, check_endpoint
from .plan import DEFAULT_SAMPLING_INTERVAL_MS, ConnectionPlan, ReadChunk
from .security import Credentials, check_pinned, load_credentials, with_user

__all__ = ["OpcUaDriver", "OpcUaStats"]

_log = logging.getLogger(__name__)

#: A polite CloseSession must not hold up a reconnect when the peer is gone.
_CLOSE_BUDGET_S = 2.0
_SEVERITY_BAD = 0x80000000


@dataclass(slots=True)
class OpcUaStats(DriverStats):
    """Driver counters plus the subscription side."""

    #: Data change notifications received (one per monitored item sample).
    notifications: int = 0
    #: Publish responses carrying data (keep-alives excluded).
    publishes: int = 0
    #: Live subscriptions and monitored items (set again at every connect).
    subscriptions: int = 0
    monitored_items: int = 0
    #: Monitored items the server refused at creation (per status name in ``errors``).
    monitored_items_failed: int = 0
    #: Times the driver saw the session die (watchdog, failed request, status change).
    connection_lost: int = 0

    def as_dict(self) -> dict[str, Any]:
        out = DriverStats.as_dict(self)
        out.update(
            notifications=self.notifications,
            publishes=self.publishes,
            subscriptions=self.subscriptions,
            monitored_items=self.monitored_items,
            monitored_items_failed=self.monitored_items_failed,
            connection_lost=self.connection_lost,
        )
        return out


@dataclass(slots=True)
class _Session:
    client: Client
    index: int
    tasks: list[asyncio.Task[Any]] = field(default_factory=list)


class OpcUaDriver:
    """An OPC UA client for one server endpoint (``opc.tcp://host:port/path``).

    Construction never touches the network. The context's ``scan_periods_ms`` (scan group →
    period) gives subscribed tags without ``sampling_interval_ms`` their group's period;
    without it they sample at :data:`DEFAULT_SAMPLING_INTERVAL_MS`.
    """

    title: ClassVar[str] = "OPC UA"
    options_model: ClassVar[type[OpcUaOptions]] = OpcUaOptions
    address_key: ClassVar[str] = "opcua"
    address_model: ClassVar[type[OpcUaAddress]] = OpcUaAddress
    #: Sampling interval of a subscribed tag when neither the tag nor its group gives one.
    DEFAULT_SAMPLING_INTERVAL_MS: ClassVar[float] = DEFAULT_SAMPLING_INTERVAL_MS

    stats: OpcUaStats
    #: Round-trip time of every request (reads, writes, subscription set-up), in seconds.
    latency: Histogram
    #: Set when the session is found dead; cleared by :meth:`connect`.
    connection_lost: LossSignal
    #: Called once per loss with the error the next read/write will raise.
    on_connection_lost: Callable[[TransportError], None] | None

    def __init__(self, context: DriverContext) -> None:
        problem = check_endpoint(context.endpoint)
        if problem is not None:
            raise ValueError(problem)
        self.name = context.connection
        self.options = context.options_as(OpcUaOptions)
        self.endpoint = context.endpoint
        self._clock = context.clock
        self.stats = OpcUaStats()
        self.latency = Histogram()
        self.connection_lost = LossSignal()
        self.on_connection_lost = None
        self._sink: SubscriptionSink | None = None
        self._sessions: list[_Session] = []
        self._connected = False
        self._lost: TransportError | None = None
        self._next_session = 0
        self._last_write: dict[int, tuple[float, float]] = {}
        #: Blocks reporting monitored items the server refused, waiting for a sink.
        self._undelivered: list[ReadResult] = []
        plan = ConnectionPlan.build(
            self.name, self.options, context.bindings, context.scan_periods_ms
        )
        self._plan = plan
        self._bindings = plan.bindings
        self._node_ids = plan.node_ids
        self._invalid = plan.invalid
        self._string_handles = plan.string_handles
        self._read_plans = plan.read_plans
        self._invalid_by_group = plan.invalid_by_group
        self._subscriptions = plan.subscriptions
        self._subscribed_handles = plan.subscribed_handles
        self._invalid_subscribed = plan.invalid_subscribed

    @staticmethod
    def check_endpoint(endpoint: str) -> str | None:
        """Error text when ``endpoint`` is not ``opc.tcp://host[:port][/path]``, else None."""
        return check_endpoint(endpoint)

    # --- Driver protocol --------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        """True between a successful :meth:`connect` and :meth:`close` or a detected loss."""
        return self._connected and self._lost is None

    def set_subscription_sink(self, sink: SubscriptionSink | None) -> None:
        """Where subscription blocks go; blocks about refused items wait for a sink."""
        self._sink = sink
        if sink is not None and self._undelivered:
            pending, self._undelivered = self._undelivered, []
            for block in pending:
                self._deliver(block)

    async def connect(self) -> None:
        """Open every session (security, login), then create all subscriptions.

        Raises :class:`~edgeos.errors.ConnectError` (refused, handshake, login) or
        :class:`~edgeos.errors.ProvisioningError` (credential files missing or too open).
        """
        await self.close()
        self.connection_lost.clear()
        self._lost = None
        credentials = load_credentials(self.options)
        try:
            for index in range(self.options.sessions):
                self._sessions.append(await self._open_session(index, credentials))
            await self._create_subscriptions()
            if self._lost is not None:
                raise self._lost
        except BaseException:
            await self.close()
            raise
        self._connected = True
        if self._invalid_subscribed:
            self._deliver(self._bad_block(self._invalid_subscribed, "BadNodeIdInvalid"))

    async def close(self) -> None:
        """Close every session; never raises (cancellation still propagates)."""
        self._connected = False
        sessions, self._sessions = self._sessions, []
        for plan in self._subscriptions:
            plan.subscription_id = None
        for session in sessions:
            await self._close_session(session)

    async def read(self, scan_group: str) -> ReadResult:
        """Read the polled tags of ``scan_group``: one Read call per ``max_items_per_read``."""
        chunks = self._read_plans.get(scan_group)
        invalid = self._invalid_by_group.get(scan_group, [])
        if chunks is None:
            return ReadResult.empty()
        self._ensure_usable()
        parts: list[ReadResult] = []
        if len(chunks) == 1 or self.options.max_parallel_reads == 1:
            for chunk in chunks:
                parts.append(await self._read_chunk(chunk))
        else:
            parts = await self._read_parallel(chunks)
        if invalid:
            parts.append(self._bad_block(invalid, "BadNodeIdInvalid"))
        return concat(parts)

    async def write(self, binding: TagBinding, value: Value) -> None:
        """Write one value with the tag's variant type.

        Limits, rate and type are checked again here (:func:`~edgeos.driver.check_write`) so
        nothing out of bounds reaches the wire; refusals raise :class:`WriteRefused`. A server
        that rejects the write raises :class:`~edgeos.errors.DeviceException` with its status.
        """
        handle = binding.index
        own = self._bindings.get(handle)
        try:
            if own is None or own.tag.name != binding.tag.name:
                raise WriteRefused(binding.tag.name, "tag is not served by this connection")
            tag = own.tag
            last = self._last_write.get(handle)
            now = self._clock.monotonic()
            checked = check_write(
                tag,
                value,
                last_value=last[0] if last else None,
                last_time=last[1] if last else None,
                now=now,
            )
            if handle in self._invalid:
                raise WriteRefused(tag.name, self._invalid[handle])
            variant = to_variant(tag.name, tag.data_type, checked)
        except WriteRefused:
            self.stats.writes_refused += 1
            raise
        self._ensure_usable()
        params = ua.WriteParameters(
            NodesToWrite=[
                ua.WriteValue(
                    NodeId=self._node_ids[handle],
                    AttributeId=AttributeIds.Value,
                    # No timestamps: many PLC servers refuse writes that carry them.
                    Value=ua.DataValue(variant, StatusCode=None),
                )
            ]
        )
        session = self._pick_session()
        async with self._request("write"):
            results = await session.client.uaclient.session.write(params)
        code = results[0].value if results else 0
        if code & _SEVERITY_BAD:
            self.stats.errors[status_name(code)] += 1
            raise DeviceException(
                code, f"write to {tag.name!r} refused by the server: {describe_status(code)}"
            )
        self.stats.writes += 1
        if not isinstance(checked, str | bool):
            self._last_write[handle] = (float(checked), now)

    # --- sessions -----------------------------------------------------------------------------

    async def _open_session(self, index: int, creds: Credentials) -> _Session:
        opts = self.options
        client = Client(
            self.endpoint,
            timeout=opts.request_timeout_s,
            watchdog_intervall=opts.watchdog_interval_s,
            auto_reconnect=False,
        )
        client.application_uri = creds.application_uri
        client.name = opts.application_name
        client.description = f"{opts.application_name} ({self.name}#{index})"
        client.session_timeout = int(opts.session_timeout_s * 1000)
        if opts.username is not None:
            client.set_user(opts.username)
            client.set_password(creds.password or "")
        session = _Session(client, index)
        self.stats.requests += 1
        started = self._clock.monotonic()
        try:
            with translate_errors("connect", self.endpoint):
                if opts.security_policy == "Basic256Sha256":
                    assert creds.certificate_der is not None
                    assert creds.private_key_der is not None
                    if creds.server_certificate_der is not None and index == 0:
                        # A server holding another key cannot decrypt our handshake and
                        # stays silent; compare certificates first to say so plainly.
                        offered = await client.connect_and_get_server_endpoints()
                        check_pinned(
                            self.endpoint, opts.security_mode, offered, creds.server_certificate_der
                        )
                    await client.set_security(
                        security_policies.SecurityPolicyBasic256Sha256,
                        certificate=creds.certificate_der,
                        private_key=creds.private_key_der,
                        server_certificate=creds.server_certificate_der,
                        mode=getattr(ua.MessageSecurityMode, opts.security_mode),
                    )
                await client.connect()
        except EdgeosError as exc:
            self._count_error(exc)
            await self._close_session(session)
            if isinstance(exc, ConnectError) and opts.username is not None:
                raise with_user(exc, opts.username) from exc.__cause__
            raise
        self.stats.responses += 1
        self._record_latency(started)
        client.connection_lost_callback = self._make_loss_callback(index)
        return session

    async def _close_session(self, session: _Session) -> None:
        client = session.client
        # asyncua cancels its publish task without awaiting it; keep the reference so no
        # task of ours outlives close().
        publish_task = client.uaclient.session._publish_task
        try:
            async with asyncio.timeout(_CLOSE_BUDGET_S):
                await client.disconnect()
        except Exception as exc:
            _log.debug("%s: closing session %d: %r", self.endpoint, session.index, exc)
        try:
            client.uaclient.disconnect_socket()
        except Exception as exc:
            _log.debug("%s: dropping socket %d: %r", self.endpoint, session.index, exc)
        leftovers = [
            task
            for task in (
                publish_task,
                client._renew_channel_task,
                client._supervisor_task,
                client._stale_watchdog_task,
            )
            if task is not None and not task.done()
        ]
        for task in leftovers:
            task.cancel()
        if leftovers:
            await asyncio.wait(leftovers)

    def _make_loss_callback(self, index: int) -> Callable[[Exception], Any]:
        async def lost(exc: Exception) -> None:
            detail = str(exc) or type(exc).__name__
            self._mark_lost(ConnectError(f"{self.endpoint}: session {index} lost ({detail})"))

        return lost

    def _mark_lost(self, error: TransportError) -> None:
        if self._lost is not None or not self._sessions:
            return
        self._lost = error
        if not self._connected:
            # Still inside connect(): it raises this error itself; nothing to announce.
            return
        self.stats.connection_lost += 1
        for session in self._sessions:
            # asyncua's publish loop would retry (and log a traceback) every second until
            # close(); the session is dead, so stop it now.
            task = session.client.uaclient.session._publish_task
            if task is not None and not task.done():
                task.cancel()
        # Logged on the state change only: a dead link must not log once per poll.
        _log.warning("%s", error)
        self.connection_lost.set(str(error))
        callback = self.on_connection_lost
        if callback is not None:
            try:
                callback(error)
            except Exception:
                _log.exception("%s: on_connection_lost callback failed", self.endpoint)

    def _ensure_usable(self) -> None:
        if self._lost is not None:
            # A fresh instance each time: re-raising one object would chain its tracebacks.
            raise type(self._lost)(str(self._lost))
        if not self._connected or not self._sessions:
            raise ConnectError(f"{self.endpoint}: not connected")

    def _pick_session(self) -> _Session:
        session = self._sessions[self._next_session % len(self._sessions)]
        self._next_session += 1
        return session

    @asynccontextmanager
    async def _request(self, phase: Phase) -> AsyncIterator[None]:
        """Count, time and translate one service call; a transport failure marks the loss."""
        self.stats.requests += 1
        started = self._clock.monotonic()
        try:
            with translate_errors(phase, self.endpoint):
                yield
        except TransportError as exc:
            self._count_error(exc)
            self._mark_lost(exc)
            raise
        self.stats.responses += 1
        self._record_latency(started)

    def _record_latency(self, started: float) -> None:
        self.latency.record(self._clock.monotonic() - started)

    def _count_error(self, exc: EdgeosError) -> None:
        kind = getattr(exc, "kind", type(exc).__name__)
        self.stats.errors[str(kind)] += 1

    # --- reads ----------------------------------------------------------------------------

    async def _read_chunk(self, chunk: ReadChunk) -> ReadResult:
        session = self._pick_session()
        async with self._request("read"):
            values = await session.client.uaclient.session.read(chunk.params)
        if len(values) != len(chunk.handles):
            error = ProtocolError(
                f"{self.endpoint}: read: asked for {len(chunk.handles)} values, got {len(values)}"
            )
            self._count_error(error)
            self._mark_lost(error)
            raise error
        return decode_datavalues(chunk.handles, values, self._string_handles, self._clock.time())

    async def _read_parallel(self, chunks: list[ReadChunk]) -> list[ReadResult]:
        limit = asyncio.Semaphore(self.options.max_parallel_reads)

        async def one(chunk: ReadChunk) -> ReadResult:
            async with limit:
                return await self._read_chunk(chunk)

        try:
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(one(chunk)) for chunk in chunks]
        except BaseExceptionGroup as eg:
            # Surface one edgeos error (they all describe the same broken connection).
            for exc in _leaves(eg):
                if isinstance(exc, EdgeosError):
                    raise exc from None
            raise
        return [task.result() for task in tasks]

    def _bad_block(self, handles: list[int], reason: str) -> ReadResult:
        n = len(handles)
        return ReadResult(
            np.asarray(handles, dtype=np.int32),
            np.full(n, math.nan),
            np.full(n, int(Quality.BAD_CONFIG), dtype=np.uint8),
            np.full(n, self._clock.time()),
            bad_reasons=Counter({reason: n}),
        )

    # --- subscriptions ----------------------------------------------------------------------

    async def _create_subscriptions(self) -> None:
        opts = self.options
        self.stats.subscriptions = 0
        self.stats.monitored_items = 0
        refused_handles: list[int] = []
        refused_codes: list[int] = []
        for plan in self._subscriptions:
            session = self._sessions[plan.session % len(self._sessions)]
            uasession = session.client.uaclient.session
            params = ua.CreateSubscriptionParameters(
                RequestedPublishingInterval=plan.publishing_interval_ms,
                RequestedLifetimeCount=opts.lifetime_count,
                RequestedMaxKeepAliveCount=opts.keepalive_count,
                MaxNotificationsPerPublish=opts.max_notifications_per_publish,
                PublishingEnabled=True,
                Priority=0,
            )
            async with self._request("subscribe"):
                created = await uasession.create_subscription(params, self._on_publish)
            plan.subscription_id = created.SubscriptionId
            self.stats.subscriptions += 1
            step = opts.max_items_per_call
            for start in range(0, len(plan.items), step):
                batch = plan.items[start : start + step]
                request = ua.CreateMonitoredItemsParameters(
                    SubscriptionId=created.SubscriptionId,
                    TimestampsToReturn=ua.TimestampsToReturn.Both,
                    ItemsToCreate=batch,
                )
                async with self._request("subscribe"):
                    results = await uasession.create_monitored_items(request)
                for item, result in zip(batch, results, strict=False):
                    code = result.StatusCode.value
                    if code & _SEVERITY_BAD:
                        refused_handles.append(item.RequestedParameters.ClientHandle)
                        refused_codes.append(code)
                        self.stats.errors[status_name(code)] += 1
                    else:
                        self.stats.monitored_items += 1
        if refused_handles:
            self.stats.monitored_items_failed += len(refused_handles)
            _log.warning(
                "%s: server refused %d monitored item(s), e.g. %s: %s",
                self.endpoint,
                len(refused_handles),
                self._bindings[refused_handles[0]].tag.name,
                describe_status(refused_codes[0]),
            )
            n = len(refused_handles)
            block = ReadResult(
                np.asarray(refused_handles, dtype=np.int32),
                np.full(n, math.nan),
                np.asarray([quality_of(c) for c in refused_codes], dtype=np.uint8),
                np.full(n, self._clock.time()),
                bad_reasons=Counter(status_name(c) for c in refused_codes),
            )
            self._deliver(block)

    def _on_publish(self, result: ua.PublishResult) -> None:
        """asyncua's publish loop calls this for every Publish response (keep-alives too)."""
        data = result.NotificationMessage.NotificationData
        if not data:
            return
        received = self._clock.time()
        for notification in data:
            if isinstance(notification, ua.DataChangeNotification):
                items = notification.MonitoredItems
                handles = [item.ClientHandle for item in items]
                values = [item.Value for item in items]
                if not self._subscribed_handles.issuperset(handles):
                    # A handle we never created would index a foreign twin column: drop it.
                    keep = [i for i, h in enumerate(handles) if h in self._subscribed_handles]
                    self.stats.errors["unknown_handle"] += len(handles) - len(keep)
                    handles = [handles[i] for i in keep]
                    values = [values[i] for i in keep]
                self.stats.publishes += 1
                self.stats.notifications += len(handles)
                if handles:
                    self._deliver(
                        decode_datavalues(handles, values, self._string_handles, received)
                    )
            elif isinstance(notification, ua.StatusChangeNotification):
                code = notification.Status.value if notification.Status else 0
                if code & _SEVERITY_BAD:
                    self._mark_lost(
                        ProtocolError(
                            f"{self.endpoint}: subscription {result.SubscriptionId} ended: "
                            f"{describe_status(code)}"
                        )
                    )

    def _deliver(self, block: ReadResult) -> None:
        sink = self._sink
        if sink is None:
            # Only blocks about refused items are kept: they are rare and would be lost.
            if block.bad_reasons:
                self._undelivered.append(block)
            return
        try:
            sink(block)
        except Exception:
            self.stats.errors["sink"] += 1
            if self.stats.errors["sink"] == 1:
                _log.exception("%s: subscription sink failed", self.endpoint)


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            out.extend(_leaves(exc))
        else:
            out.append(exc)
    return out
