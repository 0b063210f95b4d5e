"""The uplink as the runtime runs it: keyring, spool, batcher and publisher wired together.

Kept apart from :mod:`edgeos.uplink` (the library: wire format, crypto, spool, batcher,
publisher) so that the library stays usable on its own — by the receiver, the benchmarks and
the tests — and this file holds only the runtime's choices: where the spool lives, how the
parts are connected, and what the status surface shows.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from edgeos.clock import Clock
from edgeos.config import AnyTag, Config
from edgeos.uplink.batcher import Batcher, ScanSource, tag_table_from_config
from edgeos.uplink.commands import CommandLedger
from edgeos.uplink.publisher import Publisher, PublisherOptions
from edgeos.uplink.spool import Spool
from edgeos_protocol.crypto import Keyring, Suite

__all__ = ["UplinkRuntime"]


class UplinkRuntime:
    """Owns the uplink parts of one runtime (see the module docs)."""

    def __init__(
        self,
        config: Config,
        *,
        tags: Sequence[AnyTag],
        scan_source: ScanSource,
        drain_events: Callable[[], list[dict[str, Any]]],
        on_command: Callable[[dict[str, Any]], Awaitable[dict[str, Any]]],
        clock: Clock,
        skipped_scans: Callable[[], Sequence[list[Any]]] | None = None,
    ) -> None:
        self.config = config
        self.tags = tuple(tags)
        self.clock = clock
        # Refuses to start (ProvisioningError) when the key is missing or too widely readable.
        self.keyring = Keyring.load(config.uplink.key_file, config.uplink.retired_key_files)
        self._scan_source = scan_source
        self._drain_events = drain_events
        self._skipped_scans = skipped_scans
        self._on_command = on_command
        self.spool: Spool | None = None
        self.batcher: Batcher | None = None
        self.publisher: Publisher | None = None

    async def open(self) -> None:
        """Recover the spool from disk (in a thread: it reads every segment) and build the rest."""
        up = self.config.uplink
        spool = await asyncio.to_thread(
            Spool,
            self.config.device.state_dir / "spool",
            max_bytes=up.spool.max_bytes,
            segment_bytes=up.spool.effective_segment_bytes,
            full_policy=up.spool.full_policy,
            fsync=up.spool.fsync,
        )
        self.spool = spool
        suite = Suite.from_name(up.cipher)
        self.publisher = Publisher(
            PublisherOptions.from_config(self.config.device.id, up),
            spool=spool,
            keyring=self.keyring,
            clock=self.clock,
            on_command=self._on_command,
            # Commands applied survive restarts: a captured command replayed later is refused.
            command_ledger=await asyncio.to_thread(
                CommandLedger, self.config.device.state_dir / "commands.json"
            ),
        )
        self.batcher = Batcher(
            table=tag_table_from_config(self.tags),
            keyring=self.keyring,
            device=self.config.device.id,
            spool=spool,
            suite=suite,
            interval_s=up.interval_s,
            max_batch_samples=up.max_batch_samples,
            source=self._scan_source,
            drain_events=self._drain_events,
            skipped_scans=self._skipped_scans,
            on_stored=self.publisher.notify,
            clock=self.clock,
        )
        self.publisher.on_ack = self.batcher.on_ack

    def start(self, tg: asyncio.TaskGroup) -> None:
        assert self.batcher is not None and self.publisher is not None, "open() first"
        tg.create_task(self.batcher.run(), name="batcher")
        tg.create_task(self.publisher.run(), name="publisher")

    async def close(self) -> None:
        """Seal what is still open into the spool, then close the spool."""
        if self.batcher is not None:
            await self.batcher.flush()
        if self.spool is not None:
            await asyncio.to_thread(self.spool.close)

    def status(self) -> dict[str, Any]:
        if self.batcher is None or self.publisher is None or self.spool is None:
            return {"state": "starting"}
        b = self.batcher.stats()
        p = self.publisher.stats()
        s = self.spool.stats()
        return {
            "state": p.get("state"),
            "batches_sealed": b["batches"],
            "samples_sealed": b["samples"],
            "bytes_per_sample": b["bytes_per_sample"],
            "published": p.get("published"),
            "resent": p.get("resent"),
            "acked": p.get("acked"),
            "backlog_batches": len(self.spool),
            "spool_bytes": s.get("disk_bytes", 0),
            "last_ack_age_s": p.get("last_ack_age_s"),
            "dropped": s.get("dropped_records", 0) + b["refused_batches"],
            # Scans the scheduler skipped under overload, announced in the batches.
            "scans_skipped_announced": b["scans_skipped"],
            "batcher": b,
            "publisher": p,
            "spool": s,
        }

    def status_brief(self) -> str:
        doc = self.status()
        age = doc.get("last_ack_age_s")
        ack = "no ack yet" if age is None else f"last ack {age:.0f} s ago"
        return f"uplink {doc.get('state')}, backlog {doc.get('backlog_batches', 0)}, {ack}"
