"""Profiles on the gateway: export, check, apply as a config-only OTA bundle, refusals."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from edgeos.app import Runtime
from edgeos.config import Config
from edgeos.control import request
from edgeos.ota.slots import SlotManager
from edgeos.profile import (
    ProfileRefused,
    apply_profile,
    bundle_check,
    effective_config,
    export_profile,
    summary_of,
)
from edgeos_protocol.bundle import BundleSources, build_bundle
from edgeos_protocol.outcome import Reason, Rejected
from edgeos_protocol.profile import PROFILE_FILE, Profile, parse_profile, parse_summary
from edgeos_sim import SimLine, SimOptions
from edgeos_sim.line import write_line_config
from edgeos_testing.ota import HARDWARE, build_stub_release


def _config(tmp_path: Path, port: int = 1, **overrides: object) -> Config:
    return write_line_config(
        tmp_path / "edgeos.toml",
        modbus_port=port,
        opcua_url=None,
        state_dir=tmp_path / "state",
        nests=2,
        tags_per_nest=20,
        overrides={"uplink": {"enabled": False}, "device": {"hardware": HARDWARE}, **overrides},
    )


#: Inference with the guard's correction model: what writes a default recipe.
ACTING = {
    "enabled": True,
    "models": [
        {
            "name": "correction",
            "manifest": str(Path(__file__).parents[2] / "models/correction.toml"),
        }
    ],
}


def _profile(version: int = 2, **tunables: object) -> Profile:
    return parse_profile({"name": "line-a", "version": version, "tunables": tunables})


def test_export_carries_the_tunables_and_no_hard_limits(tmp_path: Path) -> None:
    config = _config(tmp_path)
    profile = export_profile(config, name="line-a")
    t = profile.tunables
    assert t.guard.alpha == 0.005 and t.scan_periods == {"default": 1000.0, "fast": 100.0}
    assert t.deadbands["nest01.heater.pv"] == 0.2
    assert (
        "hard" not in profile.canonical().decode() and "120.0" not in profile.canonical().decode()
    )
    assert validate_clean(profile, config)


def validate_clean(profile: Profile, config: Config) -> bool:
    from edgeos_protocol.profile import validate

    return validate(profile, summary_of(config)) == []


def test_apply_changes_only_tunables(tmp_path: Path) -> None:
    config = _config(tmp_path)
    applied = apply_profile(
        config,
        _profile(
            guard={"alpha": 0.002},
            deadbands={"nest01.heater.pv": 0.5},
            scan_periods={"fast": 200.0},
        ),
    )
    assert applied.inference.guard.alpha == 0.002
    assert applied.scan_group("fast").period_ms == 200.0
    by_name = {t.name: t for t in applied.all_tags}
    assert by_name["nest01.heater.pv"].deadband == 0.5
    assert by_name["nest02.heater.pv"].deadband == 0.2
    before = {t.name: (t.limits, t.writable, t.max_rate) for t in config.all_tags}
    assert {t.name: (t.limits, t.writable, t.max_rate) for t in applied.all_tags} == before
    assert config.inference.guard.alpha == 0.005  # the file's config is not modified


def test_a_profile_cannot_loosen_the_guard_or_exceed_a_hard_limit(tmp_path: Path) -> None:
    config = _config(tmp_path, inference=ACTING)
    with pytest.raises(ProfileRefused) as refused:
        apply_profile(
            config,
            _profile(
                guard={
                    "alpha": 0.05,
                    "soft_limits": {"nest01.press.sp": {"min": 2.0, "max": 20.0}},
                },
                setpoints={"nest01.heater.sp": 999.0},
            ),
        )
    text = str(refused.value)
    assert "tunables.guard.alpha: 0.05 is above" in text
    assert "tunables.setpoints.nest01.heater.sp: 999.0 is outside the hard limits" in text
    assert "tunables.guard.soft_limits.nest01.press.sp: [2.0, 20.0] is not inside" in text
    # The cloud refuses the same document against this gateway's summary (the same rules).
    from edgeos_protocol.profile import validate

    cloud = [
        str(i)
        for i in validate(_profile(setpoints={"nest01.heater.sp": 999.0}), summary_of(config))
    ]
    assert cloud == [
        "tunables.setpoints.nest01.heater.sp: 999.0 is outside the hard limits [120.0, 200.0]"
    ]


def test_set_points_gate_and_soft_limits_apply_export_and_diff(tmp_path: Path) -> None:
    from edgeos_protocol.profile import diff

    config = _config(tmp_path, inference=ACTING)
    assert summary_of(config).supports == (
        "setpoints", "gate", "guard.alpha", "guard.soft_limits", "deadbands", "scan_periods",
    )  # fmt: skip
    profile = _profile(
        setpoints={"nest01.heater.sp": 164.5, "nest02.heater.sp": 164.5},
        gate={"p_scrap": 0.6, "p_correct": 0.3},
        guard={"soft_limits": {"nest01.heater.sp": {"min": 155.0, "max": 172.0}}},
    )
    applied = apply_profile(config, profile)
    inf = applied.inference
    assert inf.setpoints == {"nest01.heater.sp": 164.5, "nest02.heater.sp": 164.5}
    assert (inf.gate.p_scrap, inf.gate.p_correct) == (0.6, 0.3)
    assert inf.guard.soft_limits["nest01.heater.sp"].max == 172.0
    assert inf.guard.alpha == config.inference.guard.alpha  # untouched
    before = {t.name: (t.limits, t.writable, t.max_rate) for t in config.all_tags}
    assert {t.name: (t.limits, t.writable, t.max_rate) for t in applied.all_tags} == before
    assert config.inference.setpoints == {}  # the file's config is not modified
    exported = export_profile(applied, name="line-a")
    assert exported.tunables.setpoints == profile.tunables.setpoints
    assert exported.tunables.gate == profile.tunables.gate
    assert exported.tunables.guard.soft_limits == profile.tunables.guard.soft_limits
    changes = {c.path: (c.old, c.new) for c in diff(export_profile(config), exported)}
    assert changes == {
        "setpoints.nest01.heater.sp": (None, 164.5),
        "setpoints.nest02.heater.sp": (None, 164.5),
        "gate.p_scrap": (None, 0.6),
        "gate.p_correct": (None, 0.3),
        "guard.soft_limits.nest01.heater.sp.min": (None, 155.0),
        "guard.soft_limits.nest01.heater.sp.max": (None, 172.0),
    }
    # Exported and applied again: the same configuration (a profile is an overlay).
    again = apply_profile(config, exported)
    assert again.inference == applied.inference


def test_the_gateway_refuses_recipe_tunables_it_would_not_honour(tmp_path: Path) -> None:
    (tmp_path / "off").mkdir()
    off = _config(tmp_path / "off")
    assert "setpoints" not in summary_of(off).supports  # the cloud refuses it already
    with pytest.raises(ProfileRefused, match="does not apply setpoints"):
        apply_profile(off, _profile(setpoints={"nest01.heater.sp": 164.5}))
    (tmp_path / "no-model").mkdir()
    idle = _config(tmp_path / "no-model", inference={"enabled": True})
    with pytest.raises(ProfileRefused, match="no correction model among the champions"):
        apply_profile(idle, _profile(setpoints={"nest01.heater.sp": 164.5}))
    config = _config(
        tmp_path,
        inference={
            **ACTING,
            "gate": {"p_scrap": 0.4},
            "guard": {"soft_limits": {"nest01.heater.sp": {"min": 150.0, "max": 165.0}}},
        },
    )
    assert config.inference.gate.p_scrap == 0.4
    for tunables, expected in (
        ({"setpoints": {"nest01.cure.sp": 25.0}}, "not a recipe set-point the guard writes"),
        # Inside the hard limits, outside the soft limits of the file (the cloud cannot see them).
        ({"setpoints": {"nest01.heater.sp": 168.0}}, "outside the soft limits in force"),
        ({"gate": {"p_correct": 0.45}}, "p_correct 0.45 must be below p_scrap 0.4"),
    ):
        with pytest.raises(ProfileRefused, match=expected):
            apply_profile(config, _profile(**tunables))
    # A profile that widens the file's soft limits (inside the hard ones) makes room for it.
    wider = _profile(
        setpoints={"nest01.heater.sp": 168.0},
        guard={"soft_limits": {"nest01.heater.sp": {"min": 150.0, "max": 170.0}}},
    )
    assert apply_profile(config, wider).inference.setpoints["nest01.heater.sp"] == 168.0


def test_the_operators_file_is_checked_by_the_same_rules(tmp_path: Path) -> None:
    from edgeos.errors import ConfigError

    with pytest.raises(ConfigError) as bad:
        _config(
            tmp_path,
            inference={
                "setpoints": {"nest01.heater.sp": 250.0, "nest01.heater.pv": 1.0},
                "guard": {"soft_limits": {"nest02.heater.sp": {"min": 100.0, "max": 170.0}}},
            },
        )
    text = str(bad.value)
    assert "inference.setpoints.nest01.heater.sp" in text and "hard limits" in text
    assert "inference.setpoints.nest01.heater.pv" in text and "not a writable tag" in text
    assert "inference.guard.soft_limits.nest02.heater.sp" in text


def _provisioned(tmp_path: Path, config_path: Path) -> SlotManager:
    root = tmp_path / "state" / "slots"
    slots = SlotManager(root, hardware=HARDWARE, config_check=bundle_check(config_path))
    full = build_stub_release(tmp_path)
    slots.provision(full)
    return slots


def _config_bundle(tmp_path: Path, profile: Profile | dict[str, object], version: str) -> Path:
    src = tmp_path / f"cfg-{version}" / "config"
    src.mkdir(parents=True)
    body = profile.canonical() if isinstance(profile, Profile) else json.dumps(profile).encode()
    (src / Path(PROFILE_FILE).name).write_bytes(body)
    return build_bundle("config", version, HARDWARE, BundleSources(config=src), tmp_path / "dist")


def test_a_profile_beyond_hard_limits_is_refused_by_the_installer_and_nothing_changes(
    tmp_path: Path,
) -> None:
    _config(tmp_path)
    slots = _provisioned(tmp_path, tmp_path / "edgeos.toml")
    before = slots.read_state()
    # Crafted past the cloud's check: a raw document that widens a hard limit, and one that
    # loosens the guard.
    for version, doc in (
        ("2", {"name": "x", "version": 2, "tunables": {"limits": {"nest01.heater.sp": [0, 900]}}}),
        ("3", _profile(guard={"alpha": 0.9})),
        ("4", _profile(setpoints={"nest01.heater.sp": 250.0})),
        ("5", _profile(guard={"soft_limits": {"nest01.heater.sp": {"min": 100.0, "max": 210.0}}})),
    ):
        with pytest.raises(Rejected) as refused:
            slots.install(_config_bundle(tmp_path, doc, version))
        assert refused.value.reason == Reason.PROFILE_REFUSED
        assert slots.read_state().trial is None
        assert slots.read_state().active == before.active
        assert not slots.slot_path("b").exists()
    assert "not inside the hard limits" in str(refused.value)


def test_a_fitting_profile_is_trialled_and_in_force_after_the_boot_check(tmp_path: Path) -> None:
    config = _config(tmp_path, ota={"enabled": False, "group": "line-a"})
    slots = _provisioned(tmp_path, tmp_path / "edgeos.toml")
    profile = _profile(guard={"alpha": 0.003}, scan_periods={"fast": 250.0})
    result = slots.install(_config_bundle(tmp_path, profile, "2"))
    assert result.restart_required and slots.read_state().trial == "b"
    slots.boot_check()  # what ExecStartPre does: current -> the trial slot
    eff = effective_config(config, config_path=tmp_path / "edgeos.toml")
    assert eff.refused is None and eff.profile == profile
    assert eff.config.inference.guard.alpha == 0.003
    summary = eff.summary()
    assert summary.profile is not None and summary.profile.sha256 == profile.digest()
    assert summary.guard.alpha_max == 0.005  # the ceiling is the file's, not the profile's
    assert summary.ota_group == "line-a" and summary.config_sha256


def test_a_config_trial_reports_the_config_bundles_version_to_its_campaign(
    tmp_path: Path,
) -> None:
    """A campaign waits for reports of the bundle it published; a config bundle is composed
    into a slot at the runtime's version, so the outcome names ``config:<version>``."""
    _config(tmp_path, ota={"enabled": False, "group": "line-a"})
    slots = _provisioned(tmp_path, tmp_path / "edgeos.toml")
    slots.install(_config_bundle(tmp_path, _profile(guard={"alpha": 0.003}), "2"))
    slots.boot_check()
    state = slots.commit()
    assert state.last_outcome is not None
    assert state.last_outcome["version"] == "config:2" and state.floors["config"] == "2"
    slots.install(_config_bundle(tmp_path, _profile(3, guard={"alpha": 0.002}), "3"))
    slots.boot_check()
    state = slots.fail_trial(Reason.HEALTH, "never healthy")
    assert state.last_outcome is not None
    assert (state.last_outcome["outcome"], state.last_outcome["version"]) == (
        "rolled_back",
        "config:3",
    )
    assert "config:3" in state.failed  # not offered again


def test_a_profile_that_no_longer_fits_the_file_is_not_applied(tmp_path: Path) -> None:
    config = _config(tmp_path)
    path = tmp_path / "state" / "slots" / "current" / PROFILE_FILE
    path.parent.mkdir(parents=True)
    path.write_bytes(_profile(guard={"alpha": 0.2}).canonical())
    eff = effective_config(config)
    assert eff.profile is None and eff.config is config
    assert eff.refused is not None and "tighten the guard" in eff.refused
    assert eff.summary().profile_refused == eff.refused


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgeos", "profile", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        check=False,
    )


def test_profile_commands_export_diff_and_check(tmp_path: Path) -> None:
    _config(tmp_path)
    cfg = str(tmp_path / "edgeos.toml")
    exported = _cli("export", "--config", cfg, "--offline", "--json", "--name", "line-a")
    assert exported.returncode == 0, exported.stderr
    a = parse_profile(exported.stdout)
    (tmp_path / "a.json").write_text(exported.stdout)
    b = _profile(guard={"alpha": 0.004}, scan_periods={"fast": 100.0, "default": 1000.0})
    (tmp_path / "b.json").write_bytes(b.canonical())
    d = _cli("diff", str(tmp_path / "a.json"), str(tmp_path / "b.json"))
    assert d.returncode == 1 and "guard.alpha: 0.005 -> 0.004" in d.stdout
    assert _cli("check", str(tmp_path / "b.json"), "--config", cfg).returncode == 0
    bad = _profile(guard={"alpha": 0.5})
    (tmp_path / "bad.json").write_bytes(bad.canonical())
    checked = _cli("check", str(tmp_path / "bad.json"), "--config", cfg, "--json")
    assert checked.returncode == 1 and json.loads(checked.stdout)["ok"] is False
    assert a.tunables.deadbands


@pytest.fixture
async def line() -> AsyncIterator[SimLine]:
    async with SimLine(SimOptions(nests=2, tags_per_nest=20, opcua_port=None, tick_hz=20)) as sim:
        yield sim


async def test_the_running_runtime_exports_its_profile_and_emits_its_summary_once(
    line: SimLine, tmp_path: Path
) -> None:
    config = _config(tmp_path, port=line.modbus_port)
    runtime = Runtime(config, config_path=tmp_path / "edgeos.toml")
    events = runtime._drain_events()
    summaries = [e for e in events if e["type"] == "config_summary"]
    assert len(summaries) == 1
    summary = parse_summary(summaries[0]["summary"])
    assert summary.tags["nest01.heater.sp"].limits is not None
    assert not [e for e in runtime._drain_events() if e["type"] == "config_summary"]
    task = asyncio.create_task(runtime.run())
    try:
        async with asyncio.timeout(20):
            await runtime.ready.wait()
        sock = tmp_path / "state" / "control.sock"
        doc = await asyncio.to_thread(request, sock, "profile.export", name="line-a", version=4)
        exported = parse_profile(doc)
        assert exported.version == 4 and exported.tunables.guard.alpha == 0.005
        live = await asyncio.to_thread(request, sock, "profile.summary")
        assert parse_summary(live).device == config.device.id
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


def test_config_summary_of_a_16000_tag_line_fits_one_receiver_event(tmp_path: Path) -> None:
    """The summary travels as one event; the receiver quarantines an event above its
    ``limits.max_event_bytes`` (64 KiB by default), which once cost a gateway its first batch."""
    import msgpack

    from edgeos.config import parse_config
    from edgeos.profile import summary_of
    from edgeos_protocol.profile import validate
    from edgeos_sim.configgen import render_tyre_line

    text = render_tyre_line(80, 200).replace('"/var/lib/edgeos"', f'"{tmp_path}"')
    config = parse_config(text)
    summary = summary_of(config)
    size = len(msgpack.packb(summary.model_dump(mode="json")))
    assert len(config.all_tags) >= 16_000
    assert size < 64 << 10, size
    # Every tag is still known by name: a deadband on a read-only tag validates, a typo does not.
    readonly = next(t.name for t in config.all_tags if not t.writable and t.derived is None)
    ok = Profile(name="p", version=1, tunables={"deadbands": {readonly: 0.5}})
    bad = Profile(name="p", version=1, tunables={"deadbands": {readonly + "x": 0.5}})
    supports = summary.model_copy(update={"supports": ("deadbands",)})
    assert validate(ok, supports) == []
    assert [i.path for i in validate(bad, supports)] == [f"tunables.deadbands.{readonly}x"]
