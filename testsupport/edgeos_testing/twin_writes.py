"""The twin's write path in tests: a recording stand-in, a set-point tag and a running loop.

Shared by the twin's desired-state, rate-limit and wait tests (``tests/twin/``), which each
need a writable set-point and ``Twin.run_writes`` running for the length of one test.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from edgeos.config import TagConfig
from edgeos.driver import TagBinding, Value
from edgeos.twin import Twin

__all__ = ["RecordingWritePath", "running_writes", "setpoint"]


class RecordingWritePath:
    """A write path standing in for driver + supervisor: records, can fail, can be held.

    ``gate`` (when set) holds the wire until it is set; ``error`` (when set) is raised.
    """

    def __init__(self) -> None:
        self.writes: list[tuple[str, Value]] = []
        self.error: Exception | None = None
        self.gate: asyncio.Event | None = None

    async def write(self, binding: TagBinding, value: Value) -> None:
        if self.gate is not None:
            await self.gate.wait()
        if self.error is not None:
            raise self.error
        self.writes.append((binding.tag.name, value))


def setpoint(name: str = "oven.sp", **kw: object) -> TagConfig:
    """A writable float32 Modbus set-point, 0–250 at 50/s; ``kw`` overrides any key."""
    data: dict[str, object] = {
        "name": name,
        "connection": "plc",
        "modbus": {"address": 0, "type": "float32"},
        "resolution": 0.1,
        "writable": True,
        "limits": {"min": 0, "max": 250},
        "max_rate": 50,
    }
    data.update(kw)
    return TagConfig.model_validate(data)


@contextlib.asynccontextmanager
async def running_writes(twin: Twin, path: RecordingWritePath) -> AsyncIterator[None]:
    """``twin.run_writes(path)`` for the body; cancelled after, and the cancellation checked."""
    task = asyncio.create_task(twin.run_writes(path))
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    if not task.cancelled():
        raise AssertionError("the write loop ended before it was cancelled")
