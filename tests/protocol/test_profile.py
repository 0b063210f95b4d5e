"""The profile format: tunables only, canonical, content-addressed, diffed, validated."""

from __future__ import annotations

import pytest

from edgeos_protocol.profile import (
    Bounds,
    GuardSummary,
    Profile,
    ProfileError,
    TagSummary,
    TargetSummary,
    diff,
    parse_profile,
    validate,
)


def _target(**overrides: object) -> TargetSummary:
    doc: dict[str, object] = {
        "device": "gw-b",
        "tags": {
            "n1.heater.sp": TagSummary(
                writable=True, limits=Bounds(min=120, max=200), scan_group="fast"
            ),
            "n1.heater.pv": TagSummary(scan_group="fast", deadband=0.2),
        },
        "scan_groups": {"default": 1000.0, "fast": 100.0},
        "guard": GuardSummary(enabled=True, alpha_max=0.01),
        "supports": (
            "setpoints",
            "gate",
            "guard.alpha",
            "guard.soft_limits",
            "deadbands",
            "scan_periods",
        ),
    }
    doc.update(overrides)
    return TargetSummary.model_validate(doc)


def _profile(**tunables: object) -> Profile:
    return parse_profile({"name": "line-a", "version": 3, "tunables": tunables})


@pytest.mark.parametrize(
    "tunables",
    [
        {"limits": {"n1.heater.sp": {"min": 0, "max": 500}}},
        {"guard": {"enabled": False}},
        {"tags": {"n1.heater.sp": {"writable": True}}},
        {"guard": {"hard_limits": {"n1.heater.sp": {"min": 0, "max": 500}}}},
    ],
)
def test_a_profile_cannot_carry_hard_limits_or_safety_settings(tunables: object) -> None:
    with pytest.raises(ProfileError, match="unknown key"):
        parse_profile({"name": "line-a", "version": 1, "tunables": tunables})


def test_canonical_form_and_content_address_are_stable() -> None:
    a = _profile(setpoints={"n1.heater.sp": 165.0}, deadbands={"n1.heater.pv": 0.5})
    b = parse_profile(a.canonical())
    assert b == a and b.digest() == a.digest()
    assert a.canonical().startswith(b'{"created":"","format":"edgeos-profile/1"')
    rolled = a.with_version(9)
    assert rolled.digest() != a.digest()
    assert rolled.tunables_digest() == a.tunables_digest()


def test_diff_lists_changed_tunables_by_key_path() -> None:
    a = _profile(setpoints={"n1.heater.sp": 160.0}, guard={"alpha": 0.005})
    b = _profile(setpoints={"n1.heater.sp": 165.0}, scan_periods={"fast": 200.0})
    assert [str(c) for c in diff(a, b)] == [
        "guard.alpha: 0.005 -> None",
        "scan_periods.fast: None -> 200.0",
        "setpoints.n1.heater.sp: 160.0 -> 165.0",
    ]
    assert diff(a, a) == []


def test_a_fitting_profile_validates_clean() -> None:
    profile = _profile(
        setpoints={"n1.heater.sp": 165.0},
        gate={"p_scrap": 0.6, "p_correct": 0.25},
        guard={"alpha": 0.004, "soft_limits": {"n1.heater.sp": {"min": 150, "max": 180}}},
        deadbands={"n1.heater.pv": 0.3},
        scan_periods={"fast": 200.0},
    )
    assert validate(profile, _target()) == []


def test_values_outside_the_targets_hard_limits_are_refused_with_key_paths() -> None:
    profile = _profile(
        setpoints={"n1.heater.sp": 230.0, "n1.heater.pv": 1.0, "nope": 1.0},
        guard={"alpha": 0.5, "soft_limits": {"n1.heater.sp": {"min": 100, "max": 180}}},
        deadbands={"missing.tag": 1.0},
        scan_periods={"slow": 5000.0},
    )
    issues = [str(i) for i in validate(profile, _target())]
    assert issues == [
        "tunables.guard.soft_limits.n1.heater.sp: [100.0, 180.0] is not inside the hard "
        "limits [120.0, 200.0]",
        "tunables.setpoints.n1.heater.pv: 'n1.heater.pv' is not a writable tag with hard limits",
        "tunables.setpoints.n1.heater.sp: 230.0 is outside the hard limits [120.0, 200.0]",
        "tunables.setpoints.nope: no tag 'nope' on gw-b",
        "tunables.guard.alpha: 0.5 is above gw-b's own alpha 0.01: a profile may tighten the "
        "guard, not loosen it",
        "tunables.deadbands.missing.tag: no tag 'missing.tag' on gw-b",
        "tunables.scan_periods.slow: no scan group 'slow' on gw-b",
    ]


def test_a_setpoint_outside_the_profiles_own_soft_limits_is_refused() -> None:
    profile = _profile(
        setpoints={"n1.heater.sp": 190.0},
        guard={"soft_limits": {"n1.heater.sp": {"min": 150, "max": 180}}},
    )
    assert [i.path for i in validate(profile, _target())] == ["tunables.setpoints.n1.heater.sp"]


def test_tunables_the_target_does_not_apply_are_refused() -> None:
    profile = _profile(setpoints={"n1.heater.sp": 165.0}, gate={"p_scrap": 0.6})
    issues = validate(profile, _target(supports=("deadbands",)))
    assert [i.path for i in issues] == ["tunables.setpoints", "tunables.gate"]
    assert "applies: deadbands" in issues[0].message


def test_inconsistent_gate_thresholds_do_not_parse() -> None:
    with pytest.raises(ProfileError, match="p_correct must be below p_scrap"):
        _profile(gate={"p_scrap": 0.2, "p_correct": 0.5})
