"""docs/grafana/edgeos-fleet.json queries only metrics (and labels) the receiver exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

from edgeos_cloud.receiver.metrics import ReceiverMetrics

DASHBOARD = Path(__file__).resolve().parents[2] / "docs" / "grafana" / "edgeos-fleet.json"


def _exported() -> dict[str, set[str]]:
    """Exposed sample name -> label names, from the receiver's real registry."""
    metrics = ReceiverMetrics()
    # Labelled families expose samples (and so their labels) once a child exists.
    metrics.rejects.labels("forged").inc()
    metrics.last_seen.labels("gw1").set(1.0)
    metrics.command_results.labels("applied").inc()
    names: dict[str, set[str]] = {}
    for family in metrics.registry.collect():
        for sample in family.samples:
            names.setdefault(sample.name, set()).update(set(sample.labels) - {"le"})
    return names


def test_every_panel_queries_real_receiver_metrics() -> None:
    doc = json.loads(DASHBOARD.read_text())
    exported = _exported()
    exprs = [t["expr"] for p in doc["panels"] for t in p["targets"]]
    assert len(exprs) >= 10
    used: set[str] = set()
    for expr in exprs:
        for name in re.findall(r"edgeos_receiver_[a-z_]+", expr):
            assert name in exported, f"{name!r} is not exported by the receiver ({expr})"
            used.add(name)
        for label in re.findall(r"(?:by|without) \(([a-z_, ]+)\)", expr):
            for key in (k.strip() for k in label.split(",")):
                # ``kind``: the credential-expiry gauge of pki refresh and the gateways.
                allowed = {"instance", "le", "kind"} | set().union(*exported.values())
                assert key in allowed, (key, expr)
    # The fleet view the issue asks for: batches/s, samples/s, rejects by reason, lag, last seen.
    assert {
        "edgeos_receiver_batches_total",
        "edgeos_receiver_samples_total",
        "edgeos_receiver_rejects_total",
        "edgeos_receiver_ingest_lag_seconds_bucket",
        "edgeos_receiver_device_last_seen_timestamp_seconds",
    } <= used
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids))
    assert doc["__inputs"][0]["name"] == "DS_PROMETHEUS"


def test_credential_expiry_panel_alerts_days_ahead_on_both_sides_gauges(tmp_path: Path) -> None:
    """The panel reads the gauge both sides export (cloud: ``pki refresh --textfile``;
    gateway: its metrics endpoint), by ``kind``, and turns red 14 days before an expiry."""
    import datetime as dt

    from prometheus_client import CollectorRegistry
    from prometheus_client.parser import text_string_to_metric_families

    from edgeos.metrics import make_registry
    from edgeos_cloud.renewal import EXPIRY_METRIC, write_textfile

    doc = json.loads(DASHBOARD.read_text())
    [panel] = [p for p in doc["panels"] if EXPIRY_METRIC in p["targets"][0]["expr"]]
    assert "by (kind)" in panel["targets"][0]["expr"]
    steps = panel["fieldConfig"]["defaults"]["thresholds"]["steps"]
    assert [(s["color"], s["value"]) for s in steps] == [
        ("red", None),
        ("orange", 14),
        ("green", 30),
    ]
    # The cloud's text file and the gateway's endpoint both carry the gauge with `kind`.
    path = tmp_path / "creds.prom"
    write_textfile(path, {"crl": dt.datetime(2030, 1, 1, tzinfo=dt.UTC)})
    cloud = {
        s.labels["kind"]
        for f in text_string_to_metric_families(path.read_text())
        for s in f.samples
        if s.name == EXPIRY_METRIC
    }
    registry: CollectorRegistry = make_registry(
        lambda: {"device": "gw", "credentials": {"client_certificate_expires": 1.9e9}}
    )
    gateway = {
        s.labels["kind"] for f in registry.collect() for s in f.samples if s.name == EXPIRY_METRIC
    }
    assert cloud == {"crl"} and gateway == {"client_certificate"}
