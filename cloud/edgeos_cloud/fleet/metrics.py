"""Prometheus metrics of mesh twin learning, per group and policy (docs/grafana/).

:func:`render` builds a fresh ``CollectorRegistry`` from a leaderboard and the competition
records and returns the text exposition format: write it where node-exporter's textfile
collector reads it (``edgeos-cloud fleet metrics > …/edgeos_fleet.prom`` from a timer), so
Prometheus keeps the leaderboard's history. Gauges:

``edgeos_fleet_group_members{group}``                           gateways in a similarity group
``edgeos_fleet_policy_reward{group,policy,model,profile}``      mean realised reward per tyre
``edgeos_fleet_policy_adjusted_reward{group,policy,…}``         re-weighted to the material mix
``edgeos_fleet_policy_uplift{group,policy,…}``                  mean r − d per tyre (vs default)
``edgeos_fleet_policy_tyres{group,policy,…}``                   measured tyres
``edgeos_fleet_policy_gate_error{group,policy,…}``              mean |predicted − realised| modulus
``edgeos_fleet_policy_scrap_rate{group,policy,…}``              scrap verdicts per judged tyre
``edgeos_fleet_competitions{group,decision}``                   the rule's decisions recorded
``edgeos_fleet_screenings{group,decision}``                     twin screenings of combinations
                                                                (combined, single, refused)

and of each group's latest screening that ran the twin:

``edgeos_fleet_screening_reward{group,candidate}``              twin mean reward per tyre
``edgeos_fleet_screening_uplift{group}``                        combination − better single
``edgeos_fleet_screening_lower_bound{group}``                   its one-sided lower bound
``edgeos_fleet_screening_confidence{group}``                    P(combination better)
``edgeos_fleet_screening_combined{group}``                      1 if the combination went out
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

from prometheus_client import CollectorRegistry, Gauge, generate_latest

from edgeos_cloud.fleet.competition import Competition
from edgeos_cloud.fleet.evidence import PolicyRow

__all__ = ["render"]

_POLICY = ["group", "policy", "model", "profile"]
#: The ``task`` of a screening record (:func:`edgeos_cloud.fleet.loop.screen_winners`).
SCREENING = "combination"


def render(
    rows: Sequence[PolicyRow],
    competitions: Iterable[Competition] = (),
    members: Mapping[str, int] | None = None,
) -> bytes:
    reg = CollectorRegistry()
    group_members = Gauge(
        "edgeos_fleet_group_members", "Gateways in the group", ["group"], registry=reg
    )
    gauges = {
        "mean_reward": Gauge(
            "edgeos_fleet_policy_reward", "Mean realised reward per tyre", _POLICY, registry=reg
        ),
        "adjusted_reward": Gauge(
            "edgeos_fleet_policy_adjusted_reward",
            "Mean reward re-weighted to the group's raw-material mix",
            _POLICY,
            registry=reg,
        ),
        "uplift_vs_default": Gauge(
            "edgeos_fleet_policy_uplift",
            "Mean realised minus default-policy reward per tyre",
            _POLICY,
            registry=reg,
        ),
        "tyres": Gauge("edgeos_fleet_policy_tyres", "Measured tyres", _POLICY, registry=reg),
        "gate_error": Gauge(
            "edgeos_fleet_policy_gate_error",
            "Mean absolute gate error vs realised modulus",
            _POLICY,
            registry=reg,
        ),
        "scrap_rate": Gauge(
            "edgeos_fleet_policy_scrap_rate",
            "Scrap verdicts per judged tyre",
            _POLICY,
            registry=reg,
        ),
    }
    decisions = Gauge(
        "edgeos_fleet_competitions",
        "Competitions recorded, by decision",
        ["group", "decision"],
        registry=reg,
    )
    for group, n in (members or {}).items():
        group_members.labels(group).set(n)
    for row in rows:
        labels = (row.group, row.policy, row.model, row.profile)
        for attr, gauge in gauges.items():
            value = getattr(row, attr)
            if value is not None:
                gauge.labels(*labels).set(float(value))
    screenings = Gauge(
        "edgeos_fleet_screenings",
        "Twin screenings of combinations of winners, by decision",
        ["group", "decision"],
        registry=reg,
    )
    screen_reward = Gauge(
        "edgeos_fleet_screening_reward",
        "Twin mean reward per tyre of each candidate in the group's latest screening",
        ["group", "candidate"],
        registry=reg,
    )
    screen_values = {
        "estimate": Gauge(
            "edgeos_fleet_screening_uplift",
            "Latest screening: combination minus the better single winner, per tyre (twin)",
            ["group"],
            registry=reg,
        ),
        "bound": Gauge(
            "edgeos_fleet_screening_lower_bound",
            "Latest screening: one-sided lower bound of that difference",
            ["group"],
            registry=reg,
        ),
        "confidence": Gauge(
            "edgeos_fleet_screening_confidence",
            "Latest screening: probability that the combination is better",
            ["group"],
            registry=reg,
        ),
    }
    combined = Gauge(
        "edgeos_fleet_screening_combined",
        "Latest screening: 1 when the combination was rolled out, else 0",
        ["group"],
        registry=reg,
    )
    records = list(competitions)
    rule = Counter((c.group, c.decision) for c in records if c.task != SCREENING)
    for (group, decision), n in rule.items():
        decisions.labels(group, decision).set(n)
    screened = Counter((c.group, c.decision) for c in records if c.task == SCREENING)
    for (group, decision), n in screened.items():
        screenings.labels(group, decision).set(n)
    latest: dict[str, Competition] = {}
    for c in records:  # oldest first: the last one that ran the twin stays
        if c.task == SCREENING and c.screening and c.screening.get("results"):
            latest[c.group] = c
    for group, c in latest.items():
        assert c.screening is not None
        for r in c.screening["results"]:
            screen_reward.labels(group, r["candidate"]).set(float(r["mean_reward"]))
        for attr, gauge in screen_values.items():
            value = getattr(c, attr)
            if value is not None:
                gauge.labels(group).set(float(value))
        combined.labels(group).set(1.0 if c.decision == "combined" else 0.0)
    return generate_latest(reg)
