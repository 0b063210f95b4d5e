"""PostgreSQL storage (psycopg 3, the ``postgres`` extra): the same schema and SQL as SQLite.

Samples travel packed, one ``sample_blocks`` row per batch (see ``blocks.py``). Transactions
lock the ``epochs`` rows of the batches they store (sorted, so two receivers never deadlock)
before touching the ledger, which makes the check for a replay and the contiguous-ack
computation race-free across receivers.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from typing import Any

from edgeos_cloud.receiver.storage.base import IngestBatch, QuarantineRecord, StoreOutcome
from edgeos_cloud.receiver.storage.sql import SqlStorage

__all__ = ["PostgresStorage"]

_PLACEHOLDER = re.compile(r"\?")


class PostgresStorage(SqlStorage):
    """Storage in a PostgreSQL database (``postgresql://user@host:port/db``)."""

    dialect = "postgres"
    for_update = " FOR UPDATE"
    greatest = "GREATEST"

    def __init__(self, url: str) -> None:
        super().__init__()
        import psycopg

        self._psycopg = psycopg
        self._conn = psycopg.connect(url, autocommit=True)
        with self._transaction():
            # Two receivers starting together must not both create the tables.
            self._conn.execute("SELECT pg_advisory_xact_lock(7408829463)")
            self._create_schema()

    def _execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        return self._conn.execute(_PLACEHOLDER.sub("%s", sql), params)

    def _executemany(self, sql: str, rows: Any) -> None:
        with self._conn.cursor() as cur:
            cur.executemany(_PLACEHOLDER.sub("%s", sql), rows)

    def _begin(self) -> None:
        self._conn.execute("BEGIN")

    def _commit(self) -> None:
        self._conn.execute("COMMIT")

    def _rollback(self) -> None:
        if self._conn.info.transaction_status != self._psycopg.pq.TransactionStatus.IDLE:
            self._conn.execute("ROLLBACK")

    def store(
        self, batches: Sequence[IngestBatch], quarantine: Sequence[QuarantineRecord] = ()
    ) -> list[StoreOutcome]:
        """As the base class, retrying a transaction PostgreSQL aborted as a deadlock victim."""
        errors = self._psycopg.errors
        for attempt in range(5):
            try:
                return super().store(batches, quarantine)
            except (errors.DeadlockDetected, errors.SerializationFailure):
                if attempt == 4:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _outage_error(self, exc: BaseException) -> bool:
        # Connection lost, server shutting down, out of resources, deadlock or serialization
        # (class 08, 53, 57, 58, 40 …: psycopg's OperationalError), or the client's own state.
        psycopg = self._psycopg
        return isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError)

    def _iter_rows(
        self, sql: str, params: Sequence[Any], batch_rows: int = 10_000
    ) -> Iterator[Sequence[Any]]:
        # A server-side cursor streams long query results instead of loading them at once.
        self._conn.autocommit = False
        try:
            with self._conn.cursor(name="edgeos_query") as cur:
                cur.itersize = batch_rows
                cur.execute(_PLACEHOLDER.sub("%s", sql), params)
                yield from cur
            self._conn.commit()
        finally:
            if self._conn.info.transaction_status != self._psycopg.pq.TransactionStatus.IDLE:
                self._conn.rollback()
            self._conn.autocommit = True

    def close(self) -> None:
        self._conn.close()
