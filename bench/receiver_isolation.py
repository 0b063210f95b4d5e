"""Receiver isolation: a healthy device's service while another, authenticated device attacks.

A real Mosquitto (TLS, per-device ACLs, the queue and packet limits ``edgeos-cloud init``
generates: :class:`edgeos_cloud.broker.BrokerLimits`), the receiver as its own process
(``edgeos-receiver run``), SQLite storage. For ``--seconds`` a second device, holding a valid
key and certificate, publishes from its own process (paho, QoS 1, as fast as it can):

* ``poison``        — authenticated batches whose body does not decode;
* ``amplification`` — authenticated batches of a few kB that decode to millions of samples;
* ``flood``         — junk on its batch topic at the broker's maximum rate.

Meanwhile the healthy device (``edgeos_testing.devsim``, real sealed batches) behaves as a real
gateway: a ``--tags`` line (16,000) scanned at 1 Hz, one batch of 3 scans every
``--period-s`` (3 s) = 16,000 samples/s, at most 16 batches unacknowledged. Its **throughput**
is the rate its samples were stored at: stored samples / max(the run's nominal span, the time
its last batch was acknowledged), so = the nominal rate when every batch is acknowledged
before the next one is due, lower when the receiver falls behind. The goal compares it to the
no-attack baseline (itself the nominal rate). A second, secondary figure is the baseline's
*saturation* throughput (the healthy device publishing flat out with its window), which says
how much headroom the receiver has, not how an attack hurts a gateway.

Reported per case and run (``--runs``, 2 by default; the machine is shared, so each number is
given per run): the healthy device's stored-on-first-delivery ratio (it never re-sends, so
every stored batch was stored from its first delivery), throughput and its ratio to the
baseline, ack latencies, the receiver's peak RSS (VmHWM, a fresh process per run) and what
the receiver counted; ``broker_dropped`` = messages published (attacker + healthy) that never
reached the receiver. Goals: ratio >= 0.99, throughput >= 0.9 x baseline, peak RSS <=
baseline + 64 MB.

Prints ONE JSON object; the default run takes ~3 minutes.
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

from edgeos_cloud.broker import BrokerLimits
from edgeos_cloud.receiver.registry import DeviceRegistry
from edgeos_testing.devsim import SimDevice, simple_batch
from edgeos_testing.mosquitto import MosquittoBroker
from edgeos_testing.net import free_port

WINDOW = 16  # the gateway's uplink.inflight_window
RESEND_AFTER_S = 20.0  # the gateway's resend_after_s: a wait this long means a lost batch
RECEIVER = Path(sys.executable).with_name("edgeos-receiver")


# --------------------------------------------------------------------------- the attacker


def _attack_payloads(kind: str, key: bytes, device: str, amp_samples: int) -> list[bytes]:
    from edgeos_protocol.crypto import Epoch, Keyring
    from edgeos_protocol.wire import Batch, Group, TagTable, ValueKind, encode_body, seal_batch

    epoch = Epoch.new(Keyring.of(key), device)
    now = int(time.time() * 1e6)
    if kind == "flood":
        return [os.urandom(64 + i % 448) for i in range(512)]
    if kind == "poison":
        # Authenticated (sealed under the device's key) but the body is not a batch body.
        return [seal_batch(epoch, os.urandom(2048), now)[1] for _ in range(256)]
    # amplification: the largest batch the receiver's limits let through (4 M samples, the
    # wire's maximum, with the default limits.max_samples): tags x 40 rows of constants, a few
    # kB once compressed.
    rows = 40
    tags = max(1, amp_samples // rows)
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
    amp_samples: int = 4_000_000,
) -> None:
    """Separate process: publish ``kind`` payloads on the device's batch topic, QoS 1, flat out."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    payloads = _attack_payloads(kind, key, device, amp_samples)
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


def _write_config(tmp: Path, broker: MosquittoBroker, metrics_port: int, extra: str = "") -> Path:
    creds = broker.receiver_credentials
    path = tmp / "receiver.toml"
    path.write_text(
        f'log_level = "WARNING"\n[broker]\nurl = "{broker.url}"\n[broker.tls]\n'
        f'ca_file = "{creds.ca_file}"\ncert_file = "{creds.cert_file}"\n'
        f'key_file = "{creds.key_file}"\n[storage]\nurl = "sqlite:///{tmp / "r.db"}"\n'
        f'[registry]\ndir = "{tmp / "registry"}"\n'
        f'[metrics]\nlisten = "127.0.0.1:{metrics_port}"\n{extra}',
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


def _healthy_batch(tags: int) -> dict[str, list[float]]:
    return {f"line.h{i:05d}": [float(i), i + 0.5, i + 0.25] for i in range(tags)}


async def _healthy_nominal(
    broker: MosquittoBroker, key: bytes, seconds: float, tags: int, period_s: float
) -> dict[str, Any]:
    """A gateway at its nominal rate: one batch of 3 scans every ``period_s`` for ``seconds``."""
    values = _healthy_batch(tags)
    async with SimDevice.connect(broker, "healthy", key) as dev:
        epoch = dev.epoch.epoch
        sent_at: list[float] = []
        acked_at: dict[int, float] = {}

        async def track(seq: int) -> None:
            await dev.wait_acked(epoch, seq)
            acked_at[seq] = time.perf_counter()

        start = time.perf_counter()
        stalled = False
        async with asyncio.TaskGroup() as tg:
            seq = 0
            while seq * period_s < seconds:
                await asyncio.sleep(max(0.0, start + seq * period_s - time.perf_counter()))
                if seq >= WINDOW:
                    try:
                        async with asyncio.timeout(RESEND_AFTER_S):
                            await dev.wait_acked(epoch, seq - WINDOW + 1)
                    except TimeoutError:
                        stalled = True  # the gateway would re-send now: a batch was lost
                        break
                t0 = 1_700_000_000_000_000 + seq * 3_000_000
                sealed = dev.seal(simple_batch(values, [t0, t0 + 1_000_000, t0 + 2_000_000]))
                sent_at.append(time.perf_counter())
                await dev.publish(sealed)
                seq += 1
                tg.create_task(_bounded(track(seq), RESEND_AFTER_S + seconds))
    published = len(sent_at)
    span = published * period_s
    last = max(acked_at.values(), default=start) - start
    latencies = sorted(acked_at[s] - sent_at[s - 1] for s in acked_at)
    acked = len(acked_at)
    return {
        "published": published,
        "acked": acked,
        "stalled": stalled,
        "samples_per_batch": tags * 3,
        "nominal_samples_per_s": round(tags * 3 / period_s),
        "samples_per_s": round(acked * tags * 3 / max(span, last)),
        "ack_latency_s": {
            "p50": round(latencies[len(latencies) // 2], 3) if latencies else None,
            "max": round(latencies[-1], 3) if latencies else None,
        },
    }


async def _bounded(coro: Any, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await coro


async def _healthy_saturation(
    broker: MosquittoBroker, key: bytes, seconds: float, tags: int
) -> dict[str, Any]:
    """Secondary figure: the same device publishing flat out (window 16) for ``seconds``."""
    times = [1_700_000_000_000_000 + i * 1_000_000 for i in range(3)]
    values = _healthy_batch(tags)
    async with SimDevice.connect(broker, "healthy", key) as dev:
        epoch = dev.epoch.epoch
        published = 0
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            if published >= WINDOW:
                try:
                    async with asyncio.timeout(RESEND_AFTER_S):
                        await dev.wait_acked(epoch, published - WINDOW + 1)
                except TimeoutError:
                    break
            await dev.publish(dev.seal(simple_batch(values, times)))
            published += 1
        elapsed = time.perf_counter() - start
        acked = dev.acked.get(epoch, 0)
    return {
        "published": published,
        "acked_during_run": acked,
        "samples_per_s": round(acked * tags * 3 / elapsed),
    }


def _stored(db: Path, device: str) -> int:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        row = conn.execute(
            "SELECT count(*) FROM batches b JOIN devices d ON d.id = b.device_id WHERE d.name = ?",
            (device,),
        ).fetchone()
    return int(row[0])


def _wait_drained(port: int, expected: int, limit_s: float = 60.0) -> float:
    """Until the receiver counted ``expected`` messages or its count stopped moving (2 s)."""
    deadline = time.monotonic() + limit_s
    last, since = -1.0, time.monotonic()
    while time.monotonic() < deadline:
        received = _scrape(port).get("edgeos_receiver_messages_received_total", 0.0)
        if received >= expected:
            return received
        if received != last:
            last, since = received, time.monotonic()
        elif time.monotonic() - since > 2.0:
            return received
        time.sleep(0.2)
    return last


async def run_case(
    kind: str | None,
    seconds: float,
    tags: int,
    period_s: float,
    limits: BrokerLimits | None,
    saturation: bool = False,
    receiver_extra: str = "",
    amp_samples: int = 4_000_000,
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        async with MosquittoBroker(tmp / "mq", limits=limits) as broker:
            registry = DeviceRegistry(tmp / "registry")
            healthy_key = registry.add("healthy").current_key
            attacker_key = registry.add("attacker").current_key
            port = free_port()
            config = _write_config(tmp, broker, port, receiver_extra)
            proc = _start_receiver(config, tmp / "receiver.log")
            attack = None
            exit_note = "terminated"
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
                            amp_samples,
                        ),
                    )
                    attack.start()
                    await asyncio.to_thread(ready.wait, 120)
                if saturation:
                    healthy = await _healthy_saturation(broker, healthy_key, seconds, tags)
                else:
                    healthy = await _healthy_nominal(broker, healthy_key, seconds, tags, period_s)
                if attack is not None:
                    await asyncio.to_thread(attack.join, 120)
                expected = int(sent.value) + healthy["published"]
                received = await asyncio.to_thread(_wait_drained, port, expected)
                metrics = _scrape(port)
                rss = _peak_rss_mb(proc.pid)
            finally:
                proc.terminate()
                try:
                    await asyncio.to_thread(proc.wait, 30)
                except subprocess.TimeoutExpired:
                    exit_note = "hung after SIGTERM for 30 s: killed"
                    proc.kill()
                    proc.wait()
                if attack is not None and attack.is_alive():
                    attack.kill()
            stored = _stored(tmp / "r.db", "healthy")
    out: dict[str, Any] = {
        "healthy_published": healthy["published"],
        "healthy_stored": stored,
        "healthy_first_delivery_ratio": round(stored / max(1, healthy["published"]), 4),
        "healthy_samples_per_s": healthy["samples_per_s"],
    }
    out.update({f"healthy_{k}": v for k, v in healthy.items() if k not in ("published",)})
    out.update(
        {
            "attacker_messages_sent": int(sent.value),
            "receiver_received": int(received),
            "broker_dropped": max(0, expected - int(received)),
            "peak_rss_mb": rss,
            "receiver_exit": exit_note,
            "receiver_counters": metrics,
        }
    )
    return out


def _load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="attack duration per case")
    parser.add_argument("--tags", type=int, default=16_000, help="healthy tags (x3 scans/batch)")
    parser.add_argument("--period-s", type=float, default=3.0, help="healthy batch period")
    parser.add_argument("--runs", type=int, default=2, help="runs of every case")
    parser.add_argument(
        "--cases", default="poison,amplification,flood", help="comma-separated subset"
    )
    parser.add_argument(
        "--mosquitto-defaults",
        action="store_true",
        help="run Mosquitto with its own queue defaults (1,000 per session), not BrokerLimits",
    )
    parser.add_argument(
        "--no-message-quota",
        action="store_true",
        help="switch the door's quotas.messages_per_s off (as before it existed)",
    )
    parser.add_argument(
        "--max-samples",
        type=int,
        default=None,
        help="receiver limits.max_samples (default: the receiver's, 4,000,000); the "
        "amplification batches hold this many samples",
    )
    parser.add_argument(
        "--no-saturation", action="store_true", help="skip the flat-out baseline figure"
    )
    args = parser.parse_args(argv)
    limits = None if args.mosquitto_defaults else BrokerLimits()
    extra = "[quotas]\nmessages_per_s = 1e12\n" if args.no_message_quota else ""
    if args.max_samples is not None:
        extra += f"[limits]\nmax_samples = {args.max_samples}\n"
    amp_samples = args.max_samples or 4_000_000
    result: dict[str, Any] = {
        "benchmark": "receiver_isolation",
        "seconds": args.seconds,
        "healthy_samples_per_batch": args.tags * 3,
        "healthy_period_s": args.period_s,
        "healthy_nominal_samples_per_s": round(args.tags * 3 / args.period_s),
        "healthy_window": WINDOW,
        "broker_limits": None if limits is None else limits.lines(),
        "receiver_quotas_messages_per_s": "off" if args.no_message_quota else "default (50)",
        "receiver_limits_max_samples": args.max_samples or "default (4,000,000)",
        "amplification_samples_per_batch": amp_samples,
        "load_average_before": _load(),
    }

    def runs(kind: str | None, saturation: bool = False) -> list[dict[str, Any]]:
        return [
            asyncio.run(
                run_case(
                    kind,
                    args.seconds,
                    args.tags,
                    args.period_s,
                    limits,
                    saturation,
                    extra,
                    amp_samples,
                )
            )
            for _ in range(args.runs)
        ]

    baseline = runs(None)
    result["baseline"] = baseline
    base_rate = min(b["healthy_samples_per_s"] for b in baseline)
    base_rss = max(b["peak_rss_mb"] for b in baseline)
    if not args.no_saturation:
        result["baseline_saturation"] = runs(None, saturation=True)
    goals_met = True
    for kind in [c for c in args.cases.split(",") if c]:
        cases = runs(kind)
        for case in cases:
            case["throughput_vs_baseline"] = round(
                case["healthy_samples_per_s"] / max(1, base_rate), 3
            )
            case["rss_over_baseline_mb"] = round(case["peak_rss_mb"] - base_rss, 1)
            case["goals_met"] = (
                case["healthy_first_delivery_ratio"] >= 0.99
                and case["throughput_vs_baseline"] >= 0.9
                and case["rss_over_baseline_mb"] <= 64
            )
            goals_met &= case["goals_met"]
        result[kind] = cases
    result["goals_met"] = goals_met
    result["load_average_after"] = _load()
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
