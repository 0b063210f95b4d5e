"""The OPC UA server's process: ``python -m edgeos.northbound.opcua_child`` (the runtime starts it).

Protocol (:class:`~edgeos.northbound.opcua.FrameLink` frames; stdin from the runtime, stdout
to it; everything the process prints or logs goes to stderr):

- runtime → child: :class:`~edgeos.northbound.opcua.ChildInit` (first), ``("batch", Batch)``,
  ``("write_result", request, status name, outcome text)``; EOF = stop.
- child → runtime: ``("ready", endpoint url)``, ``("stats", counters)`` after each push,
  ``("write", request, tag index, variant type, value, has value, user)``, ``("error", exc)``
  before exiting with status 1.

Batches are merged into a :class:`~edgeos.northbound.handoff.ValueHandoff` as they arrive (latest
value wins here too), so reading the pipe and answering writes never waits for a push.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import sys

from edgeos.northbound.handoff import Batch, ValueHandoff
from edgeos.northbound.opcua import ChildInit, FrameLink
from edgeos.northbound.opcua_server import OpcUaTwinServer

__all__ = ["main"]

log = logging.getLogger("edgeos.northbound.opcua")

#: The server's nice value: under load the plant's view may lag a scan, never the scan itself.
_NICE = 5


async def _serve(link: FrameLink) -> None:
    init = await link.recv()
    if not isinstance(init, ChildInit):
        raise TypeError(f"expected the server's configuration first, got {type(init).__name__}")
    answers: dict[int, asyncio.Future[tuple[str, str]]] = {}
    requests = itertools.count()

    async def decide(
        i: int, variant_type: str, raw: object, has_value: bool, user: str | None
    ) -> tuple[str, str]:
        request = next(requests)
        answer = answers[request] = asyncio.get_running_loop().create_future()
        try:
            link.send(("write", request, i, variant_type, raw, has_value, user))
            code, text = await answer
            return code, text
        finally:
            answers.pop(request, None)

    server = OpcUaTwinServer(init, decide)
    handoff = ValueHandoff(len(init.tags))
    wake = asyncio.Event()
    handoff.set_waker(wake.set)
    link.send(("ready", await server.start()))
    try:
        async with asyncio.TaskGroup() as tg:
            pusher = tg.create_task(_push(server, handoff, wake, link))
            while True:
                try:
                    message = await link.recv()
                except asyncio.IncompleteReadError:
                    pusher.cancel()  # the runtime closed the pipe: stop
                    return
                if message[0] == "batch":
                    b: Batch = message[1]
                    handoff.put(
                        b.indices, b.values, b.quality, b.source_ts, texts=b.texts, guard=b.guard
                    )
                elif message[0] == "write_result":
                    answer = answers.get(message[1])
                    if answer is not None and not answer.done():
                        answer.set_result((message[2], message[3]))
    finally:
        await server.stop()


async def _push(
    server: OpcUaTwinServer, handoff: ValueHandoff, wake: asyncio.Event, link: FrameLink
) -> None:
    while True:
        await wake.wait()
        wake.clear()
        await server.push(handoff.take())
        link.send(("stats", {**server.stats(), "superseded": handoff.superseded}))


async def _main(out: int) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(0, "rb", buffering=0)
    )
    transport, protocol = await loop.connect_write_pipe(
        asyncio.streams.FlowControlMixin, os.fdopen(out, "wb", buffering=0)
    )
    writer = asyncio.StreamWriter(transport, protocol, None, loop)
    link = FrameLink(reader, writer)
    try:
        await _serve(link)
    except Exception as exc:
        log.exception("the OPC UA server failed")
        try:
            link.send(("error", exc))
        except Exception:  # an exception that does not pickle: its text then
            link.send(("error", RuntimeError(f"OPC UA server: {exc!r}")))
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        raise
    finally:
        writer.close()


def _below_the_scan_loop() -> None:
    """Leave the runtime's real-time class and run below it.

    A child inherits the runtime's ``SCHED_FIFO`` (docs/scheduler.md): a FIFO server busy
    encoding notifications would take the core from the scan loop at the same priority. Dropping
    the policy and raising the nice value needs no privilege.
    """
    setter = getattr(os, "sched_setscheduler", None)
    if setter is not None:
        with contextlib.suppress(OSError):
            setter(0, os.SCHED_OTHER, os.sched_param(0))
    with contextlib.suppress(OSError):
        os.nice(_NICE)


def main() -> None:
    """Serve until the runtime closes stdin; exit status 1 (after an ``error`` frame) on errors."""
    _below_the_scan_loop()
    out = os.dup(1)
    os.dup2(2, 1)  # stdout is the protocol's: anything printed goes to stderr
    logging.basicConfig(
        level=logging.WARNING, format="edgeos-opcua %(levelname)s %(name)s: %(message)s"
    )
    try:
        asyncio.run(_main(out))
    except Exception:
        sys.exit(1)


if __name__ == "__main__":
    main()
