"""The demo's end-to-end check and the few lines a person reads when it stopped.

*Samples stored by the receiver = samples sealed by the runtime + samples spooled at the start
(``--keep``) − samples still in the spool*; a replayed batch (an ack lost, the batch sent again)
is stored once, so the sums may then differ without a loss.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from rich.console import Console

from edgeos_sim.demo.dashboard import receiver_status

if TYPE_CHECKING:
    from edgeos_sim.demo.runner import DemoRun

__all__ = ["report", "summarize"]


def summarize(
    run: DemoRun, clean: bool, before: tuple[int, int], after: tuple[int, int]
) -> dict[str, Any]:
    """The run's JSON summary; adds what does not add up to ``run.problems``.

    ``before`` and ``after`` are the (batches, samples) in the spool at start and at the end.
    """
    from edgeos_cloud.receiver.storage import open_storage

    assert run.paths is not None
    gateway = run.last_gateway or {}
    up = gateway.get("uplink") or {}
    receiver = run.receiver
    rx = receiver_status(receiver.metrics.registry) if receiver is not None else {}
    sealed = int(up.get("samples_sealed") or 0)
    delivered = sealed + before[1] - after[1]
    stored = int(rx.get("samples", 0))
    in_db = None
    db = run.paths.receiver / "receiver.db"
    if db.exists():
        storage = open_storage(f"sqlite:///{db}")
        try:
            for s in storage.device_summaries():
                if s.device == run.device:
                    in_db = {"batches": s.batches, "samples": s.samples, "rejects": s.rejects}
        finally:
            storage.close()
    rejects = dict(rx.get("rejects") or {})
    bad_rejects = {k: v for k, v in rejects.items() if k != "replayed"}
    if stored == 0:
        run.problems.append("the receiver stored no samples")
    # A replay (an ack lost, the batch sent again) is stored once: the sums then differ
    # by the replayed batches, which is correct behaviour, not a loss.
    if stored != delivered and not rejects.get("replayed"):
        run.problems.append(
            f"receiver stored {stored} samples but the runtime delivered {delivered}"
        )
    if bad_rejects:
        run.problems.append(f"receiver rejected messages: {bad_rejects}")
    groups = {
        name: {
            "period_ms": g.get("period_ms"),
            "ticks": g.get("ticks"),
            "skipped": g.get("skipped"),
            "jitter_p99_ms": (g.get("jitter") or {}).get("p99_ms"),
        }
        for name, g in (gateway.get("scan_groups") or {}).items()
    }
    return {
        "ok": clean and not run.problems,
        "duration_s": round(time.monotonic() - run.started, 1),
        "stopped_by": ("signal" if run.signals else "duration" if clean else "error"),
        "state_dir": str(run.paths.root),
        "device": run.device,
        "line": {
            "nests": run.options.nests,
            "tags_per_nest": run.options.tags_per_nest,
            "tags": (gateway.get("twin") or {}).get("tags"),
        },
        "connections": {
            c.get("name", "?"): c.get("state") for c in gateway.get("connections") or []
        },
        "scan_groups": groups,
        "runtime": {
            "batches_sealed": up.get("batches_sealed"),
            "samples_sealed": sealed,
            "bytes_per_sample": up.get("bytes_per_sample"),
            "acked": up.get("acked"),
            "spooled_at_start": {"batches": before[0], "samples": before[1]},
            "left_in_spool": {"batches": after[0], "samples": after[1]},
            "samples_delivered": delivered,
        },
        "receiver": {
            "samples_stored": stored,
            "batches_stored": rx.get("batches", 0),
            "acks": rx.get("acks", 0),
            "rejects": rejects,
            "ingest_lag_mean_s": rx.get("ingest_lag_mean_s"),
            "database": in_db,
        },
        "verdicts": {
            "continue": 0,
            "correct": 0,
            "scrap": 0,
            **(gateway.get("gates") or {}).get("verdicts", {}),
        },
        "guard": gateway.get("guard") or {},
        "inference": {
            k: v
            for k, v in (gateway.get("inference") or {}).items()
            if isinstance(v, int | float | str | bool)
        },
        "problems": list(run.problems),
    }


def report(summary: dict[str, Any], console: Console) -> None:
    """The few lines a person reads after the dashboard closed."""
    rt = summary.get("runtime", {})
    rx = summary.get("receiver", {})
    v = summary.get("verdicts", {})
    console.print(
        f"runtime sealed {rt.get('samples_sealed', 0):,} samples in "
        f"{rt.get('batches_sealed', 0)} batches "
        f"({rt.get('bytes_per_sample') or 0:.3f} bytes/sample); "
        f"receiver stored {rx.get('samples_stored', 0):,} in {rx.get('batches_stored', 0)} "
        f"batches; {rt.get('left_in_spool', {}).get('samples', 0):,} left in the spool."
    )
    console.print(
        f"verdicts: continue {v.get('continue', 0)} · correct {v.get('correct', 0)} · "
        f"scrap {v.get('scrap', 0)}; guard: "
        + (", ".join(f"{k} {val}" for k, val in summary.get("guard", {}).items()) or "-")
    )
    if summary.get("ok"):
        console.print("[green]everything stopped cleanly; data flowed end to end.[/green]")
    else:
        for problem in summary.get("problems", []) or ["did not stop cleanly"]:
            console.print(f"[red]problem:[/red] {problem}")
        console.print(f"details: {summary.get('state_dir', '.')}/demo.log")
