"""The oracle of the HIL rig and the end-to-end tests: what the line served vs what was stored.

Three sources of truth are compared:

* the simulator's ground truth (:class:`~edgeos_sim.truth.GroundTruth`): every value it served,
  with the wall time it was served;
* the device's spool (:func:`inspect_spool`, read-only, after each runtime exit): which batches
  were *accepted* — a batch is accepted once it is in the spool, so after a kill -9 the spool
  on disk says exactly which sequence numbers of the dead epoch existed (records still on disk,
  plus the ack watermark for those already acknowledged and deleted);
* the receiver's database (:func:`read_receiver`): the batch ledger ``(epoch, seq, created,
  received, samples, meta)`` and every stored sample.

:func:`evaluate` turns them into :class:`Figures`:

* **batch accounting** per epoch: accepted − stored − announced gaps (``meta["skip"]``:
  refused or dropped by the spool's full policy) − still pending on disk = **lost**;
* **samples**: every stored usable sample is matched to the served value it came from (same
  tag, served at or before the scan time, equal within half the tag's resolution); unmatched
  = **mismatched**; the same (tag, time) twice, or more samples in the ledger than rows =
  **duplicates**; a match earlier in serve order than the previous one = **order
  violations**;
* **window loss**: while a runtime incarnation ran, every scan leaves a row per tag (a failed
  read leaves a bad-quality row); a hole of several scan periods in a tag's rows between its
  first row and the incarnation's last accepted batch is read-and-sealed data the receiver
  lacks (counted in missing scans; holes next to a machine-link fault are *unread*);
* **coverage** (served values that were stored: downtime is not loss) and **latency** (scan
  time → the receiver got the batch that carries it).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import sqlite3
import struct
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from edgeos_sim.truth import GroundTruth

__all__ = [
    "Figures",
    "Incarnation",
    "LedgerBatch",
    "ReceiverData",
    "SpoolInspection",
    "StoredSample",
    "evaluate",
    "inspect_spool",
    "merge_inspections",
    "read_receiver",
    "summary_markdown",
]

_REC = struct.Struct(">4sIIQQ")
_CRC_PART = struct.Struct(">IQQ")
_RECORD_MAGIC = b"ESR1"
_FILE_MAGIC = b"EOSSPL01"
_QUALITY_USABLE = 16
#: Scan rows are timed when the read *returned*, so the serve always came before (same clock).
#: The slack only absorbs the wire format's rounding of times to whole µs. It was 2 ms once:
#: a scan of 40 requests is stamped when its last answer arrives, up to ~100 ms after its
#: first, and the next scan's first request was sometimes served within 2 ms of that stamp,
#: so the older sample was matched to the newer serve and the newer one reported as "serve #k
#: after #k" (the order anomaly of docs/hil.md, which was the oracle's, not the runtime's).
_SERVE_SLACK_S = 10e-6
#: How far back a stored scan may be from the serve it came from (request timeout + latency).
_MATCH_WINDOW_S = {"modbus": 6.0, "opcua": 15.0}
#: A value served less than this before the last accepted batch was sealed may not be in it.
_WINDOW_MARGIN_S = 0.5
#: A hole in a tag's rows this close to a machine-link fault is a failed read (not a loss).
_UNREAD_RADIUS_S = 4.0
#: A corrupted answer is stamped when its scan ends: at most a request timeout after the fault.
_CORRUPT_RADIUS_S = 3.0
#: A hole in a tag's rows counts when longer than this many scan periods (and this long).
_GAP_PERIODS = 2.5
_GAP_MIN_S = 1.5


# --------------------------------------------------------------------------- spool


@dataclass(slots=True)
class SpoolInspection:
    """What a spool directory holds: per epoch, the records on disk and the ack watermark."""

    records: dict[int, list[int]] = field(default_factory=dict)
    watermarks: dict[int, int] = field(default_factory=dict)
    torn_bytes: int = 0

    def accepted(self) -> dict[int, set[int]]:
        """Per epoch, every sequence number known to have been in the spool."""
        out: dict[int, set[int]] = {}
        for epoch in set(self.records) | set(self.watermarks):
            seqs = set(self.records.get(epoch, ()))
            seqs.update(range(1, self.watermarks.get(epoch, 0) + 1))
            out[epoch] = seqs
        return out

    def pending(self) -> dict[int, set[int]]:
        """Per epoch, records on disk above the ack watermark (not yet acknowledged)."""
        return {
            e: {s for s in seqs if s > self.watermarks.get(e, 0)}
            for e, seqs in self.records.items()
            if any(s > self.watermarks.get(e, 0) for s in seqs)
        }


def inspect_spool(directory: Path) -> SpoolInspection:
    """Read a spool directory without changing it (the format is in ``edgeos.uplink.spool``).

    Only records with a valid CRC count; a torn tail (an append interrupted by the kill, which
    never returned to the batcher) is ignored, as the spool's own recovery does.
    """
    out = SpoolInspection()
    try:
        marks = json.loads((directory / "acked.json").read_text())
        out.watermarks = {int(k): int(v) for k, v in marks.items()}
    except (OSError, ValueError, AttributeError):
        pass
    for path in sorted(directory.glob("seg-*.spool")):
        data = path.read_bytes()
        if not data.startswith(_FILE_MAGIC):
            continue
        pos = len(_FILE_MAGIC)
        while pos + _REC.size <= len(data):
            magic, length, crc, epoch, seq = _REC.unpack_from(data, pos)
            start = pos + _REC.size
            if magic != _RECORD_MAGIC or start + length > len(data):
                break
            payload = memoryview(data)[start : start + length]
            if zlib.crc32(payload, zlib.crc32(_CRC_PART.pack(length, epoch, seq))) != crc:
                break
            out.records.setdefault(epoch, []).append(seq)
            pos = start + length
        out.torn_bytes += len(data) - pos
    return out


def merge_inspections(inspections: Iterable[SpoolInspection]) -> dict[int, set[int]]:
    """Union of the accepted sequence numbers of several inspections (one per runtime exit)."""
    out: dict[int, set[int]] = {}
    for inspection in inspections:
        for epoch, seqs in inspection.accepted().items():
            out.setdefault(epoch, set()).update(seqs)
    return out


# --------------------------------------------------------------------------- receiver


@dataclass(frozen=True, slots=True)
class LedgerBatch:
    epoch: int
    seq: int
    created_us: int
    received_us: int
    samples: int
    skip: tuple[tuple[int, int, int], ...]


@dataclass(frozen=True, slots=True)
class StoredSample:
    tag: str
    ts_us: int
    value: float | None
    quality: int


@dataclass(slots=True)
class ReceiverData:
    """Everything one device has in the receiver's database."""

    batches: list[LedgerBatch]
    samples: list[StoredSample]
    resolutions: dict[str, float]
    #: ``epochs`` rows: epoch → (acked_seq, max_seq).
    epochs: dict[int, tuple[int, int]]


#: Maps device wall times (µs) to the rig's real times (µs): see ``edgeos_testing.clockjump``.
DeviceTime = Callable[[npt.NDArray[np.int64]], npt.NDArray[np.int64]]


def to_real_time(data: ReceiverData, device_time: DeviceTime) -> ReceiverData:
    """``data`` with sample and batch ``created`` times moved from the device's (stepped) wall
    clock back to real time, samples re-sorted per tag in real time. Receive times are the
    receiver's own clock and stay as they are."""
    ts = device_time(np.array([s.ts_us for s in data.samples], np.int64))
    samples = [
        StoredSample(s.tag, int(t), s.value, s.quality)
        for s, t in zip(data.samples, ts.tolist(), strict=True)
    ]
    samples.sort(key=lambda s: (s.tag, s.ts_us))
    created = device_time(np.array([b.created_us for b in data.batches], np.int64))
    batches = [
        LedgerBatch(b.epoch, b.seq, int(c), b.received_us, b.samples, b.skip)
        for b, c in zip(data.batches, created.tolist(), strict=True)
    ]
    return ReceiverData(batches, samples, data.resolutions, data.epochs)


def _from_db_epoch(value: int) -> int:
    return value & ((1 << 64) - 1)


def read_receiver(storage_url: str, device: str) -> ReceiverData:
    """The ledger, the epochs and every sample of ``device`` (SQLite or PostgreSQL).

    Samples come through the storage API (``query_samples``, what ``edgeos-receiver query``
    prints); the ledger (``batches``), ``epochs`` and ``tags`` tables are read directly
    (``docs/receiver.md``, "Schema"): the storage API has no ledger query.
    """
    if storage_url.startswith("sqlite:///"):
        conn: Any = sqlite3.connect(storage_url.removeprefix("sqlite:///"), timeout=30)
        ph = "?"
    else:
        import psycopg

        conn = psycopg.connect(storage_url)
        ph = "%s"
    try:
        cur = conn.cursor()
        cur.execute(f"SELECT id FROM devices WHERE name = {ph}", (device,))
        row = cur.fetchone()
        if row is None:
            return ReceiverData([], [], {}, {})
        dev_id = int(row[0])
        cur.execute(
            "SELECT epoch, seq, created_us, received_us, samples, meta FROM batches"
            f" WHERE device_id = {ph} ORDER BY created_us",
            (dev_id,),
        )
        batches = []
        for epoch, seq, created, received, samples, meta in cur.fetchall():
            skip: list[tuple[int, int, int]] = []
            try:
                doc = json.loads(meta) if isinstance(meta, str) else (meta or {})
                for item in doc.get("skip", []) or []:
                    skip.append((_from_db_epoch(int(item[0])), int(item[1]), int(item[2])))
            except (ValueError, TypeError, AttributeError, IndexError):
                pass
            batches.append(
                LedgerBatch(
                    _from_db_epoch(int(epoch)),
                    int(seq),
                    int(created),
                    int(received),
                    int(samples),
                    tuple(skip),
                )
            )
        cur.execute(f"SELECT id, name, resolution FROM tags WHERE device_id = {ph}", (dev_id,))
        names: dict[int, str] = {}
        resolutions: dict[str, float] = {}
        for tag_id, name, resolution in cur.fetchall():
            names[int(tag_id)] = str(name)
            if resolution is not None and math.isfinite(float(resolution)):
                resolutions[str(name)] = float(resolution)
        cur.execute(
            f"SELECT epoch, acked_seq, max_seq FROM epochs WHERE device_id = {ph}", (dev_id,)
        )
        epochs = {_from_db_epoch(int(e)): (int(a), int(m)) for e, a, m in cur.fetchall()}
    finally:
        conn.close()
    return ReceiverData(batches, _query_samples(storage_url, device), resolutions, epochs)


def _query_samples(storage_url: str, device: str) -> list[StoredSample]:
    """Every stored sample through the storage API (what ``edgeos-receiver query`` prints)."""
    from edgeos_cloud.receiver.storage import open_storage

    storage = open_storage(storage_url)
    try:
        rows = [
            StoredSample(r.tag, r.ts_us, r.value if isinstance(r.value, float) else None, r.quality)
            for r in storage.query_samples(device)
        ]
    finally:
        storage.close()
    rows.sort(key=lambda r: (r.tag, r.ts_us))
    return rows


# --------------------------------------------------------------------------- evaluation


@dataclass(frozen=True, slots=True)
class Incarnation:
    """One run of the runtime process: wall times it started and ended (None: still running)."""

    started: float
    ended: float | None
    how: str = "running"  # "kill -9", "watchdog", "sigterm", "running"


@dataclass(slots=True)
class Figures:
    """The oracle's verdict for one scenario (all counts; times in seconds)."""

    # batches
    accepted_batches: int = 0
    stored_batches: int = 0
    announced_gap_batches: int = 0
    #: Announced as dropped but stored anyway (sent before the spool dropped them, not yet acked).
    announced_but_stored: int = 0
    pending_on_disk_batches: int = 0
    lost_batches: int = 0
    lost_batch_ids: list[str] = field(default_factory=list)
    unaccounted_stored_batches: int = 0
    # samples
    served: int = 0
    stored_rows: int = 0
    stored_usable: int = 0
    matched: int = 0
    mismatched: int = 0
    #: Wrong values stored while corruption was injected on the machine link (Modbus TCP has no
    #: checksum: a flipped register bit is a valid, wrong answer). Reported, not a failure.
    wrong_under_corruption: int = 0
    duplicates: int = 0
    order_violations: int = 0
    window_lost: int = 0
    window_unread: int = 0
    window_policy: int = 0
    coverage: float = 0.0
    opcua_served: int = 0
    opcua_matched: int = 0
    # latency scan -> received by the receiver (seconds)
    latency_p50_s: float | None = None
    latency_p99_s: float | None = None
    latency_max_s: float | None = None
    epochs: int = 0
    incarnations: int = 0
    examples: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        """Zero loss, duplicates, order violations and wrong values of accepted samples (wrong
        values explained by injected machine-link corruption are counted apart)."""
        return (
            self.lost_batches == 0
            and self.window_lost == 0
            and self.duplicates == 0
            and self.order_violations == 0
            and self.mismatched == 0
        )

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["clean"] = self.clean
        return out


_UA = re.compile(r"^(nest\d+)\.ua\.(.+)$")


def _truth_key(tag: str) -> tuple[str, Literal["modbus", "opcua"]]:
    """Stored tag name → (layout tag name, source)."""
    m = _UA.match(tag)
    if m:
        return f"{m.group(1)}.{m.group(2)}", "opcua"
    return tag, "modbus"


def _skipped(batches: Sequence[LedgerBatch]) -> dict[int, set[int]]:
    out: dict[int, set[int]] = {}
    for b in batches:
        for epoch, first, last in b.skip:
            out.setdefault(epoch, set()).update(range(first, last + 1))
    return out


def evaluate(
    truth: GroundTruth,
    data: ReceiverData,
    *,
    accepted: Mapping[int, set[int]],
    pending: Mapping[int, set[int]] | None = None,
    incarnations: Sequence[Incarnation] = (),
    window_checks: bool = True,
    since: float | None = None,
    fault_windows: Sequence[tuple[float, float]] = (),
    device_time: DeviceTime | None = None,
    corrupt_windows: Sequence[tuple[float, float]] = (),
) -> Figures:
    """Compare truth, spool and receiver (see the module docs).

    ``device_time``: when the DUT's wall clock was stepped on purpose, maps its times back to
    real time first (samples are matched to serves in real time). ``corrupt_windows``: spans
    when machine-link bytes were corrupted on purpose; a wrong value scanned inside one (or up
    to a request timeout after) counts as ``wrong_under_corruption``, not as ``mismatched``.

    ``since``: ignore earlier serves. ``fault_windows``: wall-time spans when the machine link
    was faulty; a served value there that was not stored counts as *unread* (the response may
    never have reached the runtime), not as lost.
    """
    fig = Figures(incarnations=len(incarnations))
    if device_time is not None:
        data = to_real_time(data, device_time)
    pending = pending or {}
    stored_ids: dict[int, set[int]] = {}
    for b in data.batches:
        stored_ids.setdefault(b.epoch, set()).add(b.seq)
    skipped = _skipped(data.batches)
    fig.epochs = len(set(accepted) | set(stored_ids))
    for epoch, seqs in accepted.items():
        fig.accepted_batches += len(seqs)
        stored = stored_ids.get(epoch, set())
        gaps = skipped.get(epoch, set())
        waiting = pending.get(epoch, set())
        fig.announced_gap_batches += len(seqs & gaps - stored)
        fig.announced_but_stored += len(gaps & stored)
        fig.pending_on_disk_batches += len(seqs & waiting - stored - gaps)
        lost = sorted(seqs - stored - gaps - waiting)
        fig.lost_batches += len(lost)
        fig.lost_batch_ids += [f"{epoch:016x}:{s}" for s in lost[:20]]
    fig.stored_batches = len(data.batches)
    fig.unaccounted_stored_batches = sum(
        len(s - accepted.get(e, set())) for e, s in stored_ids.items()
    )
    _samples(
        fig,
        truth=truth,
        data=data,
        incarnations=incarnations,
        window_checks=window_checks,
        since=since,
        fault_windows=fault_windows,
        corrupt_windows=corrupt_windows,
    )
    return fig


def _tolerance(resolution: float, value: float) -> float:
    return resolution / 2 + 1e-9 * max(1.0, abs(value))


def _samples(
    fig: Figures,
    *,
    truth: GroundTruth,
    data: ReceiverData,
    incarnations: Sequence[Incarnation],
    window_checks: bool,
    since: float | None,
    fault_windows: Sequence[tuple[float, float]],
    corrupt_windows: Sequence[tuple[float, float]] = (),
) -> None:
    by_tag: dict[str, list[StoredSample]] = {}
    for s in data.samples:
        by_tag.setdefault(s.tag, []).append(s)
    fig.stored_rows = len(data.samples)
    ledger_samples = sum(b.samples for b in data.batches)
    # SQLite ignores a second row with the same key: a duplicate shows as a ledger surplus.
    fig.duplicates = max(0, ledger_samples - len(data.samples))
    ordered = sorted(data.batches, key=lambda b: b.created_us)
    created = np.array([b.created_us for b in ordered], np.int64)
    received = np.array([b.received_us for b in ordered], np.int64)
    latencies: list[npt.NDArray[np.float64]] = []
    layout = truth.layout
    # Serve times (one per Modbus response / OPC UA value) that a stored sample came from.
    matched_modbus: set[float] = set()
    matched_opcua = 0
    served_opcua = 0
    responses_all = truth.modbus_responses()
    windows = _last_created_per_incarnation(data.batches, incarnations)
    policy = _policy_spans(data.batches)
    for tag, rows in by_tag.items():
        name, source = _truth_key(tag)
        try:
            index = layout.index(name)
        except KeyError:
            continue
        series = truth.series(index, source)
        t_served, v_served = series.times, series.values
        if since is not None:
            keep = t_served >= since
            t_served, v_served = t_served[keep], v_served[keep]
        resolution = max(data.resolutions.get(tag, 0.0), float(layout.tags[index].resolution))
        ts = np.array([r.ts_us for r in rows], np.int64)
        if ts.size > 1:
            fig.duplicates += int(np.count_nonzero(np.diff(ts) == 0))
        if created.size:
            k = np.searchsorted(created, ts, side="left")
            ok = k < created.size
            latencies.append((received[k[ok]] - ts[ok]) / 1e6)
        matched_idx = np.zeros(t_served.size, bool)
        prev = -1
        window = _MATCH_WINDOW_S[source]
        for r in rows:
            if r.quality >= _QUALITY_USABLE or r.value is None:
                continue
            fig.stored_usable += 1
            t = r.ts_us / 1e6
            hi = int(np.searchsorted(t_served, t + _SERVE_SLACK_S, side="right")) - 1
            found = -1
            j = hi
            while j >= 0 and t_served[j] >= t - window:
                if abs(v_served[j] - r.value) <= _tolerance(resolution, r.value):
                    found = j
                    break
                j -= 1
            if found < 0:
                if any(a <= t <= b + _CORRUPT_RADIUS_S for a, b in corrupt_windows):
                    fig.wrong_under_corruption += 1
                    continue
                fig.mismatched += 1
                if len(fig.examples) < 10:
                    fig.examples.append(f"mismatch {tag} @{t:.3f} value {r.value}")
                continue
            if found <= prev and source == "modbus":
                # The same or an earlier serve than the previous stored sample: stored twice or
                # out of order. (Repeated OPC UA values legitimately map to one notification.)
                fig.order_violations += 1
                if len(fig.examples) < 10:
                    fig.examples.append(f"order {tag} @{t:.3f} serve #{found} after #{prev}")
            prev = max(prev, found)
            matched_idx[found] = True
        if window_checks and source == "modbus":
            _gaps(
                fig,
                tag,
                ts=ts.astype(np.float64) / 1e6,
                windows=windows,
                fault_windows=fault_windows,
                policy=policy,
            )
        if source == "modbus":
            matched_modbus.update(t_served[matched_idx].tolist())
        else:
            served_opcua += int(t_served.size)
            matched_opcua += int(matched_idx.sum())
    fig.matched = len(matched_modbus)
    # Modbus: one served response is one scan of one request; it is covered when any of its
    # registers reached the receiver (a coalesced read may carry registers of another group).
    responses = np.array(sorted({r[0] for r in responses_all}), np.float64)
    if since is not None:
        responses = responses[responses >= since]
    fig.served = int(responses.size)
    fig.coverage = round(fig.matched / fig.served, 4) if fig.served else 0.0
    fig.opcua_served = served_opcua
    fig.opcua_matched = matched_opcua
    if latencies:
        lat = np.concatenate(latencies)
        if lat.size:
            fig.latency_p50_s = round(float(np.percentile(lat, 50)), 3)
            fig.latency_p99_s = round(float(np.percentile(lat, 99)), 3)
            fig.latency_max_s = round(float(lat.max()), 3)


def _gaps(
    fig: Figures,
    tag: str,
    *,
    ts: npt.NDArray[np.float64],
    windows: Sequence[tuple[float, float]],
    fault_windows: Sequence[tuple[float, float]],
    policy: Sequence[tuple[float, float]],
) -> None:
    """Scans of ``tag`` missing from the receiver while the runtime ran and sealed batches.

    Every scan leaves a row (a failed read leaves a bad-quality row), so a hole in a tag's
    rows longer than a few scan periods inside an incarnation's window — from its first row to
    its last accepted batch — is data the runtime read and sealed but the receiver lacks (an
    accepted batch lost). Holes overlapping a machine-link fault are counted as *unread*.
    """
    if ts.size < 3:
        return
    period = float(np.median(np.diff(ts)))
    limit = max(_GAP_MIN_S, _GAP_PERIODS * period)
    for start, end in windows:
        inside = ts[(ts >= start) & (ts <= end - _WINDOW_MARGIN_S)]
        if inside.size < 2:
            continue
        diffs = np.diff(inside)
        for k in np.flatnonzero(diffs > limit).tolist():
            a, b = float(inside[k]), float(inside[k + 1])
            missing = max(1, round((b - a) / period) - 1) if period > 0 else 1
            if any(pa <= b and a <= pb for pa, pb in policy):
                fig.window_policy += missing
            elif any(
                fa - _UNREAD_RADIUS_S <= b and a <= fb + _UNREAD_RADIUS_S
                for fa, fb in fault_windows
            ):
                fig.window_unread += missing
            else:
                fig.window_lost += missing
                if len(fig.examples) < 10:
                    fig.examples.append(f"gap {tag} {a:.3f} → {b:.3f} ({missing} scans)")


def _policy_spans(batches: Sequence[LedgerBatch]) -> list[tuple[float, float]]:
    """Wall-time spans of batches announced as dropped/refused (between stored neighbours)."""
    skipped = _skipped(batches)
    by_epoch: dict[int, list[LedgerBatch]] = {}
    for b in batches:
        by_epoch.setdefault(b.epoch, []).append(b)
    spans = []
    for epoch, items in by_epoch.items():
        items.sort(key=lambda b: b.seq)
        gaps = skipped.get(epoch, set())
        for a, b in itertools.pairwise(items):
            if b.seq - a.seq > 1 and set(range(a.seq + 1, b.seq)) <= gaps:
                spans.append((a.created_us / 1e6, b.created_us / 1e6))
        if items and items[0].seq > 1 and set(range(1, items[0].seq)) <= gaps:
            spans.append((0.0, items[0].created_us / 1e6))
    return spans


def _last_created_per_incarnation(
    batches: Sequence[LedgerBatch], incarnations: Sequence[Incarnation]
) -> list[tuple[float, float]]:
    """Per incarnation: (start, time its last stored batch was sealed)."""
    out = []
    for inc in incarnations:
        end = inc.ended if inc.ended is not None else math.inf
        sealed = [b.created_us / 1e6 for b in batches if inc.started <= b.created_us / 1e6 <= end]
        if sealed:
            out.append((inc.started, max(sealed)))
    return out


# --------------------------------------------------------------------------- reports


def summary_markdown(title: str, scenarios: Mapping[str, Mapping[str, Any]]) -> str:
    """A short Markdown table of the figures of every scenario."""
    lines = [
        f"# {title}",
        "",
        "| scenario | ok | accepted | stored | gaps | pending | lost | dup | order | wrong "
        "| window lost/unread/policy | coverage | latency p50/p99/max s | notes |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
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
        "machine-link fault, policy = inside a gap announced in meta.skip); coverage ="
        " Modbus responses served that reached the receiver; latency = "
        "scan → received by the receiver."
    )
    return "\n".join(lines) + "\n"


def write_json(path: Path, doc: Mapping[str, Any]) -> None:
    """Write ``doc`` as pretty JSON atomically."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)
