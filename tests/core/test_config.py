"""Configuration: valid files load; each kind of mistake names its key path and the fix."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from drivers.modbus import ModbusRef
from drivers.opcua import OpcUaAddress
from edgeos.config import load_config, parse_config
from edgeos.errors import ConfigError
from edgeos_protocol.backoff import BackoffPolicy

BASE = """
[device]
id = "line-07"

[[connections]]
name = "plc"
driver = "modbus_tcp"
endpoint = "tcp://127.0.0.1:5020"

[[connections]]
name = "ua"
driver = "opcua"
endpoint = "opc.tcp://127.0.0.1:4840"

[[scan_groups]]
name = "default"
period_ms = 1000

[[scan_groups]]
name = "fast"
period_ms = 10
priority = 90
"""

GOOD_TAGS = """
[[tags]]
name = "press.temp"
connection = "plc"
unit = "degC"
modbus = { unit = 1, table = "holding", address = 10, type = "int16", scale = 0.1 }

[[tags]]
name = "press.sp"
connection = "plc"
writable = true
limits = { min = 0, max = 250 }
max_rate = 5
modbus = { address = 11, type = "int16", scale = 0.1 }

[[tags]]
name = "press.flow"
connection = "ua"
resolution = 0.01
scan_group = "fast"
opcua = { node_id = "ns=2;s=Line/press/flow", mode = "subscribe" }
"""


def _issues(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(text, check_drivers=False)
    return [str(i) for i in info.value.issues]


def test_valid_config_loads_with_defaults() -> None:
    config = parse_config(BASE + GOOD_TAGS, check_drivers=False)
    assert [t.name for t in config.all_tags] == ["press.temp", "press.sp", "press.flow"]
    assert config.uplink.interval_s == 3.0
    assert config.all_tags[0].effective_resolution == pytest.approx(0.1)
    assert config.scan_group("fast").priority == 90


def test_models_are_frozen() -> None:
    config = parse_config(BASE + GOOD_TAGS, check_drivers=False)
    with pytest.raises(ValueError, match="frozen"):
        config.device.id = "other"  # type: ignore[misc]


def test_equipment_templates_expand_with_stride_units_and_node_ids() -> None:
    text = BASE + textwrap.dedent(
        """
        [templates.nest]
        tags = [
          { name = "temp", modbus = { address = 0, type = "int16", scale = 0.1 } },
          { name = "sp", writable = true, limits = { min = 0, max = 9 }, modbus = { address = 1, type = "uint16" } },
        ]
        [templates.uanest]
        tags = [ { name = "flow", resolution = 0.1, opcua = { node_id = "ns=2;s=Line/{equipment}/flow" } } ]

        [[equipment]]
        name = "nest{n:02d}"
        template = "nest"
        connection = "plc"
        count = 3
        address_stride = 2
        unit = "{n}"

        [[equipment]]
        name = "nest{n:02d}"
        template = "uanest"
        connection = "ua"
        count = 2
        scan_group = "fast"
        """
    )
    config = parse_config(text, check_drivers=False)
    tags = {t.name: t for t in config.all_tags}
    assert len(tags) == 8
    temp, flow = tags["nest03.temp"], tags["nest02.flow"]
    assert temp.address_key == "modbus" and isinstance(temp.address, ModbusRef)
    assert (temp.address.address, temp.address.unit) == (4, 3)
    assert flow.address_key == "opcua" and isinstance(flow.address, OpcUaAddress)
    assert flow.address.node_id == "ns=2;s=Line/nest02/flow"
    assert tags["nest02.flow"].scan_group == "fast"


@pytest.mark.parametrize(
    ("snippet", "path", "words"),
    [
        # 1. unknown key, with its full path
        (
            '[[tags]]\nname="a"\nconnection="plc"\nmodbus={address=1, typo=3}\n',
            "tags[0].modbus.typo",
            "unknown key",
        ),
        # 2. unknown data type
        (
            '[[tags]]\nname="a"\nconnection="plc"\nmodbus={address=1, type="int17"}\n',
            "tags[0].modbus.type",
            "int17",
        ),
        # 3. register address out of range
        (
            '[[tags]]\nname="a"\nconnection="plc"\nmodbus={address=70000}\n',
            "tags[0].modbus.address",
            "less than or equal to 65535",
        ),
        # 4. tag on an unknown connection
        (
            '[[tags]]\nname="a"\nconnection="nope"\nmodbus={address=1}\n',
            "tags[0].connection",
            "unknown connection 'nope'",
        ),
        # 5. unknown scan group
        (
            '[[tags]]\nname="a"\nconnection="plc"\nscan_group="slow"\nmodbus={address=1}\n',
            "tags[0].scan_group",
            "unknown scan group 'slow'",
        ),
        # 6. writable numeric tag without hard limits
        (
            '[[tags]]\nname="a"\nconnection="plc"\nwritable=true\nmodbus={address=1}\n',
            "tags[0]",
            "hard 'limits'",
        ),
        # 7. limits upside down
        (
            '[[tags]]\nname="a"\nconnection="plc"\nwritable=true\nlimits={min=5,max=1}\n'
            "modbus={address=1}\n",
            "tags[0].limits",
            "must be below max",
        ),
        # 8. float without resolution
        (
            '[[tags]]\nname="a"\nconnection="plc"\nmodbus={address=1, type="float32"}\n',
            "tags[0]",
            "needs 'resolution'",
        ),
        # 9. both addresses
        (
            '[[tags]]\nname="a"\nconnection="plc"\nmodbus={address=1}\n'
            'opcua={node_id="ns=2;s=x"}\n',
            "tags[0]",
            "exactly one address",
        ),
        # 10. coil table with a non-bool type
        (
            '[[tags]]\nname="a"\nconnection="plc"\nmodbus={address=1, table="coil", type="int16"}\n',
            "tags[0].modbus",
            "holds bits",
        ),
        # 11. string without length
        (
            '[[tags]]\nname="a"\nconnection="plc"\nmodbus={address=1, type="string"}\n',
            "tags[0].modbus",
            "needs 'length'",
        ),
        # 12. OPC UA address on a Modbus connection
        (
            '[[tags]]\nname="a"\nconnection="plc"\nresolution=1\nopcua={node_id="ns=2;s=x"}\n',
            "tags[0].modbus",
            "is Modbus",
        ),
        # 13. malformed NodeId
        (
            '[[tags]]\nname="a"\nconnection="ua"\nresolution=1\nopcua={node_id="Line/x"}\n',
            "tags[0].opcua",
            "not an OPC UA NodeId",
        ),
        # 14. batch interval outside 2–5 s
        ("[uplink]\ninterval_s = 10\n", "uplink.interval_s", "less than or equal to 5"),
        # 15. scan period below 10 ms
        ('[[scan_groups]]\nname="x"\nperiod_ms=1\n', "scan_groups[2].period_ms", "10"),
        # 16. duplicate tag names
        (
            '[[tags]]\nname="a"\nconnection="plc"\nmodbus={address=1}\n'
            '[[tags]]\nname="a"\nconnection="plc"\nmodbus={address=2}\n',
            "tags[1].name",
            "duplicate tag name",
        ),
        # 17. bad enum value for the full-disk policy
        ('[uplink.spool]\nfull_policy = "panic"\n', "uplink.spool.full_policy", "panic"),
        # 18. equipment referring to a missing template
        (
            '[[equipment]]\nname="n{n}"\ntemplate="ghost"\nconnection="plc"\n',
            "equipment[0].template",
            "unknown template 'ghost'",
        ),
        # 19. equipment whose last instance passes the register space
        (
            '[templates.t]\ntags=[{name="x", modbus={address=65000}}]\n'
            '[[equipment]]\nname="n{n}"\ntemplate="t"\nconnection="plc"\ncount=5\n'
            "address_stride=1000\n",
            "templates.t.tags[0].modbus.address",
            "passes register 65535",
        ),
        # 20. bad format string in an equipment name
        (
            '[templates.t]\ntags=[{name="x", modbus={address=1}}]\n'
            '[[equipment]]\nname="n{m}"\ntemplate="t"\nconnection="plc"\n',
            "equipment[0].name",
            "bad format string",
        ),
    ],
)
def test_broken_configs_name_the_key_path(snippet: str, path: str, words: str) -> None:
    issues = _issues(BASE + snippet)
    assert any(i.startswith(path + ":") and words in i for i in issues), issues


def test_missing_device_and_bad_toml() -> None:
    assert any(i.startswith("device:") and "missing" in i for i in _issues("[uplink]\n"))
    issues = _issues("[device\nid=1")
    assert issues and "not valid TOML" in issues[0]


def test_many_mistakes_are_all_reported_at_once() -> None:
    snippet = (
        '[[tags]]\nname="a"\nconnection="nope"\nmodbus={address=1}\n'
        '[[tags]]\nname="b"\nconnection="plc"\nscan_group="x"\nmodbus={address=2}\n'
    )
    issues = _issues(BASE + snippet)
    assert len(issues) == 2


def test_driver_options_are_validated_by_the_installed_driver() -> None:
    text = BASE.replace(
        'endpoint = "tcp://127.0.0.1:5020"',
        'endpoint = "tcp://127.0.0.1:5020"\noptions = { max_registers = 500 }',
    )
    with pytest.raises(ConfigError) as info:
        parse_config(text + GOOD_TAGS)
    assert any(str(i).startswith("connections[0].options.max_registers") for i in info.value.issues)


def test_unknown_driver_is_named() -> None:
    text = BASE.replace('driver = "modbus_tcp"', 'driver = "profinet"')
    with pytest.raises(ConfigError) as info:
        parse_config(text + GOOD_TAGS)
    assert any("unknown driver 'profinet'" in str(i) for i in info.value.issues)


def test_relative_paths_resolve_against_the_config_file(tmp_path: Path) -> None:
    path = tmp_path / "edgeos.toml"
    path.write_text(BASE + GOOD_TAGS + '[uplink]\nkey_file = "keys/device.key"\n')
    config = load_config(path, check_drivers=False)
    assert config.uplink.key_file == tmp_path / "keys" / "device.key"


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgeos.cli", *args], capture_output=True, text=True, check=False
    )


def test_cli_check_config_exit_codes(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text(BASE + GOOD_TAGS)
    ok = _cli("check-config", str(good), "--no-drivers")
    assert ok.returncode == 0, ok.stderr
    assert "valid" in ok.stdout and "3 (1 writable)" in ok.stdout

    bad = tmp_path / "bad.toml"
    bad.write_text(BASE + '[[tags]]\nname="a"\nconnection="plc"\nmodbus={address=1, type="x"}\n')
    res = _cli("check-config", str(bad), "--no-drivers")
    assert res.returncode == 2
    assert "tags[0].modbus.type" in res.stderr

    missing = _cli("check-config", str(tmp_path / "nope.toml"))
    assert missing.returncode == 2
    assert "cannot read file" in missing.stderr


def test_spool_segments_are_a_fraction_of_the_bound() -> None:
    small = parse_config(BASE + "[uplink.spool]\nmax_bytes = 262144\n", check_drivers=False)
    assert small.uplink.spool.effective_segment_bytes == 64 << 10
    big = parse_config(BASE, check_drivers=False)
    assert big.uplink.spool.effective_segment_bytes == 8 << 20
    issues = _issues(BASE + "[uplink.spool]\nmax_bytes = 1048576\nsegment_bytes = 524288\n")
    assert any(i.startswith("uplink.spool:") and "quarter of max_bytes" in i for i in issues)


def test_run_refuses_an_unusable_state_dir_with_a_message(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the state directory should be")
    config = tmp_path / "edgeos.toml"
    config.write_text(
        f'[device]\nid = "gw"\nstate_dir = "{blocker}/state"\n'
        '[uplink]\nenabled = false\n[control]\nmetrics_listen = ""\n'
    )
    res = _cli("run", "--config", str(config))
    assert res.returncode == 2
    assert "state directory" in res.stderr and "Traceback" not in res.stderr


def test_reconnect_policy_and_scan_timeout_are_per_connection_with_defaults() -> None:
    text = BASE.replace(
        'endpoint = "tcp://127.0.0.1:5020"',
        'endpoint = "tcp://127.0.0.1:5020"\nscan_timeout_s = 4\n'
        "reconnect = { initial_s = 1, max_s = 60, first_retry_s = 0.2 }",
    )
    config = parse_config(text + GOOD_TAGS)
    plc, ua = config.connection("plc"), config.connection("ua")
    policy = plc.reconnect.policy()
    assert (policy.initial_s, policy.max_s, policy.first_retry_s) == (1.0, 60.0, 0.2)
    assert plc.scan_timeout_s == 4.0
    # Defaults are the shared BackoffPolicy's, so every link of edgeos behaves alike.
    assert ua.reconnect.policy() == BackoffPolicy()
    assert ua.scan_timeout_s == 10.0


@pytest.mark.parametrize(
    ("setting", "path", "words"),
    [
        ("reconnect = { initial_s = 0 }", "connections[0].reconnect.initial_s", "greater than 0"),
        ("reconnect = { jitter = 2 }", "connections[0].reconnect.jitter", "less than or equal"),
        ("reconnect = { initial_s = 9, max_s = 1 }", "connections[0].reconnect", "max_s"),
        ("reconnect = { fast = true }", "connections[0].reconnect.fast", "unknown key"),
        ("scan_timeout_s = 0", "connections[0].scan_timeout_s", "greater than 0"),
        (
            "scan_timeout_s = 1\noptions = { request_timeout_s = 3 }",
            "connections[0].scan_timeout_s",
            "shorter than one request",
        ),
        ("options = { request_timeout_s = 0 }", "connections[0].options.request_timeout_s", "0"),
    ],
)
def test_connection_timeouts_and_reconnect_errors_name_the_key(
    setting: str, path: str, words: str
) -> None:
    text = BASE.replace(
        'endpoint = "tcp://127.0.0.1:5020"', f'endpoint = "tcp://127.0.0.1:5020"\n{setting}'
    )
    with pytest.raises(ConfigError) as info:
        parse_config(text + GOOD_TAGS)
    issues = [str(i) for i in info.value.issues]
    assert any(i.startswith(path + ":") and words in i for i in issues), issues
