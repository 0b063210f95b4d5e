"""Prometheus metrics of the model lifecycle, per version and group (docs/grafana/).

``render(lifecycle)`` builds a fresh ``CollectorRegistry`` from the registry's state and the
latest tracked metrics, and returns the text exposition format: write it where node-exporter's
textfile collector reads it (``edgeos-cloud models metrics > …/edgeos_models.prom`` from a
timer), or serve it. Gauges:

``edgeos_model_stage{model,version,group,stage}``      1 for the stage a version holds
``edgeos_model_gate_passed{model,version}``            1 qualified, 0 refused
``edgeos_model_error_rms{model,version,group}``        last tracked RMS error vs realised quality
``edgeos_model_agreement{model,version,group}``        last tracked agreement with the champion
``edgeos_model_latency_ms{model,version,group}``       last tracked invoke latency on the devices
``edgeos_model_promotions{model,group}``               promotions recorded in the audit trail
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Gauge, generate_latest

if TYPE_CHECKING:
    from edgeos_cloud.models.lifecycle import Lifecycle

__all__ = ["render"]


def render(lifecycle: Lifecycle) -> bytes:
    reg = CollectorRegistry()
    stage = Gauge(
        "edgeos_model_stage",
        "Stage a version holds",
        ["model", "version", "group", "stage"],
        registry=reg,
    )
    gate = Gauge("edgeos_model_gate_passed", "Gate verdict", ["model", "version"], registry=reg)
    tracked = {
        "error_rms": Gauge(
            "edgeos_model_error_rms",
            "RMS error vs realised quality",
            ["model", "version", "group"],
            registry=reg,
        ),
        "agreement": Gauge(
            "edgeos_model_agreement",
            "Agreement with the champion",
            ["model", "version", "group"],
            registry=reg,
        ),
        "latency_ms": Gauge(
            "edgeos_model_latency_ms",
            "Invoke latency on the devices",
            ["model", "version", "group"],
            registry=reg,
        ),
    }
    promotions = Gauge(
        "edgeos_model_promotions", "Promotions recorded", ["model", "group"], registry=reg
    )
    for v in lifecycle.registry.versions():
        if v.status in ("qualified", "refused"):
            gate.labels(v.name, v.manifest_version).set(1.0 if v.status == "qualified" else 0.0)
        for group, st in v.stages.items():
            stage.labels(v.name, v.manifest_version, group, st).set(1.0)
            history = lifecycle.registry.tracking(v, group)
            for key, gauge in tracked.items():
                if history.get(key):
                    gauge.labels(v.name, v.manifest_version, group).set(history[key][-1])
    counts: dict[tuple[str, str], int] = {}
    for rec in lifecycle.registry.audit():
        if rec["to"] == "champion" and "reported" in rec["reason"]:
            name = rec["key"].split("@", 1)[0]
            counts[(name, rec["group"])] = counts.get((name, rec["group"]), 0) + 1
    for (name, group), n in counts.items():
        promotions.labels(name, group).set(n)
    return generate_latest(reg)
