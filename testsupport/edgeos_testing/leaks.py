"""Pytest plugin: fail a test that leaks asyncio tasks or non-daemon threads.

Loaded by ``tests/conftest.py`` and ``hil_tests/conftest.py`` (``pytest_plugins``), so every
suite holds the same bar: a part that starts something must stop it.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Iterator

import pytest

# Threads that libraries start once per process and keep (not leaks of a test).
_ALLOWED_THREAD_PREFIXES = ("asyncio_", "ThreadPoolExecutor", "pydevd", "Dummy-", "pytest_timeout")


def _live_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.is_alive()}


@pytest.fixture(autouse=True)
def no_leaked_threads() -> Iterator[None]:
    """Fail a test that leaves a thread running (after a short grace period)."""
    before = _live_threads()
    yield
    deadline = time.monotonic() + 2.0
    while True:
        leaked = [
            t
            for t in _live_threads() - before
            if not t.name.startswith(_ALLOWED_THREAD_PREFIXES) and not t.daemon
        ]
        if not leaked or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert not leaked, f"test leaked threads: {[t.name for t in leaked]}"


@pytest.fixture(autouse=True)
async def no_leaked_tasks() -> AsyncIterator[None]:
    """Fail an async test that leaves tasks running on its event loop."""
    loop = asyncio.get_running_loop()
    before = set(asyncio.all_tasks(loop))
    yield
    current = asyncio.current_task()
    deadline = loop.time() + 2.0
    while True:
        leaked = [t for t in asyncio.all_tasks(loop) - before if t is not current and not t.done()]
        if not leaked or loop.time() > deadline:
            break
        await asyncio.sleep(0.02)
    for task in leaked:
        task.cancel()
    assert not leaked, f"test leaked tasks: {[t.get_coro() for t in leaked]}"
