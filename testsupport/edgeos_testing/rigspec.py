"""The rig file (TOML): what the device under test, its machines, broker and receiver are.

See :mod:`edgeos_testing.rig` for an example; :func:`load_rig` refuses unknown tables and keys.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

__all__ = [
    "BrokerSpec",
    "DutSpec",
    "PeersSpec",
    "ReceiverSpec",
    "RigSpec",
    "load_rig",
    "parse_duration",
]


@dataclass(frozen=True, slots=True)
class DutSpec:
    kind: Literal["local", "ssh"] = "local"
    device_id: str = "hil-gw-01"
    interval_s: float = 2.0
    # ssh only
    host: str = ""
    user: str = "root"
    port: int = 22
    identity_file: str = ""
    remote_config: str = "/etc/edgeos/edgeos.toml"
    remote_state_dir: str = "/var/lib/edgeos"
    remote_edgeos: str = "edgeos"
    service: str = "edgeos.service"


@dataclass(frozen=True, slots=True)
class PeersSpec:
    kind: Literal["sim", "external"] = "sim"
    nests: int = 4
    tags_per_nest: int = 20
    opcua: bool = True
    tick_hz: float = 10.0
    seed: int = 0
    # external only: where the real machines are (the rig proxies to them)
    modbus: str = ""
    opcua_url: str = ""


@dataclass(frozen=True, slots=True)
class BrokerSpec:
    kind: Literal["mosquitto"] = "mosquitto"


@dataclass(frozen=True, slots=True)
class ReceiverSpec:
    #: ``sqlite`` or a PostgreSQL admin DSN (a fresh database is created per rig).
    storage: str = "sqlite"
    count: int = 1


@dataclass(frozen=True, slots=True)
class RigSpec:
    name: str = "loopback"
    dut: DutSpec = field(default_factory=DutSpec)
    peers: PeersSpec = field(default_factory=PeersSpec)
    broker: BrokerSpec = field(default_factory=BrokerSpec)
    receiver: ReceiverSpec = field(default_factory=ReceiverSpec)
    #: Runtime configuration overrides (nested tables merged into the rendered config).
    runtime: Mapping[str, Any] = field(default_factory=dict)


def _section(cls: Any, doc: Mapping[str, Any], name: str) -> Any:
    raw = dict(doc.get(name, {}))
    known = set(cls.__dataclass_fields__)
    unknown = set(raw) - known
    if unknown:
        raise ValueError(f"rig file: unknown keys in [{name}]: {', '.join(sorted(unknown))}")
    return cls(**raw)


def load_rig(path: str | Path) -> RigSpec:
    """Parse a rig file (unknown keys are errors naming their table)."""
    doc = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    unknown = set(doc) - {"rig", "dut", "peers", "broker", "receiver", "runtime"}
    if unknown:
        raise ValueError(f"rig file {path}: unknown tables {', '.join(sorted(unknown))}")
    spec = RigSpec(
        name=str(doc.get("rig", {}).get("name", Path(path).stem)),
        dut=_section(DutSpec, doc, "dut"),
        peers=_section(PeersSpec, doc, "peers"),
        broker=_section(BrokerSpec, doc, "broker"),
        receiver=_section(ReceiverSpec, doc, "receiver"),
        runtime=dict(doc.get("runtime", {})),
    )
    if spec.dut.kind == "ssh" and not spec.dut.host:
        raise ValueError("rig file: [dut] kind = 'ssh' needs host")
    if spec.peers.kind == "external" and not spec.peers.modbus:
        raise ValueError("rig file: [peers] kind = 'external' needs modbus")
    return spec


def parse_duration(text: str) -> float:
    """``90``, ``90s``, ``15m``, ``1h``, ``1h30m`` → seconds."""
    text = text.strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    parts = re.findall(r"(\d+(?:\.\d+)?)([hms])", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"not a duration: {text!r} (e.g. 90s, 15m, 1h)")
    scale = {"h": 3600.0, "m": 60.0, "s": 1.0}
    return sum(float(n) * scale[u] for n, u in parts)
