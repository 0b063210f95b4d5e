"""The local control socket: ``edgeos status`` and ``edgeos twin`` talk to a running runtime.

Protocol: one JSON object per line over a Unix stream socket. A request is
``{"op": "status"}`` or ``{"op": "twin.get", "pattern": "nest01.*"}``; the answer is
``{"ok": true, "result": …}`` or ``{"ok": false, "error": "…"}``. The socket is created with
mode 0660 so only the service user and its group (operators) can use it.

The twin's ops (:func:`twin_handlers`): ``twin.get`` (``pattern``) answers
:meth:`edgeos.twin.Twin.query`; ``twin.set`` (``tag``, ``value``, ``wait_s``) requests the value
as the operator and answers the change once it has an outcome, or after ``wait_s`` with its
status then (``pending``). :func:`wait_outcome` is the same wait for other callers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the CLI imports this module for `request`; keep numpy out of its start
    from edgeos.twin import DesiredChange, Status, Twin

__all__ = ["ControlError", "ControlServer", "request", "twin_handlers", "wait_outcome"]

log = logging.getLogger("edgeos.control")

Handler = Callable[[dict[str, Any]], Awaitable[Any]]

#: Largest request line accepted (a twin.set carries one value; 64 KiB is plenty).
MAX_LINE = 64 * 1024


class ControlError(Exception):
    """The runtime answered with an error, or could not be reached."""


class ControlServer:
    """Serves registered handlers on a Unix socket until cancelled."""

    def __init__(self, path: Path, handlers: Mapping[str, Handler]) -> None:
        self.path = path
        self._handlers = dict(handlers)

    async def run(self, ready: asyncio.Event | None = None) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        server = await asyncio.start_unix_server(self._serve, path=str(self.path), limit=MAX_LINE)
        os.chmod(self.path, 0o660)
        try:
            async with server:
                if ready is not None:
                    ready.set()
                await server.serve_forever()
        finally:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    line = await reader.readline()
                except (ValueError, asyncio.LimitOverrunError):
                    await self._send(writer, {"ok": False, "error": "request too long"})
                    return
                if not line:
                    return
                await self._send(writer, await self._dispatch(line))
        except (ConnectionError, BrokenPipeError):
            return
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, BrokenPipeError):
                await writer.wait_closed()

    async def _dispatch(self, line: bytes) -> dict[str, Any]:
        try:
            req = json.loads(line)
        except ValueError as exc:  # JSONDecodeError, or bytes that are not UTF-8/16/32
            return {"ok": False, "error": f"not JSON: {exc}"}
        if not isinstance(req, dict) or not isinstance(req.get("op"), str):
            return {"ok": False, "error": "a request is a JSON object with an 'op' string"}
        handler = self._handlers.get(req["op"])
        if handler is None:
            return {
                "ok": False,
                "error": f"unknown op {req['op']!r} (known: {sorted(self._handlers)})",
            }
        try:
            return {"ok": True, "result": await handler(req)}
        except (KeyError, ValueError, TypeError) as exc:
            return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        except Exception as exc:  # one bad request must not take the control socket down
            log.exception("control op %s failed", req["op"])
            return {"ok": False, "error": f"internal error: {exc!r}"}

    @staticmethod
    async def _send(writer: asyncio.StreamWriter, doc: dict[str, Any]) -> None:
        writer.write(json.dumps(doc, default=str).encode() + b"\n")
        await writer.drain()


async def wait_outcome(change: DesiredChange, timeout_s: float) -> Status:
    """The change's final status, or its status after ``timeout_s`` (``pending``)."""
    try:
        async with asyncio.timeout(timeout_s):
            return await change.wait()
    except TimeoutError:
        return change.status


def twin_handlers(twin: Twin, *, default_wait_s: float = 15.0) -> dict[str, Handler]:
    """``twin.get`` and ``twin.set`` for :class:`ControlServer`."""

    async def get(req: dict[str, Any]) -> list[dict[str, Any]]:
        return twin.query(str(req.get("pattern") or "*"))

    async def set_(req: dict[str, Any]) -> dict[str, Any]:
        wait_s = float(req.get("wait_s", default_wait_s))
        if not wait_s >= 0:  # also NaN
            raise ValueError(f"wait_s must be a number of seconds >= 0, got {req['wait_s']!r}")
        change = twin.set_desired(str(req["tag"]), req["value"], source="operator")
        await wait_outcome(change, wait_s)
        return change.as_dict()

    return {"twin.get": get, "twin.set": set_}


def request(path: Path, op: str, /, *, timeout_s: float = 5.0, **params: Any) -> Any:
    """Blocking client for the CLI: send one request, return its result or raise ControlError.

    ``path`` and ``op`` are positional-only so that any request parameter name (``path=`` for
    ``models.updated``) can be passed as a keyword.
    """
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout_s)
            sock.connect(str(path))
            sock.sendall(json.dumps({"op": op, **params}).encode() + b"\n")
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = sock.recv(1 << 16)
                if not chunk:
                    break
                buf += chunk
    except FileNotFoundError as exc:
        raise ControlError(f"no runtime is listening on {path} (is edgeos running?)") from exc
    except (ConnectionRefusedError, PermissionError) as exc:
        raise ControlError(f"cannot reach the runtime at {path}: {exc.strerror}") from exc
    except TimeoutError as exc:
        raise ControlError(f"the runtime at {path} did not answer within {timeout_s} s") from exc
    try:
        answer = json.loads(buf)
    except json.JSONDecodeError as exc:
        raise ControlError(f"garbled answer from the runtime: {buf[:80]!r}") from exc
    if not answer.get("ok"):
        raise ControlError(str(answer.get("error", "unknown error")))
    return answer.get("result")
