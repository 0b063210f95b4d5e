"""The Runtime: builds every part from the configuration and runs them under one TaskGroup.

Start-up order (each step can refuse to start with a message that says what to fix):

1. state directory, device key (refused when readable by group/others), spool recovery;
2. twin (restored from the last snapshot with quality ``stale``), drivers + supervisors,
   scheduler jobs (one per connection and scan group), subscription sinks;
3. the root ``asyncio.TaskGroup``: supervisors, scheduler, desired-state writes, snapshots,
   batcher, publisher, control socket, metrics, watchdog;
4. READY once every scan group has ticked (or ``ready_timeout_s`` passed).

Shutdown (SIGTERM/SIGINT, or cancellation): the TaskGroup is cancelled, then the open batch is
sealed into the spool, the twin snapshot is written and the spool closed — an accepted sample is
on disk before the process exits.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from edgeos import __version__
from edgeos.clock import Clock, SystemClock
from edgeos.clockwatch import ClockWatch
from edgeos.config import Config
from edgeos.control import ControlServer, twin_handlers, wait_outcome
from edgeos.driver import ReadResult, TagBinding, Value, load_driver_class
from edgeos.errors import (
    ConfigError,
    ProvisioningError,
    StorageError,
    TransportError,
    WriteRefused,
)
from edgeos.gcpolicy import GcPolicy
from edgeos.memory import process_figures
from edgeos.metrics import MetricsServer, make_registry
from edgeos.scheduler import ReadyFn, Scheduler
from edgeos.supervisor import Backoff, ConnectionSupervisor, ConnState, Timeouts
from edgeos.systemd import Notifier, watchdog_interval_s
from edgeos.twin import Twin
from edgeos.uplink_runtime import UplinkRuntime
from edgeos_protocol.validation import format_validation_error

if TYPE_CHECKING:
    from edgeos.inference_runtime import InferenceLoop
    from edgeos.northbound import Northbound
    from edgeos.renewal import CertificateRenewer

__all__ = ["Runtime"]

log = logging.getLogger("edgeos.runtime")

#: Past twice a connection's connect timeout, its first scan runs even if the first connect
#: attempt has not been seen to end (a backstop; the attempt is bounded by the supervisor).
_FIRST_CONNECT_SLACK_S = 5.0

EventSource = Callable[[], list[dict[str, Any]]]


class _SupervisedWrites:
    """The twin's write path: route a desired value to its connection's supervisor."""

    def __init__(self, supervisors: dict[str, ConnectionSupervisor]) -> None:
        self._supervisors = supervisors

    async def write(self, binding: TagBinding, value: Value) -> None:
        sup = self._supervisors.get(binding.tag.connection)
        if sup is None:
            raise WriteRefused(
                binding.tag.name, f"connection {binding.tag.connection!r} is disabled"
            )
        await sup.write(binding.tag.name, value)


class Runtime:
    """One gateway: machines → twin → (inference) → uplink, plus control and health."""

    def __init__(
        self,
        config: Config,
        *,
        clock: Clock | None = None,
        notifier: Notifier | None = None,
        ready_timeout_s: float = 10.0,
        config_path: Path | None = None,
    ) -> None:
        from edgeos.profile import effective_config

        # The operator's file plus the active slot's profile, re-validated against the file
        # (docs/fleet.md#profiles); the file alone when the profile does not fit.
        self.profile = effective_config(config, config_path=config_path)
        config = self.profile.config
        self.config = config
        self.clock = clock or SystemClock()
        self.notifier = notifier or Notifier()
        self.ready_timeout_s = ready_timeout_s
        self.state = "starting"
        self.started_at = time.monotonic()
        self.state_dir = config.device.state_dir
        self._event_sources: list[EventSource] = []
        self._status_providers: dict[str, Callable[[], dict[str, Any]]] = {}
        self._progress = 0
        self._last_progress_seen = -1
        self._health_progress = -1
        self.ready = asyncio.Event()

        tags = list(config.all_tags)
        stations: list[str] = []
        if config.inference.enabled:
            from edgeos.inference_runtime import find_stations, gate_tags

            stations = find_stations(config)
            tags.extend(gate_tags(stations))  # derived: verdicts live in the twin too
        self.bindings = [TagBinding(i, t) for i, t in enumerate(tags) if t.derived is None]
        self.twin = Twin(
            tags,
            config.twin,
            clock=self.clock,
            scan_groups=config.scan_groups,
            keep_scan_log=config.uplink.enabled,  # the batcher is its only consumer
        )
        self._event_sources.append(self.twin.drain_events)
        self._event_sources.append(self.profile.drain_events)  # config_summary, once per start
        self.clockwatch = ClockWatch(self.clock)
        self._event_sources.append(self.clockwatch.drain_events)

        self.inference: InferenceLoop | None = None
        if config.inference.enabled:
            from edgeos.inference_runtime import InferenceLoop

            self.inference = InferenceLoop(config, self.twin, stations, clock=self.clock)
            self._event_sources.append(self.inference.drain_events)
            self._status_providers["inference"] = self.inference.stats
            self._status_providers["gates"] = self._gates_status
            self._status_providers["guard"] = self._guard_status
        from edgeos.profile import FingerprintReport

        # fleet_fingerprint with the champion versions in force, once per start (docs/fleet.md).
        models = self.inference.engine.registry if self.inference is not None else ()
        self._event_sources.append(FingerprintReport(config, models, self.clock.time).drain_events)

        # The plant side (Sparkplug B, OPC UA server): off the scan loop, in its own tasks.
        self.northbound: Northbound | None = None
        if config.northbound.enabled:
            from edgeos.northbound import Northbound

            self.northbound = Northbound(
                config.northbound,
                self.twin,
                device_id=config.device.id,
                clock=self.clock,
                inference=self.inference,
                state_dir=config.device.state_dir,
            )
            self._status_providers["northbound"] = self.northbound.stats

        self.supervisors: dict[str, ConnectionSupervisor] = {}
        by_conn: dict[str, list[TagBinding]] = {}
        for b in self.bindings:
            by_conn.setdefault(b.tag.connection, []).append(b)
        scan_periods_ms = {g.name: g.period_ms for g in config.scan_groups}
        for conn in config.connections:
            if not conn.enabled:
                continue
            bindings = by_conn.get(conn.name, [])
            cls = load_driver_class(conn.driver)
            try:
                context = conn.driver_context(
                    bindings, clock=self.clock, scan_periods_ms=scan_periods_ms
                )
            except ValidationError as exc:
                prefix = f"connections[{config.connections.index(conn)}].options"
                raise ConfigError(format_validation_error(exc, prefix=prefix)) from exc
            driver = cls(context)
            driver.set_subscription_sink(self._on_notification)
            self.supervisors[conn.name] = ConnectionSupervisor(
                conn.name,
                driver,
                bindings,
                clock=self.clock,
                timeouts=Timeouts(
                    request_s=context.options.request_timeout_s,
                    scan_s=conn.scan_timeout_s,
                    connect_s=context.options.connect_timeout_s,
                ),
                backoff=Backoff(conn.reconnect.policy()),
            )

        self.gc = GcPolicy()
        # Skipped scans are announced in the batches (the batcher is the skip log's consumer).
        self.scheduler = Scheduler(
            self.clock, config.scan_groups, gc_policy=self.gc, skip_log=config.uplink.enabled
        )
        for name, sup in self.supervisors.items():
            polled = {b.tag.scan_group for b in by_conn.get(name, []) if b.tag.polled}
            for group in sorted(polled):
                self.scheduler.add_job(
                    group, name, self._scan_job(sup, group), ready=self._first_attempt_ended(sup)
                )

        self.uplink: UplinkRuntime | None = None
        if config.uplink.enabled:
            self.uplink = UplinkRuntime(
                config,
                tags=tags,
                scan_source=self.twin.scan_log,
                skipped_scans=self._skipped_scans,
                drain_events=self._drain_events,
                on_command=self._on_command,
                clock=self.clock,
            )

        # Client-certificate renewal (docs/credentials.md): needs TLS and the cloud's URL.
        self.renewer: CertificateRenewer | None = None
        tls = config.uplink.tls
        if self.uplink is not None and tls is not None and config.ota.repository_url:
            from edgeos.renewal import CertificateRenewer, RenewalSettings

            r = config.ota.renewal
            self.renewer = CertificateRenewer(
                RenewalSettings(
                    device=config.device.id,
                    url=config.ota.repository_url,
                    cert_file=tls.cert_file,
                    key_file=tls.key_file,
                    ca_file=tls.ca_file,
                    broker=config.uplink.broker,
                    renew_before_days=r.renew_before_days,
                    check_interval_s=r.check_interval_s,
                    retry_s=r.retry_s,
                ),
                self.uplink.keyring,
                connects=self._uplink_connects,
            )
            self._event_sources.append(self.renewer.drain_events)
        self._status_providers["credentials"] = self._credentials_status

    # ------------------------------------------------------------- data path

    def _scan_job(self, sup: ConnectionSupervisor, group: str) -> Callable[[], Awaitable[None]]:
        async def scan() -> None:
            result = await sup.read(group)
            if len(result):
                self.twin.apply(result, self.clock.time())
            self._progress += 1

        return scan

    def _first_attempt_ended(self, sup: ConnectionSupervisor) -> ReadyFn:
        """A connection's first scan waits until its first connect attempt has ended (up or
        down): a scan before that would report BAD_COMM for a PLC that is up and only still
        being connected to. The attempt is bounded by the supervisor's own connect timeout;
        the gate's bound is a backstop well past it (twice the timeout plus 5 s), so that on
        a busy machine — where the attempt's completion can be seen a little after its
        timeout — the gate never opens while the attempt is still running."""
        deadline: float | None = None

        def ready() -> bool:
            nonlocal deadline
            if sup.state is not ConnState.CONNECTING:
                return True
            now = self.clock.monotonic()
            if deadline is None:
                deadline = now + 2 * sup.connect_timeout_s + _FIRST_CONNECT_SLACK_S
            return now >= deadline

        return ready

    def _skipped_scans(self) -> list[list[Any]]:
        """Runs of ticks that started no scan, as ``meta["scans_skipped"]`` entries."""
        return [run.wire() for run in self.scheduler.drain_skips()]

    def _on_notification(self, result: ReadResult) -> None:
        self.twin.apply(result, self.clock.time())

    def add_event_source(self, source: EventSource) -> None:
        """Events (verdicts, guard decisions, write outcomes) the uplink should carry."""
        self._event_sources.append(source)

    def _drain_events(self) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        for source in self._event_sources:
            events.extend(source())
        return events

    async def _on_command(self, payload: dict[str, Any]) -> dict[str, Any]:
        """A desired-state command from the receiver: apply each tag, report each outcome."""
        desired = payload.get("desired")
        results: dict[str, Any] = {}
        if not isinstance(desired, dict):
            return {
                "id": payload.get("id"),
                "version": payload.get("version"),
                "ok": False,
                "results": {"error": "command has no 'desired' mapping"},
            }
        changes = {}
        for name, value in desired.items():
            try:
                changes[name] = self.twin.set_desired(str(name), value, source="cloud")
            except KeyError:
                results[str(name)] = {"status": "refused", "reason": "unknown tag"}
        for name, change in changes.items():
            await wait_outcome(change, 15.0)
            results[name] = {
                "status": change.status,
                "reason": change.reason,
                "version": change.version,
            }
        ok = all(r["status"] == "applied" for r in results.values())
        return {
            "id": payload.get("id"),
            "version": payload.get("version"),
            "ok": ok,
            "results": results,
        }

    # --------------------------------------------------------------- control

    async def _op_status(self, _: dict[str, Any]) -> dict[str, Any]:
        return self.status()

    async def _op_debug_memory(self, req: dict[str, Any]) -> dict[str, Any]:
        """Heap walk and tracemalloc view, for diagnosis. Runs in a worker thread: with
        tracemalloc on, a snapshot of a few hundred thousand traces takes seconds, and on the
        loop that stalled every scan (the scan loop slows down meanwhile, it does not stop)."""
        from edgeos.memory import memory_report

        dump = req.get("dump")
        return await asyncio.to_thread(
            memory_report,
            top=int(req.get("top", 20)),
            dump=Path(str(dump)) if dump is not None else None,
        )

    async def _op_learning(self, req: dict[str, Any]) -> dict[str, Any]:
        if self.inference is None:
            raise ValueError("inference is not enabled in this configuration")
        return self.inference.set_learning(
            bool(req["enabled"]), who=str(req.get("who", "operator"))
        )

    async def _op_models_updated(self, req: dict[str, Any]) -> list[dict[str, Any]]:
        """OTA models-only update: every manifest in ``path`` enters as a challenger."""
        if self.inference is None:
            raise ValueError("inference is not enabled in this configuration")
        events: list[dict[str, Any]] = self.inference.engine.on_models_updated(Path(req["path"]))
        for event in events:
            self.inference._events.append(event)
        return events

    async def _op_profile_export(self, req: dict[str, Any]) -> dict[str, Any]:
        """The tunables in force (file + applied profile) as a profile document."""
        profile = self.profile.export(
            name=str(req.get("name") or ""), version=int(req.get("version") or 1)
        )
        return profile.model_dump(mode="json")

    async def _op_profile_summary(self, _: dict[str, Any]) -> dict[str, Any]:
        return self.profile.summary().model_dump(mode="json")

    def _gates_status(self) -> dict[str, Any]:
        assert self.inference is not None
        gate = self.inference.engine.gate
        return {"verdicts": gate.stats()["verdicts"]} if gate is not None else {}

    def _guard_status(self) -> dict[str, Any]:
        assert self.inference is not None
        guard = self.inference.engine.guard
        if guard is None:
            return {}
        st = guard.stats()
        return {"learning": st["learning"], "slack": st["slack"], **st["counts"]}

    # ---------------------------------------------------------------- health

    def _healthy(self) -> bool:
        """The scan loop made progress since the last look (a stalled loop stops pinging)."""
        progressed = self._progress != self._last_progress_seen
        self._last_progress_seen = self._progress
        # With no polled tags (subscriptions only) the watchdog task running at all is the proof.
        return progressed or not any(self.scheduler.jobs(g.name) for g in self.config.scan_groups)

    def status_line(self) -> str:
        up = sum(1 for s in self.supervisors.values() if s.is_up)
        line = (
            f"{self.state}: {len(self.bindings)} tags, {up}/{len(self.supervisors)} connections up"
        )
        if self.uplink is not None:
            line += f", {self.uplink.status_brief()}"
        return line

    def status(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "device": self.config.device.id,
            "version": __version__,
            "state": self.state,
            "uptime_s": round(time.monotonic() - self.started_at, 1),
            "status_line": self.status_line(),
            "connections": [s.stats() for s in self.supervisors.values()],
            "scan_groups": self.scheduler.stats().get("groups", {}),
            "twin": self.twin.stats(),
            "gc": self.gc.stats(),
            "process": process_figures(),
            "clock": self.clockwatch.stats(),
        }
        if self.uplink is not None:
            doc["uplink"] = self.uplink.status()
        for name, provider in self._status_providers.items():
            doc[name] = provider()
        return doc

    def _uplink_connects(self) -> int:
        publisher = self.uplink.publisher if self.uplink is not None else None
        return publisher.counters.connects if publisher is not None else 0

    def _credentials_status(self) -> dict[str, Any]:
        """Expiry (Unix time) of the client certificate, the CA bundle and trusted TUF roles."""
        from edgeos.renewal import tuf_expiries

        doc = self.renewer.status() if self.renewer is not None else {}
        doc.update(tuf_expiries(self.ota_root() / "tuf" / "metadata"))
        return doc

    def add_status_provider(self, name: str, provider: Callable[[], dict[str, Any]]) -> None:
        """A part (inference, OTA) that adds a section to the status document."""
        self._status_providers[name] = provider

    # ------------------------------------------------------------------- run

    def _snapshot_path(self) -> Path:
        return self.state_dir / "twin.snapshot"

    def _control_path(self) -> Path:
        sock = self.config.control.socket
        return sock if sock.is_absolute() else self.state_dir / sock

    async def run(self) -> None:
        """Run until cancelled (SIGTERM/SIGINT cancel it); always shuts down in order."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        snapshot = self._snapshot_path()
        if snapshot.exists():
            try:
                if self.twin.restore(snapshot):
                    log.info("twin restored from %s (values stale until read)", snapshot)
            except StorageError as exc:
                log.warning("twin snapshot not used: %s", exc)
        if self.uplink is not None:
            await self.uplink.open()
        try:
            async with asyncio.TaskGroup() as tg:
                for sup in self.supervisors.values():
                    tg.create_task(sup.run(), name=f"supervisor:{sup.name}")
                tg.create_task(self.scheduler.run(), name="scheduler")
                tg.create_task(self.clockwatch.run(), name="clockwatch")
                if self.renewer is not None:
                    tg.create_task(self.renewer.run(), name="cert-renewal")
                if self.inference is not None:
                    tg.create_task(self.inference.run(), name="inference")
                tg.create_task(
                    self.twin.run_writes(_SupervisedWrites(self.supervisors)), name="writes"
                )
                tg.create_task(self.twin.run_snapshots(snapshot), name="snapshots")
                if self.northbound is not None:
                    tg.create_task(self.northbound.run(), name="northbound")
                if self.uplink is not None:
                    self.uplink.start(tg)
                handlers = {
                    "status": self._op_status,
                    **twin_handlers(self.twin),
                    "inference.learning": self._op_learning,
                    "models.updated": self._op_models_updated,
                    "debug.memory": self._op_debug_memory,
                    "profile.export": self._op_profile_export,
                    "profile.summary": self._op_profile_summary,
                }
                tg.create_task(ControlServer(self._control_path(), handlers).run(), name="control")
                if self.config.control.metrics_listen:
                    metrics = MetricsServer(
                        self.config.control.metrics_listen, make_registry(self.status)
                    )
                    tg.create_task(metrics.run(), name="metrics")
                interval = watchdog_interval_s()
                if interval is not None:
                    tg.create_task(
                        self.notifier.watchdog_task(self._healthy, interval), name="watchdog"
                    )
                tg.create_task(self._announce_ready(), name="ready")
                if self.config.ota.enabled:
                    tg.create_task(self._report_health(), name="ota-health")
        finally:
            await asyncio.shield(self._shutdown())

    def request_stop(self) -> None:
        """Report ``stopping`` ahead of the cancellation that stops :meth:`run`.

        Only the reported state: shutdown does not depend on it. A cancellation lost inside an
        MQTT client is recognised from ``Task.cancelling()`` (``edgeos_protocol.aio``).
        """
        self.state = "stopping"

    def ota_root(self) -> Path:
        root = self.config.ota.slots_dir
        return root if root.is_absolute() else self.state_dir / root

    def health_report(self) -> Any:
        """What the OTA trial monitor judges a new slot by (see docs/ota.md)."""
        from edgeos.ota.slots import HealthReport

        progressed = self._progress != self._health_progress
        self._health_progress = self._progress
        acks = True
        if self.uplink is not None:
            age = self.uplink.status().get("last_ack_age_s")
            acks = age is not None and age < max(30.0, 5 * self.config.uplink.interval_s)
        up = sum(1 for s in self.supervisors.values() if s.is_up)
        return HealthReport(
            service_ready=self.ready.is_set(),
            watchdog_alive=progressed or not self.scheduler_has_jobs(),
            drivers_connected=up,
            drivers_total=len(self.supervisors),
            acks_flowing=acks,
            detail=self.status_line(),
        )

    def scheduler_has_jobs(self) -> bool:
        return any(self.scheduler.jobs(g.name) for g in self.config.scan_groups)

    async def _report_health(self, interval_s: float = 2.0) -> None:
        """Write the OTA health file; the commit watcher reads it (a dead runtime stops writing)."""
        from edgeos.ota.slots import HealthFile

        root = self.ota_root()
        await asyncio.to_thread(root.mkdir, parents=True, exist_ok=True)
        health = HealthFile(root / "health.json")
        while True:
            await asyncio.sleep(interval_s)
            try:
                await asyncio.to_thread(health.report, self.health_report())
            except OSError as exc:
                log.warning("could not write the OTA health file: %s", exc)

    async def _announce_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout_s
        groups = self.scheduler.stats().get("groups", {})
        while time.monotonic() < deadline:
            groups = self.scheduler.stats().get("groups", {})
            if all(g.get("ticks", 0) > 0 for g in groups.values()):
                break
            await asyncio.sleep(0.05)
        self.gc.start()
        self.state = "running"
        self.notifier.ready(self.status_line())
        self.ready.set()
        log.info("ready: %s", self.status_line())
        while True:
            await asyncio.sleep(5)
            self.notifier.status(self.status_line())

    async def _shutdown(self) -> None:
        self.state = "stopping"
        self.notifier.stopping()
        self.gc.stop()
        if self.uplink is not None:
            try:
                await self.uplink.close()
            except Exception:
                log.exception("uplink did not close cleanly")
        try:
            await asyncio.to_thread(self.twin.save_snapshot, self._snapshot_path())
        except (OSError, StorageError) as exc:
            log.error("could not write the twin snapshot: %s", exc)
        log.info("stopped")


def run_forever(config: Config, *, config_path: Path | None = None) -> int:
    """Run the runtime in this process until SIGTERM/SIGINT; the ``edgeos run`` entry point."""
    from edgeos.gcpolicy import new_event_loop

    loop = new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        runtime = Runtime(config, config_path=config_path)
        # Fail start here, with the path, rather than deep inside the first snapshot or spool.
        runtime.state_dir.mkdir(parents=True, exist_ok=True)
    except (ConfigError, ProvisioningError, StorageError, TransportError) as exc:
        log.error("cannot start: %s", exc)
        return 2
    except OSError as exc:
        log.error(
            "cannot start: state directory %s is not usable (%s); set [device] state_dir to a "
            "writable folder, or run as the service user",
            config.device.state_dir,
            exc.strerror or exc,
        )
        return 2
    main = loop.create_task(runtime.run(), name="runtime")
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, main.cancel)
    try:
        loop.run_until_complete(main)
    except asyncio.CancelledError:
        pass
    except BaseExceptionGroup as group:
        # e.g. an OPC UA password file readable by others: fail start, say what to fix.
        fatal, rest = group.split((ProvisioningError, ConfigError))
        if rest is not None:
            raise
        assert fatal is not None
        for problem in fatal.exceptions:
            log.error("cannot run: %s", problem)
        return 2
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
    return 0
