"""Prometheus metrics of the model lifecycle, per version and group (docs/grafana/).

``render(lifecycle)`` builds a fresh ``CollectorRegistry`` from the registry's state and the
latest tracked metrics, and returns the text exposition format: write it where node-exporter's
textfile collector reads it (``edgeos-cloud models metrics > …/edgeos_models.prom`` from a
timer), or serve it. Gauges:

``edgeos_model_stage{model,version,group,stage}``      1 for the stage a version holds
``edgeos_model_gate_passed{model,version}``            1 qualified, 0 refused
``edgeos_model_error_rms{model,version,group}``        last tracked RMS error of the verdicts vs
                                                       realised quality (the drift monitor)
``edgeos_model_error_mean{model,version,group}``       mean error vs the realised outcome as the
                                                       gateways score it (their model_metrics)
``edgeos_model_realised_samples{model,version,group}`` tyres those errors are over
``edgeos_model_agreement{model,version,group}``        agreement with the champion (shadow rows)
``edgeos_model_latency_ms{model,version,group}``       mean invoke latency on the devices
``edgeos_model_latency_p99_ms{model,version,group}``   worst p99 invoke latency reported
``edgeos_model_promotions{model,group}``               promotions the devices reported
``edgeos_model_demotions{model,group}``                demotions the devices reported
``edgeos_model_version_promotions{model,version,group}`` promotions of that version

The gateways' figures come from the tracker's aggregates (:mod:`.tracking`, one fold per
``edgeos-cloud models reports``); the drift monitor's from the version's MLflow tracking run.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Gauge, generate_latest

if TYPE_CHECKING:
    from edgeos_cloud.models.lifecycle import Lifecycle

__all__ = ["render"]


def _gauge(reg: CollectorRegistry, name: str, doc: str, labels: list[str]) -> Gauge:
    return Gauge(name, doc, labels, registry=reg)


def render(lifecycle: Lifecycle) -> bytes:
    from edgeos_cloud.models.tracking import figures, tracking_state

    reg = CollectorRegistry()
    vg = ["model", "version", "group"]
    stage = _gauge(reg, "edgeos_model_stage", "Stage a version holds", [*vg, "stage"])
    gate = _gauge(reg, "edgeos_model_gate_passed", "Gate verdict", ["model", "version"])
    error_rms = _gauge(reg, "edgeos_model_error_rms", "RMS error of verdicts vs realised", vg)
    tracked = {
        "error_mean": _gauge(
            reg, "edgeos_model_error_mean", "Mean error vs the realised outcome (gateways)", vg
        ),
        "samples": _gauge(
            reg, "edgeos_model_realised_samples", "Realised tyres the error is over", vg
        ),
        "agreement": _gauge(reg, "edgeos_model_agreement", "Agreement with the champion", vg),
        "latency_ms": _gauge(reg, "edgeos_model_latency_ms", "Mean invoke latency (devices)", vg),
        "latency_p99_ms": _gauge(
            reg, "edgeos_model_latency_p99_ms", "Worst p99 invoke latency reported", vg
        ),
        "promotions": _gauge(
            reg, "edgeos_model_version_promotions", "Device promotions of the version", vg
        ),
    }
    promotions = _gauge(
        reg, "edgeos_model_promotions", "Promotions reported by devices", ["model", "group"]
    )
    demotions = _gauge(
        reg, "edgeos_model_demotions", "Demotions reported by devices", ["model", "group"]
    )
    for v in lifecycle.registry.versions():
        if v.status in ("qualified", "refused"):
            gate.labels(v.name, v.manifest_version).set(1.0 if v.status == "qualified" else 0.0)
        for group, st in v.stages.items():
            stage.labels(v.name, v.manifest_version, group, st).set(1.0)
            if v.tags.get(f"tracking.{group}"):
                history = lifecycle.registry.tracking(v, group)
                if history.get("error_rms"):
                    error_rms.labels(v.name, v.manifest_version, group).set(
                        history["error_rms"][-1]
                    )
    for group in lifecycle.config.groups:
        versions = tracking_state(lifecycle, group).load().get("versions", {})
        counts: dict[str, list[int]] = {}
        for key, agg in versions.items():
            name, _, mv = key.partition("@")
            for k, value in figures(agg).items():
                if k in tracked:
                    tracked[k].labels(name, mv, group).set(value)
            c = counts.setdefault(name, [0, 0])
            c[0] += int(agg["promotions"])
            c[1] += int(agg["demotions"])
        for name, (n_up, n_down) in counts.items():
            promotions.labels(name, group).set(n_up)
            demotions.labels(name, group).set(n_down)
    return generate_latest(reg)
