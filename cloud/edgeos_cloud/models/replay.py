"""Replay and training rows drawn from the fleet's stored data (the receiver database).

The receiver stores every key tag a gateway reads (``<station>.heater.pv``, …,
``<station>.quality.elasticity``: the realised modulus a press's QC measurement reports when a
tyre leaves it) and every event (``verdict`` carries the model, version and prediction). This
module turns one device's window back into what the gateway's engine saw:

1. the device's samples of the :data:`~edgeos_protocol.features.KEY_SUFFIXES` tags of every
   station are read through the storage query API (SQLite or PostgreSQL alike) and sampled on a
   1 s grid, each tag holding its last value (what the twin hands the engine once a second);
2. the grid goes through :class:`edgeos_protocol.features.StationTracker` — **the same class the
   gateway runs** — so the features are the gateway's (no train/serve skew; the only difference
   is the wire's quantisation of each value to its tag's resolution);
3. each finished cure's quality features are paired with the elasticity realised when that tyre
   left the press, exactly as ``models/train_all.py`` pairs them.

Rows are split into training and held-out replay rows by a stable hash of (device, station,
cure-end second), so a row never moves between the two sets when the window grows.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

from edgeos_cloud.models.errors import DataUnavailable, WindowRefused
from edgeos_protocol.features import (
    ANOMALY_FEATURES,
    CORRECTION_FEATURES,
    CURE,
    KEY_SUFFIXES,
    SAMPLE_PERIOD_S,
    WINDOW,
    StationTracker,
)

__all__ = [
    "AnomalyRows",
    "FleetRows",
    "QualityRows",
    "load_quality_rows",
    "load_rows",
    "split_rows",
    "verdict_errors",
]

F64 = npt.NDArray[np.float64]
_SUFFIX_INDEX = {s: i for i, s in enumerate(KEY_SUFFIXES)}
_STATE = KEY_SUFFIXES.index("cycle.state")
_HSP = KEY_SUFFIXES.index("heater.sp")
_PSP = KEY_SUFFIXES.index("press.sp")


@dataclass(frozen=True, slots=True)
class QualityRows:
    """Quality-model rows: features ``x`` (n, 5), realised elasticity ``y``, and provenance."""

    task: str
    x: F64
    y: F64
    device: tuple[str, ...]
    station: tuple[str, ...]
    ts_us: npt.NDArray[np.int64]
    #: Correction rows only: the set-points in force during the tyre's cure ``(n, 2)``
    #: (``heater.sp``, ``press.sp``), read back at its cure start as the guard does.
    applied: F64 | None = None

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def take(self, mask: npt.NDArray[np.bool_]) -> QualityRows:
        idx = np.flatnonzero(mask)
        return QualityRows(
            self.task,
            self.x[idx],
            self.y[idx],
            tuple(self.device[i] for i in idx),
            tuple(self.station[i] for i in idx),
            self.ts_us[idx],
            None if self.applied is None else self.applied[idx],
        )

    @classmethod
    def concat(cls, parts: Sequence[QualityRows]) -> QualityRows:
        if not parts:
            return cls.empty()
        applied = [p.applied for p in parts]
        return cls(
            parts[0].task,
            np.concatenate([p.x for p in parts]),
            np.concatenate([p.y for p in parts]),
            tuple(d for p in parts for d in p.device),
            tuple(s for p in parts for s in p.station),
            np.concatenate([p.ts_us for p in parts]),
            None if any(a is None for a in applied) else np.concatenate(applied),  # type: ignore[arg-type]
        )

    @classmethod
    def empty(cls) -> QualityRows:
        return cls("quality", np.zeros((0, 5)), np.zeros(0), (), (), np.zeros(0, np.int64))

    def describe(self) -> dict[str, Any]:
        return {
            "rows": len(self),
            "devices": sorted(set(self.device)),
            "since_us": int(self.ts_us.min()) if len(self) else None,
            "until_us": int(self.ts_us.max()) if len(self) else None,
        }


def _open(storage_url: str) -> Any:
    from edgeos_cloud.receiver.storage import open_storage

    try:
        return open_storage(storage_url)
    except Exception as exc:  # sqlite3/psycopg errors, OSError: the database is down
        raise DataUnavailable(
            f"receiver database {storage_url}: {type(exc).__name__}: {exc}"
        ) from exc


def _grid(
    storage: Any, device: str, since_us: int | None, until_us: int | None
) -> tuple[list[str], npt.NDArray[np.int64], F64, int]:
    """Stations, 1 s grid times, ``(time, station, KEY_SUFFIXES)`` forward-filled values and
    the number of samples read. Raises :class:`WindowRefused` when the device sent samples but
    no station has every key tag (the feature code cannot run on it)."""
    series: dict[tuple[str, int], tuple[list[int], list[float]]] = {}
    n_samples = 0
    for row in storage.query_samples(device, since_us=since_us, until_us=until_us):
        n_samples += 1
        station, _, suffix = row.tag.partition(".")
        col = _SUFFIX_INDEX.get(suffix)
        if col is None:
            continue
        ts, vals = series.setdefault((station, col), ([], []))
        ts.append(row.ts_us)
        vals.append(row.value if isinstance(row.value, float | int) else np.nan)
    stations = sorted(
        s for s in {s for s, _ in series} if all((s, c) in series for c in range(len(KEY_SUFFIXES)))
    )
    if not stations:
        if series:
            seen = {s for s, _ in series}
            missing = sorted(
                {KEY_SUFFIXES[c] for s in seen for c in range(len(KEY_SUFFIXES))}
                - {KEY_SUFFIXES[c] for s, c in series}
            )
            raise WindowRefused(
                f"{device}: the stored samples of {len(seen)} stations lack the key tags "
                f"{', '.join(missing)} that the gateway's feature code (StationTracker) needs; "
                "nothing can be trained or judged on them"
            )
        return [], np.zeros(0, np.int64), np.zeros((0, 0, len(KEY_SUFFIXES))), n_samples
    first = min(series[(s, c)][0][0] for s in stations for c in range(len(KEY_SUFFIXES)))
    last = max(series[(s, c)][0][-1] for s in stations for c in range(len(KEY_SUFFIXES)))
    period = int(SAMPLE_PERIOD_S * 1e6)
    grid = np.arange(first - first % period + period, last + 1, period, dtype=np.int64)
    values = np.full((grid.size, len(stations), len(KEY_SUFFIXES)), np.nan)
    for j, s in enumerate(stations):
        for c in range(len(KEY_SUFFIXES)):
            ts, vals = series[(s, c)]
            t = np.asarray(ts, np.int64)
            v = np.asarray(vals, np.float64)
            pos = np.searchsorted(t, grid, side="right") - 1
            ok = pos >= 0
            values[ok, j, c] = v[pos[ok]]
    return stations, grid, values, n_samples


@dataclass(frozen=True, slots=True)
class AnomalyRows:
    """Anomaly rows, one per judged tyre: the gateway's windows during its cure and its outcome.

    ``windows`` ``(m, WINDOW, len(ANOMALY_FEATURES))`` are the tracker's windows at every sample
    of a cure (what the engine's anomaly model scores, the verdict takes their maximum);
    ``tyre[k]`` is the row (tyre) window ``k`` belongs to; ``y`` is 1.0 when the tyre's realised
    modulus was out of spec (the gateway's own anomaly outcome), ``realised`` the modulus.
    """

    windows: npt.NDArray[np.float32]
    tyre: npt.NDArray[np.int64]
    y: F64
    realised: F64
    device: tuple[str, ...]
    station: tuple[str, ...]
    ts_us: npt.NDArray[np.int64]
    task: str = "anomaly"

    def __len__(self) -> int:
        return int(self.y.shape[0])

    @property
    def x(self) -> npt.NDArray[np.float32]:
        """Every window (the gate's finite check runs the model on them)."""
        return self.windows

    def take(self, mask: npt.NDArray[np.bool_]) -> AnomalyRows:
        idx = np.flatnonzero(mask)
        remap = np.full(len(self), -1, np.int64)
        remap[idx] = np.arange(idx.size)
        keep = mask[self.tyre] if len(self) else np.zeros(0, np.bool_)
        return AnomalyRows(
            self.windows[keep],
            remap[self.tyre[keep]],
            self.y[idx],
            self.realised[idx],
            tuple(self.device[i] for i in idx),
            tuple(self.station[i] for i in idx),
            self.ts_us[idx],
        )

    @classmethod
    def concat(cls, parts: Sequence[AnomalyRows]) -> AnomalyRows:
        if not parts:
            return cls.empty()
        offsets = np.cumsum([0, *(len(p) for p in parts)])[:-1]
        return cls(
            np.concatenate([p.windows for p in parts]),
            np.concatenate([p.tyre + o for p, o in zip(parts, offsets, strict=True)]),
            np.concatenate([p.y for p in parts]),
            np.concatenate([p.realised for p in parts]),
            tuple(d for p in parts for d in p.device),
            tuple(s for p in parts for s in p.station),
            np.concatenate([p.ts_us for p in parts]),
        )

    @classmethod
    def empty(cls) -> AnomalyRows:
        return cls(
            np.zeros((0, WINDOW, len(ANOMALY_FEATURES)), np.float32),
            np.zeros(0, np.int64),
            np.zeros(0),
            np.zeros(0),
            (),
            (),
            np.zeros(0, np.int64),
        )

    def describe(self) -> dict[str, Any]:
        return {
            "rows": len(self),
            "windows": int(self.windows.shape[0]),
            "out_of_spec": int(self.y.sum()),
            "devices": sorted(set(self.device)),
            "since_us": int(self.ts_us.min()) if len(self) else None,
            "until_us": int(self.ts_us.max()) if len(self) else None,
        }


@dataclass(frozen=True, slots=True)
class FleetRows:
    """What one pass over a window gives, per task (see :func:`load_rows`)."""

    quality: QualityRows
    anomaly: AnomalyRows
    correction: QualityRows
    #: Per device: the last sample time read (µs), for incremental readers.
    read_until_us: dict[str, int]
    #: Samples read per device.
    samples: dict[str, int]


def _device_rows(
    storage: Any,
    device: str,
    *,
    since_us: int | None,
    until_us: int | None,
    tasks: frozenset[str],
    spec: tuple[float, float],
) -> tuple[QualityRows, AnomalyRows, QualityRows, int | None, int]:
    stations, grid, values, n_samples = _grid(storage, device, since_us, until_us)
    last = int(grid[-1]) if grid.size else None
    if not stations:
        return QualityRows.empty(), AnomalyRows.empty(), _empty_correction(), last, n_samples
    tracker = StationTracker(len(stations))
    want_a = "anomaly" in tasks
    want_c = "correction" in tasks
    pending: dict[int, tuple[F64, int]] = {}
    xs: list[F64] = []
    ys: list[float] = []
    st: list[str] = []
    ts: list[int] = []
    # anomaly: windows of the cure in progress per station, then per finished cure
    cure_w: dict[int, list[npt.NDArray[np.float32]]] = {}
    a_pending: dict[int, tuple[list[npt.NDArray[np.float32]], int]] = {}
    a_w: list[npt.NDArray[np.float32]] = []
    a_tyre: list[int] = []
    a_y: list[float] = []
    a_real: list[float] = []
    a_st: list[str] = []
    a_ts: list[int] = []
    # correction: features at load, the recipe in force at the cure start, then the outcome
    c_pending: dict[int, list[Any]] = {}
    c_x: list[F64] = []
    c_d: list[F64] = []
    c_y: list[float] = []
    c_st: list[str] = []
    c_ts: list[int] = []
    for k in range(grid.size):
        v = values[k]
        obs = tracker.observe(v)
        t_k = int(grid[k])
        if want_a and bool(tracker.window_full.all()):
            # The engine scores every station's window once a second and keeps the largest
            # score of each cure (its verdict's anomaly input).
            for i in np.flatnonzero(v[:, _STATE] == CURE).tolist():
                cure_w.setdefault(i, []).append(tracker.window[i].copy())
        for n, i in enumerate(obs.cure_ended.tolist()):
            pending[i] = (obs.quality_x[n], t_k)
            if want_a:
                a_pending[i] = (cure_w.pop(i, []), t_k)
        for n, i in enumerate(obs.completed.tolist()):
            e = float(obs.realised[n])
            got = pending.pop(i, None)
            if got is not None and np.isfinite(e):
                xs.append(got[0])
                ys.append(e)
                st.append(stations[i])
                ts.append(got[1])
            a_got = a_pending.pop(i, None)
            if a_got is not None and a_got[0] and np.isfinite(e):
                row = len(a_y)
                a_w.extend(a_got[0])
                a_tyre.extend([row] * len(a_got[0]))
                a_y.append(float(not spec[0] <= e <= spec[1]))
                a_real.append(e)
                a_st.append(stations[i])
                a_ts.append(a_got[1])
            c_got = c_pending.pop(i, None)
            if (
                c_got is not None
                and c_got[3] is not None
                and int(obs.count[n]) == c_got[2]
                and np.isfinite(e)
            ):
                c_x.append(c_got[0])
                c_d.append(c_got[3])
                c_y.append(e)
                c_st.append(stations[i])
                c_ts.append(c_got[1])
        if want_c:
            for n, i in enumerate(obs.loaded.tolist()):
                if bool(obs.load_ok[n]):
                    c_pending[i] = [obs.correction_x[n].copy(), t_k, int(obs.load_count[n]), None]
                else:  # the guard takes the default for such loads; their features are doubtful
                    c_pending.pop(i, None)
            for i in obs.cure_started.tolist():
                if i in c_pending:
                    c_pending[i][3] = v[i, [_HSP, _PSP]].astype(np.float64)
        if want_a:
            for i in obs.loaded.tolist():
                cure_w.pop(i, None)
    quality = (
        QualityRows(
            "quality",
            np.array(xs),
            np.array(ys),
            (device,) * len(ys),
            tuple(st),
            np.array(ts, np.int64),
        )
        if ys
        else QualityRows.empty()
    )
    anomaly = (
        AnomalyRows(
            np.array(a_w, np.float32),
            np.array(a_tyre, np.int64),
            np.array(a_y),
            np.array(a_real),
            (device,) * len(a_y),
            tuple(a_st),
            np.array(a_ts, np.int64),
        )
        if a_y
        else AnomalyRows.empty()
    )
    correction = (
        QualityRows(
            "correction",
            np.array(c_x),
            np.array(c_y),
            (device,) * len(c_y),
            tuple(c_st),
            np.array(c_ts, np.int64),
            applied=np.array(c_d),
        )
        if c_y
        else _empty_correction()
    )
    return quality, anomaly, correction, last, n_samples


def _empty_correction() -> QualityRows:
    return QualityRows(
        "correction",
        np.zeros((0, len(CORRECTION_FEATURES))),
        np.zeros(0),
        (),
        (),
        np.zeros(0, np.int64),
        applied=np.zeros((0, 2)),
    )


def load_rows(
    storage_url: str,
    devices: Iterable[str],
    *,
    tasks: Iterable[str] = ("quality",),
    since_us: int | None = None,
    until_us: int | None = None,
    since_by_device: Mapping[str, int] | None = None,
    spec: tuple[float, float] = (6.0, 7.2),
) -> FleetRows:
    """Rows of every task in ``tasks`` for ``devices`` in ``[since, until)`` in one pass.

    ``since_by_device`` overrides ``since_us`` per device (incremental readers). Raises
    :class:`DataUnavailable` (database down) and :class:`WindowRefused` (the stored data of a
    device lack key tags the feature code needs).
    """
    wanted = frozenset(tasks)
    storage = _open(storage_url)
    parts: list[tuple[QualityRows, AnomalyRows, QualityRows, int | None, int]] = []
    names = list(devices)
    try:
        for d in names:
            since = (since_by_device or {}).get(d, since_us)
            parts.append(
                _device_rows(storage, d, since_us=since, until_us=until_us, tasks=wanted, spec=spec)
            )
    except (DataUnavailable, WindowRefused):
        raise
    except Exception as exc:  # the database went away mid-read
        raise DataUnavailable(f"receiver database {storage_url}: {exc}") from exc
    finally:
        storage.close()
    return FleetRows(
        QualityRows.concat([p[0] for p in parts if len(p[0])]),
        AnomalyRows.concat([p[1] for p in parts if len(p[1])]),
        QualityRows.concat([p[2] for p in parts if len(p[2])])
        if any(len(p[2]) for p in parts)
        else _empty_correction(),
        {d: p[3] for d, p in zip(names, parts, strict=True) if p[3] is not None},
        {d: p[4] for d, p in zip(names, parts, strict=True)},
    )


def load_quality_rows(
    storage_url: str,
    devices: Iterable[str],
    *,
    since_us: int | None = None,
    until_us: int | None = None,
) -> QualityRows:
    """Quality rows of ``devices`` in ``[since, until)``; raises :class:`DataUnavailable`."""
    return load_rows(storage_url, devices, since_us=since_us, until_us=until_us).quality


_R = TypeVar("_R", QualityRows, AnomalyRows)


def _bucket(device: str, station: str, ts_us: int) -> int:
    h = hashlib.blake2b(f"{device}/{station}/{ts_us // 1_000_000}".encode(), digest_size=2)
    return int.from_bytes(h.digest(), "big") % 100


def split_rows(rows: _R, held_out_percent: int = 30) -> tuple[_R, _R]:
    """(training rows, held-out replay rows) by a stable hash of each row's identity
    (device, station, cure-end second; a correction row: its load second)."""
    held = np.array(
        [
            _bucket(d, s, int(t)) < held_out_percent
            for d, s, t in zip(rows.device, rows.station, rows.ts_us, strict=True)
        ],
        dtype=np.bool_,
    )
    return rows.take(~held), rows.take(held)


def verdict_errors(
    storage_url: str,
    devices: Iterable[str],
    rows: QualityRows,
    *,
    since_us: int | None = None,
    since_by_device: Mapping[str, int] | None = None,
) -> list[dict[str, Any]]:
    """The gateways' own predictions (``verdict`` events) paired with realised quality.

    Returns ``[{"ts_us", "device", "station", "model", "predicted", "realised", "error"}]``
    for every row whose cure-end second has a verdict from the same station within 2 s.
    """
    storage = _open(storage_url)
    try:
        by_key: dict[tuple[str, str], list[tuple[int, dict[str, Any]]]] = {}
        for device in devices:
            since = (since_by_device or {}).get(device, since_us)
            for ev in storage.events_of_types(device, ("verdict",), since):
                if "predicted" in ev:
                    by_key.setdefault((device, str(ev["station"])), []).append((ev["ts_us"], ev))
    except Exception as exc:
        raise DataUnavailable(f"receiver database {storage_url}: {exc}") from exc
    finally:
        storage.close()
    out: list[dict[str, Any]] = []
    for i in range(len(rows)):
        cands = by_key.get((rows.device[i], rows.station[i]), [])
        t = int(rows.ts_us[i])
        best = min(cands, key=lambda c: abs(c[0] - t), default=None)
        if best is None or abs(best[0] - t) > 2_000_000:
            continue
        ev = best[1]
        pred = float(ev["predicted"])
        out.append(
            {
                "ts_us": t,
                "device": rows.device[i],
                "station": rows.station[i],
                "model": f"{ev.get('model')}@{ev.get('version')}",
                "predicted": pred,
                "realised": float(rows.y[i]),
                "error": pred - float(rows.y[i]),
            }
        )
    return out
