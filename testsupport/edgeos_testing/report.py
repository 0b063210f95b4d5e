"""Scenario verdicts and the run's report (JSON plus a Markdown summary)."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeos_testing.oracle import Figures

__all__ = ["Outcome", "summary_markdown", "write_json", "write_report"]


@dataclass(slots=True)
class Outcome:
    """One scenario's verdict: the oracle's figures plus what the scenario noted."""

    name: str
    figures: Figures
    notes: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return self.figures.clean and not self.problems

    def as_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "seconds": round(self.seconds, 1),
            "figures": self.figures.as_dict(),
            "notes": self.notes,
            "problems": self.problems,
        }


def summary_markdown(title: str, scenarios: Mapping[str, Mapping[str, Any]]) -> str:
    """A short Markdown table of the figures of every scenario."""
    lines = [
        f"# {title}",
        "",
        "| scenario | ok | accepted | stored | gaps | pending | lost | dup | order | wrong "
        "| window lost/unread/policy | skipped by the runtime (announced) | coverage "
        "| latency p50/p99/max s | notes |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- "
        "| --- |",
    ]
    for name, doc in scenarios.items():
        f = doc.get("figures", {})
        lat = "/".join(
            "-" if f.get(k) is None else f"{f[k]:.2f}"
            for k in ("latency_p50_s", "latency_p99_s", "latency_max_s")
        )
        notes = "; ".join(f"{k}={v}" for k, v in (doc.get("notes") or {}).items())
        wrong = str(f.get("mismatched"))
        if f.get("wrong_under_corruption"):
            wrong += f" (+{f['wrong_under_corruption']} corrupted)"
        lines.append(
            f"| {name} | {'yes' if doc.get('passed') else 'NO'} | {f.get('accepted_batches')} "
            f"| {f.get('stored_batches')} | {f.get('announced_gap_batches')} "
            f"| {f.get('pending_on_disk_batches')} | {f.get('lost_batches')} "
            f"| {f.get('duplicates')} | {f.get('order_violations')} | {wrong} "
            f"| {f.get('window_lost')}/{f.get('window_unread')}/{f.get('window_policy')} "
            f"| {f.get('window_skipped', 0)} ({f.get('scans_skipped_announced', 0)}) "
            f"| {f.get('coverage')} "
            f"| {lat} | {notes} |"
        )
    lines.append("")
    lines.append(
        "accepted = batches that reached the spool; gaps = announced in meta.skip (refused or "
        "dropped by the full policy); pending = still in the spool on disk at the end; wrong = "
        "stored values never served (corrupted = while machine-link bytes were being corrupted "
        "on purpose: Modbus TCP has no checksum); window lost = tag scans missing from the "
        "stored rows while the runtime ran, up to its last accepted batch (unread = next to a "
        "machine-link fault, policy = inside a gap announced in meta.skip); skipped by the "
        "runtime = tag scans missing because the scheduler did not run them (overload: a scan "
        "still running at its next deadline, or a late dispatcher) and announced it in "
        "meta.scans_skipped — never read, so not accepted data that was lost (that is 'lost') — "
        "with, in parentheses, the scans (of a connection and scan group) it announced; "
        "coverage ="
        " Modbus responses served that reached the receiver; latency = "
        "scan → received by the receiver."
    )
    return "\n".join(lines) + "\n"


def write_json(path: Path, doc: Mapping[str, Any]) -> None:
    """Write ``doc`` as pretty JSON atomically."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def write_report(directory: Path, doc: Mapping[str, Any]) -> tuple[Path, Path]:
    """Write the run's JSON report and Markdown summary (plus ``latest.*`` copies)."""
    directory.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    json_path = directory / f"hil-{stamp}.json"
    md_path = directory / f"hil-{stamp}.md"
    write_json(json_path, doc)
    title = f"HIL run {stamp} — rig {doc.get('rig', {}).get('name')}, mode {doc.get('mode')}"
    text = summary_markdown(title, doc.get("scenarios", {}))
    soak = doc.get("soak")
    if soak:
        text += "\n## Soak\n\n" + "\n".join(
            f"* {k}: {v}" for k, v in soak.get("summary", {}).items()
        )
        text += "\n"
    md_path.write_text(text, encoding="utf-8")
    shutil.copyfile(json_path, directory / "latest.json")
    shutil.copyfile(md_path, directory / "latest.md")
    return json_path, md_path
