"""The OPC UA server of the twin against an independent client: node-opcua (Node.js).

One server, one client run (``node/opcua_client.mjs``): the script prints a JSON line per step,
this test reads them as they come and acts on the twin when the script asks for it — no sleeps.
node-opcua is installed from npm into a cache outside the checkout on first use
(``node_opcua`` in conftest.py); without node/npm, or when the install fails, the test skips.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import pytest

from .conftest import PlantRig, apply
from .test_opcua_twin_server import opcua_config, pki, served

__all__ = ["pki"]  # the server's and the client's certificates, shared with the asyncua tests

SCRIPT = Path(__file__).parent / "node" / "opcua_client.mjs"
CHANGED_TS = 1_700_000_000.0


def parse(line: bytes) -> dict[str, Any] | None:
    """A step the script reported, or None for node-opcua's own log lines."""
    text = line.decode(errors="replace").strip()
    if not text.startswith("{"):
        return None
    event = json.loads(text)
    return event if isinstance(event, dict) and "step" in event else None


def iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="milliseconds")[:-6] + "Z"


async def test_node_opcua_browses_reads_subscribes_and_writes_the_twin(
    tmp_path: Path, pki: dict[str, Path], node_opcua: Path
) -> None:
    rig = PlantRig()
    read_ts = rig.twin.query("nest01.heater.sp")[0]["ts"]
    steps: dict[str, dict[str, Any]] = {}
    at_write_ok: dict[str, Any] = {}
    stderr_path = tmp_path / "node.stderr"
    async with served(rig, opcua_config(tmp_path, pki)) as nb:
        assert nb.opcua is not None
        options = {
            "endpoint": nb.opcua.endpoint_url,
            "applicationUri": "urn:edgeos:test-client",
            "clientCert": str(pki["client_cert"]),
            "clientKey": str(pki["client_key"]),
            "serverCert": str(pki["cert"]),
            "pkiDir": str(tmp_path / "node-pki"),
            "user": "eng",
            "password": "eng-pw",
            "device": "gw-1",
            "equipment": "nest01",
            "readTag": "nest01.heater.sp",
            "subscribeTag": "nest02.heater.pv",
            "writeTag": "nest01.heater.sp",
            "writeOk": 190.0,
            "writeOutOfRange": 9999.0,
            "timeoutMs": 20_000,
        }
        node = shutil.which("node")
        assert node is not None  # the node_opcua fixture skipped otherwise
        with stderr_path.open("wb") as stderr:
            proc = await asyncio.create_subprocess_exec(
                node,
                str(SCRIPT),
                json.dumps(options),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=stderr,
                env={**os.environ, "NODE_OPCUA_DIR": str(node_opcua)},
            )
            assert proc.stdout is not None and proc.stdin is not None
            try:
                async with asyncio.timeout(90):
                    async for line in proc.stdout:
                        event = parse(line)
                        if event is None:
                            continue
                        steps[event["step"]] = event
                        if event["step"] == "subscribed":
                            apply(rig.twin, {"nest02.heater.pv": 175.0}, ts=CHANGED_TS)
                        elif event["step"] == "write_ok":
                            # Looked at now: the script's next write must not have happened yet.
                            change = rig.twin.desired("nest01.heater.sp")
                            at_write_ok["plc"] = list(rig.plc.writes)
                            at_write_ok["change"] = change and (
                                change.value,
                                change.status,
                                change.source,
                            )
                            proc.stdin.write(b"continue\n")
                            await proc.stdin.drain()
                    await proc.wait()
            finally:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
    log = stderr_path.read_text(errors="replace")[-2000:]
    assert proc.returncode == 0 and "error" not in steps, (steps.get("error"), log)

    # No anonymous token is offered, and one sent anyway is refused by the server itself.
    anonymous = steps["anonymous"]
    assert anonymous["advertised"] is False and anonymous["refused"] is True, anonymous
    assert re.search(r"Bad(IdentityToken\w+|UserAccessDenied)", anonymous["error"]), anonymous
    assert steps["session"]["securityMode"] == "SignAndEncrypt"
    assert steps["session"]["securityPolicy"].endswith("#Basic256Sha256")

    browse = steps["browse"]
    assert "gw-1" in browse["objects"]
    assert {"nest01", "nest02", "uptime"} <= set(browse["device"])
    assert {"heater.sp", "heater.pv", "mode", "gate.verdict"} <= set(browse["equipment"])

    read = steps["read"]
    assert read["value"] == pytest.approx(180.0) and read["status"] == "Good"
    assert read["unit"] == "°C" and read["unitId"] == 4408652  # UNECE "CEL"
    assert read["range"] == [20.0, 220.0]
    assert read["sourceTimestamp"] == iso(read_ts)  # the twin's source time, to the millisecond

    assert steps["subscribed"]["value"] == pytest.approx(169.0)
    changed = steps["datachange"]
    assert changed["value"] == pytest.approx(175.0) and changed["status"] == "Good"
    assert changed["sourceTimestamp"] == iso(CHANGED_TS)

    assert steps["write_ok"]["status"] == "Good"
    assert at_write_ok["plc"] == [("nest01.heater.sp", pytest.approx(190.0))]
    assert at_write_ok["change"] == (pytest.approx(190.0), "applied", "opcua:eng")

    refused = steps["write_out_of_range"]
    assert refused["status"] == "BadOutOfRange"
    assert refused["valueAfter"] == pytest.approx(190.0)
    assert "refused" in refused["lastWriteOutcome"]
    assert rig.plc.writes == [("nest01.heater.sp", pytest.approx(190.0))]  # 9999 never did
    last = rig.twin.desired("nest01.heater.sp")
    assert last is not None and last.status == "refused" and "hard limits" in last.reason
    assert "done" in steps
