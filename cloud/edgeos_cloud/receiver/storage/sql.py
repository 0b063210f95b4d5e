"""The storage logic both SQL back-ends share (write side); subclasses supply the connection.

SQL is written once with ``?`` placeholders (SQLite style); the PostgreSQL subclass rewrites
them. Transactions are explicit (``BEGIN`` … ``COMMIT`` on an autocommit connection) so the
same code runs on both.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from itertools import repeat
from typing import Any

import numpy as np
import numpy.typing as npt

from edgeos_cloud.receiver.storage.base import (
    SCHEMA_VERSION,
    Command,
    DeviceStatus,
    IngestBatch,
    QuarantineRecord,
    Shadow,
    StoreOutcome,
    latest_per_tag,
    merge_ranges,
    new_command_id,
    safe_dumps,
    schema_statements,
    split_text,
    to_db_epoch,
)
from edgeos_cloud.receiver.storage.blocks import Block, encode_blocks
from edgeos_cloud.receiver.storage.queries import SqlQueries

__all__ = ["SqlStorage"]

log = logging.getLogger("edgeos_cloud.receiver")

_TagSig = tuple[list[str], bytes, list[str], bytes, bytes]


class SqlStorage(SqlQueries):
    """Shared implementation of :class:`~edgeos_cloud.receiver.storage.base.Storage`.

    The reads and the back-end hooks are :class:`SqlQueries`'; this class writes.
    """

    def __init__(self) -> None:
        self._device_ids: dict[str, int] = {}
        self._tag_cache: dict[int, tuple[_TagSig, npt.NDArray[np.int64]]] = {}
        self._staged_devices: dict[str, int] = {}
        self._staged_tags: dict[int, tuple[_TagSig, npt.NDArray[np.int64]]] = {}

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        """One transaction; the device and tag ids it creates are cached only once committed."""
        self._staged_devices.clear()
        self._staged_tags.clear()
        self._begin()
        try:
            yield
            self._commit()
        except BaseException:
            self._rollback()
            self._staged_devices.clear()
            self._staged_tags.clear()
            raise
        self._device_ids.update(self._staged_devices)
        self._tag_cache.update(self._staged_tags)

    # ------------------------------------------------------------------ schema

    def _create_schema(self) -> None:
        self._execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        row = self._execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        version = None if row is None else int(row[0])
        if version not in (None, 1, SCHEMA_VERSION):
            raise RuntimeError(
                f"database schema version {version} is newer than {SCHEMA_VERSION}; upgrade edgeos"
            )
        for stmt in schema_statements(self.dialect):
            self._execute(stmt)
        if version == 1:
            self._migrate_v1()
        if version != SCHEMA_VERSION:
            self._execute(
                "INSERT INTO meta (key, value) VALUES ('schema_version', ?)"
                " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (str(SCHEMA_VERSION),),
            )

    def _migrate_v1(self) -> None:
        """Version 1 kept one row per sample: pack them into blocks (one transaction)."""
        log.warning("migrating the receiver database to schema %d (sample blocks)", SCHEMA_VERSION)
        for table in ("samples", "text_samples"):
            devices = [int(d) for (d,) in self._execute(f"SELECT DISTINCT device_id FROM {table}")]
            for device_id in devices:
                last = (-(1 << 62), -1)
                while True:
                    rows = self._execute(
                        f"SELECT ts, tag_id, value, quality FROM {table} WHERE device_id = ?"
                        " AND (ts > ? OR (ts = ? AND tag_id > ?)) ORDER BY ts, tag_id LIMIT 100000",
                        (device_id, last[0], last[0], last[1]),
                    ).fetchall()
                    if not rows:
                        break
                    ts, tag, value, quality = zip(*rows, strict=True)
                    text: dict[int, str | None] = {}
                    if table == "text_samples":
                        text = {i: None if v is None else str(v) for i, v in enumerate(value)}
                        value = (math.nan,) * len(rows)
                    blocks = encode_blocks(
                        np.array(ts, np.int64),
                        np.array(tag, np.int64),
                        np.array([math.nan if v is None else v for v in value], np.float64),
                        np.array(quality, np.uint8),
                        text,
                    )
                    self._insert_blocks(device_id, 0, 0, blocks)
                    last = (int(ts[-1]), int(tag[-1]))
            self._execute(f"DROP TABLE {table}")
        for row in self._execute(
            "SELECT device_id, tag_ids, ts, value, quality, text FROM shadows"
        ).fetchall():
            shadow = Shadow.from_row(row[1:], packed=False)
            self._save_shadow(int(row[0]), shadow, int(time.time() * 1e6))

    # ------------------------------------------------------------------ ingest

    def store(
        self, batches: Sequence[IngestBatch], quarantine: Sequence[QuarantineRecord] = ()
    ) -> list[StoreOutcome]:
        if not batches and not quarantine:
            return []
        try:
            with self._transaction():
                return self._store_locked(batches, quarantine)
        except Exception as exc:
            if not batches or self._is_outage(exc):
                raise
            log.warning(
                "storing %d batches failed (%s: %s); storing them one by one",
                len(batches),
                type(exc).__name__,
                exc,
            )
        # The database is up but refused something: nothing was committed. Store each batch
        # on its own, so only the one it refuses fails; that one is quarantined.
        outcomes: list[StoreOutcome] = []
        for b in batches:
            try:
                with self._transaction():
                    outcomes += self._store_locked([b], ())
                continue
            except Exception as exc:
                if self._is_outage(exc):
                    raise
                detail = f"{type(exc).__name__}: {exc}"
            record = QuarantineRecord.of(b, "unstorable", detail)
            with self._transaction():
                outcomes += self._store_locked([], [record])
        if quarantine:
            with self._transaction():
                outcomes += self._store_locked([], quarantine)
        return outcomes

    def _is_outage(self, exc: BaseException) -> bool:
        """Whether ``exc`` (a failed transaction, rolled back) means the database is unusable
        (raise: nothing acked, the writer backs off) rather than refusing this data."""
        if self._outage_error(exc):
            return True
        try:
            self._execute("SELECT 1").fetchone()
        except Exception:  # any failure of the probe is the database's, not the batch's
            return True
        return False

    def _outage_error(self, exc: BaseException) -> bool:
        """Back-end hook: errors of the connection or the server, not of the data."""
        return False

    def _store_locked(
        self, batches: Sequence[IngestBatch], quarantine: Sequence[QuarantineRecord] = ()
    ) -> list[StoreOutcome]:
        now_us = int(time.time() * 1e6)
        keys = [(b.device, b.epoch) for b in batches] + [(r.device, r.epoch) for r in quarantine]
        dev_ids = {device: self._device_id(device) for device, _ in keys}
        # Lock (device, epoch) rows in one global order so concurrent receivers never deadlock;
        # epochs named by skip lists too (their contiguous mark may move).
        named = set(keys)
        named.update((b.device, e) for b in batches for e, _, _ in b.skips)
        acked: dict[tuple[str, int], int] = {}
        for device, epoch in sorted(named):
            acked[(device, epoch)] = self._lock_epoch(dev_ids[device], epoch, now_us)
        new_skips: dict[tuple[str, int], list[tuple[int, int]]] = {}
        stored_flags: list[bool] = []
        shadows: dict[int, Shadow] = {}
        dev_stats: dict[int, list[int]] = {}  # batches, samples, last received, last created
        epoch_stats: dict[tuple[str, int], list[int]] = {}  # stored, max seq
        for b in batches:
            dev_id = dev_ids[b.device]
            cur = self._execute(
                "INSERT INTO batches (device_id, epoch, seq, created_us, received_us, samples,"
                " bytes, meta) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                (
                    dev_id,
                    to_db_epoch(b.epoch),
                    b.seq,
                    b.created_us,
                    b.received_us,
                    b.sample_count,
                    b.nbytes,
                    safe_dumps(b.meta),
                ),
            )
            is_new = cur.rowcount == 1
            stored_flags.append(is_new)
            if not is_new:
                continue
            # Re-ingested from quarantine (or a re-send that now passes): stored, not kept.
            self._execute(
                "DELETE FROM quarantine WHERE device_id = ? AND epoch = ? AND seq = ?",
                (dev_id, to_db_epoch(b.epoch), b.seq),
            )
            tag_ids = self._tag_ids(dev_id, b)
            self._store_samples(dev_id, b, tag_ids, shadows)
            if b.events:
                self._executemany(
                    "INSERT INTO events (device_id, ts, epoch, seq, type, body)"
                    " VALUES (?, ?, ?, ?, ?, ?)",
                    [
                        (
                            dev_id,
                            _event_ts(ev, b.created_us),
                            to_db_epoch(b.epoch),
                            b.seq,
                            str(ev.get("type", "")),
                            safe_dumps(ev),
                        )
                        for ev in b.events
                    ],
                )
            st = dev_stats.setdefault(dev_id, [0, 0, 0, 0])
            st[0] += 1
            st[1] += b.sample_count
            st[2] = max(st[2], b.received_us)
            st[3] = max(st[3], b.created_us)
            es = epoch_stats.setdefault((b.device, b.epoch), [0, 0])
            es[0] += 1
            es[1] = max(es[1], b.seq)
            # Only a newly stored batch's skip list counts: a replay changes nothing.
            for e, first, last in b.skips:
                new_skips.setdefault((b.device, e), []).append((first, last))
        q_flags = [self._quarantine_one(dev_ids[r.device], r, now_us) for r in quarantine]
        for r, (_, new) in zip(quarantine, q_flags, strict=True):
            if new:
                es = epoch_stats.setdefault((r.device, r.epoch), [0, 0])
                es[1] = max(es[1], r.seq)
        for key in sorted(new_skips):
            ranges = merge_ranges(new_skips[key])
            self._record_skips(dev_ids[key[0]], key[1], ranges, now_us)
            es = epoch_stats.setdefault(key, [0, 0])
            es[1] = max(es[1], ranges[-1][1])
        final: dict[tuple[str, int], int] = {}
        for key, start in acked.items():
            stored, max_seq = epoch_stats.get(key, (0, 0))
            final[key] = self._advance(dev_ids[key[0]], key[1], start, stored, max_seq)
        for dev_id in sorted(shadows):
            self._save_shadow(dev_id, shadows[dev_id], now_us)
        for dev_id in sorted(dev_stats):
            n_batches, n_samples, last_rx, last_created = dev_stats[dev_id]
            self._execute(
                "UPDATE devices SET batches = batches + ?, samples = samples + ?,"
                f" last_seen_us = {self.greatest}(COALESCE(last_seen_us, 0), ?),"
                f" last_created_us = {self.greatest}(COALESCE(last_created_us, 0), ?),"
                " first_seen_us = COALESCE(first_seen_us, ?) WHERE id = ?",
                (n_batches, n_samples, last_rx, last_created, last_rx, dev_id),
            )
        outcomes = []
        for b, new in zip(batches, stored_flags, strict=True):
            others: tuple[tuple[int, int], ...] = ()
            if new and b.skips:
                epochs = sorted({e for e, _, _ in b.skips} - {b.epoch})
                others = tuple(
                    (e, final[(b.device, e)]) for e in epochs if final[(b.device, e)] > 0
                )
            outcomes.append(
                StoreOutcome(
                    b.device,
                    b.epoch,
                    b.seq,
                    new,
                    final[(b.device, b.epoch)],
                    b.sample_count,
                    others,
                )
            )
        for r, (reason, new) in zip(quarantine, q_flags, strict=True):
            outcomes.append(
                StoreOutcome(
                    r.device,
                    r.epoch,
                    r.seq,
                    False,
                    final[(r.device, r.epoch)],
                    0,
                    (),
                    reason,
                    new,
                )
            )
        return outcomes

    def _quarantine_one(
        self, device_id: int, r: QuarantineRecord, now_us: int
    ) -> tuple[str | None, bool]:
        """Keep a quarantined batch: ``(reason, newly quarantined)``; ``(None, False)`` when
        the batch is stored already (a re-send of stored data is a plain replay)."""
        key = (device_id, to_db_epoch(r.epoch), r.seq)
        where = "WHERE device_id = ? AND epoch = ? AND seq = ?"
        if self._execute(f"SELECT 1 FROM batches {where}", key).fetchone() is not None:
            return None, False
        # Our own text, but the detail quotes the data: no NUL (PostgreSQL text), bounded.
        detail = r.detail.replace("\x00", "\\x00")[:2000]
        if self._execute(f"SELECT 1 FROM quarantine {where}", key).fetchone() is not None:
            self._execute(
                "UPDATE quarantine SET reason = ?, detail = ?, attempts = attempts + 1,"
                f" last_us = ? {where}",
                (r.reason, detail, now_us, *key),
            )
            return r.reason, False
        self._execute(
            "INSERT INTO quarantine (device_id, epoch, seq, key_id, created_us, received_us,"
            " reason, detail, attempts, last_us, payload) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 1, ?, ?)",
            # The record may carry the very value the database refused: clamp to BIGINT.
            (
                *key,
                *(_i64(v) for v in (r.key_id, r.created_us, r.received_us)),
                r.reason,
                detail,
                now_us,
                r.payload,
            ),
        )
        return r.reason, True

    def _device_id(self, device: str) -> int:
        found = self._device_ids.get(device) or self._staged_devices.get(device)
        if found is not None:
            return found
        self._execute("INSERT INTO devices (name) VALUES (?) ON CONFLICT DO NOTHING", (device,))
        row = self._execute("SELECT id FROM devices WHERE name = ?", (device,)).fetchone()
        self._staged_devices[device] = int(row[0])
        return int(row[0])

    def _lock_epoch(self, device_id: int, epoch: int, now_us: int) -> int:
        self._execute(
            "INSERT INTO epochs (device_id, epoch, first_seen_us) VALUES (?, ?, ?)"
            " ON CONFLICT DO NOTHING",
            (device_id, to_db_epoch(epoch), now_us),
        )
        row = self._execute(
            "SELECT acked_seq FROM epochs WHERE device_id = ? AND epoch = ?" + self.for_update,
            (device_id, to_db_epoch(epoch)),
        ).fetchone()
        return int(row[0])

    def _record_skips(
        self, device_id: int, epoch: int, ranges: list[tuple[int, int]], now_us: int
    ) -> None:
        # Every later batch repeats the announcement until an ack passes it: the upsert keeps
        # one row per (epoch, first) and writes only when a range grew.
        self._executemany(
            "INSERT INTO skips (device_id, epoch, first_seq, last_seq, announced_us)"
            " VALUES (?, ?, ?, ?, ?) ON CONFLICT (device_id, epoch, first_seq) DO UPDATE SET"
            " last_seq = excluded.last_seq, announced_us = excluded.announced_us"
            " WHERE excluded.last_seq > skips.last_seq",
            [(device_id, to_db_epoch(epoch), f, last, now_us) for f, last in ranges],
        )

    def _skip_ranges(self, device_id: int, db_epoch: int, above: int) -> list[tuple[int, int]]:
        rows = self._execute(
            "SELECT first_seq, last_seq FROM skips WHERE device_id = ? AND epoch = ?"
            " AND last_seq > ?",
            (device_id, db_epoch, above),
        ).fetchall()
        return merge_ranges((int(f), int(last)) for f, last in rows)

    def _advance(self, device_id: int, epoch: int, acked: int, stored: int, max_seq: int) -> int:
        """Move the epoch's contiguous mark over every stored or skipped number after it."""
        db_epoch = to_db_epoch(epoch)
        start = acked
        skips = self._skip_ranges(device_id, db_epoch, acked)
        i = 0
        while True:
            while i < len(skips) and skips[i][0] <= acked + 1:
                acked = max(acked, skips[i][1])
                i += 1
            # Quarantined numbers count as present: the device may drop them (re-ingest
            # happens from the receiver's copy).
            rows = self._execute(
                "SELECT seq FROM batches WHERE device_id = ? AND epoch = ? AND seq > ?"
                " UNION SELECT seq FROM quarantine WHERE device_id = ? AND epoch = ?"
                " AND seq > ? ORDER BY seq LIMIT 512",
                (device_id, db_epoch, acked, device_id, db_epoch, acked),
            ).fetchall()
            moved = 0
            for (seq,) in rows:
                if seq != acked + 1:
                    break
                acked = seq
                moved += 1
            if moved == 512:
                continue
            if not (i < len(skips) and skips[i][0] <= acked + 1):
                break
        if acked != start or stored or max_seq:
            self._execute(
                f"UPDATE epochs SET acked_seq = ?, max_seq = {self.greatest}(max_seq, ?),"
                " stored = stored + ? WHERE device_id = ? AND epoch = ?",
                (acked, max_seq, stored, device_id, db_epoch),
            )
        return acked

    def _tag_ids(self, device_id: int, b: IngestBatch) -> npt.NDArray[np.int64]:
        """Tag ids for the batch's tag table; a table equal to the last one costs nothing."""
        sig: _TagSig = (
            b.tag_names,
            b.tag_kinds.tobytes(),
            b.tag_units,
            b.tag_resolutions.tobytes(),
            b.tag_indices.tobytes(),
        )
        cached = self._staged_tags.get(device_id) or self._tag_cache.get(device_id)
        if cached is not None and cached[0] == sig:
            return cached[1]
        res = [None if not np.isfinite(r) else r for r in b.tag_resolutions.tolist()]
        self._executemany(
            "INSERT INTO tags (device_id, name, kind, unit, resolution, twin_index)"
            " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (device_id, name) DO UPDATE SET"
            " kind = excluded.kind, unit = excluded.unit, resolution = excluded.resolution,"
            " twin_index = excluded.twin_index",
            list(
                zip(
                    repeat(device_id),
                    b.tag_names,
                    b.tag_kinds.tolist(),
                    b.tag_units,
                    res,
                    b.tag_indices.tolist(),
                    strict=False,
                )
            ),
        )
        mapping = dict(
            self._execute("SELECT name, id FROM tags WHERE device_id = ?", (device_id,)).fetchall()
        )
        ids = np.fromiter((mapping[n] for n in b.tag_names), np.int64, len(b.tag_names))
        self._staged_tags[device_id] = (sig, ids)
        return ids

    def _store_samples(
        self,
        device_id: int,
        b: IngestBatch,
        tag_ids: npt.NDArray[np.int64],
        shadows: dict[int, Shadow],
    ) -> None:
        if not b.sample_count:
            return
        tid = tag_ids[b.tag]
        is_text = split_text(b)
        text: dict[int, str | None] = {}
        text_latest: dict[int, tuple[int, str | None, int]] = {}
        if is_text.any():
            positions = np.flatnonzero(is_text).tolist()
            text = {p: b.text.get(p) for p in positions}
            for p in sorted(positions, key=lambda p: int(b.ts_us[p])):
                text_latest[int(tid[p])] = (int(b.ts_us[p]), text[p], int(b.quality[p]))
            num = ~is_text
            ts_n, tid_n, val_n, q_n = b.ts_us[num], tid[num], b.value[num], b.quality[num]
        else:
            ts_n, tid_n, val_n, q_n = b.ts_us, tid, b.value, b.quality
        self._insert_blocks(
            device_id, b.epoch, b.seq, encode_blocks(b.ts_us, tid, b.value, b.quality, text)
        )
        shadow = shadows.get(device_id)
        if shadow is None:
            shadow = self._load_shadow(device_id, lock=True)
            shadows[device_id] = shadow
        last = latest_per_tag(tid_n, ts_n)
        shadow.merge(tid_n[last], ts_n[last], val_n[last], q_n[last], text_latest)

    def _insert_blocks(self, device_id: int, epoch: int, seq: int, blocks: list[Block]) -> None:
        self._executemany(
            "INSERT INTO sample_blocks (device_id, t_first, t_last, epoch, seq, count, data)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            [
                (device_id, bl.t_first, bl.t_last, to_db_epoch(epoch), seq, bl.count, bl.data)
                for bl in blocks
            ],
        )

    def _save_shadow(self, device_id: int, shadow: Shadow, now_us: int) -> None:
        self._execute(
            "INSERT INTO shadows (device_id, tag_ids, ts, value, quality, text, updated_us)"
            " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (device_id) DO UPDATE SET"
            " tag_ids = excluded.tag_ids, ts = excluded.ts, value = excluded.value,"
            " quality = excluded.quality, text = excluded.text, updated_us = excluded.updated_us",
            (device_id, *shadow.to_row(), now_us),
        )

    def record_rejects(self, counts: Mapping[tuple[str, str], int], now_us: int) -> None:
        if not counts:
            return
        with self._transaction():
            self._executemany(
                "INSERT INTO rejects (device, reason, count, last_us) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (device, reason) DO UPDATE SET count = rejects.count +"
                " excluded.count, last_us = excluded.last_us",
                [(dev, reason, n, now_us) for (dev, reason), n in sorted(counts.items())],
            )

    def record_statuses(self, statuses: Sequence[DeviceStatus]) -> None:
        if not statuses:
            return
        with self._transaction():
            for st in statuses:
                # A repeated state (the retained message again after a reconnect) keeps the
                # time it was first seen.
                self._execute(
                    "INSERT INTO device_status (device_id, state, since_us, device_ts_us, epoch,"
                    " updated_us) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (device_id) DO UPDATE SET"
                    " since_us = CASE WHEN device_status.state = excluded.state"
                    " THEN device_status.since_us ELSE excluded.since_us END,"
                    " state = excluded.state, device_ts_us = excluded.device_ts_us,"
                    " epoch = excluded.epoch, updated_us = excluded.updated_us",
                    (
                        self._device_id(st.device),
                        "online" if st.online else "offline",
                        st.received_us,
                        st.device_ts_us,
                        st.epoch,
                        st.received_us,
                    ),
                )

    # ------------------------------------------------------------------ commands

    def enqueue_command(self, device: str, desired: Mapping[str, Any], now_us: int) -> Command:
        with self._transaction():
            device_id = self._device_id(device)
            row = self._execute(
                "SELECT COALESCE(MAX(version), 0) FROM commands WHERE device_id = ?",
                (device_id,),
            ).fetchone()
            command = Command(
                device, int(row[0]) + 1, new_command_id(), dict(desired), "pending", now_us
            )
            self._execute(
                "INSERT INTO commands (device_id, version, id, desired, status, requested_us)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (
                    device_id,
                    command.version,
                    command.id,
                    json.dumps(command.desired),
                    "pending",
                    now_us,
                ),
            )
        return command

    def _commands(self, where: str, params: Sequence[Any]) -> list[Command]:
        rows = self._execute(
            "SELECT d.name, c.version, c.id, c.desired, c.status, c.requested_us, c.sent_us,"
            " c.answered_us, c.results FROM commands c JOIN devices d ON d.id = c.device_id"
            f" WHERE {where} ORDER BY d.name, c.version",
            params,
        ).fetchall()
        return [
            Command(
                str(name),
                int(version),
                str(cid),
                json.loads(desired),
                str(status),
                int(req),
                None if sent is None else int(sent),
                None if ans is None else int(ans),
                None if results is None else json.loads(results),
            )
            for name, version, cid, desired, status, req, sent, ans, results in rows
        ]

    def due_commands(self, now_us: int, resend_us: int) -> list[Command]:
        return self._commands(
            "c.status = 'pending' OR (c.status = 'sent' AND c.sent_us <= ?)",
            (now_us - resend_us,),
        )

    def commands(self, device: str) -> list[Command]:
        return self._commands("d.name = ?", (device,))

    def mark_sent(self, device: str, version: int, now_us: int) -> None:
        self._execute(
            "UPDATE commands SET status = 'sent', sent_us = ? WHERE version = ? AND"
            " status IN ('pending', 'sent') AND device_id = (SELECT id FROM devices"
            " WHERE name = ?)",
            (now_us, version, device),
        )

    def record_command_result(
        self, device: str, version: int, ok: bool, results: Mapping[str, Any], now_us: int
    ) -> bool:
        # The first answer of a version is its outcome: the device applies a version at most
        # once and repeats that answer, so a later result for an answered version is a repeat
        # or a replay (e.g. captured before a receiver restart emptied the counter guard) and
        # never overwrites it. True when the command exists (answered now or before).
        cur = self._execute(
            "UPDATE commands SET status = ?, results = ?, answered_us = ? WHERE version = ?"
            " AND status IN ('pending', 'sent')"
            " AND device_id = (SELECT id FROM devices WHERE name = ?)",
            ("applied" if ok else "refused", safe_dumps(dict(results)), now_us, version, device),
        )
        if cur.rowcount == 1:
            return True
        found = self._execute(
            "SELECT 1 FROM commands WHERE version = ?"
            " AND device_id = (SELECT id FROM devices WHERE name = ?)",
            (version, device),
        ).fetchone()
        return found is not None


def _i64(value: int) -> int:
    return max(-(1 << 63), min(value, (1 << 63) - 1))


def _event_ts(event: Mapping[str, Any], default: int) -> int:
    ts = event.get("ts_us")
    if isinstance(ts, int) and not isinstance(ts, bool) and -(1 << 62) < ts < 1 << 62:
        return ts
    return default
