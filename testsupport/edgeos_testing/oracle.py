"""The oracle of the HIL rig and the end-to-end tests: what the line served vs what was stored.

Three sources of truth are compared:

* the simulator's ground truth (:class:`~edgeos_sim.truth.GroundTruth`): every value it served,
  with the wall time it was served;
* the device's spool (:func:`~edgeos_testing.spoolread.inspect_spool`, read-only, after each
  runtime exit): which batches were *accepted* — a batch is accepted once it is in the spool,
  so after a kill -9 the spool on disk says exactly which sequence numbers of the dead epoch
  existed (records still on disk, plus the ack watermark for those already acknowledged and
  deleted);
* the receiver's database (:func:`~edgeos_testing.receiverdb.read_receiver`): the batch ledger
  ``(epoch, seq, created, received, samples, meta)`` and every stored sample.

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
  **scans skipped by the runtime** are apart: a scan the scheduler did not run under overload
  (still running at its next deadline, or a dispatcher that woke late) left no row, but the
  runtime counted it and announced it (``meta["scans_skipped"]``: job, deadlines, count). A
  hole is excused as *skipped (announced)* up to the number of announced deadlines of the
  tag's own job (scan group, connection) around it; any rest is still **lost**;
* **coverage** (served values that were stored: downtime is not loss) and **latency** (scan
  time → the receiver got the batch that carries it).
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from edgeos_sim.truth import GroundTruth
from edgeos_testing.receiverdb import (
    DeviceTime,
    LedgerBatch,
    ReceiverData,
    StoredSample,
    to_real_time,
)

#: Tag name → (scan group, connection, period s): the scheduler job that scans it.
TagJobs = Mapping[str, tuple[str, str, float]]

__all__ = ["Figures", "Incarnation", "TagJobs", "evaluate", "tag_jobs_of"]

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
    #: Distinct sequence numbers announced in ``meta.skip`` at all (accepted or not: a drop
    #: after the last look at the spool is announced too): what the runtime's drop counter
    #: (``uplink.dropped``) must equal.
    announced_seqs: int = 0
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
    #: Tag scans missing because the runtime's scheduler skipped them under overload and
    #: announced it (``meta["scans_skipped"]``): never read, so not accepted data that was lost.
    window_skipped: int = 0
    #: Scans the runtime announced as skipped (all jobs), and in how many runs.
    scans_skipped_announced: int = 0
    scan_skip_runs: int = 0
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
    tag_jobs: TagJobs | None = None,
) -> Figures:
    """Compare truth, spool and receiver (see the module docs).

    ``tag_jobs`` (:func:`tag_jobs_of` the runtime's configuration): which scheduler job scans
    each tag, so a hole is excused only by skips announced for that job. Without it no hole is
    excused as skipped.

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
    fig.announced_seqs = sum(len(seqs) for seqs in skipped.values())
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
    for b in data.batches:
        fig.scan_skip_runs += len(b.scans_skipped)
        fig.scans_skipped_announced += sum(k.count for k in b.scans_skipped)
    _samples(
        fig,
        truth=truth,
        data=data,
        incarnations=incarnations,
        window_checks=window_checks,
        since=since,
        fault_windows=fault_windows,
        corrupt_windows=corrupt_windows,
        tag_jobs=tag_jobs or {},
    )
    return fig


def tag_jobs_of(config: Any) -> dict[str, tuple[str, str, float]]:
    """Tag name → (scan group, connection, period s) of a loaded runtime configuration."""
    periods = {g.name: g.period_ms / 1000.0 for g in config.scan_groups}
    return {t.name: (t.scan_group, t.connection, periods[t.scan_group]) for t in config.all_tags}


def _announced_skips(
    batches: Sequence[LedgerBatch],
) -> dict[tuple[str, str], list[tuple[float, float, int]]]:
    """Announced skipped-scan runs by (group, job): (first deadline s, last deadline s, count)."""
    out: dict[tuple[str, str], list[tuple[float, float, int]]] = {}
    for b in batches:
        for k in b.scans_skipped:
            out.setdefault((k.group, k.job), []).append(
                (k.first_us / 1e6, k.last_us / 1e6, k.count)
            )
    return out


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
    tag_jobs: TagJobs | None = None,
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
    announced = _announced_skips(data.batches)
    jobs = tag_jobs or {}
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
                skips=announced.get(jobs[tag][:2], []) if tag in jobs else [],
                scan_period=jobs[tag][2] if tag in jobs else None,
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
    skips: Sequence[tuple[float, float, int]] = (),
    scan_period: float | None = None,
) -> None:
    """Scans of ``tag`` missing from the receiver while the runtime ran and sealed batches.

    Every scan the scheduler ran leaves a row (a failed read leaves a bad-quality row), so a
    hole in a tag's rows longer than a few scan periods inside an incarnation's window — from
    its first row to its last accepted batch — is data the runtime read and sealed but the
    receiver lacks (an accepted batch lost). Holes overlapping a machine-link fault are counted
    as *unread*.

    Scans the scheduler announced as skipped for this tag's job (``skips``: first and last
    deadline, count) are exact deadlines on the job's grid (``scan_period``), so a hole between
    rows ``a`` and ``b`` is counted exactly: the scan stamped ``b`` started at a deadline in
    ``(a, b]`` (scans of one job never overlap, and a deadline is only ever run on time or
    skipped), so the other deadlines in ``(a, b]`` are the missing scans; each one announced
    is *skipped*, the rest stays lost. (Without an announcement the count is estimated from
    the hole's length: a late stamp at ``b`` — a slow scan — can make it one too many.)
    """
    if ts.size < 3:
        return
    period = float(np.median(np.diff(ts)))
    limit = max(_GAP_MIN_S, _GAP_PERIODS * period)
    grid: list[float] = []
    if skips and scan_period:
        # Every announced deadline, on the job's grid.
        grid = sorted(
            first + i * (last - first) / (n - 1) if n > 1 else first
            for first, last, n in skips
            for i in range(n)
        )
    announced = np.array(grid, np.float64)
    for start, end in windows:
        inside = ts[(ts >= start) & (ts <= end - _WINDOW_MARGIN_S)]
        if inside.size < 2:
            continue
        diffs = np.diff(inside)
        for k in np.flatnonzero(diffs > limit).tolist():
            a, b = float(inside[k]), float(inside[k + 1])
            missing = max(1, round((b - a) / period) - 1) if period > 0 else 1
            skipped = 0
            how = f"estimated from the median period {period:.3f} s"
            if announced.size and scan_period:
                lo = int(np.searchsorted(announced, a, side="right"))
                hi = int(np.searchsorted(announced, b, side="right"))
                if hi > lo:
                    # Deadlines in (a, b] on the grid of an announced one: b's own and the
                    # missing ones.
                    ref = float(announced[lo])
                    on_grid = math.floor((b - ref) / scan_period + 1e-6) - math.floor(
                        (a - ref) / scan_period + 1e-6
                    )
                    missing = max(0, on_grid - 1)
                    skipped = min(missing, hi - lo)
                    how = (
                        f"{on_grid} deadlines of the {scan_period:g} s grid in the hole, "
                        f"{hi - lo} announced"
                    )
            fig.window_skipped += skipped
            missing -= skipped
            if missing == 0:
                continue
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
                    fig.examples.append(f"gap {tag} {a:.3f} → {b:.3f} ({missing} scans; {how})")


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
