"""SQLite storage: one WAL file, zero set-up; the default back-end."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edgeos_cloud.receiver.storage.sql import SqlStorage

__all__ = ["SqliteStorage"]


class SqliteStorage(SqlStorage):
    """Storage in one SQLite file (WAL).

    ``synchronous="full"`` (default) fsyncs the WAL at every commit, so a batch acknowledged
    after :meth:`store` returns survives a power cut; ``"normal"`` survives only a crash of the
    process. Several processes may share the file (``BEGIN IMMEDIATE`` serializes writers;
    ``busy_timeout`` waits for the lock instead of failing).
    """

    dialect = "sqlite"

    def __init__(self, path: str | Path, *, synchronous: str = "full") -> None:
        super().__init__()
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # The writer thread that opens the storage is the only one that uses it.
        self._conn = sqlite3.connect(
            self.path, isolation_level=None, timeout=60.0, check_same_thread=False
        )
        self._conn.execute("PRAGMA journal_mode = WAL")
        self._conn.execute(f"PRAGMA synchronous = {'FULL' if synchronous == 'full' else 'NORMAL'}")
        self._conn.execute("PRAGMA foreign_keys = OFF")
        # A 16,000-tag batch touches a few MB of pages; a larger cache keeps the hot end of the
        # sample B-tree in memory.
        self._conn.execute("PRAGMA cache_size = -131072")
        self._conn.execute("PRAGMA temp_store = MEMORY")
        with self._transaction():
            self._create_schema()

    def _execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        return self._conn.execute(sql, params)

    def _executemany(self, sql: str, rows: Any) -> None:
        self._conn.executemany(sql, rows)

    def _begin(self) -> None:
        # IMMEDIATE takes the write lock up front: read-then-write inside the transaction
        # (ledger, contiguous mark, shadow) cannot interleave with another receiver's.
        self._conn.execute("BEGIN IMMEDIATE")

    def _commit(self) -> None:
        self._conn.execute("COMMIT")

    def _rollback(self) -> None:
        if self._conn.in_transaction:
            self._conn.execute("ROLLBACK")

    def _outage_error(self, exc: BaseException) -> bool:
        # Locked, disk full or I/O error, a closed connection: the database's trouble. A
        # value SQLite cannot hold is an OverflowError or a sqlite3.DataError/IntegrityError.
        return isinstance(exc, sqlite3.OperationalError | sqlite3.InterfaceError) or (
            isinstance(exc, sqlite3.ProgrammingError) and "closed" in str(exc)
        )

    def close(self) -> None:
        self._conn.close()
