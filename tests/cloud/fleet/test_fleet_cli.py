"""``edgeos-cloud fleet …`` on a real receiver database: JSON views, metrics, the dashboard."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from edgeos_cloud.cli import main

DASHBOARD = Path(__file__).resolve().parents[3] / "docs" / "grafana" / "edgeos-fleet-learning.json"


@pytest.fixture
def config(tmp_path: Path, fleet_db: Any) -> Path:
    path = tmp_path / "cloud.toml"
    path.write_text(
        f'[fleet]\nhome = "fleet"\nstorage_url = "{fleet_db.storage_url}"\n'
        "[fleet.competition]\nmin_tyres = 20\nmin_strata = 1\n"
    )
    return path


def _json(capsys: pytest.CaptureFixture[str], argv: list[str]) -> Any:
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_groups_leaderboard_decide_and_competitions_as_json(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["fleet", "--config", str(config), "--json"]
    groups = _json(capsys, [*base, "groups"])
    (line,) = [g for g in groups["groups"] if g["members"] == ["gw-a", "gw-b"]]
    assert line["source"] == "fingerprint" and groups["ungrouped"] == []
    board = _json(capsys, [*base, "leaderboard", "--group", line["group"]])
    policies = {row["policy"] for row in board}
    assert policies == {"correction@1.0.0|press-a@1", "correction@1.0.0|press-b@2"}
    decided = _json(
        capsys, [*base, "decide", "--group", line["group"], "--champion", board[1]["policy"]]
    )
    (record,) = decided["competitions"]
    assert record["champion"] == board[1]["policy"] and record["challenger"] == board[0]["policy"]
    assert record["decision"] in ("winner", "tie", "champion_better", "insufficient")
    assert (decided["winner"] is not None) == (record["decision"] == "winner")
    listed = _json(capsys, [*base, "competitions"])
    assert [c["id"] for c in listed] == [record["id"]]


def test_fleet_dashboard_queries_only_exported_metrics(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["fleet", "--config", str(config), "metrics"]) == 0
    text = capsys.readouterr().out
    assert re.search(r'edgeos_fleet_policy_reward\{.*policy="correction@1.0.0\|press-a@1"', text)
    exported = set(re.findall(r"^# TYPE (\w+) ", text, re.M))
    dashboard = json.loads(DASHBOARD.read_text())
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            names = set(re.findall(r"\b(edgeos_\w+)", target["expr"]))
            assert names and names <= exported, (names, exported)


def test_configuration_errors_exit_2_and_missing_repository_defers(
    tmp_path: Path, config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[fleet]\nunknown = 1\n")
    assert main(["fleet", "--config", str(bad), "groups"]) == 2
    assert "fleet.unknown" in capsys.readouterr().err
    assert main(["fleet", "--config", str(config), "rollouts"]) == 3
    assert "ota_repo" in capsys.readouterr().err


def test_fleet_dashboard_plots_every_screening_metric_with_labels_it_exports() -> None:
    """The screening gauges have panels, and every ``{{label}}`` a panel's legend names is a
    label of the samples :func:`render` writes for a screening that ran the twin."""
    from prometheus_client.parser import text_string_to_metric_families

    from edgeos_cloud.fleet.competition import Competition
    from edgeos_cloud.fleet.metrics import render

    screening = Competition(
        group="line-a", task="combination", champion="m@1|p@1", challenger="m@1|p@2+p@3",
        decision="combined", reason="", estimate=0.38, se=0.003, bound=0.377, confidence=1.0,
        naive=None, strata=0, evidence={"A+B": 3000}, settings={},
        screening={"results": [
            {"candidate": "default", "mean_reward": 5.13}, {"candidate": "A+B", "mean_reward": 6.05}
        ]},
    )  # fmt: skip
    families = text_string_to_metric_families(render([], [screening]).decode())
    labels = {s.name: set(s.labels) for f in families for s in f.samples}
    screening_metrics = {n for n in labels if n.startswith("edgeos_fleet_screening")}
    assert len(screening_metrics) == 6, labels
    dashboard = json.loads(DASHBOARD.read_text())
    used: set[str] = set()
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            names = set(re.findall(r"\b(edgeos_\w+)", target["expr"]))
            used |= names
            for name in names & screening_metrics:
                legend = set(re.findall(r"\{\{(\w+)\}\}", target.get("legendFormat", "")))
                assert legend <= labels[name], (name, legend)
    assert screening_metrics <= used
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
