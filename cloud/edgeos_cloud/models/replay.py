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
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from edgeos_cloud.models.errors import DataUnavailable
from edgeos_protocol.features import KEY_SUFFIXES, SAMPLE_PERIOD_S, StationTracker

__all__ = ["QualityRows", "load_quality_rows", "split_rows", "verdict_errors"]

F64 = npt.NDArray[np.float64]
_SUFFIX_INDEX = {s: i for i, s in enumerate(KEY_SUFFIXES)}


@dataclass(frozen=True, slots=True)
class QualityRows:
    """Quality-model rows: features ``x`` (n, 5), realised elasticity ``y``, and provenance."""

    task: str
    x: F64
    y: F64
    device: tuple[str, ...]
    station: tuple[str, ...]
    ts_us: npt.NDArray[np.int64]

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
        )

    @classmethod
    def concat(cls, parts: Sequence[QualityRows]) -> QualityRows:
        if not parts:
            return cls.empty()
        return cls(
            "quality",
            np.concatenate([p.x for p in parts]),
            np.concatenate([p.y for p in parts]),
            tuple(d for p in parts for d in p.device),
            tuple(s for p in parts for s in p.station),
            np.concatenate([p.ts_us for p in parts]),
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
) -> tuple[list[str], npt.NDArray[np.int64], F64]:
    """Stations, 1 s grid times and ``(time, station, KEY_SUFFIXES)`` forward-filled values."""
    series: dict[tuple[str, int], tuple[list[int], list[float]]] = {}
    for row in storage.query_samples(device, since_us=since_us, until_us=until_us):
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
        return [], np.zeros(0, np.int64), np.zeros((0, 0, len(KEY_SUFFIXES)))
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
    return stations, grid, values


def _rows_of_device(
    storage: Any, device: str, since_us: int | None, until_us: int | None
) -> QualityRows:
    stations, grid, values = _grid(storage, device, since_us, until_us)
    if not stations:
        return QualityRows.empty()
    tracker = StationTracker(len(stations))
    pending: dict[int, tuple[F64, int]] = {}
    xs: list[F64] = []
    ys: list[float] = []
    st: list[str] = []
    ts: list[int] = []
    for k in range(grid.size):
        obs = tracker.observe(values[k])
        for n, i in enumerate(obs.cure_ended.tolist()):
            pending[i] = (obs.quality_x[n], int(grid[k]))
        for n, i in enumerate(obs.completed.tolist()):
            got = pending.pop(i, None)
            if got is not None and np.isfinite(obs.realised[n]):
                xs.append(got[0])
                ys.append(float(obs.realised[n]))
                st.append(stations[i])
                ts.append(got[1])
    if not ys:
        return QualityRows.empty()
    return QualityRows(
        "quality",
        np.array(xs),
        np.array(ys),
        (device,) * len(ys),
        tuple(st),
        np.array(ts, np.int64),
    )


def load_quality_rows(
    storage_url: str,
    devices: Iterable[str],
    *,
    since_us: int | None = None,
    until_us: int | None = None,
) -> QualityRows:
    """Quality rows of ``devices`` in ``[since, until)``; raises :class:`DataUnavailable`."""
    storage = _open(storage_url)
    try:
        parts = [_rows_of_device(storage, d, since_us, until_us) for d in devices]
    except DataUnavailable:
        raise
    except Exception as exc:  # the database went away mid-read
        raise DataUnavailable(f"receiver database {storage_url}: {exc}") from exc
    finally:
        storage.close()
    return QualityRows.concat([p for p in parts if len(p)])


def _bucket(device: str, station: str, ts_us: int) -> int:
    h = hashlib.blake2b(f"{device}/{station}/{ts_us // 1_000_000}".encode(), digest_size=2)
    return int.from_bytes(h.digest(), "big") % 100


def split_rows(rows: QualityRows, held_out_percent: int = 30) -> tuple[QualityRows, QualityRows]:
    """(training rows, held-out replay rows) by a stable hash of each row's identity."""
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
) -> list[dict[str, Any]]:
    """The gateways' own predictions (``verdict`` events) paired with realised quality.

    Returns ``[{"ts_us", "device", "station", "model", "predicted", "realised", "error"}]``
    for every row whose cure-end second has a verdict from the same station within 2 s.
    """
    storage = _open(storage_url)
    try:
        by_key: dict[tuple[str, str], list[tuple[int, dict[str, Any]]]] = {}
        for device in devices:
            for ev in storage.events(device, since_us):
                if ev.get("type") == "verdict" and "predicted" in ev:
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
