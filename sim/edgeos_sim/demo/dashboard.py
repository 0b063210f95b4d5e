"""The demo's live dashboard: the gateway's status screen plus the receiver's side of the wire.

:func:`receiver_status` reads one receiver's Prometheus registry (in this process) into a plain
dictionary; :func:`render_receiver` draws it; :func:`render_dashboard` puts the demo header, the
gateway screen (:func:`edgeos.status_view.render_status`, the same one ``edgeos status`` prints)
and the receiver panel together, side by side on wide terminals and stacked on narrow ones.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

from prometheus_client import CollectorRegistry
from rich.console import Group, RenderableType
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from edgeos.status_view import render_status

__all__ = ["RateMeter", "receiver_status", "render_dashboard", "render_receiver"]

#: Terminal width from which the gateway and receiver panels sit side by side.
WIDE = 150


def _samples(registry: CollectorRegistry, name: str) -> list[tuple[dict[str, str], float]]:
    out = []
    for metric in registry.collect():
        for sample in metric.samples:
            if sample.name == name:
                out.append((dict(sample.labels), float(sample.value)))
    return out


def _value(registry: CollectorRegistry, name: str) -> float:
    got = registry.get_sample_value(name)
    return 0.0 if got is None else float(got)


def receiver_status(registry: CollectorRegistry, *, now: float | None = None) -> dict[str, Any]:
    """The receiver's counters (this process's instance) as one dictionary."""
    now = time.time() if now is None else now
    rejects = {
        labels["reason"]: int(v)
        for labels, v in _samples(registry, "edgeos_receiver_rejects_total")
        if v
    }
    last_seen = {
        labels["device"]: v
        for labels, v in _samples(registry, "edgeos_receiver_device_last_seen_timestamp_seconds")
    }
    lag_n = _value(registry, "edgeos_receiver_ingest_lag_seconds_count")
    lag_sum = _value(registry, "edgeos_receiver_ingest_lag_seconds_sum")
    return {
        "connected": bool(_value(registry, "edgeos_receiver_broker_connected")),
        "batches": int(_value(registry, "edgeos_receiver_batches_total")),
        "samples": int(_value(registry, "edgeos_receiver_samples_total")),
        "bytes": int(_value(registry, "edgeos_receiver_bytes_total")),
        "acks": int(_value(registry, "edgeos_receiver_acks_total")),
        "acks_dropped": int(_value(registry, "edgeos_receiver_acks_dropped_total")),
        "rejects": rejects,
        "queue_depth": int(_value(registry, "edgeos_receiver_queue_depth")),
        "storage_errors": int(_value(registry, "edgeos_receiver_storage_errors_total")),
        "ingest_lag_mean_s": round(lag_sum / lag_n, 3) if lag_n else None,
        "last_stored_age_s": {d: round(max(0.0, now - t), 1) for d, t in last_seen.items()},
    }


class RateMeter:
    """Per-second rate of a growing counter over a sliding window of observations."""

    def __init__(self, window_s: float = 6.0) -> None:
        self.window_s = window_s
        self._points: deque[tuple[float, float]] = deque()

    def observe(self, value: float, at: float | None = None) -> float | None:
        """Record ``value`` (monotonic time ``at``); the rate over the window, once known."""
        at = time.monotonic() if at is None else at
        self._points.append((at, value))
        while len(self._points) > 2 and at - self._points[0][0] > self.window_s:
            self._points.popleft()
        (t0, v0), (t1, v1) = self._points[0], self._points[-1]
        return (v1 - v0) / (t1 - t0) if t1 - t0 >= 1.0 else None


def _fmt_rate(rate: float | None, unit: str) -> str:
    if rate is None:
        return f"… {unit}/s"
    return f"{rate:,.1f} {unit}/s" if rate < 10 else f"{rate:,.0f} {unit}/s"


def render_receiver(doc: Mapping[str, Any], rates: Mapping[str, float | None]) -> Panel:
    """The receiver panel: what arrived, what was stored and acknowledged, what was refused."""
    table = Table(show_header=False, expand=True, box=None, padding=(0, 1))
    table.add_column("key", style="bold", no_wrap=True)
    table.add_column("value")
    connected = doc.get("connected")
    table.add_row(
        "broker",
        Text("subscribed", style="green") if connected else Text("not connected", style="red"),
    )
    table.add_row(
        "stored",
        f"{doc.get('samples', 0):,} samples in {doc.get('batches', 0):,} batches "
        f"({int(doc.get('bytes', 0)) / 1e6:.2f} MB sealed)",
    )
    table.add_row(
        "rate",
        f"{_fmt_rate(rates.get('samples'), 'samples')} · "
        f"{_fmt_rate(rates.get('batches'), 'batches')}",
    )
    table.add_row("acks sent", f"{doc.get('acks', 0):,} (dropped {doc.get('acks_dropped', 0)})")
    ages = doc.get("last_stored_age_s") or {}
    last = ", ".join(f"{d} {a:.0f} s ago" for d, a in sorted(ages.items())) or "nothing yet"
    table.add_row("last stored", last)
    lag = doc.get("ingest_lag_mean_s")
    table.add_row("ingest lag", "…" if lag is None else f"{float(lag) * 1000:.0f} ms mean")
    rejects = doc.get("rejects") or {}
    table.add_row(
        "rejects",
        Text("none", style="green")
        if not rejects
        else Text(", ".join(f"{k} {v}" for k, v in sorted(rejects.items())), style="yellow"),
    )
    if doc.get("queue_depth"):
        table.add_row("queue", str(doc["queue_depth"]))
    if doc.get("storage_errors"):
        table.add_row("storage errors", Text(str(doc["storage_errors"]), style="red"))
    return Panel(table, title="receiver (cloud side)", border_style="magenta")


def render_dashboard(
    header: Sequence[str],
    gateway: Mapping[str, Any] | None,
    receiver: Mapping[str, Any],
    rates: Mapping[str, float | None],
    *,
    width: int,
    hints: Sequence[str] = (),
    footer: str = "",
) -> RenderableType:
    """One frame: header lines, the gateway screen and the receiver panel, then a footer.

    ``hints`` (commands to try in another terminal) are shown under the receiver panel when
    the terminal is wide enough for the two columns.
    """
    head = Text("\n".join(header), style="dim")
    gw: RenderableType = (
        render_status(gateway)
        if gateway is not None
        else Panel(Text("starting the runtime …"), title="edgeos status", border_style="blue")
    )
    rx = render_receiver(receiver, rates)
    parts: list[RenderableType] = [head]
    if width >= WIDE:
        grid = Table.grid(expand=True)
        grid.add_column(ratio=3)
        grid.add_column(ratio=2)
        right: list[RenderableType] = [rx]
        if hints:
            right.append(
                Panel(
                    Text("\n".join(hints), overflow="fold"),
                    title="try in another terminal",
                    border_style="dim",
                )
            )
        grid.add_row(gw, Group(*right))
        parts.append(grid)
    else:
        parts.extend([gw, rx])
    if footer:
        parts.append(Text(footer, style="bold"))
    return Group(*parts)
