"""Rolling a winner out to its similarity group: canary first, automatic halt and rollback.

A winner is either a model version (it reaches gateways as a *challenger* in a ``models``
bundle, so each gateway's own champion/challenger rule and α-budget guard still protect its
line) or a configuration profile (a ``config`` bundle: health-gated trial, automatic rollback
on the gateway). A rollout is one staged :class:`~edgeos_cloud.ota.campaign.Campaign`:

1. ``canary`` — the canary gateways' channels (a canary needs an ``[ota] group`` of its own,
   else the stage would reach its neighbours too; refused otherwise);
2. ``group`` — every other member's channel.

:meth:`Rollouts.step` watches the canaries: the authenticated OTA reports the campaign holds
(``rolled_back``/``rejected`` halts at once, through the campaign itself), then the receiver's
``guard_settled``/``guard_decision`` events turned into tyres by the fleet evidence
(:func:`edgeos_cloud.fleet.evidence.tyres_of_device`). :func:`judge` compares each canary's
mean reward per tyre since the rollout started with the same gateway's before it (the champion
the winner replaced), and checks the α budget (Σ r ≥ (1 − α) Σ d) as the gateway's guard keeps
it: over the gateway's stored tyres, slack earned before the rollout included. Worse,
or a broken budget → the campaign is halted and the previous champion/profile is re-published
as a **new** version to the canaries (the gateways' version floor forbids going back by
number). Healthy with enough tyres → the campaign advances to the group. Every rollout is
recorded in ``<home>/rollouts/<name>.json`` (``edgeos-cloud fleet rollouts``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from edgeos_cloud.fleet.profiles import ProfileStore, build_profile_bundle, next_config_version
from edgeos_cloud.ota.campaign import Campaign, Stage
from edgeos_cloud.ota.repository import OtaRepository
from edgeos_protocol.fsutil import atomic_write_json, read_json
from edgeos_protocol.profile import Profile

__all__ = [
    "CanaryEvidence",
    "Judgement",
    "Rollout",
    "RolloutRefused",
    "Rollouts",
    "judge",
]

Kind = Literal["model", "profile"]
Status = Literal["canary", "group", "done", "halted"]
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")


class RolloutRefused(ValueError):
    """A rollout cannot start (targets refuse the profile, canaries share a channel, …)."""


@dataclass(frozen=True, slots=True)
class CanaryEvidence:
    """One canary's tyres: rewards before the rollout (the champion), after it (the winner)
    and the default policy's reward for the latter, as the gateway's budget counts it."""

    device: str
    before: Sequence[float]
    after: Sequence[float]
    after_default: Sequence[float]
    alpha: float
    #: The default policy's reward for the ``before`` tyres. Given, the budget is checked as the
    #: gateway's guard keeps it: over its whole history, slack earned before the rollout
    #: included; without it, over the rollout's tyres alone (stricter).
    before_default: Sequence[float] | None = None


@dataclass(frozen=True, slots=True)
class Judgement:
    verdict: Literal["wait", "healthy", "worse"]
    reason: str


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else math.nan


def judge(
    evidence: Sequence[CanaryEvidence], *, min_tyres: int = 20, margin: float = 0.0
) -> Judgement:
    """Worse as soon as any canary's α budget is broken, or, with ``min_tyres`` tyres since the
    rollout, its mean reward is below its champion's by more than ``margin``; healthy when every
    canary has ``min_tyres`` and is not worse; else wait. Pure."""
    waiting = []
    for ev in evidence:
        r, d, since = sum(ev.after), sum(ev.after_default), "since the rollout"
        if ev.before_default is not None and len(ev.before_default) == len(ev.before):
            # A window of a few tyres alone would halt a gateway whose guard spent slack it had
            # earned, within its budget (seen in tests/e2e/test_mtl_e2e.py).
            r, d, since = r + sum(ev.before), d + sum(ev.before_default), "over its history"
        if ev.after and r < (1.0 - ev.alpha) * d - 1e-9:
            return Judgement(
                "worse",
                f"{ev.device}: α budget broken {since} (Σr {r:.2f} < (1−{ev.alpha}) Σd {d:.2f})",
            )
        if len(ev.after) < min_tyres or not ev.before:
            waiting.append(ev.device)
            continue
        now, then = _mean(ev.after), _mean(ev.before)
        if now < then - margin:
            return Judgement(
                "worse",
                f"{ev.device}: mean reward {now:.3f} over {len(ev.after)} tyres, "
                f"champion {then:.3f} over {len(ev.before)}",
            )
    if waiting or not evidence:
        return Judgement("wait", f"too few tyres on {', '.join(waiting) or 'no canary'}")
    return Judgement("healthy", f"{len(evidence)} canary(ies) no worse than their champion")


@dataclass
class Rollout:
    name: str
    group: str
    kind: Kind
    #: ``task@version`` of a model winner, ``name@version`` of a profile.
    winner: str
    #: What it replaces (the rollback target).
    champion: str
    canaries: list[str]
    members: list[str]
    channels: dict[str, str]
    hardware: str
    target: str
    campaign: str
    started_us: int
    alpha: float
    status: Status = "canary"
    reason: str = ""
    rollback_target: str | None = None
    history: list[dict[str, Any]] = field(default_factory=list)

    def note(self, what: str, **details: Any) -> None:
        at = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        self.history.append({"at": at, "event": what, **details})


#: Publishes the previous champion again for a model rollback: ``(rollout) → target path``.
ModelRollback = Callable[[Rollout], str]
#: Turns a device's stored events into tyres (:func:`edgeos_cloud.fleet.evidence.tyres_of_device`).
TyreSource = Callable[[str], Sequence[Any]]


class Rollouts:
    """Start, watch and record rollouts (the files live under ``home``)."""

    def __init__(self, repo_dir: Path, home: Path, store: ProfileStore | None = None) -> None:
        self.repo = OtaRepository(repo_dir)
        self.home = Path(home)
        self.dir = self.home / "rollouts"
        self.store = store or ProfileStore(self.home)

    # ------------------------------------------------------------------ records

    def save(self, rollout: Rollout) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.dir / f"{rollout.name}.json", asdict(rollout))

    def load(self, name: str) -> Rollout:
        if not _NAME_RE.match(name):
            raise KeyError(name)
        return Rollout(**read_json(self.dir / f"{name}.json"))

    def all(self) -> list[Rollout]:
        if not self.dir.is_dir():
            return []
        return sorted(
            (self.load(p.stem) for p in self.dir.glob("*.json")), key=lambda r: r.started_us
        )

    def current(self, group: str) -> dict[str, str]:
        """The bundles the group's newest *completed* rollouts put in force, by kind
        (``{"models": target, "config": target}``): what bootstrap offers a new gateway."""
        found: dict[str, str] = {}
        for r in self.all():
            if r.group != group:
                continue
            kind = "models" if r.kind == "model" else "config"
            if r.status == "done":
                found[kind] = r.target
            elif r.status == "halted" and r.rollback_target and kind in found:
                found[kind] = r.rollback_target
        return found

    # ------------------------------------------------------------------ start

    def _channels(
        self, members: Sequence[str], canaries: Sequence[str], channels: Mapping[str, str] | None
    ) -> dict[str, str]:
        out: dict[str, str] = {}
        for device in members:
            if channels is not None and device in channels:
                out[device] = channels[device]
                continue
            summary = self.store.summary(device)
            if summary is None or not summary.ota_group:
                raise RolloutRefused(f"{device}: no config_summary with its [ota] group yet")
            out[device] = summary.ota_group
        canary_channels = {out[c] for c in canaries}
        shared = sorted(d for d in members if d not in canaries and out[d] in canary_channels)
        if shared:
            raise RolloutRefused(
                f"canary channel(s) {sorted(canary_channels)} also serve {shared}: "
                "give each canary an [ota] group of its own"
            )
        return out

    def _start(self, r: Rollout) -> Rollout:
        if not _NAME_RE.match(r.name) or (self.dir / f"{r.name}.json").exists():
            raise RolloutRefused(f"rollout {r.name!r} exists or is not a valid name")
        canary = sorted({r.channels[c] for c in r.canaries})
        rest = sorted({r.channels[d] for d in r.members if d not in r.canaries})
        # A config bundle is trialled and reported; a models bundle is live without a report.
        trialled = r.kind == "profile"
        stages = [Stage("canary", tuple(canary), 0.0, len(r.canaries) if trialled else 0)]
        if rest:
            stages.append(Stage("group", tuple(rest), 0.0, 1 if trialled else 0))
        campaign = Campaign.create(self.repo, r.campaign, r.target, stages)
        campaign.start()
        r.note("started", target=r.target, canary_channels=canary)
        self.save(r)
        return r

    def start_profile(
        self,
        group: str,
        profile: Profile,
        *,
        members: Sequence[str],
        canaries: Sequence[str],
        hardware: str,
        champion: Profile | None,
        now_us: int,
        alpha: float = 0.005,
        channels: Mapping[str, str] | None = None,
    ) -> Rollout:
        """Validate ``profile`` against every member's latest summary, build and publish its
        config bundle, and start the canary stage."""
        if not canaries or not set(canaries) <= set(members):
            raise RolloutRefused("canaries must be members of the group")
        chans = self._channels(members, canaries, channels)
        version = next_config_version(self.repo.published(), hardware)
        work = self.home / "work"
        try:
            bundle = build_profile_bundle(
                self.store, profile, members, hardware=hardware, version=version, out_dir=work
            )
        except ValueError as exc:
            raise RolloutRefused(str(exc)) from exc
        published = self.repo.publish(bundle)
        bundle.unlink(missing_ok=True)
        name = f"{group}-profile-{profile.name}-{profile.version}"
        return self._start(
            Rollout(
                name=name,
                group=group,
                kind="profile",
                winner=f"{profile.name}@{profile.version}",
                champion="" if champion is None else f"{champion.name}@{champion.version}",
                canaries=list(canaries),
                members=list(members),
                channels=chans,
                hardware=hardware,
                target=published.target_path,
                campaign=name,
                started_us=now_us,
                alpha=alpha,
            )
        )

    def start_model(
        self,
        group: str,
        *,
        winner: str,
        champion: str,
        target: str,
        members: Sequence[str],
        canaries: Sequence[str],
        hardware: str,
        now_us: int,
        alpha: float = 0.005,
        channels: Mapping[str, str] | None = None,
    ) -> Rollout:
        """Start the canary stage of an already published ``models`` bundle (``target``,
        e.g. from :func:`edgeos_cloud.models.publish.publish_version`'s bundle): gateways load
        every model of it as a challenger."""
        if not canaries or not set(canaries) <= set(members):
            raise RolloutRefused("canaries must be members of the group")
        chans = self._channels(members, canaries, channels)
        name = f"{group}-model-{re.sub(r'[^A-Za-z0-9_.-]', '-', winner)}"
        return self._start(
            Rollout(
                name=name,
                group=group,
                kind="model",
                winner=winner,
                champion=champion,
                canaries=list(canaries),
                members=list(members),
                channels=chans,
                hardware=hardware,
                target=target,
                campaign=name,
                started_us=now_us,
                alpha=alpha,
            )
        )

    # ------------------------------------------------------------------ watch

    def evidence(
        self, r: Rollout, tyres_of: TyreSource, devices: Sequence[str]
    ) -> list[CanaryEvidence]:
        out = []
        for device in devices:
            tyres = list(tyres_of(device))
            before = [t for t in tyres if not self._under_winner(r, t)]
            after = [t for t in tyres if self._under_winner(r, t)]
            out.append(
                CanaryEvidence(
                    device,
                    [t.reward for t in before],
                    [t.reward for t in after],
                    [t.default_reward for t in after],
                    r.alpha,
                    [t.default_reward for t in before],
                )
            )
        return out

    @staticmethod
    def _under_winner(r: Rollout, tyre: Any) -> bool:
        """Made since the rollout started — and, for a profile, under the winner's profile: a
        config bundle takes effect only when the gateway restarts into its trial slot, and the
        tyres it made under its old profile in between are its champion's, not the winner's
        (counted as such, a fresh batch in that gap halted a healthy canary in
        tests/e2e/test_mtl_profile_e2e.py). Tyres without a profile (tests) go by time alone."""
        if tyre.ts_us < r.started_us:
            return False
        profile = getattr(tyre, "profile", None)
        return r.kind != "profile" or profile is None or profile == r.winner

    def step(
        self,
        name: str,
        tyres_of: TyreSource,
        *,
        min_tyres: int = 20,
        margin: float = 0.0,
        model_rollback: ModelRollback | None = None,
    ) -> Rollout:
        """One watch step (idempotent; run it from a timer): halt + roll back, advance, or wait."""
        r = self.load(name)
        if r.status in ("done", "halted"):
            return r
        campaign = Campaign(self.repo, r.campaign)
        summary = campaign.summary()
        failed = {d: v for d, v in summary["devices"].items() if v["outcome"] != "committed"}
        if summary["status"] == "halted" or failed:
            reason = summary["halted_reason"] or f"OTA failures: {sorted(failed)}"
            return self._halt(r, campaign, f"campaign halted: {reason}", model_rollback)
        watched = r.canaries if r.status == "canary" else r.members
        judgement = judge(self.evidence(r, tyres_of, watched), min_tyres=min_tyres, margin=margin)
        if judgement.verdict == "worse":
            return self._halt(r, campaign, judgement.reason, model_rollback)
        committed = {d for d, v in summary["devices"].items() if v["outcome"] == "committed"}
        # A config bundle is trialled on the gateway: its stage waits for the commits too.
        if judgement.verdict == "healthy" and (r.kind == "model" or set(watched) <= committed):
            status = campaign.advance()
            r.status = "done" if status == "done" else "group"
            r.reason = judgement.reason
            r.note("advanced", to=r.status, reason=judgement.reason)
            self.save(r)
        return r

    def _halt(
        self, r: Rollout, campaign: Campaign, reason: str, model_rollback: ModelRollback | None
    ) -> Rollout:
        campaign.halt(reason)
        r.status, r.reason = "halted", reason
        canary_channels = sorted({r.channels[c] for c in r.canaries})
        if r.kind == "profile" and r.champion:
            prev_name, _, prev_version = r.champion.partition("@")
            previous = self.store.version(prev_name, int(prev_version))
            again = previous.with_version(self.store.next_version(prev_name))
            version = next_config_version(self.repo.published(), r.hardware)
            bundle = build_profile_bundle(
                self.store,
                again,
                r.canaries,
                hardware=r.hardware,
                version=version,
                out_dir=self.home / "work",
            )
            published = self.repo.publish(bundle)
            bundle.unlink(missing_ok=True)
            self.repo.set_channels(canary_channels, published.target_path)
            r.rollback_target = published.target_path
            r.note("rolled back", profile=f"{again.name}@{again.version}", of=r.champion)
        elif r.kind == "model" and model_rollback is not None:
            target = model_rollback(r)
            self.repo.set_channels(canary_channels, target)
            r.rollback_target = target
            r.note("rolled back", target=target, of=r.champion)
        r.note("halted", reason=reason)
        self.save(r)
        return r
