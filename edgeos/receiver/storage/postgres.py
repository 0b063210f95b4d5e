"""PostgreSQL storage (psycopg 3, the ``postgres`` extra): the same schema, COPY for samples.

Samples travel as one binary ``COPY`` per batch whose buffer numpy builds in one go (no Python
object per sample). Transactions lock the ``epochs`` rows of the batches they store (sorted,
so two receivers never deadlock) before touching the ledger, which makes the check for a
replay and the contiguous-ack computation race-free across receivers.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from edgeos.receiver.storage.base import IngestBatch, StoreOutcome
from edgeos.receiver.storage.sql import SqlStorage

__all__ = ["PostgresStorage"]

_PLACEHOLDER = re.compile(r"\?")
_COPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + (0).to_bytes(4, "big") + (0).to_bytes(4, "big")
_COPY_TRAILER = (-1).to_bytes(2, "big", signed=True)
# One binary COPY tuple: field count, then (length, value) per column. Rows whose value is
# NaN are sent with length -1 (NULL) and no value bytes, hence a second layout.
_ROW = np.dtype(
    [
        ("n", ">i2"),
        ("l_dev", ">i4"),
        ("dev", ">i4"),
        ("l_ts", ">i4"),
        ("ts", ">i8"),
        ("l_tag", ">i4"),
        ("tag", ">i4"),
        ("l_val", ">i4"),
        ("val", ">f8"),
        ("l_q", ">i4"),
        ("q", ">i2"),
    ]
)
_ROW_NULL = np.dtype(
    [
        ("n", ">i2"),
        ("l_dev", ">i4"),
        ("dev", ">i4"),
        ("l_ts", ">i4"),
        ("ts", ">i8"),
        ("l_tag", ">i4"),
        ("tag", ">i4"),
        ("l_val", ">i4"),
        ("l_q", ">i4"),
        ("q", ">i2"),
    ]
)


def _copy_buffer(
    device_id: int,
    ts: npt.NDArray[np.int64],
    tag_id: npt.NDArray[np.int64],
    value: npt.NDArray[np.float64],
    quality: npt.NDArray[np.uint8],
) -> bytes:
    null = np.isnan(value)
    parts = [_COPY_HEADER]
    for dtype, mask in ((_ROW, ~null), (_ROW_NULL, null)):
        count = int(np.count_nonzero(mask))
        if not count:
            continue
        rec = np.empty(count, dtype)
        rec["n"] = 5
        rec["l_dev"] = 4
        rec["dev"] = device_id
        rec["l_ts"] = 8
        rec["ts"] = ts[mask]
        rec["l_tag"] = 4
        rec["tag"] = tag_id[mask]
        if dtype is _ROW:
            rec["l_val"] = 8
            rec["val"] = value[mask]
        else:
            rec["l_val"] = -1
        rec["l_q"] = 2
        rec["q"] = quality[mask]
        parts.append(rec.tobytes())
    parts.append(_COPY_TRAILER)
    return b"".join(parts)


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
        self._begin()
        try:
            # Two receivers starting together must not both create the tables.
            self._conn.execute("SELECT pg_advisory_xact_lock(7408829463)")
            self._create_schema()
            self._commit()
        except BaseException:
            self._rollback()
            raise

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

    def store(self, batches: Sequence[IngestBatch]) -> list[StoreOutcome]:
        """As the base class, retrying a transaction PostgreSQL aborted as a deadlock victim."""
        errors = self._psycopg.errors
        for attempt in range(5):
            try:
                return super().store(batches)
            except (errors.DeadlockDetected, errors.SerializationFailure):
                if attempt == 4:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _insert_samples(
        self,
        device_id: int,
        ts: npt.NDArray[np.int64],
        tag_id: npt.NDArray[np.int64],
        value: npt.NDArray[np.float64],
        quality: npt.NDArray[np.uint8],
    ) -> None:
        buf = _copy_buffer(device_id, ts, tag_id, value, quality)
        with (
            self._conn.cursor() as cur,
            cur.copy(
                "COPY samples (device_id, ts, tag_id, value, quality) FROM STDIN (FORMAT BINARY)"
            ) as copy,
        ):
            copy.write(buf)

    def _iter_rows(self, sql: str, params: Sequence[Any]) -> Iterator[Sequence[Any]]:
        # A server-side cursor streams long query results instead of loading them at once.
        self._conn.autocommit = False
        try:
            with self._conn.cursor(name="edgeos_query") as cur:
                cur.itersize = 10_000
                cur.execute(_PLACEHOLDER.sub("%s", sql), params)
                yield from cur
            self._conn.commit()
        finally:
            if self._conn.info.transaction_status != self._psycopg.pq.TransactionStatus.IDLE:
                self._conn.rollback()
            self._conn.autocommit = True

    def close(self) -> None:
        self._conn.close()
