"""The simulated line on real protocol servers: pymodbus Modbus TCP and asyncua OPC UA.

::

    async with SimLine(SimOptions(nests=4, tags_per_nest=20)) as line:
        client = AsyncModbusTcpClient("127.0.0.1", port=line.modbus_port)
        ...

The physics ticks at ``tick_hz`` in one task. Values reach the servers lazily: each tick
encodes the whole line into one ``uint16`` vector (numpy, ~0.1 ms for 16,000 tags), and a
Modbus read copies just the requested slice into pymodbus' register block in the device's
``action`` hook, which is also where the served response is recorded as ground truth and where
writes are checked and applied to the physics. OPC UA variables answer reads through a value
callback from the same vector; nodes that have a monitored item get data-change
notifications at ``opcua_publish_hz`` when their value changed. Nothing is copied per tick
that nobody asked for, so an idle 16,000-tag line costs ~2.5 ms of CPU per tick.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self

import numpy as np
import numpy.typing as npt
from asyncua import ua
from asyncua.server.server import Server
from asyncua.ua.attribute_ids import AttributeIds
from asyncua.ua.object_ids import ObjectIds
from asyncua.ua.status_codes import StatusCodes
from asyncua.ua.uaerrors._base import UaStatusCodeError
from pymodbus.constants import ExcCodes
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from edgeos_cloud.fleet.physics.layout import (
    OPCUA_NAMESPACE_URI,
    Layout,
    LayoutMode,
    TagSpec,
    build_layout,
)
from edgeos_cloud.fleet.physics.line import LinePhysics
from edgeos_cloud.fleet.physics.recipe import optimal_setpoints
from edgeos_sim.truth import GroundTruth, TruthLog

__all__ = ["SimLine", "SimOptions"]

_log = logging.getLogger(__name__)

_READ_FCS = frozenset({3, 4})
_VARIANT = {
    "float64": ua.VariantType.Double,
    "int32": ua.VariantType.Int32,
    "bool": ua.VariantType.Boolean,
}
_DATATYPE = {
    "float64": ObjectIds.Double,
    "int32": ObjectIds.Int32,
    "bool": ObjectIds.Boolean,
}


@dataclass(frozen=True, slots=True)
class SimOptions:
    """How to run a simulated line. Ports: 0 picks a free one; ``None`` disables a server."""

    nests: int = 80
    tags_per_nest: int = 200
    layout: LayoutMode = "flat"
    host: str = "127.0.0.1"
    modbus_port: int | None = 0
    opcua_port: int | None = 0
    #: ``key`` exposes only the process tags over OPC UA (faster start for big lines).
    opcua_tags: Literal["all", "key"] = "all"
    #: Data-change notifications per second for subscribed nodes; ``None`` = ``tick_hz``.
    opcua_publish_hz: float | None = None
    seed: int = 0
    #: Physics ticks per second; 0 = no clock, the caller drives :meth:`SimLine.step`.
    tick_hz: float = 10.0
    #: Nominal cycle of a press in (compressed) seconds.
    cycle_s: float = 40.0
    noise: float = 1.0
    #: Recipe at start: the plant's ``default`` or the true ``optimal`` one.
    policy: Literal["default", "optimal"] = "default"
    #: The raw material: a batch's hidden property ``p ~ N(mean, std²)`` (the plant's usual
    #: compound is N(0, 1)); ``mooney_offset`` is added to the served lab Mooney (a compound
    #: whose reading relates differently to how it cures).
    material_mean: float = 0.0
    material_std: float = 1.0
    mooney_offset: float = 0.0
    #: A new rubber mid-run: after this many *simulated* seconds a new batch of
    #: ``N(material_mean_after, material_std_after²)`` starts (each nest takes it at its next
    #: load) and the Mooney offset becomes ``mooney_offset_after``; ``None``: never.
    material_change_after_s: float | None = None
    material_mean_after: float = 0.0
    material_std_after: float = 1.0
    mooney_offset_after: float = 0.0
    #: Record every served value to this file (``.truth``).
    truth_path: Path | None = None
    #: Record every served value in memory (``line.ground_truth()``).
    truth_memory: bool = False
    truth_flush_s: float = 1.0


class SimLine:
    """A running simulated line; an async context manager (see the module docstring)."""

    def __init__(self, options: SimOptions | None = None) -> None:
        self.options = opts = options or SimOptions()
        if opts.tick_hz < 0:
            raise ValueError("tick_hz must be >= 0")
        self.layout: Layout = build_layout(opts.nests, opts.tags_per_nest, opts.layout)
        if opts.material_std < 0 or opts.material_std_after < 0:
            raise ValueError("material std must be >= 0")
        self.physics = LinePhysics(
            self.layout,
            seed=opts.seed,
            cycle_s=opts.cycle_s,
            noise=opts.noise,
            material_mean=opts.material_mean,
            material_std=opts.material_std,
        )
        if opts.policy == "optimal":
            self.physics.set_setpoints(optimal_setpoints(self.physics.line_state()))
        self._mooney_at = np.array(
            [self.layout.index(f"{self.layout.nest_name(n)}.batch.mooney")
             for n in range(1, opts.nests + 1)],
            dtype=np.intp,
        )  # fmt: skip
        #: Added to every served ``batch.mooney`` (see :class:`SimOptions`).
        self.mooney_offset = opts.mooney_offset
        #: Simulated time of the rubber change (``None``: not yet, or none planned).
        self.material_changed_at: float | None = None
        self.truth: TruthLog | None = None
        if opts.truth_path is not None or opts.truth_memory:
            self.truth = TruthLog(self.layout, opts.truth_path)
        #: Raw registers and the engineering values a client decodes from them.
        self.registers: npt.NDArray[np.uint16] = self.layout.encode(self._served())
        self.values: npt.NDArray[np.float64] = self.layout.decode(self.registers)
        self.tick_time = time.time()
        self.ticks = 0
        self.writes = 0
        self._modbus: ModbusTcpServer | None = None
        self._opcua: _OpcUaSide | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._last_flush = time.monotonic()
        self.modbus_port: int | None = None
        self.opcua_url: str | None = None

    # ---------------------------------------------------------------- lifecycle

    async def __aenter__(self) -> Self:
        try:
            await self.start()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def start(self) -> None:
        """Start the servers and the physics clock (``async with`` does this for you)."""
        opts = self.options
        if opts.modbus_port is not None:
            await self._start_modbus(opts.host, opts.modbus_port)
        if opts.opcua_port is not None:
            self._opcua = _OpcUaSide(self)
            self.opcua_url = await self._opcua.start(opts.host, opts.opcua_port)
        if opts.tick_hz > 0:
            self._tasks.append(asyncio.create_task(self._clock(), name="sim-clock"))

    async def close(self) -> None:
        """Stop everything and flush the truth log; idempotent, never raises on cleanup."""
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        failures = []
        for task in tasks:
            try:
                await task
            except asyncio.CancelledError:
                if not task.cancelled():
                    raise
            except Exception as exc:  # the clock died earlier: report it, after cleanup
                failures.append(exc)
        if self._opcua is not None:
            await self._opcua.stop()
            self._opcua = None
        if self._modbus is not None:
            await self._modbus.shutdown()  # type: ignore[no-untyped-call]
            self._modbus = None
        for _, fut in self._waiters:
            fut.cancel()
        self._waiters.clear()
        if self.truth is not None:
            self.truth.close()
        if failures:
            raise failures[0]

    # ---------------------------------------------------------------- physics clock

    async def step(self, n: int = 1) -> None:
        """Advance the physics ``n`` ticks now and publish (any ``tick_hz``)."""
        for _ in range(n):
            await self._tick()

    async def wait_ticks(self, n: int = 1) -> None:
        """Wait until the clock (or :meth:`step`) has advanced ``n`` more ticks."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((self.ticks + n, fut))
        await fut

    def ground_truth(self) -> GroundTruth:
        """Everything served so far; needs ``truth_memory`` or ``truth_path``."""
        if self.truth is None:
            raise RuntimeError("start the line with truth_memory=True or a truth_path")
        return self.truth.ground_truth()

    @property
    def tick_s(self) -> float:
        """Simulated seconds per tick."""
        hz = self.options.tick_hz
        return 1.0 / hz if hz > 0 else 0.1

    async def _clock(self) -> None:
        loop = asyncio.get_running_loop()
        period = 1.0 / self.options.tick_hz
        deadline = loop.time()
        while True:
            deadline += period
            await asyncio.sleep(max(0.0, deadline - loop.time()))
            lag = loop.time() - deadline
            if lag > period:
                # Overloaded (shared CI core): drop ticks rather than burst to catch up;
                # simulated time then runs slower than wall time, which is harmless.
                deadline = loop.time()
            await self._tick()

    def change_material(self, mean: float, std: float, mooney_offset: float = 0.0) -> None:
        """A new rubber from now on: the next batch (starting now) and every later one is drawn
        from ``N(mean, std²)``; each nest takes it at its next load. Its lab Mooney reads
        ``mooney_offset`` higher (from the next tick's values)."""
        if std < 0:
            raise ValueError("material std must be >= 0")
        self.physics.material_mean, self.physics.material_std = float(mean), float(std)
        self.physics.new_batch()
        self.mooney_offset = float(mooney_offset)
        self.material_changed_at = self.physics.time_s
        _log.info("new rubber at %.1f s: p ~ N(%g, %g²), Mooney offset %+g", self.physics.time_s,
                  mean, std, mooney_offset)  # fmt: skip

    def _served(self) -> npt.NDArray[np.float64]:
        values = self.physics.values()
        if self.mooney_offset:
            # Only where a tyre's batch is known (0 = no batch loaded yet).
            loaded = values[self._mooney_at] != 0.0
            values[self._mooney_at[loaded]] += self.mooney_offset
        return values

    async def _tick(self) -> None:
        self.physics.step(self.tick_s)
        opts = self.options
        change = opts.material_change_after_s
        if (
            change is not None
            and self.material_changed_at is None
            and self.physics.time_s >= change
        ):
            self.change_material(
                opts.material_mean_after, opts.material_std_after, opts.mooney_offset_after
            )
        self.registers = self.layout.encode(self._served())
        self.values = self.layout.decode(self.registers)
        self.tick_time = time.time()
        self.ticks += 1
        if self._opcua is not None:
            await self._opcua.on_tick()
        if self.truth is not None and time.monotonic() - self._last_flush >= (
            self.options.truth_flush_s
        ):
            self._last_flush = time.monotonic()
            self.truth.flush()
        if self._waiters:
            due = [w for w in self._waiters if w[0] <= self.ticks]
            self._waiters = [w for w in self._waiters if w[0] > self.ticks]
            for _, fut in due:
                if not fut.done():
                    fut.set_result(None)

    # ---------------------------------------------------------------- writes

    def write(self, index: int, value: float) -> None:
        """Apply a set-point write (from any protocol); raises ``KeyError``/``ValueError``."""
        self.physics.write(index, value)
        # Re-encode just this tag so the very next read serves the written value.
        at = np.array([index])
        self.registers[index] = self.layout.encode(np.array([value]), at)[0]
        self.values[index] = self.layout.decode(self.registers[at], at)[0]
        self.writes += 1

    # ---------------------------------------------------------------- Modbus

    async def _start_modbus(self, host: str, port: int) -> None:
        devices = []
        for unit in self.layout.units:
            _, count = self.layout.unit_range(unit)
            devices.append(
                SimDevice(
                    id=unit,
                    simdata=[SimData(0, count=count, values=0, datatype=DataType.REGISTERS)],
                    action=partial(self._modbus_action, unit),
                )
            )
        server = ModbusTcpServer(devices, address=(host, port))
        await server.serve_forever(background=True)
        self._modbus = server
        sockets = getattr(server.transport, "sockets", None)
        if not sockets:
            raise OSError(f"Modbus server did not bind {host}:{port}")
        self.modbus_port = int(sockets[0].getsockname()[1])

    async def _modbus_action(  # noqa: PLR0917 - the signature is pymodbus' action hook
        self,
        unit: int,
        function_code: int,
        start_address: int,
        address: int,
        count: int,
        registers: list[int],
        set_values: list[int] | list[bool] | None,
    ) -> ExcCodes | None:
        """pymodbus device hook: serve reads from the latest tick, apply set-point writes."""
        first, _ = self.layout.unit_range(unit)
        offset = address - start_address
        if set_values is None:
            if function_code not in _READ_FCS:
                return None
            # Pure copy, no await after it: the slice set here is exactly what pymodbus sends.
            served = self.registers[first + offset : first + offset + count].copy()
            registers[offset : offset + count] = served.tolist()
            if self.truth is not None:
                self.truth.record_modbus(time.time(), unit, function_code, address, served)
            return None
        indices = np.arange(first + offset, first + offset + len(set_values))
        if not self.layout.writable_mask[indices].all():
            return ExcCodes.ILLEGAL_ADDRESS
        raw = np.asarray([int(v) for v in set_values], dtype=np.uint16)
        values = self.layout.decode(raw, indices)
        for index, value in zip(indices.tolist(), values.tolist(), strict=True):
            limits = self.layout.tags[index].limits
            assert limits is not None
            if not limits[0] <= value <= limits[1]:
                return ExcCodes.ILLEGAL_VALUE
        for index, value in zip(indices.tolist(), values.tolist(), strict=True):
            self.write(index, value)
        return None


class _OpcUaSide:
    """The OPC UA server of a line: one variable per tag, values served from the line."""

    def __init__(self, line: SimLine) -> None:
        self.line = line
        self.server = Server()
        specs = line.layout.tags
        if line.options.opcua_tags == "key":
            specs = tuple(t for t in specs if t.key)
        self.specs: tuple[TagSpec, ...] = specs
        self.indices = np.array([t.index for t in specs], dtype=np.intp)
        self._attrs: list[Any] = []
        self._published = np.full(len(specs), -1, dtype=np.int64)
        self._last_publish = 0.0
        self._timestamp = ua.DateTime.now(UTC)
        self._timestamp_tick = -1
        self._callback_counter: int | None = None
        self._watched: list[int] = []

    async def start(self, host: str, port: int) -> str:
        server = self.server
        await server.init()
        server.set_endpoint(f"opc.tcp://{host}:{port}")
        server.set_server_name("edgeos simulated tyre line")
        server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
        ns = await server.register_namespace(OPCUA_NAMESPACE_URI)
        if ns != 2:
            raise RuntimeError(f"OPC UA namespace index is {ns}, the layout assumes 2")
        # Building 16,000 nodes is ~3 s of pure Python inside asyncua; a worker thread keeps
        # the loop (and the Modbus server, already up) responsive meanwhile. Nothing else
        # touches this address space before server.start().
        await asyncio.to_thread(self._build_address_space, ns)
        for k, spec in enumerate(self.specs):
            node_id = ua.NodeId.from_string(spec.node_id)
            server.set_attribute_value_callback(node_id, partial(self._read, k))
            if spec.writable:
                server.set_attribute_value_setter(node_id, partial(self._write, k))
            self._attrs.append(server.iserver.aspace[node_id].attributes[AttributeIds.Value])
        await server.start()
        real_port = int(server.bserver.port) if server.bserver is not None else port
        return f"opc.tcp://{host}:{real_port}"

    async def stop(self) -> None:
        with contextlib.suppress(Exception):  # already half-stopped after a failed start
            await self.server.stop()

    def _build_address_space(self, ns: int) -> None:
        items: list[ua.AddNodesItem] = []
        objects = ua.NodeId.from_string(f"i={ObjectIds.ObjectsFolder}")
        folders: set[str] = set()

        def folder(node: str, name: str, parent: ua.NodeId) -> ua.NodeId:
            node_id = ua.NodeId.from_string(f"ns={ns};s={node}")
            if node not in folders:
                folders.add(node)
                attrs = ua.ObjectAttributes()
                attrs.DisplayName = ua.LocalizedText(name)
                item = ua.AddNodesItem()
                item.RequestedNewNodeId = node_id
                item.BrowseName = ua.QualifiedName(name, ns)
                item.NodeClass = ua.NodeClass.Object
                item.ParentNodeId = parent
                item.ReferenceTypeId = ua.NodeId.from_string(f"i={ObjectIds.Organizes}")
                item.TypeDefinition = ua.NodeId.from_string(f"i={ObjectIds.FolderType}")
                item.NodeAttributes = attrs
                items.append(item)
            return node_id

        line = folder("Line", "Line", objects)
        for spec in self.specs:
            nest_name = spec.name.split(".", 1)[0]
            nest = folder(f"Line/{nest_name}", nest_name, line)
            # Group a nest's variables in small folders (heater, press, zone, …): asyncua scans
            # a parent's references on every insert, so 200 siblings would cost quadratic time.
            group_name = spec.local_name.split(".", 1)[0].rstrip("0123456789")
            group = folder(f"Line/{nest_name}/{group_name}", group_name, nest)
            vtype = _VARIANT[spec.opcua_type]
            attrs = ua.VariableAttributes()
            attrs.DisplayName = ua.LocalizedText(spec.local_name)
            attrs.Description = ua.LocalizedText(f"{spec.description} [{spec.unit}]".strip())
            attrs.Value = ua.Variant(_py_value(spec.opcua_type, 0.0), vtype)
            attrs.DataType = ua.NodeId.from_string(f"i={_DATATYPE[spec.opcua_type]}")
            attrs.ValueRank = -1
            access = ua.AccessLevel.CurrentRead.mask
            if spec.writable:
                access |= ua.AccessLevel.CurrentWrite.mask
            attrs.AccessLevel = access
            attrs.UserAccessLevel = access
            item = ua.AddNodesItem()
            item.RequestedNewNodeId = ua.NodeId.from_string(spec.node_id)
            item.BrowseName = ua.QualifiedName(spec.local_name, ns)
            item.NodeClass = ua.NodeClass.Variable
            item.ParentNodeId = group
            item.ReferenceTypeId = ua.NodeId.from_string(f"i={ObjectIds.HasComponent}")
            item.TypeDefinition = ua.NodeId.from_string(f"i={ObjectIds.BaseDataVariableType}")
            item.NodeAttributes = attrs
            items.append(item)
        results = self.server.iserver.node_mgt_service.add_nodes(items)
        bad = [r.StatusCode for r in results if not r.StatusCode.is_good()]
        if bad:
            raise RuntimeError(f"OPC UA address space: {len(bad)} nodes failed ({bad[0]})")

    def _source_timestamp(self) -> ua.DateTime:
        if self._timestamp_tick != self.line.ticks:
            self._timestamp = ua.DateTime.fromtimestamp(self.line.tick_time, UTC)
            self._timestamp_tick = self.line.ticks
        return self._timestamp

    def _datavalue(self, k: int) -> tuple[ua.DataValue, float]:
        spec = self.specs[k]
        value = float(self.line.values[spec.index])
        dv = ua.DataValue(
            Value=ua.Variant(_py_value(spec.opcua_type, value), _VARIANT[spec.opcua_type]),
            SourceTimestamp=self._source_timestamp(),
            ServerTimestamp=ua.DateTime.now(UTC),
        )
        return dv, value

    def _read(self, k: int, _node_id: ua.NodeId, _attr: AttributeIds) -> ua.DataValue:
        dv, value = self._datavalue(k)
        truth = self.line.truth
        if truth is not None:
            truth.record_opcua(self.line.tick_time, int(self.indices[k]), value)
        return dv

    def _write(self, k: int, _node: Any, _attr: AttributeIds, dv: ua.DataValue) -> None:
        spec = self.specs[k]
        raw = dv.Value.Value if dv.Value is not None else None
        if isinstance(raw, bool) or not isinstance(raw, int | float):
            raise UaStatusCodeError(StatusCodes.BadTypeMismatch)  # type: ignore[no-untyped-call]
        try:
            self.line.write(spec.index, float(raw))
        except ValueError:
            raise UaStatusCodeError(StatusCodes.BadOutOfRange) from None  # type: ignore[no-untyped-call]

    async def on_tick(self) -> None:
        hz = self.line.options.opcua_publish_hz
        if hz is not None and hz > 0:
            now = time.monotonic()
            if now - self._last_publish < 1.0 / hz:
                return
            self._last_publish = now
        await self.publish()

    async def publish(self) -> None:
        """Notify monitored items of nodes whose served value changed since the last publish."""
        # Rescanning 16,000 attributes costs ~1.5 ms; do it only when a monitored item was
        # created since the last scan (asyncua numbers them from one counter). Deleted items
        # simply leave an empty callback dict behind and are filtered below.
        counter = getattr(self.server.iserver.aspace, "_datachange_callback_counter", None)
        if counter is None or counter != self._callback_counter:
            self._callback_counter = counter
            self._watched = [k for k, av in enumerate(self._attrs) if av.datachange_callbacks]
        watched = [k for k in self._watched if self._attrs[k].datachange_callbacks]
        if not watched:
            return
        ks = np.asarray(watched, dtype=np.intp)
        raw = self.line.registers[self.indices[ks]].astype(np.int64)
        changed = ks[raw != self._published[ks]]
        self._published[ks] = raw
        truth = self.line.truth
        for k in changed.tolist():
            dv, value = self._datavalue(k)
            if truth is not None:
                truth.record_opcua(self.line.tick_time, int(self.indices[k]), value)
            # The same fan-out asyncua's write_attribute_value does, minus its side effects
            # (it would drop our value callback and call the set-point setter).
            callbacks: list[tuple[int, Callable[..., Awaitable[None]]]] = list(
                self._attrs[k].datachange_callbacks.items()
            )
            for handle, callback in callbacks:
                try:
                    await callback(handle, dv)
                except Exception:
                    _log.exception("OPC UA data-change callback failed for %s", self.specs[k].name)


def _py_value(kind: str, value: float) -> float | int | bool:
    if kind == "int32":
        return round(value)
    if kind == "bool":
        return value != 0
    return value
