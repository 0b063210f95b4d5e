"""An MQTT client that drops a cancellation inside ``publish``, as aiomqtt does on Python 3.11.

aiomqtt waits for a PUBACK with ``asyncio.wait_for``; on Python 3.11, when the PUBACK and a
cancellation land in the same loop iteration, ``wait_for`` returns the result and the
``CancelledError`` is gone (the task's ``cancelling()`` stays raised). Seen under load: a
receiver and test peers that kept serving after being stopped (``edgeos_protocol.aio``). The
race cannot be provoked on demand against a real broker, so this client makes it happen on
every publish; everything else a loop does around it stays real.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any


class _Message:
    def __init__(self, topic: str, payload: bytes) -> None:
        self.topic = topic
        self.payload = payload
        self.qos = 1
        self.mid = 0


class DropsCancellation:
    """``publish`` records the message, then the task is cancelled and the error dropped."""

    def __init__(self, incoming: list[tuple[str, bytes]] | None = None) -> None:
        self.published: list[tuple[str, bytes]] = []
        self.subscribed: list[str] = []
        self._incoming = list(incoming or [])
        self._idle = asyncio.Event()  # never set: after the incoming messages, wait for ever

    async def publish(self, topic: str, payload: bytes, qos: int = 0, **_: Any) -> None:
        self.published.append((topic, payload))
        task = asyncio.current_task()
        assert task is not None
        task.cancel()  # the stop arrives as the PUBACK does ...
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(0)  # ... and the operation's result wins

    async def subscribe(self, topic: str, qos: int = 0, **_: Any) -> None:
        self.subscribed.append(topic)

    @property
    def messages(self) -> AsyncIterator[_Message]:
        return self._messages()

    async def _messages(self) -> AsyncIterator[_Message]:
        for topic, payload in self._incoming:
            yield _Message(topic, payload)
        await self._idle.wait()


async def stopped(task: asyncio.Task[Any], bound_s: float = 30.0) -> None:
    """Assert that ``task`` ended cancelled (by the stop its publish dropped); else fail.

    ``asyncio.wait`` rather than a timeout scope around ``await task``: a scope's own
    cancellation would be taken for the task's.
    """
    done, _ = await asyncio.wait({task}, timeout=bound_s)
    if task not in done:
        while not task.done():  # it serves on: stop it for good before failing
            task.cancel()
            await asyncio.wait({task}, timeout=1.0)
        raise AssertionError("the loop went on serving after it was stopped")
    assert task.cancelled(), f"the loop ended otherwise: {task.exception()!r}"
