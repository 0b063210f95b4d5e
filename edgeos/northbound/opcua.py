"""The OPC UA server of the twin, as the runtime runs it: asyncua in a child process.

Why a process: asyncua turns every written value into data-change notifications and encodes
publish responses in pure Python (~20 µs per subscribed value). On the runtime's event loop
that was the scan loop's jitter (docs/northbound.md); on a thread of the same process it still
was, because the two threads share the GIL: the scan loop waited for the GIL on every return
from a system call while the server thread held it (p50 jitter 0.05 → 3.6 ms at 16,000 values/s,
measured). A child process has its own interpreter and GIL; the runtime keeps only the cheap
part: taking the hub's changes and writing them into a pipe.

::

    runtime's loop                                            child process (asyncua)
    hub ─► pump: changed columns ─► ValueHandoff ─► sender ═══ pipe ═══► reader ─► ValueHandoff
                                    (latest wins,            (frames)            ─► push to the
                                     superseded counted)                            address space
    _decide_write ◄══════════ "write" frames ═══════════ client Write (status ◄── "write_result")

- **Bounded, never blocking the scan loop**: the pump is O(changed) numpy on the runtime's loop;
  the sender writes one batch and awaits the pipe's drain; while the child is busy the batches
  wait in the handoff, where a tag's newer value replaces its older one (counted as
  ``values_superseded``). Nothing grows with the lag.
- **Writes** from OPC UA clients come back over the pipe and are decided here, on the runtime's
  loop, by ``twin.set_desired`` (same checks and outcome records as any write); the child
  answers the client's Write with the status code this side returns.
- **Lifecycle**: the child is started and stopped by :meth:`OpcUaService.run` (a child of the
  runtime's TaskGroup): cancellation closes its stdin (it stops its server and exits), a child
  that does not exit in time is killed, and the process is always reaped. An error in the child
  (a port in use, a bad certificate) is sent back pickled and raised here.

Only :mod:`edgeos.northbound.opcua_server` (the child's side) imports asyncua; the runtime's
process does not load it at all.
"""

from __future__ import annotations

import asyncio
import logging
import pickle
import struct
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from edgeos.clock import Clock
from edgeos.driver import Value
from edgeos.northbound.config import OpcUaServerConfig, plant_writable
from edgeos.northbound.handoff import ValueHandoff
from edgeos.northbound.hub import GUARD_METRICS, GuardStats, Hub, read_secret
from edgeos.tags import TagSpec
from edgeos.twin import DesiredChange, Twin

__all__ = ["ChildInit", "FrameLink", "OpcUaServerExited", "OpcUaService"]

log = logging.getLogger("edgeos.northbound.opcua")

_CHILD_MODULE = "edgeos.northbound.opcua_child"
#: An orderly stop (stdin closed → server stopped → exit) takes well under this.
_STOP_TIMEOUT_S = 10.0
_HEADER = struct.Struct(">I")
#: Variant types a numeric tag accepts (OPC UA built-in type names).
_NUMERIC = frozenset(
    {"SByte", "Byte", "Int16", "UInt16", "Int32", "UInt32", "Int64", "UInt64", "Float", "Double"}
)


class OpcUaServerExited(RuntimeError):
    """The OPC UA server's process ended without being asked to (and without an error)."""


@dataclass(frozen=True, slots=True)
class ChildInit:
    """Everything the child needs to build the server (sent once, as the first frame)."""

    config: OpcUaServerConfig
    tags: tuple[TagSpec, ...]
    device_id: str
    writable: frozenset[int]
    #: user name -> (password, role); read from the password files by the runtime.
    passwords: Mapping[str, tuple[str, str]]


class FrameLink:
    """Length-prefixed pickle frames over a pair of asyncio streams (one process to another).

    Pickle is safe here: both ends are this package, the pipe is private to the two processes.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    def send(self, message: object) -> None:
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        self.writer.write(_HEADER.pack(len(data)) + data)

    async def drain(self) -> None:
        await self.writer.drain()

    async def recv(self) -> Any:
        """The next message; ``asyncio.IncompleteReadError`` at the other end's EOF."""
        (size,) = _HEADER.unpack(await self.reader.readexactly(_HEADER.size))
        return pickle.loads(await self.reader.readexactly(size))


def _status_of_outcome(change: DesiredChange) -> str:
    """The OPC UA status code (by name) of a desired-state outcome."""
    status = change.status
    if status == "applied":
        return "Good"
    if status in ("pending", "superseded"):
        return "GoodCompletesAsynchronously"
    if status == "failed":
        return "BadCommunicationError"
    if status == "timed_out":
        return "BadTimeout"
    reason = change.reason
    if "limits" in reason or "max_rate" in reason or "finite" in reason:
        return "BadOutOfRange"
    if reason.startswith("expected"):
        return "BadTypeMismatch"
    return "BadNotWritable"


def plant_value(tag: TagSpec, variant_type: str, raw: object) -> Value | None:
    """The written value as the twin takes it, or None when its type does not fit the tag."""
    if tag.data_type == "string":
        return raw if variant_type == "String" and isinstance(raw, str) else None
    if tag.data_type == "bool":
        return bool(raw) if variant_type == "Boolean" else None
    if variant_type in _NUMERIC and isinstance(raw, int | float) and not isinstance(raw, bool):
        return raw
    return None


@dataclass(slots=True)
class OpcUaCounters:
    """The runtime's side: plant writes by outcome (the child reports its pushes)."""

    writes: dict[str, int] = field(default_factory=dict)

    def count_write(self, outcome: str) -> None:
        self.writes[outcome] = self.writes.get(outcome, 0) + 1


class OpcUaService:
    """The twin's OPC UA server in a child process; :meth:`run` until cancelled."""

    def __init__(
        self,
        config: OpcUaServerConfig,
        twin: Twin,
        hub: Hub,
        *,
        device_id: str,
        clock: Clock,
        guard_stats: GuardStats | None = None,
    ) -> None:
        self.config = config
        self.twin = twin
        self.clock = clock
        self.device_id = device_id
        self.feed = hub.feed("opcua")
        self.guard_stats = guard_stats
        self.writable = plant_writable(config.writes, twin.tags)
        self.counters = OpcUaCounters()
        self.ready = asyncio.Event()
        self.endpoint_url = config.endpoint
        #: Runtime's loop -> sender to the child (see the module docs).
        self.handoff = ValueHandoff(len(twin))
        #: The child's process id while it runs.
        self.pid: int | None = None
        #: The child's own counters (pushes, values pushed/unchanged), as last reported.
        self.child_stats: dict[str, Any] = {}
        self._is_text = [t.data_type == "string" for t in twin.tags]
        self._text_columns = [i for i, s in enumerate(self._is_text) if s]
        self._has_stations = any(t.name.endswith(".gate.verdict") for t in twin.tags)
        self._guard_sent: dict[str, Any] = {}

    # ------------------------------------------------------------------ run

    async def run(self) -> None:
        """Start the server's process, feed it after every scan, answer its writes; stop it."""
        init = ChildInit(
            config=self.config,
            tags=tuple(self.twin.tags),
            device_id=self.device_id,
            writable=frozenset(self.writable),
            passwords={
                u.name: (
                    read_secret(u.password_file, f"OPC UA user {u.name!r} password_file"),
                    u.role,
                )
                for u in self.config.users
            },
        )
        self.feed.mark_all()  # the first push sets every value, status and timestamp
        self._guard_sent = {}
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            _CHILD_MODULE,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        assert proc.stdin is not None and proc.stdout is not None
        self.pid = proc.pid
        link = FrameLink(proc.stdout, proc.stdin)
        try:
            link.send(init)
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._pump(), name="northbound:opcua:pump")
                tg.create_task(self._send(link), name="northbound:opcua:send")
                tg.create_task(self._receive(link, tg), name="northbound:opcua:receive")
        finally:
            self.ready.clear()
            await _stop_child(proc)
            self.pid = None

    async def _pump(self) -> None:
        """After every scan that changed something: :meth:`pump_once`."""
        while True:
            await self.feed.wait()
            self.pump_once()

    def pump_once(self) -> None:
        """The hub's changed columns (and the guard's state) into the handoff."""
        idx = self.feed.take()
        texts = None
        if self._text_columns:
            texts = {i: self.twin.text(i) for i in idx.tolist() if self._is_text[i]}
        self.handoff.put(
            idx,
            self.twin.values[idx],
            self.twin.quality[idx],
            self.twin.source_ts[idx],
            texts=texts,
            guard=self._guard_changes(),
        )

    def _guard_changes(self) -> dict[str, Any] | None:
        if not self._has_stations or self.guard_stats is None:
            return None
        stats = self.guard_stats()
        if stats is None:
            return None
        current = {suffix: stats.get(key) for suffix, (key, _) in GUARD_METRICS.items()}
        if current == self._guard_sent:
            return None
        self._guard_sent = current
        return current

    async def _send(self, link: FrameLink) -> None:
        """One batch at a time into the pipe; while it drains, newer values wait in the handoff."""
        wake = asyncio.Event()
        self.handoff.set_waker(wake.set)
        try:
            while True:
                await wake.wait()
                wake.clear()
                link.send(("batch", self.handoff.take()))
                await link.drain()
        finally:
            self.handoff.set_waker(None)

    async def _receive(self, link: FrameLink, tg: asyncio.TaskGroup) -> None:
        while True:
            try:
                message = await link.recv()
            except asyncio.IncompleteReadError:
                raise OpcUaServerExited("the OPC UA server's process exited") from None
            kind = message[0]
            if kind == "ready":
                self.endpoint_url = message[1]
                self.ready.set()
            elif kind == "stats":
                self.child_stats = message[1]
            elif kind == "write":
                tg.create_task(self._answer(link, message), name="northbound:opcua:write")
            elif kind == "error":
                raise message[1]

    async def _answer(self, link: FrameLink, message: tuple[Any, ...]) -> None:
        _, request, i, variant_type, raw, has_value, user = message
        code, text = await self.decide_write(i, variant_type, raw, has_value=has_value, user=user)
        link.send(("write_result", request, code, text))

    # ------------------------------------------------------------------ writes

    async def decide_write(
        self, i: int, variant_type: str, raw: object, *, has_value: bool, user: str | None
    ) -> tuple[str, str]:
        """A client's write of tag ``i``: checks, ``twin.set_desired``, (status name, outcome)."""
        tag = self.twin.tags[i]
        who = user or "anonymous"
        writers = {u.name for u in self.config.users if u.role == "write"}
        if user not in writers:
            return self._refuse(i, "BadUserAccessDenied", f"{who} may not write")
        if i not in self.writable:
            return self._refuse(i, "BadNotWritable", f"{tag.name} is read-only from the plant")
        if not has_value:
            return self._refuse(i, "BadTypeMismatch", "the write carries no value")
        value = plant_value(tag, variant_type, raw)
        if value is None:
            return self._refuse(
                i, "BadTypeMismatch", f"{variant_type} does not fit a {tag.data_type}"
            )
        change = self.twin.set_desired(tag.name, value, source=f"opcua:{who}")
        if not change.done and self.config.write_timeout_s > 0:
            try:
                async with asyncio.timeout(self.config.write_timeout_s):
                    await change.wait()
            except TimeoutError:
                pass  # still pending: GoodCompletesAsynchronously, the twin keeps tracking it
        self.counters.count_write(change.status)
        if change.status == "refused":
            log.info("opcua: write %s = %r by %s refused: %s", tag.name, value, who, change.reason)
        return _status_of_outcome(change), f"v{change.version} {change.value!r} {change.outcome()}"

    def _refuse(self, i: int, code: str, reason: str) -> tuple[str, str]:
        self.counters.count_write("refused")
        log.info("opcua: write of %s refused: %s", self.twin.tags[i].name, reason)
        return code, f"refused: {reason}"

    def stats(self) -> dict[str, Any]:
        return {
            "endpoint": self.endpoint_url,
            "running": self.ready.is_set(),
            "pid": self.pid,
            "pushes": self.child_stats.get("pushes", 0),
            "values_pushed": self.child_stats.get("values_pushed", 0),
            "values_unchanged": self.child_stats.get("values_unchanged", 0),
            "values_superseded": self.handoff.superseded + self.child_stats.get("superseded", 0),
            "values_pending": self.handoff.pending,
            "writes": dict(self.counters.writes),
        }


async def _stop_child(proc: asyncio.subprocess.Process) -> None:
    """Close its stdin (it stops its server and exits); kill it if it does not; reap it."""
    if proc.returncode is None and proc.stdin is not None:
        proc.stdin.close()
    try:
        async with asyncio.timeout(_STOP_TIMEOUT_S):
            await proc.wait()
    except TimeoutError:
        log.warning("opcua: the server's process did not stop in %.0f s; killed", _STOP_TIMEOUT_S)
        proc.kill()
        await proc.wait()
    if proc.returncode:
        log.info("opcua: the server's process exited with %s", proc.returncode)
