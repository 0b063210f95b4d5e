"""Configuration profiles on the gateway: export, check, apply, and the config summary.

The operator's file (``/etc/edgeos/edgeos.toml``) is the only source of hard limits, safety
settings and identity. A profile (:mod:`edgeos_protocol.profile`) is an overlay of tunables
that arrives in a ``config`` bundle as ``config/profile.json`` and sits in the active A/B slot.
At start the runtime loads the file, re-validates the slot's profile against it
(:func:`effective_config`) and applies it; a profile that no longer fits is not applied (the
file alone is always safe) and the refusal is reported in the summary. Before that, the OTA
installer has already refused such a bundle (:func:`bundle_check`): nothing changes on the
device, the refusal is recorded with reason ``profile_refused`` and reported to the campaign.

This gateway applies every tunable of the format (:data:`SUPPORTS`):

* ``guard.alpha`` — at most the file's α: a profile tightens the guard, never loosens it;
* ``setpoints`` — the **default recipe** of a station's set-point (``nest01.heater.sp``): the
  guard's default for that tag instead of the correction manifest's ``[baseline]``. It reaches
  the press the way every default does: written by the guard at the station's *next load*
  (checked against the hard limits and ``max_rate``, ramped when the step is larger than the
  rate allows, recorded by the twin), never in the middle of a cure — a tyre is cured with one
  recipe, and the budget accounts it by the recipe read back at its cure start. So set-points
  need the engine that writes them: ``[inference] enabled`` with the tag's station among the
  engine's stations and a recipe suffix (``heater.sp``, ``press.sp``); a set-point the runtime
  would never write is refused rather than reported as in force;
* ``gate`` — ``p_scrap`` / ``p_correct`` instead of the quality manifest's thresholds (they
  stay in force across a promotion);
* ``guard.soft_limits`` — bounds for *learned* set-points inside the hard limits (a proposal
  outside them takes the default recipe; :mod:`edgeos.inference.guard`);
* per-tag ``deadbands`` and ``scan_periods``.

The profile overlays the file: what it names replaces the file's value (``[inference]
setpoints``, ``[inference.gate]``, ``[inference.guard] soft_limits`` are the file's own), what it
does not name keeps it. The result is checked again as a whole: a set-point outside the soft
limits in force, or a ``p_correct`` not below the ``p_scrap`` in force, refuses the profile.

Commands::

    edgeos profile export [--config FILE] [--offline] [--json] [--name N] [--version V]
    edgeos profile diff A.json B.json [--json]
    edgeos profile check PROFILE.json --config FILE [--json]
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from edgeos.config import Config, GateConfig, SoftLimits, load_config
from edgeos.config_models import RECIPE_SUFFIXES
from edgeos.errors import ConfigError
from edgeos_protocol.fleet import PROFILE_EVENT, fingerprint_of, fingerprint_report
from edgeos_protocol.outcome import Reason, Rejected
from edgeos_protocol.profile import (
    EVENT_TYPE,
    PROFILE_FILE,
    TUNABLE_KINDS,
    Bounds,
    GateTunables,
    GuardSummary,
    GuardTunables,
    Issue,
    Profile,
    ProfileError,
    ProfileInForce,
    TagSummary,
    TargetSummary,
    Tunables,
    diff,
    group_names,
    parse_profile,
    validate,
)

__all__ = [
    "SUPPORTS",
    "Effective",
    "ProfileRefused",
    "apply_profile",
    "bundle_check",
    "effective_config",
    "export_profile",
    "main",
    "summary_of",
]

log = logging.getLogger("edgeos.profile")

#: The tunable kinds this gateway applies (all of :data:`edgeos_protocol.profile.TUNABLE_KINDS`).
SUPPORTS = TUNABLE_KINDS
_NO_ENGINE_SUPPORTS = tuple(k for k in SUPPORTS if k != "setpoints")


class ProfileRefused(ValueError):
    """A profile does not fit this gateway's own configuration."""

    def __init__(self, issues: Sequence[Issue]) -> None:
        self.issues = list(issues)
        super().__init__("; ".join(str(i) for i in issues))


def _file_sha256(path: Path | None) -> str:
    if path is None:
        return ""
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return ""


def summary_of(
    config: Config,
    *,
    config_path: Path | None = None,
    profile: Profile | None = None,
    refused: str | None = None,
) -> TargetSummary:
    """What this gateway reports about its configuration (``config`` = the operator's file)."""
    tags = {}
    others = []
    for tag in config.all_tags:
        if tag.derived is not None:
            continue
        if not tag.writable:
            others.append(tag.name)
            continue
        limits = Bounds(min=tag.limits.min, max=tag.limits.max) if tag.limits else None
        tags[tag.name] = TagSummary(
            scan_group=tag.scan_group,
            deadband=tag.deadband,
            writable=tag.writable,
            limits=limits,
        )
    guard = config.inference.guard
    in_force = (
        ProfileInForce(name=profile.name, version=profile.version, sha256=profile.digest())
        if profile is not None
        else None
    )
    return TargetSummary(
        device=config.device.id,
        hardware=config.device.hardware,
        ota_group=config.ota.group,
        config_sha256=_file_sha256(config_path),
        tags=tags,
        other_tags=group_names(others),
        scan_groups={g.name: g.period_ms for g in config.scan_groups},
        guard=GuardSummary(enabled=guard.enabled, alpha_max=guard.alpha),
        # Without inference nothing writes a default recipe: the cloud learns it from here.
        supports=SUPPORTS if config.inference.enabled else _NO_ENGINE_SUPPORTS,
        profile=in_force,
        profile_refused=refused,
    )


def export_profile(
    config: Config, *, name: str = "", version: int = 1, source: str | None = None
) -> Profile:
    """The tunables of ``config`` as a profile: α, every scan period, non-zero deadbands.

    A profile is an overlay: what it does not name keeps the target's own value, so tags at
    the default deadband 0 are left out (a 16,000-tag line exports only what was tuned).
    """
    deadbands = {
        t.name: t.deadband for t in config.all_tags if t.derived is None and t.deadband > 0
    }
    inference = config.inference
    soft = {name: Bounds(min=b.min, max=b.max) for name, b in inference.guard.soft_limits.items()}
    return Profile(
        name=name or config.ota.group or config.device.id,
        version=version,
        source=source if source is not None else config.device.id,
        created=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        tunables=Tunables(
            setpoints=dict(inference.setpoints),
            gate=GateTunables(p_scrap=inference.gate.p_scrap, p_correct=inference.gate.p_correct),
            guard=GuardTunables(alpha=inference.guard.alpha, soft_limits=soft),
            deadbands=deadbands,
            scan_periods={g.name: g.period_ms for g in config.scan_groups},
        ),
    )


def _acting_model(config: Config) -> bool:
    """Is a correction model configured as a champion (the engine's guard writes recipes)?

    A manifest that does not read counts as one: the engine refuses to start on it anyway, and
    that is the error to see, not a profile refusal."""
    from edgeos_protocol.manifest import ManifestError, load_manifest

    for ref in config.inference.models:
        if ref.role != "champion":
            continue
        try:
            if load_manifest(ref.manifest).task == "correction":
                return True
        except (ManifestError, OSError):
            return True
    return False


def _recipe_issues(config: Config, profile: Profile) -> list[Issue]:
    """What only this gateway can check: the overlay as a whole, and that the runtime would
    really write each set-point (see the module docs)."""
    issues: list[Issue] = []
    t = profile.tunables
    inference = config.inference
    if t.setpoints:
        from edgeos.inference_runtime import find_stations

        stations = set(find_stations(config)) if inference.enabled else set()
        if stations and not _acting_model(config):
            issues.append(
                Issue(
                    "tunables.setpoints",
                    "no correction model among the champions: nothing writes a default recipe",
                )
            )
        for name in sorted(t.setpoints):
            station, _, suffix = name.partition(".")
            if station not in stations or suffix not in RECIPE_SUFFIXES:
                issues.append(
                    Issue(
                        f"tunables.setpoints.{name}",
                        f"not a recipe set-point the guard writes "
                        f"(<station>.{'|'.join(RECIPE_SUFFIXES)} of a station the engine runs)",
                    )
                )
    soft: dict[str, SoftLimits | Bounds] = {**inference.guard.soft_limits, **t.guard.soft_limits}
    for name, value in sorted({**inference.setpoints, **t.setpoints}.items()):
        bounds = soft.get(name)
        if bounds is not None and not bounds.min <= value <= bounds.max:
            issues.append(
                Issue(
                    f"tunables.setpoints.{name}",
                    f"{value} is outside the soft limits in force [{bounds.min}, {bounds.max}]",
                )
            )
    p_scrap = t.gate.p_scrap if t.gate.p_scrap is not None else inference.gate.p_scrap
    p_correct = t.gate.p_correct if t.gate.p_correct is not None else inference.gate.p_correct
    if p_scrap is not None and p_correct is not None and not p_correct < p_scrap:
        issues.append(
            Issue("tunables.gate", f"p_correct {p_correct} must be below p_scrap {p_scrap}")
        )
    return issues


def apply_profile(config: Config, profile: Profile) -> Config:
    """``config`` with ``profile``'s tunables in force; raises :class:`ProfileRefused`.

    Validates first, against ``config`` itself (tags, hard limits, α ceiling, supported
    kinds), so nothing outside the tunables can change.
    """
    issues = validate(profile, summary_of(config)) or _recipe_issues(config, profile)
    if issues:
        raise ProfileRefused(issues)
    t = profile.tunables
    update: dict[str, Any] = {}
    if t.scan_periods:
        update["scan_groups"] = [
            g.model_copy(update={"period_ms": t.scan_periods.get(g.name, g.period_ms)})
            for g in config.scan_groups
        ]
    inference = config.inference
    guard_update: dict[str, Any] = {}
    if t.guard.alpha is not None:
        guard_update["alpha"] = t.guard.alpha
    if t.guard.soft_limits:
        soft = {n: SoftLimits(min=b.min, max=b.max) for n, b in t.guard.soft_limits.items()}
        guard_update["soft_limits"] = {**inference.guard.soft_limits, **soft}
    inference_update: dict[str, Any] = {}
    if guard_update:
        inference_update["guard"] = inference.guard.model_copy(update=guard_update)
    if t.setpoints:
        inference_update["setpoints"] = {**inference.setpoints, **t.setpoints}
    if t.gate.p_scrap is not None or t.gate.p_correct is not None:
        inference_update["gate"] = GateConfig(
            p_scrap=t.gate.p_scrap if t.gate.p_scrap is not None else inference.gate.p_scrap,
            p_correct=(
                t.gate.p_correct if t.gate.p_correct is not None else inference.gate.p_correct
            ),
        )
    if inference_update:
        update["inference"] = inference.model_copy(update=inference_update)
    tags = config.all_tags
    if t.deadbands:
        tags = tuple(
            dataclasses.replace(tag, deadband=t.deadbands[tag.name])
            if tag.name in t.deadbands
            else tag
            for tag in tags
        )
    applied = config.model_copy(update=update)
    # The runtime records are built once by the loader; the overlay only changes deadbands.
    applied._all_tags = tags
    return applied


@dataclass
class Effective:
    """The configuration the runtime runs: the file plus the active slot's profile (if it fits)."""

    config: Config
    base: Config
    profile: Profile | None = None
    refused: str | None = None
    config_path: Path | None = None
    _sent: bool = field(default=False, repr=False)

    def summary(self) -> TargetSummary:
        return summary_of(
            self.base, config_path=self.config_path, profile=self.profile, refused=self.refused
        )

    def drain_events(self) -> list[dict[str, Any]]:
        """The ``config_summary`` event, once per start (an uplink event source)."""
        if self._sent:
            return []
        self._sent = True
        events = [{"type": EVENT_TYPE, "summary": self.summary().model_dump(mode="json")}]
        if self.profile is not None:
            # The fleet evidence attributes each tyre to the profile in force.
            key = f"{self.profile.name}@{self.profile.version}"
            events.append({"type": PROFILE_EVENT, "profile": key})
        return events

    def export(self, *, name: str = "", version: int = 1) -> Profile:
        return export_profile(self.config, name=name, version=version)


@dataclass
class FingerprintReport:
    """The ``fleet_fingerprint`` event, once per start (an uplink event source), next to the
    ``config_summary``: the equipment templates' tag names, the input contracts of the models
    the engine loaded and the hardware target (:func:`edgeos_protocol.fleet.fingerprint_of`),
    with the champion versions in force as ``versions`` (docs/fleet.md). ``models`` yields
    ``(role, loaded model)`` like the engine's registry; it is read at the first drain, when the
    engine has loaded its configured models."""

    config: Config
    models: Iterable[tuple[str, Any]]
    now: Callable[[], float]
    _sent: bool = field(default=False, repr=False)

    def drain_events(self) -> list[dict[str, Any]]:
        if self._sent:
            return []
        self._sent = True
        loaded = list(self.models)
        # Champions first: a task's contract is its champion's (fingerprint_of keeps the first).
        loaded.sort(key=lambda rm: rm[0] != "champion")
        fp = fingerprint_of(
            templates={n: [t.name for t in tpl.tags] for n, tpl in self.config.templates.items()},
            manifests=[m.manifest for _, m in loaded],
            hardware=self.config.device.hardware,
        )
        versions = {m.manifest.task: m.manifest.key for role, m in loaded if role == "champion"}
        return [fingerprint_report(fp, ts=self.now(), versions=versions)]


def ota_root(config: Config) -> Path:
    root = config.ota.slots_dir
    return root if root.is_absolute() else config.device.state_dir / root


def active_profile_path(config: Config) -> Path:
    return ota_root(config) / "current" / PROFILE_FILE


def effective_config(config: Config, *, config_path: Path | None = None) -> Effective:
    """Apply the active slot's ``config/profile.json`` to ``config`` when it fits."""
    path = active_profile_path(config)
    if not path.is_file():
        return Effective(config, config, config_path=config_path)
    try:
        profile = parse_profile(path.read_bytes())
        return Effective(apply_profile(config, profile), config, profile, None, config_path)
    except (OSError, ProfileError, ProfileRefused) as exc:
        # The file alone is always safe: run it, and say so in the summary and the journal.
        log.error("profile in %s not applied: %s", path, exc)
        return Effective(config, config, None, str(exc)[:500], config_path)


def bundle_check(config_path: Path) -> Callable[[Path], None]:
    """The OTA installer's hook: refuse a config bundle whose profile does not fit this file.

    Called with the unpacked bundle (before any slot is touched); the configuration is read
    from the file at that moment, so an operator's edit since the last start counts.
    """

    def check(unpacked: Path) -> None:
        path = unpacked / PROFILE_FILE
        if not path.exists():
            return
        try:
            config = load_config(config_path, check_drivers=False)
        except ConfigError as exc:
            raise Rejected(Reason.PROFILE_REFUSED, f"own configuration unreadable: {exc}") from exc
        try:
            apply_profile(config, parse_profile(path.read_bytes()))
        except (ProfileError, ProfileRefused) as exc:
            raise Rejected(Reason.PROFILE_REFUSED, str(exc)[:1500]) from exc

    return check


# --------------------------------------------------------------------------- command line

EXIT_OK, EXIT_REFUSED, EXIT_USAGE = 0, 1, 2


def _read_profile(path: str) -> Profile:
    try:
        return parse_profile(Path(path).read_bytes())
    except OSError as exc:
        raise SystemExit(f"edgeos profile: cannot read {path}: {exc.strerror}") from exc
    except ProfileError as exc:
        print(f"{path}: not a profile — {len(exc.issues)} error(s):", file=sys.stderr)
        for issue in exc.issues:
            print(f"  {issue}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE) from exc


def _load(path: str) -> Config:
    try:
        return load_config(path, check_drivers=False)
    except ConfigError as exc:
        print(f"{path}: invalid — {exc}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE) from exc


def _cmd_export(args: argparse.Namespace) -> int:
    doc: dict[str, Any] | None = None
    config = _load(args.config)
    if not args.offline:
        from edgeos.control import ControlError, request

        sock = config.control.socket
        sock = sock if sock.is_absolute() else config.device.state_dir / sock
        try:
            doc = request(sock, "profile.export", name=args.name, version=args.version)
        except ControlError:
            doc = None  # not running: the file (and the active slot's profile) say the same
    if doc is None:
        eff = effective_config(config, config_path=Path(args.config))
        doc = eff.export(name=args.name, version=args.version).model_dump(mode="json")
    profile = parse_profile(doc)
    if args.json:
        sys.stdout.write(profile.canonical().decode() + "\n")
    else:
        print(json.dumps(profile.model_dump(mode="json"), indent=2))
    return EXIT_OK


def _cmd_diff(args: argparse.Namespace) -> int:
    a, b = _read_profile(args.a), _read_profile(args.b)
    changes = diff(a, b)
    if args.json:
        print(json.dumps([{"path": c.path, "old": c.old, "new": c.new} for c in changes]))
    else:
        for change in changes:
            print(change)
        if not changes:
            print("no differences in the tunables")
    return EXIT_OK if not changes else EXIT_REFUSED


def _cmd_check(args: argparse.Namespace) -> int:
    profile = _read_profile(args.profile)
    config = _load(args.config)
    issues = validate(profile, summary_of(config))
    if args.json:
        print(json.dumps({"ok": not issues, "issues": [str(i) for i in issues]}))
    elif issues:
        print(f"{args.profile}: refused for {config.device.id} — {len(issues)} issue(s):")
        for issue in issues:
            print(f"  {issue}")
    else:
        print(f"{args.profile}: fits {config.device.id}")
    return EXIT_OK if not issues else EXIT_REFUSED


def main(argv: Sequence[str]) -> int:
    """``edgeos profile …``: 0 ok, 1 refused / different, 2 usage or unreadable input."""
    parser = argparse.ArgumentParser(prog="edgeos profile", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    export = sub.add_parser("export", help="the tunables of this gateway as a profile")
    export.add_argument("--config", default="/etc/edgeos/edgeos.toml")
    export.add_argument(
        "--offline", action="store_true", help="read the file, do not ask the running runtime"
    )
    export.add_argument("--name", default="", help="profile family (default: the ota group)")
    export.add_argument("--version", type=int, default=1)
    export.add_argument("--json", action="store_true", help="canonical JSON on one line")
    export.set_defaults(func=_cmd_export)
    d = sub.add_parser("diff", help="tunables that differ between two profiles")
    d.add_argument("a")
    d.add_argument("b")
    d.add_argument("--json", action="store_true")
    d.set_defaults(func=_cmd_diff)
    check = sub.add_parser("check", help="does a profile fit this gateway's configuration?")
    check.add_argument("profile")
    check.add_argument("--config", default="/etc/edgeos/edgeos.toml")
    check.add_argument("--json", action="store_true")
    check.set_defaults(func=_cmd_check)
    args = parser.parse_args(list(argv)[1:] if argv and argv[0] == "profile" else list(argv))
    result: int = args.func(args)
    return result
