"""Long-term tracking: the gateways' own model reports folded into per version × group records.

A gateway's champion/challenger (``edgeos.inference.champion``) emits, per task and decision:

* ``model_metrics`` — one per model (champion and challenger): ``mean_error`` against the
  realised outcome over ``samples`` measured tyres (quality: ``|ŷ − e|``; anomaly: misjudged
  tyres; correction: the baseline head on plant-recipe tyres), ``agreement`` with the champion
  over ``rows`` shadow rows, and the runner's ``latency`` (count, p50/p99/max/mean in ms);
* ``model_promoted`` / ``model_demoted`` — the device swapped champion and challenger.

The receiver stores them as events. :meth:`FleetTracker.fold` reads, per device of a group,
only the events stamped since its cursor (the ``(device, ts)`` index; minus ``lateness_s``, so
a batch delivered late from a gateway's spool is still folded, and what was already folded in
that overlap is recognised by its identity and skipped), and:

1. adds each version's figures to a running aggregate per group (sample-weighted error,
   row-weighted agreement, latency), kept in ``home/state/tracking-<group>.json``;
2. logs them as MLflow metrics on the version's tracking run in that group
   (:meth:`ModelRegistry.log_tracking`: ``error_mean``, ``agreement``, ``latency_ms``,
   ``latency_p99_ms``, ``samples``, ``promotions``, ``demotions``), timestamped with the
   reports' time, so the run keeps the history;
3. records every device's promotion or demotion as an audit entry tagged with the device, and
   moves the group's stage as the device did (a qualified version only; the latest report wins).

:mod:`.metrics` exports the aggregates to Prometheus (docs/grafana/). The step is idempotent:
a fold that fails before saving its state is repeated; MLflow may then hold a figure twice in
a run's history, the aggregates never count an event twice.
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any

from edgeos_cloud.models.errors import DataUnavailable
from edgeos_cloud.models.state import StateFile

if TYPE_CHECKING:
    from edgeos_cloud.models.lifecycle import Lifecycle

__all__ = ["TRACKED_EVENTS", "FleetTracker", "tracking_state"]

TRACKED_EVENTS: tuple[str, ...] = ("model_metrics", "model_promoted", "model_demoted")


def tracking_state(lifecycle: Lifecycle, group: str) -> StateFile:
    return StateFile(lifecycle.config.home, f"tracking-{group}")


def _identity(ev: dict[str, Any]) -> str:
    body = json.dumps(ev, sort_keys=True, default=str)
    return hashlib.blake2b(body.encode(), digest_size=10).hexdigest()


def _new_aggregate() -> dict[str, Any]:
    return {
        "reports": 0,
        "samples": 0,
        "error_sum": 0.0,
        "agreement_rows": 0,
        "agreement_sum": 0.0,
        "latency_count": 0,
        "latency_mean_sum": 0.0,
        "latency_p99_ms": 0.0,
        "promotions": 0,
        "demotions": 0,
        "devices": [],
        "last_ts_us": 0,
    }


def figures(agg: dict[str, Any]) -> dict[str, float]:
    """The exported figures of one version's aggregate (only those it has data for)."""
    out: dict[str, float] = {
        "samples": float(agg["samples"]),
        "promotions": float(agg["promotions"]),
        "demotions": float(agg["demotions"]),
    }
    if agg["samples"]:
        out["error_mean"] = agg["error_sum"] / agg["samples"]
    if agg["agreement_rows"]:
        out["agreement"] = agg["agreement_sum"] / agg["agreement_rows"]
    if agg["latency_count"]:
        out["latency_ms"] = agg["latency_mean_sum"] / agg["latency_count"]
        out["latency_p99_ms"] = agg["latency_p99_ms"]
    return out


class FleetTracker:
    """Folds one group's stored model reports into tracking (see the module docstring)."""

    def __init__(self, lifecycle: Lifecycle) -> None:
        self.life = lifecycle

    def _read(self, group: str, cursors: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
        from edgeos_cloud.models.replay import _open

        lateness = int(self.life.config.tracking.lateness_s * 1e6)
        storage = _open(self.life.config.storage_url)
        try:
            out: dict[str, list[dict[str, Any]]] = {}
            for device in self.life.config.group(group).devices:
                cur = cursors.get(device)
                since = None if cur is None else int(cur["ts_us"]) - lateness
                out[device] = storage.events_of_types(device, TRACKED_EVENTS, since)
            return out
        except DataUnavailable:
            raise
        except Exception as exc:  # the database went away mid-read
            raise DataUnavailable(
                f"receiver database {self.life.config.storage_url}: {exc}"
            ) from exc
        finally:
            storage.close()

    def fold(self, group: str) -> dict[str, Any]:
        """Read the group's new reports, fold them; returns what was read and changed."""
        state_file = tracking_state(self.life, group)
        state = state_file.load()
        cursors: dict[str, Any] = state.setdefault("cursors", {})
        versions: dict[str, Any] = state.setdefault("versions", {})
        read = self._read(group, cursors)
        lateness = int(self.life.config.tracking.lateness_s * 1e6)
        touched: set[str] = set()
        reports: list[tuple[str, dict[str, Any]]] = []
        counts = {"read": 0, "new": 0}
        for device, events in read.items():
            cur = cursors.setdefault(device, {"ts_us": 0, "seen": []})
            seen = set(cur["seen"])
            counts["read"] += len(events)
            for ev in events:
                ident = _identity(ev)
                if ident in seen:
                    continue
                seen.add(ident)
                counts["new"] += 1
                key = f"{ev.get('model')}@{ev.get('version')}"
                agg = versions.setdefault(key, _new_aggregate())
                agg["last_ts_us"] = max(int(agg["last_ts_us"]), int(ev["ts_us"]))
                if device not in agg["devices"]:
                    agg["devices"].append(device)
                touched.add(key)
                if ev["type"] == "model_metrics":
                    _add_metrics(agg, ev)
                else:
                    agg["promotions" if ev["type"] == "model_promoted" else "demotions"] += 1
                    reports.append((device, ev))
            top = max([int(cur["ts_us"]), *(int(e["ts_us"]) for e in events)])
            cur["ts_us"] = top
            keep = {_identity(e) for e in events if int(e["ts_us"]) >= top - lateness}
            cur["seen"] = sorted(keep)
        changes = self._record_reports(group, reports)
        logged = self._log(group, versions, touched)
        state_file.save(state)
        return {
            "group": group,
            "events": counts,
            "cursors": {d: c["ts_us"] for d, c in cursors.items()},
            "versions": {k: figures(versions[k]) for k in sorted(touched)},
            "logged": logged,
            "changes": changes,
        }

    def _record_reports(
        self, group: str, reports: list[tuple[str, dict[str, Any]]]
    ) -> list[dict[str, Any]]:
        registry = self.life.registry
        changes: list[dict[str, Any]] = []
        for device, ev in sorted(reports, key=lambda r: int(r[1]["ts_us"])):
            key = f"{ev['model']}@{ev['version']}"
            try:
                version = registry.find(key)
            except KeyError:
                changes.append(
                    {"device": device, "model": key, "stage": None, "note": "not in the registry"}
                )
                continue
            promoted = ev["type"] == "model_promoted"
            before, after = ("challenger", "champion") if promoted else ("champion", "challenger")
            detail = (
                f"{device} reported {ev['type']} at {int(ev['ts_us'])} µs "
                f"(challenger error {ev.get('challenger_error')} vs champion "
                f"{ev.get('champion_error')} over {ev.get('samples')} tyres)"
            )
            registry.audit_device(
                version, group=group, device=device, before=before, after=after, reason=detail
            )
            stage = "champion" if promoted else "challenger"
            change: dict[str, Any] = {"device": device, "model": key, "stage": stage}
            if version.stages.get(group) != stage and version.status == "qualified":
                registry.set_stage(version, group, stage, f"{device} reported {ev['type']}")
                change["group_stage_moved"] = True
            changes.append(change)
        return changes

    def _log(self, group: str, versions: dict[str, Any], touched: set[str]) -> list[str]:
        registry = self.life.registry
        logged: list[str] = []
        for key in sorted(touched):
            try:
                version = registry.find(key)
            except KeyError:
                continue  # a model the registry never had (shipped outside the lifecycle)
            agg = versions[key]
            registry.log_tracking(
                registry.get(version.name, version.number),
                group,
                figures(agg),
                timestamp_ms=int(agg["last_ts_us"]) // 1000,
            )
            logged.append(key)
        return logged


def _add_metrics(agg: dict[str, Any], ev: dict[str, Any]) -> None:
    agg["reports"] += 1
    samples = int(ev.get("samples") or 0)
    if samples and ev.get("mean_error") is not None:
        agg["samples"] += samples
        agg["error_sum"] += float(ev["mean_error"]) * samples
    rows = int(ev.get("rows") or 0)
    if rows and ev.get("agreement") is not None:
        agg["agreement_rows"] += rows
        agg["agreement_sum"] += float(ev["agreement"]) * rows
    lat = ev.get("latency") or {}
    if isinstance(lat, dict) and lat.get("count"):
        # One figure per report: the runner's mean since the device started, p99 the worst seen.
        agg["latency_count"] += 1
        agg["latency_mean_sum"] += float(lat.get("mean_ms") or lat.get("p50_ms") or 0.0)
        agg["latency_p99_ms"] = max(float(agg["latency_p99_ms"]), float(lat.get("p99_ms") or 0))
