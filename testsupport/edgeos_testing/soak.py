"""The soak's verdict on resources: is RSS (or are open files) growing beyond noise?

The series is sampled every few seconds from one runtime lifetime. The first minute (imports,
first allocations, caches filling) is left out. RSS moves in steps (arenas, a backlog drained
after a fault), so a least-squares slope alone over-reads a single step near either end; the
verdict compares the *medians of the first and last quarters* of the steady series and also
reports the fitted slope and first/last/max for the record.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["RSS_NOISE_MB", "soak_problems", "soak_summary"]

#: Growth of the median RSS, first quarter → last quarter, still counted as noise (MB).
RSS_NOISE_MB = 2.0
#: Open descriptors may differ by a connection or two being re-established at sampling time.
FILES_NOISE = 3


def _slope_per_h(t_s: Sequence[float], y: Sequence[float]) -> float | None:
    if len(t_s) < 3:
        return None
    t = [x / 3600 for x in t_s]
    mt, my = statistics.fmean(t), statistics.fmean(y)
    var = sum((x - mt) ** 2 for x in t)
    if var == 0:
        return None
    return round(sum((x - mt) * (v - my) for x, v in zip(t, y, strict=True)) / var, 2)


def _quarters(values: Sequence[float]) -> tuple[float, float] | None:
    n = len(values)
    if n < 8:
        return None
    q = n // 4
    return statistics.median(values[:q]), statistics.median(values[-q:])


def soak_summary(samples: Sequence[Mapping[str, Any]], *, warmup_s: float = 60.0) -> dict[str, Any]:
    """Figures of a soak series (rows with ``t_s``, ``rss_mb``, ``open_files``, …)."""
    steady = [s for s in samples if s["t_s"] >= warmup_s] or list(samples)
    out: dict[str, Any] = {"samples": len(samples)}
    if not steady:
        return out
    rss = [float(s["rss_mb"]) for s in steady]
    files = [float(s["open_files"]) for s in steady]
    out["rss_growth_mb_per_h"] = _slope_per_h([float(s["t_s"]) for s in steady], rss)
    out["rss_mb_first_last_max"] = [rss[0], rss[-1], max(rss)]
    quarters = _quarters(rss)
    if quarters is not None:
        out["rss_median_first_last_quarter_mb"] = [quarters[0], quarters[1]]
        out["rss_growth_mb"] = round(quarters[1] - quarters[0], 2)
    fq = _quarters(files)
    out["open_files_first_last_max"] = [int(files[0]), int(files[-1]), int(max(files))]
    if fq is not None:
        out["open_files_growth"] = fq[1] - fq[0]
    out["spool_bytes_max"] = max(int(s.get("spool_bytes") or 0) for s in samples)
    jitter = [s.get("jitter_p99_ms") for s in steady]
    out["jitter_p99_ms_first_last"] = [jitter[0], jitter[-1]]
    blocks = [int(s["py_blocks"]) for s in steady if s.get("py_blocks") is not None]
    if blocks:
        out["py_blocks_first_last_max"] = [blocks[0], blocks[-1], max(blocks)]
    return out


def soak_problems(summary: Mapping[str, Any], *, tracing: bool = False) -> list[str]:
    """What the summary says is wrong (empty: the runtime held steady)."""
    problems = []
    growth = summary.get("rss_growth_mb")
    if growth is None:
        problems.append("too few samples for an RSS verdict (soak at least a few minutes)")
    elif growth > RSS_NOISE_MB and not tracing:
        problems.append(
            f"RSS grew {growth:+.1f} MB (median of the first → last quarter), "
            f"more than the {RSS_NOISE_MB:g} MB counted as noise"
        )
    files = summary.get("open_files_growth")
    if files is not None and files > FILES_NOISE:
        problems.append(f"open files grew by {files:g} (descriptor leak?)")
    return problems
