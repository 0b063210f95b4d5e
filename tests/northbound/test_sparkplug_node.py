"""The Sparkplug B edge node against an independent host application on a real Mosquitto.

The host (edgeos_testing.sparkplug_host) decodes the payloads by hand from the specification's
wire format; the node encodes with Google's protobuf runtime.
"""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest

from edgeos.config import GuardConfig
from edgeos.inference.guard import ActuationGuard
from edgeos.northbound import Northbound, NorthboundConfig
from edgeos_testing.mosquitto import MosquittoBroker, mosquitto_path
from edgeos_testing.sparkplug_host import (
    BOOLEAN,
    DOUBLE,
    INT16,
    HostMessage,
    Metric,
    SparkplugHost,
)

from .conftest import PlantRig, apply

pytestmark = pytest.mark.skipif(mosquitto_path() is None, reason="mosquitto is not installed")

GROUP = "line3"
NODE = "gw-1"


def sparkplug_config(broker: MosquittoBroker, **kw: object) -> NorthboundConfig:
    creds = broker.credentials(NODE)
    section: dict[str, object] = {
        "broker": broker.url,
        "tls": {"ca_file": creds.ca_file, "cert_file": creds.cert_file, "key_file": creds.key_file},
        "group_id": GROUP,
        "publish_interval_ms": 20,
        "writes": ["nest*.heater.sp"],
    }
    section.update(kw)
    return NorthboundConfig.model_validate({"sparkplug": section})


@pytest.fixture
async def broker(tmp_path: Path):
    async with MosquittoBroker(tmp_path / "broker", tls=True, acl=False) as b:
        yield b


def node_of(rig: PlantRig, config: NorthboundConfig, tmp_path: Path, **kw: object) -> Northbound:
    return Northbound(config, rig.twin, device_id=NODE, clock=rig.clock, state_dir=tmp_path, **kw)  # type: ignore[arg-type]


def metric(m: HostMessage, name: str) -> Metric:
    assert m.payload is not None
    return m.payload.by_name()[name]


async def test_births_carry_every_metric_with_alias_datatype_unit_and_properties(
    broker: MosquittoBroker, tmp_path: Path
) -> None:
    rig = PlantRig()
    guard = ActuationGuard(GuardConfig(enabled=True), {}, target=10.0)
    nb = node_of(rig, sparkplug_config(broker), tmp_path, guard_stats=guard.stats)
    async with SparkplugHost(broker, group=GROUP) as host, rig.running(nb):
        nbirth = await host.expect(kind="NBIRTH")
        d1 = await host.expect(kind="DBIRTH", device="nest01")
        d2 = await host.expect(kind="DBIRTH", device="nest02")
    assert nbirth.node == NODE
    assert nbirth.payload is not None and nbirth.payload.seq == 0
    assert metric(nbirth, "bdSeq").value == 0
    assert metric(nbirth, "Node Control/Rebirth").value is False
    assert metric(nbirth, "uptime").value == 42
    assert {d1.payload.seq, d2.payload.seq} == {1, 2}  # type: ignore[union-attr]

    sp = metric(d1, "heater/sp")
    assert sp.datatype == 9  # Float (float32)
    assert sp.value == pytest.approx(180.0)
    assert sp.properties["engUnit"] == "°C"
    assert (sp.properties["engLow"], sp.properties["engHigh"]) == (20.0, 220.0)
    assert sp.properties["readOnly"] is False
    assert sp.properties["Quality"] == 192
    pv = metric(d1, "heater/pv")
    assert pv.properties["readOnly"] is True and pv.properties["deadband"] == 0.5
    assert metric(d1, "mode").datatype == INT16 and metric(d1, "mode").value == 1
    assert metric(d2, "mode").properties["readOnly"] is True  # writable tag, not enabled for DCMD
    # Gate verdicts, confidence and guard state are metrics of the station's device.
    assert metric(d1, "gate/verdict").value == 0
    assert metric(d1, "gate/confidence").value == pytest.approx(0.93)
    assert metric(d1, "guard/learning").value is True
    assert metric(d1, "guard/alpha").value == pytest.approx(0.005)
    assert "guard/learning" not in d2.payload.by_name()  # type: ignore[union-attr]

    aliases = [m.alias for msg in (nbirth, d1, d2) for m in msg.payload.metrics if m.alias]  # type: ignore[union-attr]
    assert len(aliases) == len(set(aliases)), "aliases must be unique across the edge node"
    assert all(m.timestamp for msg in (nbirth, d1, d2) for m in msg.payload.metrics)  # type: ignore[union-attr]


async def test_data_is_sent_by_exception_with_the_tag_deadband_aliases_and_seq(
    broker: MosquittoBroker, tmp_path: Path
) -> None:
    rig = PlantRig()
    nb = node_of(rig, sparkplug_config(broker), tmp_path)
    async with SparkplugHost(broker, group=GROUP) as host, rig.running(nb):
        d1 = await host.expect(kind="DBIRTH", device="nest01")
        alias = {m.name: m.alias for m in d1.payload.metrics}  # type: ignore[union-attr]
        start = host.index_of(d1)
        apply(rig.twin, {"nest01.heater.pv": 179.3})  # inside the 0.5 deadband: no change
        apply(rig.twin, {"nest01.heater.pv": 180.0, "nest02.heater.sp": 171.0})
        dd1 = await host.expect(kind="DDATA", device="nest01", after=start)
        dd2 = await host.expect(kind="DDATA", device="nest02", after=start)
    assert dd1.payload is not None and dd2.payload is not None
    assert [(m.alias, m.name) for m in dd1.payload.metrics] == [(alias["heater/pv"], None)]
    assert dd1.payload.metrics[0].value == pytest.approx(180.0)
    assert [m.value for m in dd2.payload.metrics] == [pytest.approx(171.0)]
    seqs = [
        m.payload.seq for m in host.messages if m.kind in ("NBIRTH", "DBIRTH", "DDATA", "NDATA")
    ]  # type: ignore[union-attr]
    assert seqs == list(range(len(seqs))), "seq counts every message from NBIRTH on"


async def test_rebirth_command_resends_births_with_the_same_bdseq_and_seq_from_zero(
    broker: MosquittoBroker, tmp_path: Path
) -> None:
    rig = PlantRig()
    nb = node_of(rig, sparkplug_config(broker), tmp_path)
    async with SparkplugHost(broker, group=GROUP) as host, rig.running(nb):
        first = await host.expect(kind="NBIRTH")
        await host.expect(kind="DBIRTH", device="nest02")
        await host.rebirth(NODE)
        again = await host.expect(kind="NBIRTH", after=host.index_of(first))
        d2 = await host.expect(kind="DBIRTH", device="nest02", after=host.index_of(again))
    assert metric(again, "bdSeq").value == metric(first, "bdSeq").value
    assert again.payload.seq == 0 and d2.payload.seq == 2  # type: ignore[union-attr]
    assert nb.sparkplug is not None and nb.sparkplug.counters.rebirths == 1


async def test_orderly_stop_sends_ndeath_with_the_birth_bdseq_and_the_next_session_counts_up(
    broker: MosquittoBroker, tmp_path: Path
) -> None:
    rig = PlantRig()
    async with SparkplugHost(broker, group=GROUP) as host:
        nb = node_of(rig, sparkplug_config(broker), tmp_path)
        async with rig.running(nb):
            birth = await host.expect(kind="NBIRTH")
        death = await host.expect(kind="NDEATH")
        assert metric(death, "bdSeq").value == metric(birth, "bdSeq").value
        assert death.payload.seq is None  # type: ignore[union-attr]  # NDEATH carries no seq
        # bdSeq is kept in state_dir: a restarted node registers the next one.
        nb2 = node_of(rig, sparkplug_config(broker), tmp_path)
        async with rig.running(nb2):
            birth2 = await host.expect(kind="NBIRTH", after=host.index_of(death))
    assert metric(birth2, "bdSeq").value == (metric(birth, "bdSeq").value + 1) % 256


async def test_the_will_is_an_ndeath_the_broker_sends_when_the_node_vanishes(
    broker: MosquittoBroker, tmp_path: Path
) -> None:
    """Closing the socket under the node (no DISCONNECT) makes the broker publish the will."""
    rig = PlantRig()
    nb = node_of(rig, sparkplug_config(broker), tmp_path)
    async with SparkplugHost(broker, group=GROUP) as host, rig.running(nb):
        birth = await host.expect(kind="NBIRTH")
        node = nb.sparkplug
        assert node is not None and node._client is not None
        node._client._client.socket().shutdown(socket.SHUT_RDWR)  # the link dies, no DISCONNECT
        death = await host.expect(kind="NDEATH")
        rebirth = await host.expect(kind="NBIRTH", after=host.index_of(death))
    assert metric(death, "bdSeq").value == metric(birth, "bdSeq").value
    assert metric(rebirth, "bdSeq").value == metric(birth, "bdSeq").value + 1


async def test_primary_host_offline_holds_values_and_sends_them_historical_when_it_returns(
    broker: MosquittoBroker, tmp_path: Path
) -> None:
    rig = PlantRig()
    config = sparkplug_config(broker, primary_host_id="scada")
    nb = node_of(rig, config, tmp_path)
    node = nb.sparkplug
    assert node is not None
    async with SparkplugHost(broker, group=GROUP, host_id="scada") as host, rig.running(nb):
        await host.set_state(online=True, timestamp=1000)
        birth = await host.expect(kind="NBIRTH")
        await host.expect(kind="DBIRTH", device="nest02")
        await host.set_state(online=False, timestamp=2000)
        death = await host.expect(kind="NDEATH", after=host.index_of(birth))
        # A STATE older than the last one seen is ignored (a stale retained message).
        await host.set_state(online=True, timestamp=1500)
        await asyncio.wait_for(_until(lambda: node.counters.state_ignored >= 1), 20)
        stamps = [1_700_000_000.0 + k for k in range(3)]
        for k, ts in enumerate(stamps):
            apply(rig.twin, {"nest01.heater.pv": 150.0 + 10 * k}, ts=ts)
            await asyncio.wait_for(_until(lambda k=k: node.counters.held_values >= k + 1), 20)
        assert not [m for m in host.messages[host.index_of(death) :] if m.kind == "DDATA"]
        await host.set_state(online=True, timestamp=3000)
        reborn = await host.expect(kind="NBIRTH", after=host.index_of(death))
        hist = await host.expect(
            kind="DDATA",
            device="nest01",
            after=host.index_of(reborn),
            where=lambda m: any(x.is_historical for x in m.payload.metrics),  # type: ignore[union-attr]
        )
    assert metric(reborn, "bdSeq").value == metric(birth, "bdSeq").value + 1
    held = [(m.timestamp, m.value) for m in hist.payload.metrics]  # type: ignore[union-attr]
    assert held[0] == (int(stamps[0] * 1000), pytest.approx(150.0))
    assert node.counters.held_values == 3 and node.counters.historical_sent >= 1
    assert node.counters.host_offline == 1


async def test_hold_is_bounded_and_counts_what_it_dropped(
    broker: MosquittoBroker, tmp_path: Path
) -> None:
    rig = PlantRig()
    nb = node_of(
        rig, sparkplug_config(broker, primary_host_id="scada", hold_max_values=2), tmp_path
    )
    node = nb.sparkplug
    assert node is not None
    async with rig.running(nb):  # no host ever comes online: everything is held
        for k in range(5):
            apply(rig.twin, {"nest01.heater.pv": 100.0 + 10 * k})
            await asyncio.wait_for(_until(lambda k=k: node.counters.held_values >= k + 1), 20)
    assert node.counters.held_values == 5
    assert node.counters.held_dropped == 3
    assert node.stats()["held_now"] == 2


async def test_dcmd_within_limits_reaches_the_plc_through_the_desired_state_path(
    broker: MosquittoBroker, tmp_path: Path
) -> None:
    rig = PlantRig()
    nb = node_of(rig, sparkplug_config(broker), tmp_path)
    async with SparkplugHost(broker, group=GROUP) as host, rig.running(nb):
        d1 = await host.expect(kind="DBIRTH", device="nest01")
        await host.dcmd(NODE, "nest01", [Metric(name="heater/sp", datatype=9, value=190.0)])
        echoed = await host.expect(
            kind="DDATA",
            device="nest01",
            after=host.index_of(d1),
            where=lambda m: any(x.value == pytest.approx(190.0) for x in m.payload.metrics),  # type: ignore[union-attr]
        )
        outcome = await host.expect(
            kind="NDATA",
            where=lambda m: any("applied" in str(x.value) for x in m.payload.metrics),  # type: ignore[union-attr]
        )
    assert rig.plc.writes == [("nest01.heater.sp", pytest.approx(190.0))]
    change = rig.twin.desired("nest01.heater.sp")
    assert change is not None and change.status == "applied" and change.source == "sparkplug"
    assert echoed.payload is not None and outcome.payload is not None
    assert "nest01.heater.sp" in str(outcome.payload.metrics[0].value)


async def test_dcmd_beyond_limits_is_refused_with_a_reason_and_nothing_reaches_the_plc(
    broker: MosquittoBroker, tmp_path: Path
) -> None:
    rig = PlantRig()
    nb = node_of(rig, sparkplug_config(broker), tmp_path)
    async with SparkplugHost(broker, group=GROUP) as host, rig.running(nb):
        d1 = await host.expect(kind="DBIRTH", device="nest01")
        alias = {m.name: m.alias for m in d1.payload.metrics}["heater/sp"]  # type: ignore[union-attr]
        await host.dcmd(NODE, "nest01", [Metric(alias=alias, datatype=DOUBLE, value=9999.0)])
        refused = await host.expect(
            kind="NDATA",
            where=lambda m: any("refused" in str(x.value) for x in m.payload.metrics),  # type: ignore[union-attr]
        )
    text = str(refused.payload.metrics[0].value)  # type: ignore[union-attr]
    assert "outside hard limits [20, 220]" in text
    assert rig.plc.writes == []
    change = rig.twin.desired("nest01.heater.sp")
    assert change is not None and change.status == "refused"


@pytest.mark.parametrize(
    ("device", "metric_", "why"),
    [
        (
            "nest01",
            Metric(name="heater/pv", datatype=DOUBLE, value=1.0),
            "read-only from the plant",
        ),
        ("nest02", Metric(name="mode", datatype=INT16, value=1), "read-only from the plant"),
        ("nest01", Metric(name="no/such", datatype=DOUBLE, value=1.0), "unknown metric"),
        ("nest01", Metric(alias=99_999, datatype=DOUBLE, value=1.0), "unknown metric alias"),
        ("press9", Metric(name="heater/sp", datatype=DOUBLE, value=1.0), "unknown device"),
        ("nest01", Metric(name="heater/sp", datatype=DOUBLE, value=None), "carries no value"),
    ],
)
async def test_dcmd_for_unknown_read_only_or_valueless_metrics_is_refused_with_a_reason(
    broker: MosquittoBroker, tmp_path: Path, device: str, metric_: Metric, why: str
) -> None:
    rig = PlantRig()
    nb = node_of(rig, sparkplug_config(broker), tmp_path)
    async with SparkplugHost(broker, group=GROUP) as host, rig.running(nb):
        await host.expect(kind="DBIRTH", device="nest02")
        await host.dcmd(NODE, device, [metric_])
        refused = await host.expect(
            kind="NDATA",
            where=lambda m: any("refused" in str(x.value) for x in m.payload.metrics),  # type: ignore[union-attr]
        )
    assert why in str(refused.payload.metrics[0].value)  # type: ignore[union-attr]
    assert rig.plc.writes == []
    assert rig.twin.desired("nest01.heater.sp") is None


async def test_malformed_payloads_are_refused_and_the_node_keeps_serving(
    broker: MosquittoBroker, tmp_path: Path
) -> None:
    rig = PlantRig()
    nb = node_of(rig, sparkplug_config(broker, primary_host_id="scada"), tmp_path)
    node = nb.sparkplug
    assert node is not None
    async with SparkplugHost(broker, group=GROUP, host_id="scada") as host, rig.running(nb):
        await host.set_state(online=True)
        birth = await host.expect(kind="DBIRTH", device="nest02")
        await host.publish_raw(f"spBv1.0/{GROUP}/DCMD/{NODE}/nest01", b"\x12\xff\xff\xff")
        await host.publish_raw(f"spBv1.0/{GROUP}/NCMD/{NODE}", b"\x0a")
        await host.publish_raw("spBv1.0/STATE/scada", b"not json")
        await asyncio.wait_for(_until(lambda: node.counters.commands["malformed"] >= 2), 20)
        await asyncio.wait_for(_until(lambda: node.counters.state_ignored >= 1), 20)
        apply(rig.twin, {"nest01.heater.pv": 120.0})
        await host.expect(kind="DDATA", device="nest01", after=host.index_of(birth))
    assert rig.plc.writes == []
    assert node.counters.host_offline == 0


async def test_rebirth_as_bool_false_or_an_unknown_node_command_does_nothing(
    broker: MosquittoBroker, tmp_path: Path
) -> None:
    rig = PlantRig()
    nb = node_of(rig, sparkplug_config(broker), tmp_path)
    node = nb.sparkplug
    assert node is not None
    async with SparkplugHost(broker, group=GROUP) as host, rig.running(nb):
        await host.expect(kind="DBIRTH", device="nest02")
        payload_metrics = [
            Metric(name="Node Control/Rebirth", datatype=BOOLEAN, value=False),
            Metric(name="Node Control/Reboot", datatype=BOOLEAN, value=True),
        ]
        from edgeos_testing.sparkplug_host import encode_payload

        await host.publish_raw(f"spBv1.0/{GROUP}/NCMD/{NODE}", encode_payload(payload_metrics))
        refused = await host.expect(
            kind="NDATA",
            where=lambda m: any("unknown node command" in str(x.value) for x in m.payload.metrics),  # type: ignore[union-attr]
        )
    assert refused is not None
    assert node.counters.rebirths == 0
    assert len([m for m in host.messages if m.kind == "NBIRTH"]) == 1


async def _until(predicate) -> None:  # type: ignore[no-untyped-def]
    """Wait (without a fixed sleep) until ``predicate()`` holds; callers bound it by a timeout."""
    while not predicate():
        await asyncio.sleep(0.01)
