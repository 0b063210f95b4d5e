"""Receiver isolation: a healthy device's service while another, authenticated device attacks.

A real Mosquitto (TLS, per-device ACLs), the receiver as its own process
(``edgeos-receiver run``), SQLite storage. The healthy device (``edgeos_testing.devsim``)
publishes real sealed batches as the gateway's uplink does (at most 16 unacknowledged) for
``--seconds``; meanwhile a second device, holding a valid key and certificate, runs from its own
process (paho, QoS 1, as fast as it can):

* ``poison``        — authenticated batches whose body does not decode;
* ``amplification`` — authenticated batches of a few kB that decode to millions of samples;
* ``flood``         — junk on its batch topic at the broker's maximum rate.

Reported per case: the healthy device's stored-on-first-delivery ratio (it never re-sends, so
every stored batch was stored from its first delivery), its stored samples/s and the ratio to
the no-attack baseline, the receiver's peak RSS (VmHWM, a fresh process per case) and what the
receiver counted (deferred, rejected). Goals: ratio >= 0.99, throughput >= 0.9 x baseline,
peak RSS <= baseline + 64 MB.

Prints ONE JSON object; the default run takes ~1.5 minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import re
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

from edgeos_cloud.receiver.registry import DeviceRegistry
from edgeos_testing.devsim import SimDevice, simple_batch
from edgeos_testing.mosquitto import MosquittoBroker
from edgeos_testing.net import free_port

WINDOW = 16  # the gateway's uplink.inflight_window
RESEND_AFTER_S = 20.0  # the gateway's resend_after_s: a wait this long means a lost batch
RECEIVER = Path(sys.executable).with_name("edgeos-receiver")


# --------------------------------------------------------------------------- the attacker


def _attack_payloads(kind: str, key: bytes, device: str) -> list[bytes]:
    from edgeos_protocol.crypto import Epoch, Keyring
    from edgeos_protocol.wire import Batch, Group, TagTable, ValueKind, encode_body, seal_batch

    epoch = Epoch.new(Keyring.of(key), device)
    now = int(time.time() * 1e6)
    if kind == "flood":
        return [os.urandom(64 + i % 448) for i in range(512)]
    if kind == "poison":
        # Authenticated (sealed under the device's key) but the body is not a batch body.
        return [seal_batch(epoch, os.urandom(2048), now)[1] for _ in range(256)]
    # amplification: 100,000 tags x 40 rows of constants = 4 M samples (the wire's maximum)
    # in a few kB once compressed.
    tags = 100_000
    rows = 40
    table = TagTable(
        np.arange(tags),
        [f"t{i}" for i in range(tags)],
        [ValueKind.NUMBER] * tags,
        [1.0] * tags,
        [""] * tags,
    )
    group = Group(
        np.arange(rows, dtype=np.int64) * 1_000_000 + now,
        np.arange(tags, dtype=np.int32),
        np.zeros((rows, tags)),
        np.zeros((rows, tags), np.uint8),
    )
    body = encode_body(Batch(table, [group]), level=19)
    return [seal_batch(epoch, body, now)[1] for _ in range(64)]


def attacker_main(
    kind: str,
    host: str,
    port: int,
    creds: tuple[str, str, str],
    device: str,
    key: bytes,
    seconds: float,
    ready: Any,
    result: Any,
) -> None:
    """Separate process: publish ``kind`` payloads on the device's batch topic, QoS 1, flat out."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    payloads = _attack_payloads(kind, key, device)
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"{device}-attack")
    client.tls_set(ca_certs=creds[0], certfile=creds[1], keyfile=creds[2])
    client.max_inflight_messages_set(1000)
    client.max_queued_messages_set(0)
    client.connect(host, port, keepalive=60)
    client.loop_start()
    ready.set()
    topic = f"edgeos/v1/{device}/batch"
    sent = 0
    infos = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        infos.append(client.publish(topic, payloads[sent % len(payloads)], qos=1))
        sent += 1
        if len(infos) >= 2000:  # bound the client's own queue: wait for the oldest
            infos[0].wait_for_publish(5)
            infos = infos[1000:]
    client.loop_stop()
    client.disconnect()
    result.value = sent


# --------------------------------------------------------------------------- one case


def _write_config(tmp: Path, broker: MosquittoBroker, metrics_port: int) -> Path:
    creds = broker.receiver_credentials
    path = tmp / "receiver.toml"
    path.write_text(
        f'log_level = "WARNING"\n[broker]\nurl = "{broker.url}"\n[broker.tls]\n'
        f'ca_file = "{creds.ca_file}"\ncert_file = "{creds.cert_file}"\n'
        f'key_file = "{creds.key_file}"\n[storage]\nurl = "sqlite:///{tmp / "r.db"}"\n'
        f'[registry]\ndir = "{tmp / "registry"}"\n'
        f'[metrics]\nlisten = "127.0.0.1:{metrics_port}"\n',
        encoding="utf-8",
    )
    return path


def _peak_rss_mb(pid: int) -> float:
    text = Path(f"/proc/{pid}/status").read_text()
    found = re.search(r"VmHWM:\s+(\d+) kB", text)
    return round(int(found.group(1)) / 1024, 1) if found else float("nan")


def _scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("edgeos_receiver_") and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            if name.endswith("_total") or "_total{" in name or "bytes_in_flight" in name:
                out[name] = float(value)
    return {k: v for k, v in out.items() if v}


def _wait_connected(port: int, proc: subprocess.Popen[bytes]) -> None:
    """Until the receiver's ``broker_connected`` gauge is 1 (it subscribes right before)."""
    while proc.poll() is None:
        with contextlib.suppress(OSError):
            if "edgeos_receiver_broker_connected 1.0" in _metrics_text(port):
                return
        time.sleep(0.1)
    raise RuntimeError(f"receiver exited with {proc.returncode}")


def _metrics_text(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return str(r.read().decode())


def _start_receiver(config: Path, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as err:
        return subprocess.Popen(
            [str(RECEIVER), "run", "--config", str(config)], stdout=subprocess.DEVNULL, stderr=err
        )


async def _healthy(
    broker: MosquittoBroker, key: bytes, seconds: float, tags: int
) -> dict[str, Any]:
    times = [1_700_000_000_000_000 + i * 1_000_000 for i in range(3)]
    values = {f"h{i}": [float(i), i + 0.5, i + 0.25] for i in range(tags)}
    async with SimDevice.connect(broker, "healthy", key) as dev:
        epoch = dev.epoch.epoch
        published = 0
        stalled = False
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            if published >= WINDOW:
                try:
                    async with asyncio.timeout(RESEND_AFTER_S):
                        await dev.wait_acked(epoch, published - WINDOW + 1)
                except TimeoutError:
                    stalled = True  # the gateway would re-send now: a batch was lost
                    break
            await dev.publish(dev.seal(simple_batch(values, times)))
            published += 1
        elapsed = time.perf_counter() - start
        acked_in_time = dev.acked.get(epoch, 0)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(RESEND_AFTER_S):
                await dev.wait_acked(epoch, published)
    return {
        "published": published,
        "acked_during_run": acked_in_time,
        "elapsed_s": elapsed,
        "stalled": stalled,
        "samples_per_batch": tags * 3,
    }


def _stored(db: Path, device: str) -> int:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        row = conn.execute(
            "SELECT count(*) FROM batches b JOIN devices d ON d.id = b.device_id WHERE d.name = ?",
            (device,),
        ).fetchone()
    return int(row[0])


async def run_case(
    kind: str | None, seconds: float, tags: int, broker_queue: int | None
) -> dict[str, Any]:
    extra = "" if broker_queue is None else f"max_queued_messages {broker_queue}"
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        async with MosquittoBroker(tmp / "mq", extra_config=extra) as broker:
            registry = DeviceRegistry(tmp / "registry")
            healthy_key = registry.add("healthy").current_key
            attacker_key = registry.add("attacker").current_key
            port = free_port()
            config = _write_config(tmp, broker, port)
            proc = _start_receiver(config, tmp / "receiver.log")
            attack = None
            try:
                await asyncio.to_thread(_wait_connected, port, proc)
                ctx = multiprocessing.get_context("spawn")
                sent = ctx.Value("q", 0)
                if kind is not None:
                    ready = ctx.Event()
                    c = broker.credentials("attacker")
                    attack = ctx.Process(
                        target=attacker_main,
                        args=(
                            kind,
                            broker.host,
                            broker.port,
                            (str(c.ca_file), str(c.cert_file), str(c.key_file)),
                            "attacker",
                            attacker_key,
                            seconds,
                            ready,
                            sent,
                        ),
                    )
                    attack.start()
                    await asyncio.to_thread(ready.wait, 120)
                healthy = await _healthy(broker, healthy_key, seconds, tags)
                if attack is not None:
                    await asyncio.to_thread(attack.join, 120)
                metrics = _scrape(port)
                rss = _peak_rss_mb(proc.pid)
            finally:
                proc.terminate()
                proc.wait(30)
                if attack is not None and attack.is_alive():
                    attack.kill()
            stored = _stored(tmp / "r.db", "healthy")
    acked = healthy["acked_during_run"]
    return {
        "healthy_published": healthy["published"],
        "healthy_stored": stored,
        "healthy_first_delivery_ratio": round(stored / max(1, healthy["published"]), 4),
        "healthy_samples_per_s": round(acked * healthy["samples_per_batch"] / healthy["elapsed_s"]),
        "healthy_stalled": healthy["stalled"],
        "attacker_messages_sent": int(sent.value),
        "peak_rss_mb": rss,
        "receiver_counters": metrics,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="attack duration per case")
    parser.add_argument("--tags", type=int, default=2000, help="healthy tags (x3 scans/batch)")
    parser.add_argument(
        "--cases", default="poison,amplification,flood", help="comma-separated subset"
    )
    parser.add_argument(
        "--broker-queue",
        type=int,
        default=None,
        help="Mosquitto max_queued_messages (default: Mosquitto's 1000; 0 = unbounded)",
    )
    args = parser.parse_args(argv)
    result: dict[str, Any] = {
        "benchmark": "receiver_isolation",
        "seconds": args.seconds,
        "healthy_samples_per_batch": args.tags * 3,
        "healthy_window": WINDOW,
        "broker_max_queued_messages": 1000 if args.broker_queue is None else args.broker_queue,
    }
    baseline = asyncio.run(run_case(None, args.seconds, args.tags, args.broker_queue))
    result["baseline"] = baseline
    goals_met = True
    for kind in [c for c in args.cases.split(",") if c]:
        case = asyncio.run(run_case(kind, args.seconds, args.tags, args.broker_queue))
        case["throughput_vs_baseline"] = round(
            case["healthy_samples_per_s"] / max(1, baseline["healthy_samples_per_s"]), 3
        )
        case["rss_over_baseline_mb"] = round(case["peak_rss_mb"] - baseline["peak_rss_mb"], 1)
        case["goals_met"] = (
            case["healthy_first_delivery_ratio"] >= 0.99
            and case["throughput_vs_baseline"] >= 0.9
            and case["rss_over_baseline_mb"] <= 64
        )
        goals_met &= case["goals_met"]
        result[kind] = case
    result["goals_met"] = goals_met
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
