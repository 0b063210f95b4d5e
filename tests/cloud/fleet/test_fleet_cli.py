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
