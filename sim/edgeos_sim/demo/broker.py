"""An embedded MQTT broker for the demo: amqtt, in this process, plain TCP on loopback.

::

    async with EmbeddedBroker() as broker:
        broker.url   # "mqtt://127.0.0.1:41234" (a free port, read back after binding)

Only for the one-command demo: no TLS, anonymous clients, no ACLs, and no shared subscriptions
(``$share/…``). Production and the test suite use Mosquitto (``edgeos_testing.mosquitto``).
The batches that cross it are still sealed with the device key, so the receiver still refuses
anything it cannot authenticate.
"""

from __future__ import annotations

import asyncio
import logging
from types import TracebackType
from typing import Any, Self

from edgeos.errors import TransportError

__all__ = ["EmbeddedBroker"]

# amqtt logs every connection and packet at INFO; the demo's log file wants the runtime's story.
_NOISY_LOGGERS = ("amqtt", "transitions")


class EmbeddedBroker:
    """amqtt on ``host:port`` (0 picks a free port); an async context manager."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self._requested_port = port
        self.port: int | None = None
        self._broker: Any = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("the broker is not running")
        return f"mqtt://{self.host}:{self.port}"

    async def start(self) -> None:
        """Bind and serve; raises :class:`TransportError` saying why when it cannot."""
        try:
            from amqtt.broker import Broker
        except ImportError as exc:
            raise TransportError(
                "the demo's embedded broker needs amqtt: pip install ./sim (it depends on amqtt)"
            ) from exc
        for name in _NOISY_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)
        config = {
            "listeners": {
                "default": {"type": "tcp", "bind": f"{self.host}:{self._requested_port}"}
            },
            # Only anonymous access: no $SYS publisher, no packet logger (they add tasks and
            # log lines, nothing the demo shows).
            "plugins": {
                "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}
            },
        }
        broker = Broker(config)
        try:
            await broker.start()
        except Exception as exc:  # amqtt wraps bind errors in BrokerError
            raise TransportError(f"embedded broker could not start: {exc}") from exc
        self._broker = broker
        server = broker._servers["default"].instance  # amqtt has no public "bound port"
        self.port = int(server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        """Disconnect every client and stop listening; idempotent."""
        broker, self._broker = self._broker, None
        if broker is None:
            return
        try:
            await broker.shutdown()
        except Exception as exc:  # best effort: the process is ending anyway
            logging.getLogger("edgeos_sim.demo").warning("embedded broker shutdown: %s", exc)
        self.port = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await asyncio.shield(self.close())
