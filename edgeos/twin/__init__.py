"""The local digital twin: columnar tag state, history windows, desired state, snapshots."""

from __future__ import annotations

from edgeos.twin.desired import FINAL, DesiredChange, LastWrite, Status, WriteLog, WritePath
from edgeos.twin.history import History
from edgeos.twin.scanlog import ScanBatch, ScanLog, ScanRecord
from edgeos.twin.store import Twin

__all__ = [
    "FINAL",
    "DesiredChange",
    "History",
    "LastWrite",
    "ScanBatch",
    "ScanLog",
    "ScanRecord",
    "Status",
    "Twin",
    "WriteLog",
    "WritePath",
]
