"""Loopback networking helpers."""

from __future__ import annotations

import socket

__all__ = ["free_port"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago.

    Prefer binding servers to port 0 and reading the port back; use this only for servers
    (like Mosquitto) that must be told their port in a config file.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
