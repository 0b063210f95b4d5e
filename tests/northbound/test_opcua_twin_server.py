"""The OPC UA server of the twin against a plain asyncua client (real server, real client)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from asyncua import Client, ua
from asyncua.ua.uaerrors import BadUserAccessDenied, UaStatusCodeError

from edgeos.northbound import Northbound, NorthboundConfig
from edgeos_testing.opcua_server import generate_certificate

from .conftest import PlantRig, apply

NS = "urn:edgeos:twin"


def secret(path: Path, text: str) -> Path:
    path.touch(mode=0o600)
    path.chmod(0o600)
    path.write_text(text + "\n")
    return path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("pki")
    cert, key = generate_certificate(d, "gateway", "urn:edgeos:gw-1", hostname="localhost")
    ccert, ckey = generate_certificate(d, "client", "urn:edgeos:test-client", hostname="localhost")
    return {"cert": cert, "key": key, "client_cert": ccert, "client_key": ckey}


def opcua_config(tmp_path: Path, pki: dict[str, Path], **kw: object) -> NorthboundConfig:
    section: dict[str, object] = {
        "endpoint": "opc.tcp://127.0.0.1:0/edgeos/",
        "cert_file": pki["cert"],
        "key_file": pki["key"],
        "users": [
            {"name": "mes", "password_file": secret(tmp_path / "mes.pw", "mes-pw"), "role": "read"},
            {
                "name": "eng",
                "password_file": secret(tmp_path / "eng.pw", "eng-pw"),
                "role": "write",
            },
        ],
        "writes": ["nest*.heater.sp"],
        "write_timeout_s": 5,
    }
    section.update(kw)
    return NorthboundConfig.model_validate({"opcua": section})


# A safety bound, not a measure: the server's child process (import asyncua, load the
# certificates, open the endpoint) took over 30 s to say ready with both cores loaded and other
# tests running (seen in `make test-loaded`); the test waits on its ready event.
_READY_BOUND_S = 120
pytestmark = pytest.mark.timeout(300)  # above the ready bound plus the test itself


@contextlib.asynccontextmanager
async def served(rig: PlantRig, config: NorthboundConfig) -> AsyncIterator[Northbound]:
    nb = Northbound(config, rig.twin, device_id="gw-1", clock=rig.clock)
    async with rig.running(nb):
        assert nb.opcua is not None
        async with asyncio.timeout(_READY_BOUND_S):
            await nb.opcua.ready.wait()
        yield nb


@contextlib.asynccontextmanager
async def client_of(
    nb: Northbound, pki: dict[str, Path], user: str | None = "eng", mode: str = "SignAndEncrypt"
) -> AsyncIterator[Client]:
    assert nb.opcua is not None
    client = Client(nb.opcua.endpoint_url, timeout=10)
    client.application_uri = "urn:edgeos:test-client"
    await client.set_security_string(
        f"Basic256Sha256,{mode},{pki['client_cert']},{pki['client_key']},{pki['cert']}"
    )
    if user is not None:
        client.set_user(user)
        client.set_password(f"{user}-pw")
    async with client:
        yield client


async def node(client: Client, name: str):  # type: ignore[no-untyped-def]
    ns = await client.get_namespace_index(NS)
    return client.get_node(ua.NodeId(name, ns))


async def test_address_space_has_a_folder_per_equipment_with_units_ranges_and_verdicts(
    tmp_path: Path, pki: dict[str, Path]
) -> None:
    rig = PlantRig()
    async with served(rig, opcua_config(tmp_path, pki)) as nb, client_of(nb, pki, "mes") as c:
        ns = await c.get_namespace_index(NS)
        gw = await c.nodes.objects.get_child([f"{ns}:gw-1"])
        folders = {(await n.read_browse_name()).Name for n in await gw.get_children()}
        assert {"nest01", "nest02", "uptime"} <= folders
        nest01 = await gw.get_child([f"{ns}:nest01"])
        names = {(await n.read_browse_name()).Name for n in await nest01.get_children()}
        assert {"heater.sp", "heater.pv", "mode", "gate.verdict", "gate.confidence"} <= names
        sp = await nest01.get_child([f"{ns}:heater.sp"])
        eu = await (await sp.get_child(["0:EngineeringUnits"])).read_value()
        assert eu.DisplayName.Text == "°C" and eu.UnitId == 4408652  # UNECE "CEL"
        rng = await (await sp.get_child(["0:EURange"])).read_value()
        assert (rng.Low, rng.High) == (20.0, 220.0)
        dv = await sp.read_data_value()
        assert dv.Value.Value == pytest.approx(180.0) and dv.StatusCode.is_good()
        assert dv.SourceTimestamp is not None
        verdict = await (await node(c, "nest01.gate.verdict")).read_description()
        assert "scrap" in verdict.Text
        assert await (await node(c, "nest01.mode")).read_value() == 1  # Int16, not a float


async def test_quality_maps_to_status_codes_and_subscriptions_get_each_scan(
    tmp_path: Path, pki: dict[str, Path]
) -> None:
    rig = PlantRig()
    async with served(rig, opcua_config(tmp_path, pki)) as nb, client_of(nb, pki, "mes") as c:
        got: asyncio.Queue[ua.DataValue] = asyncio.Queue()

        class Handler:
            def datachange_notification(self, n, val, data):  # type: ignore[no-untyped-def]
                got.put_nowait(data.monitored_item.Value)

        sub = await c.create_subscription(20, Handler())
        await sub.subscribe_data_change(await node(c, "nest02.heater.pv"))
        first = await asyncio.wait_for(got.get(), 20)
        assert first.Value.Value == pytest.approx(169.0)
        apply(rig.twin, {"nest02.heater.pv": 175.0}, ts=1_700_000_000.0)
        changed = await asyncio.wait_for(got.get(), 20)
        assert changed.Value.Value == pytest.approx(175.0)
        assert changed.SourceTimestamp.timestamp() == pytest.approx(1_700_000_000.0)
        apply(rig.twin, {"nest02.heater.pv": float("nan")}, quality=17)  # BAD_COMM
        bad = await asyncio.wait_for(got.get(), 20)
        assert bad.StatusCode.value == ua.StatusCodes.BadCommunicationError
        await sub.delete()


async def test_write_within_limits_goes_through_the_desired_state_path_to_the_plc(
    tmp_path: Path, pki: dict[str, Path]
) -> None:
    rig = PlantRig()
    async with served(rig, opcua_config(tmp_path, pki)) as nb, client_of(nb, pki, "eng") as c:
        sp = await node(c, "nest01.heater.sp")
        await sp.write_value(ua.DataValue(ua.Variant(190.0, ua.VariantType.Double)))
        assert rig.plc.writes == [("nest01.heater.sp", pytest.approx(190.0))]
        change = rig.twin.desired("nest01.heater.sp")
        assert change is not None and change.status == "applied"
        assert change.source == "opcua:eng"
        outcome = await (
            await sp.get_child([f"{await c.get_namespace_index(NS)}:LastWriteOutcome"])
        ).read_value()
        assert "applied" in outcome


@pytest.mark.parametrize(
    ("user", "name", "variant", "code", "reason"),
    [
        (
            "eng",
            "nest01.heater.sp",
            ua.Variant(9999.0, ua.VariantType.Double),
            "BadOutOfRange",
            "hard limits",
        ),
        (
            "eng",
            "nest01.heater.sp",
            ua.Variant("hot", ua.VariantType.String),
            "BadTypeMismatch",
            "",
        ),
        ("eng", "nest01.heater.pv", ua.Variant(1.0, ua.VariantType.Double), "BadNotWritable", ""),
        ("eng", "nest02.mode", ua.Variant(1, ua.VariantType.Int16), "BadNotWritable", ""),
        (
            "mes",
            "nest01.heater.sp",
            ua.Variant(190.0, ua.VariantType.Double),
            "BadUserAccessDenied",
            "",
        ),
    ],
)
async def test_bad_writes_are_refused_with_a_status_and_nothing_reaches_the_plc(
    tmp_path: Path,
    pki: dict[str, Path],
    user: str,
    name: str,
    variant: ua.Variant,
    code: str,
    reason: str,
) -> None:
    rig = PlantRig()
    async with served(rig, opcua_config(tmp_path, pki)) as nb, client_of(nb, pki, user) as c:
        target = await node(c, name)
        with pytest.raises(UaStatusCodeError) as err:
            await target.write_value(ua.DataValue(variant))
        assert err.value.code == getattr(ua.StatusCodes, code)
        assert await target.read_value() != 9999.0
    assert rig.plc.writes == []
    change = rig.twin.desired(name) if rig.twin.tags[rig.twin.index(name)].writable else None
    if reason:
        assert change is not None and reason in change.reason


async def test_anonymous_login_is_refused_by_default(tmp_path: Path, pki: dict[str, Path]) -> None:
    rig = PlantRig()
    async with served(rig, opcua_config(tmp_path, pki)) as nb:
        with pytest.raises((BadUserAccessDenied, UaStatusCodeError)):
            async with client_of(nb, pki, user=None):
                pass


async def test_sign_only_endpoint_serves_reads(tmp_path: Path, pki: dict[str, Path]) -> None:
    rig = PlantRig()
    async with (
        served(rig, opcua_config(tmp_path, pki)) as nb,
        client_of(nb, pki, "mes", "Sign") as c,
    ):
        assert await (await node(c, "uptime")).read_value() == 42


# ---------------------------------------------------------------- the server's own process


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_server_runs_in_its_own_process_and_stops_and_restarts_with_the_northbound_task(
    tmp_path: Path, pki: dict[str, Path]
) -> None:
    rig = PlantRig()
    nb = Northbound(opcua_config(tmp_path, pki), rig.twin, device_id="gw-1", clock=rig.clock)
    assert nb.opcua is not None
    pids = []
    for round_ in range(2):
        async with rig.running(nb):
            async with asyncio.timeout(_READY_BOUND_S):
                await nb.opcua.ready.wait()
            pid = nb.opcua.pid
            assert pid is not None and pid != os.getpid() and alive(pid)
            pids.append(pid)
            async with client_of(nb, pki, "mes") as c:
                assert await (await node(c, "uptime")).read_value() == 42, round_
        assert not alive(pids[-1])  # stopped and reaped when the task ended, not later
        assert nb.opcua.pid is None and not nb.opcua.ready.is_set()
    assert pids[0] != pids[1]


async def test_write_from_the_server_process_reaches_the_desired_state_path_on_the_runtime_loop(
    tmp_path: Path, pki: dict[str, Path]
) -> None:
    rig = PlantRig()
    async with served(rig, opcua_config(tmp_path, pki)) as nb, client_of(nb, pki, "eng") as c:
        assert nb.opcua is not None and nb.opcua.pid != os.getpid()
        sp = await node(c, "nest02.heater.sp")
        await sp.write_value(ua.DataValue(ua.Variant(175.0, ua.VariantType.Double)))
        assert rig.plc.writes == [("nest02.heater.sp", pytest.approx(175.0))]
        assert rig.plc.write_threads == [threading.get_ident()]  # the runtime's loop's thread
        change = rig.twin.desired("nest02.heater.sp")
        assert change is not None and change.status == "applied" and change.source == "opcua:eng"
        assert nb.stats()["opcua"]["writes"] == {"applied": 1}


async def test_values_superseded_while_the_server_lags_are_counted_and_the_latest_is_served(
    tmp_path: Path, pki: dict[str, Path]
) -> None:
    rig = PlantRig()
    async with served(rig, opcua_config(tmp_path, pki)) as nb, client_of(nb, pki, "mes") as c:
        service = nb.opcua
        assert service is not None and service.pid is not None
        got: asyncio.Queue[float] = asyncio.Queue()

        class Handler:
            def datachange_notification(self, n, val, data):  # type: ignore[no-untyped-def]
                got.put_nowait(val)

        sub = await c.create_subscription(20, Handler())
        await sub.subscribe_data_change(await node(c, "nest02.heater.pv"))
        assert await asyncio.wait_for(got.get(), 20) == pytest.approx(169.0)  # first push done

        # The server's process stopped (SIGSTOP): a server that lags as far as it can.
        os.kill(service.pid, signal.SIGSTOP)
        try:
            before = service.handoff.superseded
            for value in (171.0, 173.0, 175.0):
                apply(rig.twin, {"nest02.heater.pv": value})
                service.pump_once()  # what the pump task does after each scan
            assert service.handoff.superseded - before == 2
            assert nb.stats()["opcua"]["values_pending"] == 1
        finally:
            os.kill(service.pid, signal.SIGCONT)
        assert await asyncio.wait_for(got.get(), 20) == pytest.approx(175.0)  # 171, 173: never
        assert nb.stats()["opcua"]["values_superseded"] >= 2
        await sub.delete()


async def test_a_server_that_cannot_start_fails_the_northbound_task_with_its_error(
    tmp_path: Path, pki: dict[str, Path]
) -> None:
    rig = PlantRig()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        config = opcua_config(tmp_path, pki, endpoint=f"opc.tcp://127.0.0.1:{port}/edgeos/")
        nb = Northbound(config, rig.twin, device_id="gw-1", clock=rig.clock)
        with pytest.raises(ExceptionGroup) as err:
            async with asyncio.timeout(60):
                await nb.run()
    assert err.group_contains(OSError)
    assert nb.opcua is not None and nb.opcua.pid is None
