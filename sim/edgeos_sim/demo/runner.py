"""The demo's orchestration: line, broker, receiver and runtime in one process, stopped in order.

Start order: state directory → simulated line (Modbus TCP + OPC UA) → embedded broker →
provisioning (receiver registry + device credentials) → receiver (SQLite) → runtime. Each part
is an async context (or a task wrapped in one), so they stop in the reverse order however the
demo ends — the duration elapsed, Ctrl-C/SIGTERM, or a part failed:

1. *drain*: the runtime seals its open batch and waits (a few seconds at most) until the
   receiver has acknowledged everything in the spool; a second Ctrl-C skips this;
2. the runtime stops (whatever arrived since is sealed into the spool on disk);
3. the receiver stops (storage closed), then the broker, then the line.

Before and after, the spool is read back and every batch in it is opened with the device key,
so the summary can check exactly that *samples stored by the receiver = samples sealed by the
runtime + samples spooled at the start (``--keep``) − samples still in the spool*.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
import time
from collections.abc import AsyncIterator, Coroutine, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import tomli_w
from rich.console import Console, RenderableType
from rich.live import Live

from edgeos_sim.demo.broker import EmbeddedBroker
from edgeos_sim.demo.dashboard import RateMeter, receiver_status, render_dashboard
from edgeos_sim.demo.state import (
    MODEL_TASKS,
    DemoError,
    DemoOptions,
    DemoPaths,
    count_spooled,
    find_models,
    prepare_state_dir,
)
from edgeos_sim.demo.summary import summarize

if TYPE_CHECKING:
    from edgeos.app import Runtime
    from edgeos.config import Config
    from edgeos_cloud.receiver.service import Receiver

__all__ = ["DemoRun", "print_error"]

log = logging.getLogger("edgeos_sim.demo")


@contextlib.asynccontextmanager
async def _background(
    coro: Coroutine[Any, Any, None], name: str, problems: list[str]
) -> AsyncIterator[asyncio.Task[None]]:
    """Run ``coro`` as a task for the block; on exit cancel it and wait until it has stopped.

    A failure of the task (before or during its shutdown) is logged with its traceback and
    added to ``problems``: the demo still stops the other parts and reports, it does not crash.
    """
    task = asyncio.create_task(coro, name=name)
    try:
        yield task
    finally:
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise
        except Exception as exc:  # reported, not raised: the remaining parts must still stop
            log.error("%s failed", name, exc_info=exc)
            problems.append(f"{name} failed: {exc!r}")


async def _first(*events: asyncio.Event, watch: Sequence[asyncio.Task[None]]) -> None:
    """Return once one of ``events`` is set or one of the ``watch``-ed tasks has ended.

    Bound it with an ``asyncio.timeout`` scope.
    """
    waiters = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait({*waiters, *watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)


def _short(path: Path) -> str:
    """``path`` relative to the working directory when it is below it (shorter hints)."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


class DemoRun:
    """One run of the demo (see the module docs); :meth:`run` returns the JSON summary."""

    def __init__(self, options: DemoOptions, *, console: Console | None = None) -> None:
        self.options = options
        self.console = console or Console()
        self.stop = asyncio.Event()
        self.signals = 0
        self.problems: list[str] = []
        self.started = time.monotonic()
        self.header: list[str] = []
        self.paths: DemoPaths | None = None
        self.device = ""
        self._log_stream: IO[str] | None = None
        self._rates = {"samples": RateMeter(), "batches": RateMeter()}
        self.last_gateway: dict[str, Any] | None = None
        self.receiver: Receiver | None = None
        self.runtime: Runtime | None = None

    # ------------------------------------------------------------------ signals, logging

    def _on_signal(self) -> None:
        self.signals += 1
        self.stop.set()

    def _setup_logging(self, path: Path) -> None:
        from edgeos.logs import setup_logging

        # The dashboard owns the terminal: every log line of every part goes to the file.
        self._log_stream = path.open("a", encoding="utf-8")
        setup_logging("plain", "INFO", stream=self._log_stream)

    def _close_logging(self) -> None:
        root = logging.getLogger()
        for handler in list(root.handlers):
            root.removeHandler(handler)
            handler.close()
        # Late records (library finalizers) must not reach logging's last-resort stderr
        # handler and print under the summary.
        root.addHandler(logging.NullHandler())
        if self._log_stream is not None:
            self._log_stream.close()
            self._log_stream = None

    # ------------------------------------------------------------------ run

    async def run(self) -> dict[str, Any]:
        """Run until the duration elapsed or a signal arrived; stop everything in order."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._on_signal)
        try:
            self.paths = prepare_state_dir(self.options.state_dir, keep=self.options.keep)
            self._setup_logging(self.paths.log)
            log.info("edgeos demo starting in %s", self.paths.root)
            return await self._run(self.paths)
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
            self._close_logging()

    async def _run(self, paths: DemoPaths) -> dict[str, Any]:
        from edgeos_sim import SimLine, SimOptions

        opts = self.options
        sim_options = SimOptions(
            nests=opts.nests,
            tags_per_nest=opts.tags_per_nest,
            opcua_tags="key",
            seed=opts.seed,
            cycle_s=opts.cycle_s,
        )
        spool_dir, registry_dir = paths.gateway / "spool", paths.receiver / "registry"
        self._status("starting the simulated line (Modbus TCP + OPC UA) and the broker …")
        clean = False
        async with SimLine(sim_options) as line, EmbeddedBroker() as broker:
            assert line.modbus_port is not None
            config = self._write_configs(paths, line.modbus_port, line.opcua_url, broker.url)
            self.device = config.device.id
            before = await asyncio.to_thread(count_spooled, spool_dir, registry_dir, self.device)
            self.header = [
                f"edgeos demo · line: {opts.nests} presses × {opts.tags_per_nest} tags, "
                f"Modbus TCP 127.0.0.1:{line.modbus_port} + OPC UA {line.opcua_url} (key tags)",
                f"broker {broker.url} (embedded amqtt, loopback; batches still AEAD-sealed)",
            ]
            if not self.stop.is_set():
                clean = await self._run_services(paths, config)
            self._status("stopping the broker and the simulated line …")
        after = await asyncio.to_thread(count_spooled, spool_dir, registry_dir, self.device)
        return summarize(self, clean, before, after)

    def _status(self, text: str) -> None:
        if not self.options.as_json:
            self.console.print(f"[dim]{text}[/dim]")

    # ------------------------------------------------------------------ configuration

    def _provision(self, paths: DemoPaths, device: str, broker_url: str) -> Path:
        """Register the device with the receiver and install its credentials (key 0600)."""
        from edgeos.provision import install_bundle
        from edgeos_cloud.receiver.pki import CertificateAuthority
        from edgeos_cloud.receiver.provisioning import create_device
        from edgeos_cloud.receiver.registry import DeviceRegistry

        registry = DeviceRegistry(paths.receiver / "registry")
        key_file = paths.credentials / "device.key"
        known = registry.get(device) is not None
        if known and key_file.exists():
            return key_file  # --keep: the same device, the same key
        if known or key_file.exists():
            raise DemoError(
                f"{paths.root} holds half a registration of {device!r}; "
                "start once without --keep to reset it"
            )
        ca = CertificateAuthority.open_or_create(paths.receiver / "registry" / "ca")
        bundle = paths.receiver / "bundles" / f"{device}.credentials.json"
        create_device(registry, ca, device, broker_url, bundle)
        installed = install_bundle(bundle, paths.credentials)
        return installed.key_file

    def _write_configs(
        self, paths: DemoPaths, modbus_port: int, opcua_url: str | None, broker_url: str
    ) -> Any:
        from edgeos.config import load_config
        from edgeos_sim.line import line_config

        opts = self.options
        overrides: dict[str, Any] = {
            "uplink": {"enabled": True, "broker": broker_url, "interval_s": 2},
        }
        models = find_models(opts.models_dir) if opts.inference else None
        if opts.inference and models is None:
            self.problems.append(
                "inference off: models/{anomaly,quality,correction}.toml not found "
                "(pass --models DIR)"
            )
        if models is not None:
            overrides["inference"] = {
                "enabled": True,
                "models": [
                    {"name": t, "manifest": str(models / f"{t}.toml"), "role": "champion"}
                    for t in MODEL_TASKS
                ],
                "guard": {"enabled": True, "alpha": 0.005},
            }
        doc = line_config(
            modbus_port=modbus_port,
            opcua_url=opcua_url,
            state_dir=paths.gateway,
            nests=opts.nests,
            tags_per_nest=opts.tags_per_nest,
            overrides=overrides,
        )
        key_file = self._provision(paths, doc["device"]["id"], broker_url)
        doc["uplink"]["key_file"] = str(key_file)
        paths.config.write_text(
            "# Written by `edgeos demo` for this run; try\n"
            f"#   edgeos status --config {paths.config}\n\n" + tomli_w.dumps(doc)
        )
        receiver_doc = {
            "public_broker_url": broker_url,
            "broker": {
                "url": broker_url,
                # amqtt has no shared subscriptions: one receiver, plain subscription.
                "group": "",
                "reconnect_s": 0.5,
            },
            "storage": {"url": "sqlite:///receiver.db"},
            "registry": {"dir": "registry"},
            "metrics": {"listen": "127.0.0.1:0"},
        }
        paths.receiver_config.write_text(
            "# Written by `edgeos demo` for this run; try\n"
            f"#   edgeos-receiver devices --config {paths.receiver_config}\n\n"
            + tomli_w.dumps(receiver_doc)
        )
        return load_config(paths.config)

    # ------------------------------------------------------------------ the services

    async def _run_services(self, paths: DemoPaths, config: Config) -> bool:
        """Receiver, then runtime; the dashboard; then stop them in reverse. True when clean."""
        from edgeos.app import Runtime
        from edgeos_cloud.receiver.config import load_receiver_config
        from edgeos_cloud.receiver.service import Receiver

        problems_before = len(self.problems)
        receiver = self.receiver = Receiver(load_receiver_config(paths.receiver_config))
        self._status("starting the receiver …")
        async with _background(receiver.run(), "receiver", self.problems) as rx_task:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(30):
                    await _first(receiver.ready, self.stop, watch=[rx_task])
            if self.stop.is_set():
                return True
            if not receiver.ready.is_set():
                self.problems.append("the receiver did not subscribe to the broker in 30 s")
                return False
            self._status("starting the runtime …")
            runtime = self.runtime = Runtime(config)
            async with _background(runtime.run(), "runtime", self.problems) as rt_task:
                tasks = [rt_task, rx_task]
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(60):
                        await _first(runtime.ready, self.stop, watch=tasks)
                if runtime.ready.is_set() and not self.stop.is_set():
                    await self._show(runtime, receiver, tasks)
                    if not any(t.done() for t in tasks):
                        await self._drain(runtime)
                elif not self.stop.is_set() and not rt_task.done():
                    self.problems.append("the runtime did not become ready in 60 s")
                for task in tasks:
                    if task.done() and not self.stop.is_set() and self._deadline_left() > 0:
                        self.problems.append(f"the {task.get_name()} stopped by itself")
                runtime.request_stop()  # the cancellation _background sends next is meant
            # Stopped: the last status holds the final counters (the open batch is sealed).
            self.last_gateway = runtime.status()
        return len(self.problems) == problems_before

    def _deadline_left(self) -> float:
        if self.options.duration_s is None:
            return float("inf")
        return self.options.duration_s - (time.monotonic() - self.started)

    def _frame(self, runtime: Runtime, receiver: Receiver) -> RenderableType:
        rx = receiver_status(receiver.metrics.registry)
        now = time.monotonic()
        rates = {
            "samples": self._rates["samples"].observe(rx["samples"], now),
            "batches": self._rates["batches"].observe(rx["batches"], now),
        }
        gateway = runtime.status()
        self.last_gateway = gateway
        assert self.paths is not None
        header = [
            *self.header,
            f"receiver metrics http://127.0.0.1:{receiver.metrics_port}/metrics · "
            f"logs {self.paths.log}",
        ]
        left = self._deadline_left()
        remaining = "" if left == float("inf") else f" (or wait {max(0.0, left):.0f} s)"
        gw, rx_config = _short(self.paths.config), _short(self.paths.receiver_config)
        hints = [
            f"edgeos status --config {gw}",
            f"edgeos twin get 'nest01.*' --config {gw}",
            f"edgeos learning off --config {gw}",
            f"edgeos-receiver devices --config {rx_config}",
            f"edgeos-receiver query --config {rx_config} --device {self.device} "
            "--tag nest01.heater.pv --limit 5",
        ]
        return render_dashboard(
            header,
            gateway,
            rx,
            rates,
            width=self.console.width,
            hints=hints,
            footer=f"Ctrl-C stops everything in order{remaining}",
        )

    async def _show(
        self, runtime: Runtime, receiver: Receiver, tasks: list[asyncio.Task[None]]
    ) -> None:
        """The dashboard (or, with ``--json``, a quiet wait) until it is time to stop."""
        period = 1.0 / self.options.refresh_hz
        live: Live | None = None
        if not self.options.as_json:
            live = Live(console=self.console, auto_refresh=False, transient=False)
            live.start()
        try:
            while not self.stop.is_set() and not any(t.done() for t in tasks):
                if live is not None:
                    live.update(self._frame(runtime, receiver), refresh=True)
                step = min(period, self._deadline_left())
                if step <= 0:
                    break
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(step):
                        await _first(self.stop, watch=tasks)
        finally:
            if live is not None:
                live.update(self._frame(runtime, receiver), refresh=True)
                live.stop()
                self.console.line()
        self._status("stopping: sealing the last batch and waiting for its ack …")

    async def _drain(self, runtime: Runtime) -> None:
        """Seal the open batch and wait (bounded) until the receiver acknowledged the spool."""
        up = runtime.uplink
        if up is None or up.batcher is None or up.spool is None:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.options.drain_s):
                await up.batcher.flush()
                while len(up.spool) and self.signals < 2:  # noqa: ASYNC110 - spool has no event
                    await asyncio.sleep(0.05)


def print_error(message: str) -> None:
    print(f"edgeos demo: {message}", file=sys.stderr)
