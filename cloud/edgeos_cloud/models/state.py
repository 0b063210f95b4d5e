"""Where the lifecycle's incremental readers remember how far they read (``home/state/*.json``).

The drift monitor and the fleet tracker are steps run from a timer; each reads only what the
receiver stored since its last step. Their cursors and running aggregates are small JSON
documents, replaced atomically (write + fsync + rename), so a step that fails half-way leaves
the previous state and is simply repeated.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

__all__ = ["StateFile"]

_SAFE = re.compile(r"[^A-Za-z0-9_.-]")


class StateFile:
    """One JSON document under ``home/state/``."""

    def __init__(self, home: Path, name: str) -> None:
        self.path = Path(home) / "state" / f"{_SAFE.sub('_', name)}.json"

    def load(self) -> dict[str, Any]:
        try:
            data: dict[str, Any] = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        return data

    def save(self, data: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        with tmp.open("w", encoding="utf-8") as f:
            json.dump(data, f, separators=(",", ":"))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)
