"""What the plant interfaces share: the twin's changes off the hot path, names, guard state.

**Off the hot path.** :class:`Hub` subscribes to the twin (``twin.subscribe``); after every
``apply`` its listener marks the columns that *changed* (the twin's own change detection, with
each tag's deadband) in one boolean mask per consumer and sets that consumer's event — a
vectorised assignment, no allocation that grows, no I/O. Each interface runs in its own task,
wakes on its event, takes the marked columns (:meth:`Feed.take`) and reads their current value,
quality and source timestamp from the twin's columns. A consumer that falls behind loses
nothing but intermediate values of a tag (it always sends the latest); memory is bounded by
construction (one bool per tag per consumer).

**Names.** The plant sees the twin's equipment structure: ``nest01.heater.sp`` is metric
``heater/sp`` of device (folder) ``nest01``; a tag without a dot belongs to the node itself.
"""

from __future__ import annotations

import asyncio
import os
import stat
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from edgeos.errors import ProvisioningError
from edgeos.tags import TagSpec
from edgeos.twin import ScanRecord, Twin

__all__ = [
    "GUARD_METRICS",
    "Feed",
    "GuardStats",
    "Hub",
    "PlantNames",
    "read_secret",
    "split_name",
]

#: Returns the guard's ``stats()`` (``learning``, ``slack``, ``tyres``, …) or None without one.
GuardStats = Callable[[], Mapping[str, Any] | None]

#: Guard state published on each station: metric suffix -> (stats key, kind).
GUARD_METRICS: dict[str, tuple[str, str]] = {
    "guard/learning": ("learning", "bool"),
    "guard/slack": ("slack", "float"),
    "guard/alpha": ("alpha", "float"),
    "guard/tyres": ("tyres", "int"),
}


def split_name(name: str) -> tuple[str | None, str]:
    """``nest01.heater.sp`` -> ``("nest01", "heater/sp")``; ``uptime`` -> ``(None, "uptime")``."""
    device, dot, rest = name.partition(".")
    if not dot:
        return None, name
    return device, rest.replace(".", "/")


@dataclass(frozen=True, slots=True)
class PlantNames:
    """Devices (equipment instances) and metric names of the twin's tags."""

    #: Device per twin column (-1: a node-level tag).
    device_of: npt.NDArray[np.int32]
    devices: tuple[str, ...]
    metric: tuple[str, ...]
    #: Devices that carry gate outputs (``<station>.gate.verdict``): they get guard metrics.
    stations: tuple[str, ...]

    @classmethod
    def of(cls, tags: Sequence[TagSpec]) -> PlantNames:
        devices: dict[str, int] = {}
        device_of = np.full(len(tags), -1, dtype=np.int32)
        metrics: list[str] = []
        stations: list[str] = []
        for i, tag in enumerate(tags):
            device, metric = split_name(tag.name)
            metrics.append(metric)
            if device is not None:
                device_of[i] = devices.setdefault(device, len(devices))
                if metric == "gate/verdict":
                    stations.append(device)
        return cls(device_of, tuple(devices), tuple(metrics), tuple(stations))


class Feed:
    """One consumer's view of the twin's changes: a mask of changed columns and a wake-up."""

    def __init__(self, name: str, size: int) -> None:
        self.name = name
        self._dirty = np.zeros(size, dtype=bool)
        self._event = asyncio.Event()
        #: Scans that marked at least one change for this consumer.
        self.marks = 0

    def mark(self, indices: npt.NDArray[np.int32]) -> None:
        self._dirty[indices] = True
        self.marks += 1
        self._event.set()

    def mark_all(self) -> None:
        self._dirty[:] = True
        self._event.set()

    def wake(self) -> None:
        """Wake the consumer without a change (e.g. the guard's state or a command outcome)."""
        self._event.set()

    async def wait(self) -> None:
        """Return once something is marked (at once if something already is)."""
        await self._event.wait()

    def take(self) -> npt.NDArray[np.int32]:
        """The columns that changed since the last take (and forget them)."""
        self._event.clear()
        idx = np.flatnonzero(self._dirty).astype(np.int32)
        self._dirty[idx] = False
        return idx


class Hub:
    """Fans the twin's per-scan changes out to the plant interfaces (see the module docs)."""

    def __init__(self, twin: Twin) -> None:
        self.twin = twin
        self._feeds: list[Feed] = []
        self._unsubscribe: Callable[[], None] | None = None
        self.records = 0

    def feed(self, name: str) -> Feed:
        """A new consumer; nothing is marked yet (``mark_all`` for a complete first send)."""
        feed = Feed(name, len(self.twin))
        self._feeds.append(feed)
        return feed

    def attach(self) -> None:
        if self._unsubscribe is None:
            self._unsubscribe = self.twin.subscribe(self._on_record)

    def detach(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None

    def _on_record(self, record: ScanRecord) -> None:
        # Runs inside twin.apply on the scan loop: one masked index and one assignment per
        # consumer; everything else happens in the consumers' own tasks.
        self.records += 1
        changed = record.indices[record.changed]
        if changed.shape[0]:
            for feed in self._feeds:
                feed.mark(changed)


def read_secret(path: Path, what: str) -> str:
    """First line of a secret file that group and others cannot read (``ProvisioningError``)."""
    try:
        st = os.stat(path)
        if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ProvisioningError(f"{what} {path} is readable by group or others; chmod 600 it")
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ProvisioningError(f"{what} {path} cannot be read: {exc.strerror or exc}") from exc
    return text.splitlines()[0] if text else ""
