"""The cancellation rule of the MQTT sessions (edgeos_protocol.aio), on real asyncio primitives.

The "client" here is a coroutine doing what aiomqtt does on the way out of a cancelled
operation (a connection error raised in place of ``CancelledError``) or what Python 3.11's
``asyncio.wait_for`` does (drop a cancellation that lands as the awaited future completes).
"""

from __future__ import annotations

import asyncio

import pytest

from edgeos_protocol.aio import in_own_task, reraise_lost_cancellation


async def _client_that_turns_cancellation_into_a_connection_error(
    started: asyncio.Event,
) -> None:
    started.set()
    try:
        await asyncio.Event().wait()
    except asyncio.CancelledError:
        raise OSError("connection closed while the session ended") from None


async def _reconnect_loop(attempts: list[str], started: asyncio.Event) -> None:
    """The shape of Publisher.run / the receiver's broker loop: reconnect on OSError."""
    while True:
        try:
            attempts.append("connect")
            await _client_that_turns_cancellation_into_a_connection_error(started)
        except OSError as exc:
            reraise_lost_cancellation(exc)
            attempts.append("reconnect")
        started.clear()


async def test_a_cancellation_the_client_turns_into_a_connection_error_stops_the_loop() -> None:
    attempts: list[str] = []
    started = asyncio.Event()
    task = asyncio.create_task(_reconnect_loop(attempts, started))
    await started.wait()
    task.cancel()  # once: no second request is needed
    async with asyncio.timeout(5):
        with pytest.raises(asyncio.CancelledError):
            await task
    assert attempts == ["connect"]


async def test_an_inner_timeout_that_fires_does_not_stop_the_loop() -> None:
    """A timeout scope cancels its own task to end the block: the count is raised inside the
    scope, the rule's CancelledError is what the scope turns into TimeoutError, and the loop
    (which reconnects on OSError, TimeoutError included) carries on with a clean count."""
    attempts: list[str] = []
    started = asyncio.Event()
    counts: list[int] = []

    async def loop_with_inner_timeout() -> None:
        task = asyncio.current_task()
        assert task is not None
        while len(attempts) < 3:
            try:
                async with asyncio.timeout(0.01):
                    attempts.append("connect")
                    try:
                        await _client_that_turns_cancellation_into_a_connection_error(started)
                    except OSError as exc:
                        reraise_lost_cancellation(exc)  # the scope's own cancellation
            except OSError:
                counts.append(task.cancelling())

    async with asyncio.timeout(10):
        await loop_with_inner_timeout()
    assert attempts == ["connect"] * 3
    assert counts == [0, 0, 0]


async def test_a_cancellation_dropped_by_wait_for_is_still_recognised() -> None:
    """Python 3.11's wait_for returns the result of a future that completed as the
    cancellation landed; the task's cancelling() still says it was asked to stop."""
    done = asyncio.get_running_loop().create_future()
    waiting = asyncio.Event()
    seen: list[int] = []

    async def operation() -> None:
        waiting.set()
        await asyncio.wait_for(done, timeout=10)
        task = asyncio.current_task()
        assert task is not None
        seen.append(task.cancelling())
        reraise_lost_cancellation()

    task = asyncio.create_task(operation())
    await waiting.wait()
    # Complete the operation and cancel in the same step, as a broker answer and a SIGTERM can.
    done.set_result(None)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # 3.11 swallows (count 1 after a normal return); later versions raise at once (no entry).
    assert seen in ([1], [])


async def _group_whose_child_fails_while_it_waits_to_exit() -> None:
    async def child() -> None:
        await asyncio.sleep(0)
        raise OSError("connection lost")

    async with asyncio.TaskGroup() as tg:
        tg.create_task(child())


async def test_in_own_task_keeps_a_task_groups_bookkeeping_off_the_callers_count() -> None:
    """A lost connection fails a session's task group while it waits in __aexit__; on Python
    3.11 that leaves its parent task 'cancelling' for good (why the first guard was reverted).
    Run in its own task, the caller's count stays clean and the rule keeps reconnecting."""
    task = asyncio.current_task()
    assert task is not None
    for _ in range(3):
        with pytest.raises(ExceptionGroup):
            await in_own_task(_group_whose_child_fails_while_it_waits_to_exit())
        assert task.cancelling() == 0
        reraise_lost_cancellation()  # nothing to re-raise: a healthy loop reconnects


async def test_cancelling_the_caller_of_in_own_task_cancels_the_inner_task_and_waits() -> None:
    inner_started = asyncio.Event()
    inner_ended: list[str] = []

    async def inner() -> None:
        inner_started.set()
        try:
            await asyncio.Event().wait()
        finally:
            await asyncio.sleep(0)  # cleanup that takes a step: the caller must wait for it
            inner_ended.append("ended")

    outer = asyncio.create_task(in_own_task(inner()))
    await inner_started.wait()
    outer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await outer
    assert inner_ended == ["ended"]
