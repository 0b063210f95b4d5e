"""Where the runtime's memory is: ``edgeos debug memory`` and the status document's ``process``.

A gateway runs for months; an operator who sees RSS climb needs to tell apart growth of the
Python heap (objects kept alive: a list that is never trimmed, a task per reconnect), growth of
native memory (OpenSSL, zstd, the TFLite interpreter, malloc arenas) and plain fragmentation.
``process_figures()`` is cheap enough for every status call; ``memory_report()`` walks the heap
and is for diagnosis only. With ``PYTHONTRACEMALLOC=N`` in the service's environment the report
can also dump a ``tracemalloc`` snapshot, which ``python -m edgeos.memory OLD NEW`` compares.
"""

from __future__ import annotations

import collections
import gc
import os
import sys
import threading
import tracemalloc
from pathlib import Path
from typing import Any

__all__ = ["compare_snapshots", "memory_report", "process_figures"]


def _proc_status() -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return out
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "VmData"):
            out[key] = int(rest.split()[0])  # kB
    return out


def process_figures() -> dict[str, Any]:
    """RSS, Python heap blocks, threads and open files of this process (a few µs)."""
    st = _proc_status()
    try:
        fds = len(os.listdir("/proc/self/fd"))
    except OSError:
        fds = -1
    return {
        "rss_mb": round(st.get("VmRSS", 0) / 1024, 1),
        "rss_peak_mb": round(st.get("VmHWM", 0) / 1024, 1),
        "anon_mb": round(st.get("RssAnon", 0) / 1024, 1),
        "py_blocks": sys.getallocatedblocks(),
        "threads": threading.active_count(),
        "open_files": fds,
    }


def memory_report(*, top: int = 20, dump: Path | None = None) -> dict[str, Any]:
    """Process figures, the most numerous object types, and tracemalloc's view when tracing.

    ``dump`` writes a tracemalloc snapshot there (only when tracing; the runtime must have been
    started with ``PYTHONTRACEMALLOC``, since tracing only sees allocations made after it began).
    """
    doc: dict[str, Any] = {"process": process_figures(), "gc": {"counts": gc.get_count()}}
    if top > 0:
        objs = gc.get_objects()
        doc["gc"]["tracked_objects"] = len(objs)
        counts = collections.Counter(type(o).__qualname__ for o in objs)
        del objs
        doc["types"] = counts.most_common(top)
    tracing = tracemalloc.is_tracing()
    doc["tracemalloc"] = {"tracing": tracing}
    if tracing:
        current, peak = tracemalloc.get_traced_memory()
        doc["tracemalloc"].update(
            {"current_mb": round(current / 2**20, 2), "peak_mb": round(peak / 2**20, 2)}
        )
        snap = tracemalloc.take_snapshot()
        if dump is not None:
            dump.parent.mkdir(parents=True, exist_ok=True)
            snap.dump(str(dump))
            doc["tracemalloc"]["dumped"] = str(dump)
        if top > 0:
            doc["tracemalloc"]["top"] = [
                {"where": str(s.traceback), "kb": round(s.size / 1024, 1), "count": s.count}
                for s in snap.statistics("lineno")[:top]
            ]
    elif dump is not None:
        raise ValueError(
            "tracemalloc is not tracing: start the runtime with PYTHONTRACEMALLOC=1 (or more "
            "frames) in its environment to dump snapshots"
        )
    return doc


def compare_snapshots(old: Path, new: Path, *, top: int = 25, key: str = "lineno") -> list[str]:
    """The allocation sites that grew most between two dumped snapshots, one line each."""
    filters = [
        tracemalloc.Filter(False, tracemalloc.__file__),
        tracemalloc.Filter(False, "<frozen importlib._bootstrap>"),
    ]
    a = tracemalloc.Snapshot.load(str(old)).filter_traces(filters)
    b = tracemalloc.Snapshot.load(str(new)).filter_traces(filters)
    lines = []
    for stat in b.compare_to(a, key)[:top]:
        frame = stat.traceback[0]
        lines.append(
            f"{stat.size_diff / 1024:+10.1f} KiB {stat.count_diff:+8d} blocks  "
            f"{frame.filename}:{frame.lineno}"
        )
    return lines


def _main(argv: list[str]) -> int:
    if len(argv) not in (2, 3):
        print("usage: python -m edgeos.memory OLD.snapshot NEW.snapshot [TOP]", file=sys.stderr)
        return 2
    top = int(argv[2]) if len(argv) == 3 else 25
    for line in compare_snapshots(Path(argv[0]), Path(argv[1]), top=top):
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
