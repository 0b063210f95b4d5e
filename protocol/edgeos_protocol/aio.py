"""The one cancellation rule of the MQTT sessions (the gateway's publisher, the receiver).

A reconnect loop treats a connection error as "reconnect". A cancelled loop can see one in
place of its ``CancelledError``: the MQTT client raises a connection error while the cancelled
session closes, or Python 3.11's ``asyncio.wait_for`` (inside aiomqtt) returns a result that
completed at the same moment and drops the cancellation. The loop would then reconnect through
a shutdown (in the service: until systemd's SIGKILL). The rule: **a cancellation is recognised
from** ``Task.cancelling()`` **— never from a stop flag** — by :func:`reraise_lost_cancellation`,
which a loop calls where it catches connection errors and before it starts serving.

``cancelling()`` counts cancellation requests nobody has taken back with ``uncancel()``. It is
only trustworthy if the loop's task runs nothing that leaves the count raised:

* ``asyncio.timeout`` scopes are fine. A scope that fired calls ``uncancel()`` when it exits;
  inside it the count is raised, and a ``CancelledError`` raised there by this rule is what
  the scope turns into ``TimeoutError`` (unless another cancellation is pending, which then
  propagates, as it should).
* ``asyncio.TaskGroup`` on Python 3.11 is *not*: when a child fails while the parent already
  waits in ``__aexit__``, the group cancels the parent and never uncancels it (its
  ``uncancel()`` ran earlier). A lost connection does exactly that to a session's group, so
  after the first reconnect the loop's task stayed "cancelling" for good. This is why the first
  ``cancelling()`` guard was reverted: it stopped a healthy publisher at the next failed
  reconnect (the quota e2e). Hence :func:`in_own_task`: a loop runs its session's task group in
  a task of its own, awaited, so that bookkeeping stays off the loop's count.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

__all__ = ["in_own_task", "reraise_lost_cancellation"]

T = TypeVar("T")


def reraise_lost_cancellation(cause: BaseException | None = None) -> None:
    """Raise ``CancelledError`` (from ``cause``) if the current task has a pending cancellation.

    Call it in the ``except`` clause that would reconnect on a connection error, and after the
    awaits that set a session up: a cancelled loop then ends instead of (re)connecting.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling() > 0:
        raise asyncio.CancelledError("cancelled (the cancellation surfaced as an error)") from cause


async def in_own_task(coro: Coroutine[Any, Any, T], *, name: str | None = None) -> T:
    """Await ``coro`` in a task of its own and return its result or raise its error.

    Cancelling the caller cancels that task (the caller waits until it has ended); whatever the
    coroutine does to its own task's cancellation count (a Python 3.11 ``TaskGroup`` leaves it
    raised when a child fails, see the module docs) stays off the caller's ``cancelling()``.
    """
    task = asyncio.get_running_loop().create_task(coro, name=name)
    try:
        return await task
    finally:
        # Awaiting a task returns only once it is done; cancelling us cancels it first. Should
        # that ever change, the task must not outlive us.
        if not task.done():
            task.cancel()
