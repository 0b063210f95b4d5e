"""One screen of gateway status, rendered with rich from the runtime's status document.

The same renderer serves ``edgeos status`` (one shot) and the live demo dashboard. The status
document (``Runtime.status()``; ``edgeos status --json`` prints it) has these keys, each optional:

``device, version, state, uptime_s, status_line`` · ``connections``: list of supervisor stats ·
``scan_groups``: ``{name: {period_ms, ticks, skipped, missed, timeouts, jitter: {p50_ms, p99_ms,
max_ms}, duration: {...}}}`` · ``twin``: ``{tags, by_quality, writable, history_mb,
desired_pending, desired_outcomes}`` · ``uplink``: ``{state, batches_sealed, acked,
backlog_batches, spool_bytes, last_ack_age_s, bytes_per_sample, dropped,
scans_skipped_announced}`` · ``gates``: ``{verdicts: {continue, correct, scrap}}`` · ``guard``:
decisions by kind · ``ota``: ``{active_slot, trial_slot, version, committed_version}``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from rich.console import Group, RenderableType
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

__all__ = ["render_status"]

_STATE_STYLE = {"up": "green", "degraded": "yellow", "connecting": "cyan", "down": "red"}


def _desired(twin: Mapping[str, Any]) -> str:
    """Desired changes in flight and their outcomes so far (a refusal must be visible)."""
    outcomes: Mapping[str, Any] = twin.get("desired_outcomes") or {}
    pending = int(twin.get("desired_pending") or 0)
    if not outcomes and not pending:
        return ""
    done = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in sorted(outcomes.items()))
    return f"{pending} pending" + (f"; {done}" if done else "")


def _fmt_age(seconds: Any) -> str:
    if seconds is None:
        return "never"
    s = float(seconds)
    if s < 120:
        return f"{s:.0f} s ago"
    if s < 7200:
        return f"{s / 60:.0f} min ago"
    return f"{s / 3600:.1f} h ago"


def _connections(conns: list[Mapping[str, Any]]) -> Table:
    table = Table(title="connections", expand=True, title_justify="left")
    for col in ("name", "state", "since", "reconnects", "errors", "p99 ms", "last error"):
        table.add_column(col, overflow="fold")
    for c in conns:
        state = str(c.get("state", "?"))
        errors = sum(int(v) for v in c.get("errors", {}).values())
        table.add_row(
            str(c.get("name", "")),
            Text(state, style=_STATE_STYLE.get(state, "")),
            f"{float(c.get('since_s', 0)):.0f} s",
            str(c.get("reconnects", 0)),
            str(errors),
            f"{float(c.get('latency', {}).get('p99_ms', 0)):.2f}",
            str(c.get("last_error", ""))[:60],
        )
    return table


def _groups(groups: Mapping[str, Mapping[str, Any]]) -> Table:
    table = Table(title="scan groups", expand=True, title_justify="left")
    columns = ("group", "period", "ticks", "skipped/missed", "jitter p50/p99/max ms", "scan p99 ms")
    for col in columns:
        table.add_column(col)
    for name, g in groups.items():
        j = g.get("jitter", {})
        d = g.get("duration", {})
        table.add_row(
            name,
            f"{float(g.get('period_ms', 0)):g} ms",
            str(g.get("ticks", 0)),
            f"{g.get('skipped', 0)} / {g.get('missed', 0)}",
            f"{float(j.get('p50_ms', 0)):.2f} / {float(j.get('p99_ms', 0)):.2f} / "
            f"{float(j.get('max_ms', 0)):.2f}",
            f"{float(d.get('p99_ms', 0)):.2f}",
        )
    return table


def _kv(title: str, rows: list[tuple[str, str]]) -> Table:
    table = Table(title=title, show_header=False, expand=True, title_justify="left")
    table.add_column("key", style="bold")
    table.add_column("value")
    for key, value in rows:
        table.add_row(key, value)
    return table


def render_status(doc: Mapping[str, Any]) -> RenderableType:
    """The whole status screen for one runtime."""
    head = Text.assemble(
        (f"edgeos {doc.get('version', '')} ", "bold"),
        (f"device {doc.get('device', '?')} ", "bold cyan"),
        f"· {doc.get('state', '?')} · up {float(doc.get('uptime_s', 0)):.0f} s",
    )
    parts: list[RenderableType] = [head]
    if doc.get("status_line"):
        parts.append(Text(str(doc["status_line"]), style="italic"))
    if doc.get("connections"):
        parts.append(_connections(list(doc["connections"])))
    if doc.get("scan_groups"):
        parts.append(_groups(doc["scan_groups"]))

    side: list[tuple[str, str]] = []
    twin = doc.get("twin") or {}
    if twin:
        by_q = ", ".join(f"{k} {v}" for k, v in twin.get("by_quality", {}).items())
        side.append(("twin", f"{twin.get('tags', 0)} tags ({by_q})"))
        if "history_mb" in twin:
            side.append(("history", f"{float(twin['history_mb']):.1f} MB"))
        desired = _desired(twin)
        if desired:
            side.append(("desired", desired))
    up = doc.get("uplink") or {}
    if up:
        side.append(("uplink", str(up.get("state", "?"))))
        side.append(
            (
                "batches",
                f"{up.get('batches_sealed', 0)} sealed, {up.get('acked', 0)} acked, "
                f"backlog {up.get('backlog_batches', 0)}",
            )
        )
        side.append(("spool", f"{int(up.get('spool_bytes', 0)) / 1e6:.2f} MB"))
        side.append(("last ack", _fmt_age(up.get("last_ack_age_s"))))
        if up.get("bytes_per_sample") is not None:
            side.append(("bytes/sample", f"{float(up['bytes_per_sample']):.3f}"))
        if up.get("dropped"):
            side.append(("dropped", str(up["dropped"])))
        if up.get("scans_skipped_announced"):
            # Scans not read (overload), announced to the cloud: not data lost.
            side.append(("scans skipped", str(up["scans_skipped_announced"])))
    gates = doc.get("gates") or {}
    if gates:
        v = gates.get("verdicts", {})
        side.append(
            (
                "verdicts",
                f"continue {v.get('continue', 0)} · correct {v.get('correct', 0)} · "
                f"scrap {v.get('scrap', 0)}",
            )
        )
    guard = doc.get("guard") or {}
    if guard:
        side.append(("guard", ", ".join(f"{k} {val}" for k, val in guard.items())))
    ota = doc.get("ota") or {}
    if ota:
        side.append(
            (
                "slots",
                f"active {ota.get('active_slot', '?')} ({ota.get('version', '?')}), "
                f"trial {ota.get('trial_slot') or '-'}",
            )
        )
    proc = doc.get("process") or {}
    if proc:
        side.append(
            (
                "process",
                f"RSS {float(proc.get('rss_mb', 0)):.1f} MB (peak "
                f"{float(proc.get('rss_peak_mb', 0)):.1f}), {proc.get('threads', '?')} threads, "
                f"{proc.get('open_files', '?')} open files",
            )
        )
    clock = doc.get("clock") or {}
    if clock.get("steps"):
        side.append(
            (
                "wall clock",
                f"stepped {clock['steps']}× (last {float(clock.get('last_step_s') or 0):+.1f} s)",
            )
        )
    creds = doc.get("credentials") or {}
    if creds:
        side.append(("credentials", _credentials(creds)))
    if side:
        parts.append(_kv("gateway", side))
    return Panel(Group(*parts), title="edgeos status", border_style="blue")


def _credentials(creds: Mapping[str, Any]) -> str:
    """``client cert 2027-03-01 (412 d), CA …, tuf timestamp …`` plus a renewal failure."""
    now = time.time()
    names = {"client_certificate_expires": "client cert", "ca_expires": "CA"}
    names.update({f"tuf_{r}": f"tuf {r}" for r in ("root", "targets", "snapshot", "timestamp")})
    shown = []
    for key, label in names.items():
        when = creds.get(key)
        if isinstance(when, int | float):
            day = time.strftime("%Y-%m-%d", time.gmtime(when))
            shown.append(f"{label} {day} ({(when - now) / 86400:.0f} d)")
    text = ", ".join(shown) or "-"
    if creds.get("state") == "failed":
        text += f"; renewal failing: {creds.get('last_error')}"
    return text
