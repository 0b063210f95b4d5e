"""A real twin with a real desired-state write path for the northbound tests.

``PlantRig`` = a ``Twin`` of two presses (``nest01``, ``nest02``), a node-level tag and nest01's
gate outputs; ``EchoPlc`` is the write sink behind ``twin.run_writes``: it records every write
that reached "the PLC" and reports it back in the next read, as a device would.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

import numpy as np
import pytest

from edgeos.clock import SystemClock
from edgeos.config import TagConfig, TwinConfig
from edgeos.driver import Quality, ReadResult, TagBinding, Value
from edgeos.inference_runtime import gate_tags
from edgeos.twin import Twin


def _tag(name: str, address: int, **kw: object) -> TagConfig:
    data: dict[str, object] = {
        "name": name,
        "connection": "plc",
        "modbus": {"address": address, "type": "float32"},
        "resolution": 0.1,
    }
    data.update(kw)
    return TagConfig.model_validate(data)


def plant_tags() -> list[object]:
    tags: list[object] = []
    for n, base in (("nest01", 0), ("nest02", 100)):
        tags += [
            _tag(
                f"{n}.heater.sp",
                base,
                unit="°C",
                writable=True,
                limits={"min": 20, "max": 220},
                max_rate=1000,
            ),
            _tag(f"{n}.heater.pv", base + 2, unit="°C", deadband=0.5),
            _tag(
                f"{n}.mode",
                base + 4,
                modbus={"address": base + 4, "type": "int16"},
                resolution=None,
                writable=True,
                limits={"min": 0, "max": 3},
            ),
        ]
    tags.append(_tag("uptime", 300, modbus={"address": 300, "type": "uint32"}, resolution=None))
    tags += gate_tags(["nest01"])
    return tags


class EchoPlc:
    """The twin's write path: what reached the PLC, echoed back by the next read."""

    def __init__(self, twin: Twin) -> None:
        self.twin = twin
        self.writes: list[tuple[str, Value]] = []
        #: The thread each write reached "the PLC" on (the runtime's loop, whoever wrote).
        self.write_threads: list[int] = []
        self._echo: list[tuple[int, Value]] = []
        self._wake = asyncio.Event()

    async def write(self, binding: TagBinding, value: Value) -> None:
        self.writes.append((binding.tag.name, value))
        self.write_threads.append(threading.get_ident())
        self._echo.append((binding.index, value))
        self._wake.set()

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            echo, self._echo = self._echo, []
            for index, value in echo:
                apply(self.twin, {self.twin.names[index]: float(value)})


def apply(
    twin: Twin, values: Mapping[str, float], quality: int = Quality.GOOD, ts: float | None = None
) -> np.ndarray:
    idx = np.array([twin.index(n) for n in values], dtype=np.int32)
    vals = np.array(list(values.values()), dtype=np.float64)
    now = time.time() if ts is None else ts
    result = ReadResult(
        idx, vals, np.full(len(idx), quality, np.uint8), np.full(len(idx), now, np.float64)
    )
    return twin.apply(result, time.time())


class PlantRig:
    def __init__(self) -> None:
        self.clock = SystemClock()
        self.twin = Twin(plant_tags(), TwinConfig(), clock=self.clock, confirm_timeout_s=5.0)
        self.plc = EchoPlc(self.twin)
        apply(
            self.twin,
            {
                "nest01.heater.sp": 180.0,
                "nest01.heater.pv": 179.0,
                "nest01.mode": 1,
                "nest02.heater.sp": 170.0,
                "nest02.heater.pv": 169.0,
                "nest02.mode": 2,
                "uptime": 42,
                "nest01.gate.verdict": 0,
                "nest01.gate.confidence": 0.93,
            },
        )

    @contextlib.asynccontextmanager
    async def running(self, *parts: object) -> AsyncIterator[None]:
        """Run the write path, the echoing PLC and ``parts`` (objects with ``run()``)."""
        async with asyncio.TaskGroup() as tg:
            tasks = [
                tg.create_task(self.twin.run_writes(self.plc)),
                tg.create_task(self.plc.run()),
                *[tg.create_task(p.run()) for p in parts],  # type: ignore[attr-defined]
            ]
            try:
                yield
            finally:
                for t in tasks:
                    t.cancel()


# ------------------------------------------------------------------ node-opcua (an independent client)

#: The newest node-opcua whose ``engines`` still accepts Node 18/20 (2.183.0 needs >= 22.13).
NODE_OPCUA_VERSION = "2.182.2"
NODE_MIN_MAJOR = 18


def _node_opcua_cache() -> Path:
    """``$EDGEOS_NODE_CACHE``, else /var/cache/edgeos (if writable), else ~/.cache/edgeos."""
    if env := os.environ.get("EDGEOS_NODE_CACHE"):
        return Path(env) / "node-opcua"
    system = Path("/var/cache/edgeos")
    try:
        system.mkdir(parents=True, exist_ok=True)
        if os.access(system, os.W_OK):
            return system / "node-opcua"
    except OSError:
        pass
    xdg = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return xdg / "edgeos" / "node-opcua"


def _install_node_opcua(version: str) -> Path:
    """The folder node-opcua ``version`` is installed in; npm installs it there when missing.

    Installs into a temporary sibling and renames it into place, so a crashed install or two
    concurrent test runs never leave a half-filled folder behind the version's name. Raises
    ``RuntimeError`` with the reason when node or npm is missing or the install fails.
    """
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        raise RuntimeError("node and npm are needed for the node-opcua client (not on PATH)")
    out = subprocess.run([node, "--version"], capture_output=True, text=True, check=True)
    major = int(out.stdout.strip().lstrip("v").split(".")[0])
    if major < NODE_MIN_MAJOR:
        raise RuntimeError(
            f"node-opcua {version} needs Node >= {NODE_MIN_MAJOR}, found {out.stdout}"
        )
    target = _node_opcua_cache() / version
    if (target / "node_modules" / "node-opcua" / "package.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f"{version}.", dir=target.parent))
    try:
        (staging / "package.json").write_text('{"private": true}\n')
        done = subprocess.run(
            [npm, "install", "--no-audit", "--no-fund", f"node-opcua@{version}"],
            cwd=staging,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,  # the reason goes into the skip message
        )
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
            raise RuntimeError(f"npm install node-opcua@{version} failed: {' | '.join(tail)}")
        try:
            staging.rename(target)
        except OSError:
            # Another run installed it first (the target exists and is not empty): use theirs.
            if not (target / "node_modules" / "node-opcua" / "package.json").is_file():
                raise
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"npm install node-opcua@{version} timed out ({exc.timeout} s)") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


@pytest.fixture(scope="session")
def node_opcua() -> Path:
    """node-opcua installed from npm into the cache (on first use); skips when it cannot be."""
    try:
        return _install_node_opcua(NODE_OPCUA_VERSION)
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"node-opcua client unavailable: {exc}")
