"""Cancellation that cannot get lost in a reconnect loop.

Two ways a cancelled MQTT loop can miss its cancellation: the client raises a connection error
in place of ``CancelledError`` while the cancelled session closes, or Python 3.11's
``asyncio.wait_for`` (used inside aiomqtt) returns a result that completed at the same moment
and drops the cancellation. A loop that reconnects on connection errors would then run on, and
a service shutdown would hang until systemd's SIGKILL. Loops call :func:`raise_if_cancelling`
where they catch connection errors and before they start serving.
"""

from __future__ import annotations

import asyncio

__all__ = ["raise_if_cancelling"]


def raise_if_cancelling(cause: BaseException | None = None) -> None:
    """Raise ``CancelledError`` when this task was asked to stop but the request got lost."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError from cause
