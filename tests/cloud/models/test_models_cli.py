"""``edgeos-cloud models …`` on a real store and database; the dashboard's metrics exist."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from edgeos.inference.selfcheck import MODELS_DIR
from edgeos_cloud.cli import main

DASHBOARD = Path(__file__).resolve().parents[3] / "docs" / "grafana" / "edgeos-models.json"


@pytest.fixture
def config(tmp_path: Path, fleet: Any) -> Path:
    path = tmp_path / "models.toml"
    path.write_text(
        f'home = "lifecycle"\nstorage_url = "{fleet.storage_url}"\n'
        f'[groups.{fleet.group}]\ndevices = ["{fleet.device}"]\n'
    )
    return path


def _json(capsys: pytest.CaptureFixture[str], argv: list[str]) -> Any:
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_register_list_show_drift_and_metrics_from_the_command_line(
    config: Path, fleet: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["models", "--config", str(config), "--json"]
    seeded = _json(
        capsys,
        [*base, "register", str(MODELS_DIR / "quality.toml"), "--group", fleet.group, "--champion"],
    )
    assert seeded["key"] == "quality@1.1.0" and seeded["stages"] == {fleet.group: "champion"}
    listed = _json(capsys, [*base, "list"])
    assert [v["key"] for v in listed] == ["quality@1.1.0"]
    shown = _json(capsys, [*base, "show", "quality@1.1.0"])
    assert shown["gate_report"]["checks"][0]["name"] == "integrity"
    assert [a["to"] for a in shown["audit"]][-1] == "champion"
    drift = _json(capsys, [*base, "drift", "--group", fleet.group])
    assert drift["drift"] is True and drift["champion"] == "quality@1.1.0"
    assert main(["models", "--config", str(config), "metrics"]) == 0
    text = capsys.readouterr().out
    assert (
        'edgeos_model_stage{group="line-a",model="quality",stage="champion",version="1.1.0"} 1.0'
        in text
    )
    assert re.search(
        r'edgeos_model_error_rms\{group="line-a",model="quality",version="1.1.0"\} \d', text
    )


def test_deferred_and_refused_exit_codes(
    tmp_path: Path, config: Path, fleet: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    down = tmp_path / "down.toml"
    down.write_text(
        'home = "lifecycle"\nstorage_url = "postgresql://x:y@127.0.0.1:1/none"\n'
        f'[groups.{fleet.group}]\ndevices = ["{fleet.device}"]\n'
    )
    assert main(["models", "--config", str(down), "retrain", "--group", fleet.group]) == 3
    assert "deferred: receiver database" in capsys.readouterr().err
    bad = tmp_path / "bad.toml"
    bad.write_text('home = "x"\nstorage_url = "sqlite://"\nunknown = 1\n')
    assert main(["models", "--config", str(bad), "list"]) == 2
    assert "unknown" in capsys.readouterr().err


def test_models_dashboard_queries_only_exported_metrics(make_lifecycle: Any, fleet: Any) -> None:
    from edgeos_cloud.models.metrics import render

    life = make_lifecycle()
    life.seed_champion(MODELS_DIR / "quality.toml", fleet.group)
    text = render(life).decode()
    exported = set(re.findall(r"^# TYPE (\w+) ", text, re.M))
    dashboard = json.loads(DASHBOARD.read_text())
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            names = set(re.findall(r"\b(edgeos_\w+)", target["expr"]))
            assert names and names <= exported, (names, exported)
