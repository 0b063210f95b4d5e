"""A driver installed next to edgeos plugs in through its entry point, with no change to the core.

The driver (``replay_plugin.py``, a recording replayer) is installed the way pip would: its
module in a folder on ``sys.path`` plus a ``*.dist-info`` folder with ``entry_points.txt``.
It brings its own address key and models; configuration validation, the runtime, the
supervisor, the scheduler and the twin use it like the built-in drivers.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from edgeos.app import Runtime
from edgeos.config import parse_config
from edgeos.driver import Quality, available_drivers, clear_driver_caches, load_driver_class
from edgeos.errors import ConfigError
from edgeos.twin.scanlog import ScanRecord

ROWS = [
    {"speed": 10.5, "count": 1, "running": 1},
    {"speed": 11.0, "count": 2, "running": 1},
    {"speed": 11.5, "count": 3, "running": 0},
]


@pytest.fixture
def replay_installed(tmp_path: Path) -> Iterator[Path]:
    """Install ``edgeos_replay`` (entry point ``replay``) into a folder on ``sys.path``."""
    site = tmp_path / "site-packages"
    site.mkdir()
    shutil.copy(Path(__file__).with_name("replay_plugin.py"), site / "edgeos_replay.py")
    info = site / "edgeos_replay-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: edgeos-replay\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[edgeos.drivers]\nreplay = edgeos_replay:ReplayDriver\n"
    )
    sys.path.insert(0, str(site))
    clear_driver_caches()  # the registry is cached; a driver installed at run time is new
    try:
        yield site
    finally:
        sys.path.remove(str(site))
        sys.modules.pop("edgeos_replay", None)
        clear_driver_caches()


def _config_text(tmp_path: Path, tags: str) -> str:
    recording = tmp_path / "recording.jsonl"
    recording.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    return textwrap.dedent(
        f"""
        [device]
        id = "gw-replay"
        state_dir = "{tmp_path / "state"}"

        [uplink]
        enabled = false

        [control]
        metrics_listen = ""

        [[connections]]
        name = "rec"
        driver = "replay"
        endpoint = "file://{recording}"
        options = {{ loop = false }}
        reconnect = {{ initial_s = 0.05, max_s = 0.5 }}

        [[connections]]
        name = "plc"
        driver = "modbus_tcp"
        endpoint = "tcp://127.0.0.1:1502"
        enabled = false

        [[scan_groups]]
        name = "default"
        period_ms = 20
        """
    ) + textwrap.dedent(tags)


TAGS = """
[[tags]]
name = "line.speed"
connection = "rec"
resolution = 0.1
replay = { column = "speed" }

[[tags]]
name = "line.count"
connection = "rec"
replay = { column = "count", type = "int32" }

[templates.station]
tags = [ { name = "running", replay = { column = "{equipment}", type = "bool" } } ]
"""


def test_the_driver_is_found_through_its_entry_point(replay_installed: Path) -> None:
    assert {"replay", "modbus_tcp", "opcua"} <= available_drivers()
    cls = load_driver_class("replay")
    assert (cls.address_key, cls.title) == ("replay", "file replay")


def test_its_address_and_options_are_validated_with_key_paths(
    replay_installed: Path, tmp_path: Path
) -> None:
    bad = """
    [[tags]]
    name = "a"
    connection = "rec"
    resolution = 0.1
    replay = { colum = "speed" }

    [[tags]]
    name = "b"
    connection = "plc"
    resolution = 0.1
    replay = { column = "speed" }

    [[tags]]
    name = "c"
    connection = "rec"
    modbus = { address = 1 }
    """
    text = _config_text(tmp_path, bad).replace("loop = false", "loop = 3")
    with pytest.raises(ConfigError) as info:
        parse_config(text)
    issues = [str(i) for i in info.value.issues]
    assert any(i.startswith("tags[0].replay.colum: unknown key") for i in issues), issues
    assert any(i.startswith("tags[0].replay.column: required key") for i in issues), issues
    # Schema errors stop before cross-references; fix the schema ones and look again.
    text = _config_text(tmp_path, bad.replace("colum =", "column =")).replace(
        "loop = false", "loop = 3"
    )
    with pytest.raises(ConfigError) as info:
        parse_config(text)
    issues = [str(i) for i in info.value.issues]
    assert any(i.startswith("connections[0].options.loop:") for i in issues), issues
    assert any(i.startswith("tags[1].modbus:") and "is Modbus TCP" in i for i in issues), issues
    assert any(i.startswith("tags[2].replay:") and "is file replay" in i for i in issues), issues


async def test_its_values_arrive_in_the_twin_through_the_real_runtime(
    replay_installed: Path, tmp_path: Path
) -> None:
    text = _config_text(tmp_path, TAGS)
    text += textwrap.dedent(
        """
        [[equipment]]
        name = "running"
        template = "station"
        connection = "rec"
        """
    )
    config = parse_config(text)
    assert [t.name for t in config.all_tags] == ["line.speed", "line.count", "running.running"]

    runtime = Runtime(config)
    index = {name: runtime.twin.index(name) for name in ("line.speed", "line.count")}
    last = len(ROWS) - 1
    held = asyncio.Event()

    def on_apply(record: ScanRecord) -> None:
        # The recording is not looped: once a scan delivers the last row, it stays there.
        values = dict(zip(record.indices.tolist(), record.values.tolist(), strict=True))
        if values.get(index["line.count"]) == ROWS[last]["count"]:
            held.set()

    runtime.twin.subscribe(on_apply)
    task = asyncio.create_task(runtime.run())
    try:
        async with asyncio.timeout(20):
            await runtime.ready.wait()
            await held.wait()
        twin = runtime.twin
        assert twin.values[index["line.speed"]] == pytest.approx(ROWS[last]["speed"])
        assert twin.values[index["line.count"]] == ROWS[last]["count"]
        assert twin.values[twin.index("running.running")] == ROWS[last]["running"]
        assert (twin.quality == Quality.GOOD).all()
        assert np.isfinite(twin.values).all()
        status = runtime.status()
        (conn,) = status["connections"]
        assert conn["name"] == "rec" and conn["state"] == "up"
        assert conn["driver"]["responses"] >= len(ROWS)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
