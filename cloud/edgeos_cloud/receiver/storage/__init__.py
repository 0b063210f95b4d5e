"""Receiver storage: the :class:`Storage` protocol and its SQLite and PostgreSQL back-ends.

:func:`open_storage` picks the back-end from the URL (``sqlite:///path.db`` or
``postgresql://…``); PostgreSQL needs the ``postgres`` extra (psycopg 3) and is imported only
when asked for.
"""

from __future__ import annotations

from edgeos_cloud.receiver.storage.base import (
    Command,
    DeviceStatus,
    DeviceSummary,
    IngestBatch,
    QuarantineEntry,
    QuarantineRecord,
    ReportedValue,
    SampleRow,
    Storage,
    StoreOutcome,
)

__all__ = [
    "Command",
    "DeviceStatus",
    "DeviceSummary",
    "IngestBatch",
    "QuarantineEntry",
    "QuarantineRecord",
    "ReportedValue",
    "SampleRow",
    "Storage",
    "StoreOutcome",
    "open_storage",
]


def open_storage(url: str, *, sqlite_synchronous: str = "full") -> Storage:
    """Open (and create the schema of) the storage named by ``url``."""
    if url.startswith("sqlite:///"):
        from edgeos_cloud.receiver.storage.sqlite import SqliteStorage

        return SqliteStorage(url.removeprefix("sqlite:///"), synchronous=sqlite_synchronous)
    if url.startswith(("postgresql://", "postgres://")):
        from edgeos_cloud.receiver.storage.postgres import PostgresStorage

        return PostgresStorage(url)
    raise ValueError(f"unsupported storage url {url!r} (sqlite:///PATH or postgresql://…)")
