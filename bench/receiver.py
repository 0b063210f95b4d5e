"""Receiver throughput: open + decode, and open + decode + store + ack (SQLite, PostgreSQL).

Realistic batches: a 16,000-tag line (``edgeos_testing.uplink_synth``: int16-scaled slow process
values, every tenth tag boolean) × 3 scans per batch, sealed with the real wire format. The
store path runs in this one process exactly as the receiver's writer thread does (one
transaction per batch, then the ack is sealed); MQTT transport is not included.

Prints ONE JSON object. ``--quick`` finishes in well under a minute.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from edgeos_cloud.receiver.ingest import BatchOpener
from edgeos_cloud.receiver.registry import DeviceRegistry
from edgeos_cloud.receiver.storage import IngestBatch, open_storage
from edgeos_protocol.crypto import Epoch, Keyring
from edgeos_protocol.wire import Batch, ControlKind, Group, encode_body, seal_batch, seal_control
from edgeos_testing.uplink_synth import SyntheticLine

T0 = 1_700_000_000_000_000


def make_batches(registry: DeviceRegistry, device: str, count: int, scans: int = 3) -> list[bytes]:
    record = registry.get(device) or registry.add(device)
    epoch = Epoch.new(Keyring.of(record.current_key), device)
    line = SyntheticLine()
    out = []
    for b in range(count):
        rows = [line.scan() for _ in range(scans)]
        group = Group(
            np.array([T0 + (b * scans + i) * 1_000_000 for i in range(scans)], np.int64),
            np.arange(line.tag_count, dtype=np.int32),
            np.stack([r[0] for r in rows]),
            np.stack([r[1] for r in rows]),
        )
        out.append(seal_batch(epoch, encode_body(Batch(line.table, [group])), T0)[1])
    return out


def bench_decode(opener: BatchOpener, sealed: list[bytes], device: str) -> dict[str, Any]:
    opener.open(sealed[0], T0, device)  # warm the epoch key cache
    wall, cpu = time.perf_counter(), time.process_time()
    samples = sum(opener.open(s, T0, device).sample_count for s in sealed)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {"samples": samples, "wall_s": round(wall, 3), "samples_per_s": round(samples / wall)}


def bench_store(
    url: str,
    opener: BatchOpener,
    registry: DeviceRegistry,
    sealed: list[bytes],
    device: str,
    sqlite_synchronous: str = "full",
) -> dict[str, Any]:
    storage = open_storage(url, sqlite_synchronous=sqlite_synchronous)
    key = registry.get(device)
    assert key is not None
    try:
        # The first batch of a device registers its 16,000 tags: measured separately.
        first = time.perf_counter()
        storage.store([opener.open(sealed[0], T0, device)])
        first = time.perf_counter() - first
        wall, cpu = time.perf_counter(), time.process_time()
        samples = 0
        for i, payload in enumerate(sealed[1:], start=1):
            batch: IngestBatch = opener.open(payload, T0, device)
            (outcome,) = storage.store([batch])
            seal_control(
                ControlKind.ACK,
                {"epoch": batch.epoch, "seq": outcome.ack_seq},
                key.current_key,
                device,
                i,
                key_id=key.current_key_id,
            )
            samples += batch.sample_count
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    finally:
        storage.close()
    return {
        "samples": samples,
        "wall_s": round(wall, 3),
        "cpu_s": round(cpu, 3),
        "samples_per_s": round(samples / wall),
        # CPU of this process only (for PostgreSQL the server's work is not in it).
        "samples_per_process_cpu_s": round(samples / cpu) if cpu > 0 else None,
        "first_batch_s": round(first, 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer batches (< 1 minute)")
    parser.add_argument("--no-postgres", action="store_true")
    parser.add_argument(
        "--sqlite-synchronous",
        choices=["full", "normal"],
        default="full",
        help="storage.sqlite_synchronous (default full: an ack survives power loss)",
    )
    args = parser.parse_args(argv)
    n_decode, n_store = (10, 8) if args.quick else (40, 30)
    result: dict[str, Any] = {"benchmark": "receiver", "tags": 16_000, "scans_per_batch": 3}
    with tempfile.TemporaryDirectory() as tmp:
        registry = DeviceRegistry(Path(tmp) / "registry")
        opener = BatchOpener(registry)
        sealed = make_batches(registry, "bench", max(n_decode, n_store))
        result["sealed_bytes_per_batch"] = len(sealed[0])
        dec = bench_decode(opener, sealed[:n_decode], "bench")
        result["decode_samples_per_s"] = dec["samples_per_s"]
        result["decode"] = dec
        sq = bench_store(
            f"sqlite:///{tmp}/bench.db",
            opener,
            registry,
            sealed[:n_store],
            "bench",
            args.sqlite_synchronous,
        )
        sq["synchronous"] = args.sqlite_synchronous
        result["sqlite_samples_per_s"] = sq["samples_per_s"]
        result["sqlite"] = sq
        result["postgres_samples_per_s"] = None
        if not args.no_postgres:
            from edgeos_testing.receiver import PostgresUnavailable, postgres_database

            try:
                with postgres_database("edgeos_bench") as url:
                    pg = bench_store(url, opener, registry, sealed[:n_store], "bench")
                result["postgres_samples_per_s"] = pg["samples_per_s"]
                result["postgres"] = pg
            except PostgresUnavailable as exc:
                result["postgres_skipped"] = str(exc)
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
