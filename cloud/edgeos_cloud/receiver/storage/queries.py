"""The read side of the SQL storage, and the hooks (connection, transactions) a back-end supplies.

:class:`~edgeos_cloud.receiver.storage.sql.SqlStorage` adds the write side (schema, ingest,
commands); :mod:`.sqlite` and :mod:`.postgres` supply the hooks. SQL is written with ``?``
placeholders (SQLite style); the PostgreSQL back-end rewrites them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from itertools import chain
from typing import Any

from edgeos_cloud.receiver.storage.base import (
    DeviceSummary,
    QuarantineEntry,
    QuarantineRecord,
    ReportedValue,
    SampleRow,
    Shadow,
    from_db_epoch,
    merge_ranges,
    to_db_epoch,
)
from edgeos_cloud.receiver.storage.blocks import MAX_SPAN_US, BlockMerger, decode_block

__all__ = ["SqlQueries"]


class SqlQueries:
    """Queries over the receiver's tables: samples, events, device summaries, shadows."""

    dialect = "sqlite"
    #: Row lock suffix for read-modify-write selects (PostgreSQL); SQLite locks the database.
    for_update = ""
    greatest = "max"

    # ------------------------------------------------------------------ hooks

    def _execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        raise NotImplementedError

    def _executemany(self, sql: str, rows: Any) -> None:
        raise NotImplementedError

    def _begin(self) -> None:
        raise NotImplementedError

    def _commit(self) -> None:
        raise NotImplementedError

    def _rollback(self) -> None:
        raise NotImplementedError

    def _iter_rows(
        self, sql: str, params: Sequence[Any], batch_rows: int = 10_000
    ) -> Iterator[Sequence[Any]]:
        """Rows of a long result, fetched ``batch_rows`` at a time where the driver can."""
        yield from self._execute(sql, params)

    def close(self) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------------ reading

    def _lookup_device(self, device: str) -> int | None:
        row = self._execute("SELECT id FROM devices WHERE name = ?", (device,)).fetchone()
        return None if row is None else int(row[0])

    def _tag_names(self, device_id: int) -> dict[int, str]:
        return {
            int(i): str(n)
            for i, n in self._execute(
                "SELECT id, name FROM tags WHERE device_id = ?", (device_id,)
            ).fetchall()
        }

    def query_samples(
        self,
        device: str,
        tag: str | None = None,
        since_us: int | None = None,
        until_us: int | None = None,
        limit: int | None = None,
    ) -> Iterator[SampleRow]:
        device_id = self._lookup_device(device)
        if device_id is None or (limit is not None and limit <= 0):
            return
        names = self._tag_names(device_id)
        tag_id = None
        if tag is not None:
            ids = [i for i, n in names.items() if n == tag]
            if not ids:
                return
            tag_id = ids[0]
        since = -(1 << 62) if since_us is None else since_us
        until = 1 << 62 if until_us is None else until_us
        merger = BlockMerger(since, until, tag_id)
        # No block spans more than MAX_SPAN_US: the (device_id, t_first) index bounds the scan.
        blocks = self._iter_rows(
            "SELECT id, t_first, data FROM sample_blocks WHERE device_id = ? AND t_first >= ?"
            " AND t_first < ? AND t_last >= ? ORDER BY t_first, id",
            (device_id, since - MAX_SPAN_US, until, since),
            batch_rows=16,
        )
        count = 0
        for rows in chain(
            (
                merger.add(decode_block(data, int(t_first)), int(bid), int(t_first))
                for bid, t_first, data in blocks
            ),
            (merger.finish(),),
        ):
            for ts, tid, value, quality in rows:
                yield SampleRow(device, names.get(tid, f"#{tid}"), ts, value, quality)
                count += 1
                if limit is not None and count >= limit:
                    return

    def events(self, device: str, since_us: int | None = None) -> list[dict[str, Any]]:
        device_id = self._lookup_device(device)
        if device_id is None:
            return []
        rows = self._execute(
            "SELECT ts, epoch, seq, body FROM events WHERE device_id = ? AND ts >= ? ORDER BY ts",
            (device_id, since_us or -(1 << 62)),
        ).fetchall()
        return [
            {"ts_us": int(ts), "epoch": from_db_epoch(int(ep)), "seq": int(seq), **json.loads(body)}
            for ts, ep, seq, body in rows
        ]

    def events_of_types(
        self, device: str, types: Sequence[str], since_us: int | None = None
    ) -> list[dict[str, Any]]:
        """Events of the given ``types`` stamped at or after ``since_us``, oldest first.

        For incremental readers (the model lifecycle's tracker): the ``(device_id, ts)`` index
        bounds the scan to the time since their cursor, and only the types they fold are parsed.
        """
        device_id = self._lookup_device(device)
        if device_id is None or not types:
            return []
        marks = ", ".join("?" for _ in types)
        rows = self._execute(
            "SELECT ts, epoch, seq, body FROM events WHERE device_id = ? AND ts >= ?"
            f" AND type IN ({marks}) ORDER BY ts",
            (device_id, since_us if since_us is not None else -(1 << 62), *types),
        ).fetchall()
        return [
            {"ts_us": int(ts), "epoch": from_db_epoch(int(ep)), "seq": int(seq), **json.loads(body)}
            for ts, ep, seq, body in rows
        ]

    def device_summaries(self) -> list[DeviceSummary]:
        rejects: dict[str, dict[str, int]] = {}
        for dev, reason, count in self._execute(
            "SELECT device, reason, count FROM rejects"
        ).fetchall():
            rejects.setdefault(str(dev), {})[str(reason)] = int(count)
        skips: dict[tuple[int, int], list[tuple[int, int]]] = {}
        for dev_id, epoch, first, last in self._execute(
            "SELECT device_id, epoch, first_seq, last_seq FROM skips"
        ).fetchall():
            skips.setdefault((int(dev_id), int(epoch)), []).append((int(first), int(last)))
        merged = {key: merge_ranges(ranges) for key, ranges in skips.items()}
        skipped: dict[int, int] = {}
        skipped_ranges: dict[int, list[tuple[int, int, int]]] = {}
        for (dev_id, epoch), ranges in sorted(merged.items()):
            for first, last in ranges:
                # A number both announced and stored (sent, then dropped from the device's
                # spool before the ack came) is not a gap.
                skipped[dev_id] = skipped.get(dev_id, 0) + (last - first + 1)
                skipped[dev_id] -= self._count_stored(dev_id, epoch, first, last)
                skipped_ranges.setdefault(dev_id, []).append((from_db_epoch(epoch), first, last))
        backlog: dict[int, int] = {}
        for row in self._execute(
            "SELECT device_id, epoch, acked_seq, max_seq FROM epochs WHERE max_seq > acked_seq"
        ).fetchall():
            dev_id, epoch, acked, max_seq = (int(v) for v in row)
            missing = max_seq - acked - self._count_stored(dev_id, epoch, acked + 1, max_seq)
            for first, last in merged.get((dev_id, epoch), []):
                lo, hi = max(first, acked + 1), min(last, max_seq)
                if lo <= hi:
                    missing -= (hi - lo + 1) - self._count_stored(dev_id, epoch, lo, hi)
            backlog[dev_id] = backlog.get(dev_id, 0) + missing
        quarantined: dict[int, dict[str, int]] = {}
        for dev_id, reason, count in self._execute(
            "SELECT device_id, reason, COUNT(*) FROM quarantine GROUP BY device_id, reason"
        ).fetchall():
            quarantined.setdefault(int(dev_id), {})[str(reason)] = int(count)
        states = {
            int(dev_id): (str(state), int(since))
            for dev_id, state, since in self._execute(
                "SELECT device_id, state, since_us FROM device_status"
            ).fetchall()
        }
        out = []
        seen = set()
        for dev_id, name, first, last, batches, samples in self._execute(
            "SELECT id, name, first_seen_us, last_seen_us, batches, samples FROM devices"
            " ORDER BY name"
        ).fetchall():
            state, since = states.get(int(dev_id), (None, None))
            held = quarantined.get(int(dev_id), {})
            seen.add(name)
            out.append(
                DeviceSummary(
                    str(name),
                    None if first is None else int(first),
                    None if last is None else int(last),
                    int(batches),
                    int(samples),
                    backlog.get(int(dev_id), 0),
                    rejects.get(str(name), {}),
                    skipped.get(int(dev_id), 0),
                    tuple(skipped_ranges.get(int(dev_id), ())),
                    state,
                    since,
                    sum(held.values()),
                    dict(sorted(held.items())),
                )
            )
        for name in sorted(set(rejects) - seen):
            out.append(DeviceSummary(name, None, None, 0, 0, 0, rejects[name]))
        return out

    def _count_stored(self, device_id: int, db_epoch: int, first: int, last: int) -> int:
        """Numbers in ``[first, last]`` stored or quarantined (a batch is never both)."""
        total = 0
        for table in ("batches", "quarantine"):
            (count,) = self._execute(
                f"SELECT COUNT(*) FROM {table} WHERE device_id = ? AND epoch = ? AND seq >= ?"
                " AND seq <= ?",
                (device_id, db_epoch, first, last),
            ).fetchone()
            total += int(count)
        return total

    def quarantined(
        self, device: str | None = None, limit: int | None = None
    ) -> list[QuarantineEntry]:
        where = ""
        params: tuple[str, ...] = ()
        if device is not None:
            where, params = " WHERE d.name = ?", (device,)
        rows = self._execute(
            "SELECT d.name, q.epoch, q.seq, q.key_id, q.created_us, q.received_us, q.reason,"
            " q.detail, q.attempts, q.last_us, LENGTH(q.payload) FROM quarantine q"
            f" JOIN devices d ON d.id = q.device_id{where} ORDER BY q.received_us, d.name,"
            " q.epoch, q.seq" + ("" if limit is None else f" LIMIT {int(limit)}"),
            params,
        ).fetchall()
        return [
            QuarantineEntry(
                device=str(row[0]),
                epoch=from_db_epoch(int(row[1])),
                seq=int(row[2]),
                key_id=int(row[3]),
                created_us=int(row[4]),
                received_us=int(row[5]),
                reason=str(row[6]),
                detail=str(row[7]),
                attempts=int(row[8]),
                last_us=int(row[9]),
                nbytes=int(row[10]),
            )
            for row in rows
        ]

    def quarantined_record(self, device: str, epoch: int, seq: int) -> QuarantineRecord | None:
        row = self._execute(
            "SELECT q.key_id, q.created_us, q.received_us, q.reason, q.detail, q.payload"
            " FROM quarantine q JOIN devices d ON d.id = q.device_id"
            " WHERE d.name = ? AND q.epoch = ? AND q.seq = ?",
            (device, to_db_epoch(epoch), seq),
        ).fetchone()
        if row is None:
            return None
        key_id, created, received, reason, detail, payload = row
        return QuarantineRecord(
            device,
            epoch,
            seq,
            int(key_id),
            int(created),
            int(received),
            str(reason),
            str(detail),
            bytes(payload),
        )

    def reported(self, device: str) -> dict[str, ReportedValue]:
        device_id = self._lookup_device(device)
        if device_id is None:
            return {}
        shadow = self._load_shadow(device_id)
        names = self._tag_names(device_id)
        out: dict[str, ReportedValue] = {}
        for tid, ts, value, quality in zip(
            shadow.tag_ids.tolist(),
            shadow.ts.tolist(),
            shadow.value.tolist(),
            shadow.quality.tolist(),
            strict=True,
        ):
            out[names.get(tid, f"#{tid}")] = ReportedValue(
                ts, None if math.isnan(value) else value, quality
            )
        for tid, (ts, text, quality) in shadow.text.items():
            out[names.get(tid, f"#{tid}")] = ReportedValue(ts, text, quality)
        return dict(sorted(out.items()))

    def _load_shadow(self, device_id: int, *, lock: bool = False) -> Shadow:
        """The device's shadow; ``lock`` holds its row for a read-modify-write (ingest)."""
        row = self._execute(
            "SELECT tag_ids, ts, value, quality, text FROM shadows WHERE device_id = ?"
            + (self.for_update if lock else ""),
            (device_id,),
        ).fetchone()
        return Shadow.empty() if row is None else Shadow.from_row(row)
