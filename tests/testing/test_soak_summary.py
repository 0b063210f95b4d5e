"""The soak's resource verdict: flat series with steps pass, a steady climb or an fd leak fails."""

from __future__ import annotations

import random
from typing import Any

from edgeos_testing.soak import RSS_NOISE_MB, soak_problems, soak_summary


def _series(rss: Any, files: Any = lambda t: 19, n: int = 360) -> list[dict[str, Any]]:
    rng = random.Random(4)
    return [
        {
            "t_s": 10 * i,
            "rss_mb": round(rss(10 * i) + rng.uniform(-0.2, 0.2), 1),
            "open_files": files(10 * i),
            "spool_bytes": 1000,
            "jitter_p99_ms": 1.0,
            "py_blocks": 350_000,
        }
        for i in range(n)
    ]


def test_a_flat_series_with_a_step_early_on_is_noise() -> None:
    # A backlog after the first fault lifts RSS by 1.5 MB once; then it stays put.
    summary = soak_summary(_series(lambda t: 87.0 + (1.5 if t > 200 else 0.0)))
    assert abs(summary["rss_growth_mb"]) < RSS_NOISE_MB
    assert soak_problems(summary) == []
    assert summary["open_files_first_last_max"] == [19, 19, 19]


def test_a_steady_climb_is_reported() -> None:
    summary = soak_summary(_series(lambda t: 87.0 + 4.0 * t / 3600))  # +4 MB/h for an hour
    assert summary["rss_growth_mb_per_h"] > 3.5
    problems = soak_problems(summary)
    assert len(problems) == 1 and "RSS grew" in problems[0]
    # With tracemalloc on, RSS is the tracer's: the growth is shown, not judged.
    assert soak_problems(summary, tracing=True) == []


def test_a_descriptor_leak_is_reported() -> None:
    summary = soak_summary(_series(lambda t: 87.0, files=lambda t: 19 + t // 300))
    assert any("open files grew" in p for p in soak_problems(summary))


def test_too_short_a_soak_gets_no_verdict() -> None:
    assert "too few samples" in soak_problems(soak_summary(_series(lambda t: 87.0, n=5)))[0]
