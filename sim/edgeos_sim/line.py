"""A runtime configuration for a running simulated line (tests, HIL rigs, the demo, benches).

Renders the same small-line/tyre-line configuration as ``examples/`` (so what is tested is
what a newcomer reads), then points it at the simulator's real ports and at a state directory,
and applies overrides (uplink, inference, …) as nested dictionaries.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import tomli_w

from edgeos.config import Config, load_config
from edgeos_sim.configgen import render_small_line, render_tyre_line

__all__ = ["line_config", "write_line_config"]


def _merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value
    return base


def line_config(
    *,
    modbus_port: int,
    opcua_url: str | None,
    state_dir: Path,
    nests: int = 4,
    tags_per_nest: int = 20,
    big: bool = False,
    overrides: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The configuration document (a dict) for a simulated line on these endpoints."""
    text = (
        render_tyre_line(nests, tags_per_nest) if big else render_small_line(nests, tags_per_nest)
    )
    doc = tomllib.loads(text)
    doc["device"]["state_dir"] = str(state_dir)
    conns = []
    for conn in doc["connections"]:
        if conn["driver"].startswith("modbus"):
            conn["endpoint"] = f"tcp://127.0.0.1:{modbus_port}"
        elif conn["driver"] == "opcua":
            if opcua_url is None:
                continue
            conn["endpoint"] = opcua_url
        conns.append(conn)
    doc["connections"] = conns
    kept = {c["name"] for c in conns}
    doc["equipment"] = [e for e in doc.get("equipment", []) if e["connection"] in kept]
    doc.setdefault("control", {})["metrics_listen"] = ""
    if overrides:
        _merge(doc, overrides)
    return doc


def write_line_config(path: Path, **kwargs: Any) -> Config:
    """Write :func:`line_config` as TOML to ``path`` and load it back (validated)."""
    doc = line_config(**kwargs)
    path.write_text(tomli_w.dumps(doc))
    return load_config(path)
